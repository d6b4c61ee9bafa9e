"""COIN-OR CBC through python-mip (>= 2.0): ``pip install lloptim[cbc]``.

python-mip has no matrix loader, so the model is added in as few calls as its API allows: one
``add_vars`` per run of columns that share bounds, type and cost (two calls for the bin packing),
then one ``add_constr`` per row built from the CSR slices (``LinExpr`` from parallel lists, no
per-term arithmetic). CBC is memory-hungry on large assignment models (measured: 9.6 GiB at 264k
binaries), so :meth:`CbcBackend.estimate_mem_mb` lets the pipeline refuse what cannot fit.
"""

from __future__ import annotations

import numpy as np

from lloptim.formulations.model import LinearModel
from lloptim.solvers.registry import Backend, Capabilities, register_backend
from lloptim.solvers.result import Limit, Termination

__all__ = ["CbcBackend", "CBC_MB_PER_INTEGER"]

#: CBC's memory per integer column, MiB (about 0.037 MiB): 9.6 GiB measured for the 264k binaries
#: of a 1319-request x 200-client bin packing; used by :meth:`CbcBackend.estimate_mem_mb`.
CBC_MB_PER_INTEGER = 9.6 * 1024 / 264_000


def _runs(model: LinearModel) -> list[tuple[int, int]]:
    """Maximal runs of consecutive columns with equal (lo, hi, integer, cost)."""
    key = np.column_stack([model.col_lo, model.col_hi, model.integrality.astype(np.float64), model.c])
    change = np.flatnonzero(np.any(key[1:] != key[:-1], axis=1)) + 1
    edges = np.r_[0, change, model.n_cols]
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


class CbcBackend(Backend):
    """CBC branch and cut via python-mip, with MIP start and proven bound."""

    name = "cbc"
    description = "COIN-OR CBC via python-mip (bulk add_vars, MIP start, objective_bound)"
    capabilities = Capabilities(supports_mip=True, supports_time_limit=True, supports_mip_start=True,
                                needs_package="mip", pip_extra="cbc")
    formulations = ("binpacking", "full_mip")

    def estimate_mem_mb(self, model: LinearModel) -> float:
        """``38 KiB`` (9.6 GiB measured at 264k binaries) per integer column plus ``0.5 KiB`` per non-zero plus 150 MiB, MiB."""
        return 150.0 + CBC_MB_PER_INTEGER * model.n_integer + model.nnz / 2048.0

    def solve_model(self, model, x_start, params):
        """Solve ``model`` with CBC through python-mip.

        Parameters
        ----------
        model : LinearModel
            The model (objective in seconds for every lloptim formulation).
        x_start : numpy.ndarray or None
            A column vector of ``model``, shape ``(n_cols,)``, given to CBC as its MIP start (its
            non-zero entries); None: no start.
        params : SolveParams
            ``time_limit_s`` (seconds) becomes ``optimize(max_seconds=...)``, ``rel_gap`` becomes
            ``max_mip_gap``, and ``seed``, ``threads`` and ``verbose`` the model's attributes of the
            same names; each ``solver_options`` entry (except ``max_mem_mb``) sets the
            ``mip.Model`` attribute of that name.

        Returns
        -------
        Outcome
            ``x`` when CBC found a solution, its objective and ``objective_bound`` (seconds), the
            termination (a stop with or without a solution reads as ``FEASIBLE`` with
            ``Limit.TIME``) and ``extra["cbc_status"]``.

        Raises
        ------
        SolverError
            A ``solver_options`` key that is not an attribute of ``mip.Model``.
        """
        import mip

        from lloptim.solvers.base import Outcome

        m = mip.Model(sense=mip.MINIMIZE if model.sense == "min" else mip.MAXIMIZE, solver_name="CBC")
        m.verbose = 1 if params.verbose else 0
        m.seed = int(params.seed)
        if params.threads is not None:
            m.threads = int(params.threads)
        m.max_mip_gap = params.rel_gap
        for k, v in params.solver_options.items():
            if k == "max_mem_mb":
                continue
            if not hasattr(m, k):
                from lloptim.errors import SolverError

                raise SolverError(f"cbc: unknown option {k!r} (use an attribute of mip.Model, e.g. 'cuts')")
            setattr(m, k, v)
        big = lambda v: mip.INF if not np.isfinite(v) else float(v)  # noqa: E731
        xs: list = []
        for lo, hi in _runs(model):
            integer = bool(model.integrality[lo])
            vt = mip.BINARY if integer and model.col_lo[lo] == 0 and model.col_hi[lo] == 1 else (
                mip.INTEGER if integer else mip.CONTINUOUS)
            xs += m.add_vars(hi - lo, lb=-mip.INF if model.col_lo[lo] == -np.inf else float(model.col_lo[lo]),
                             ub=big(model.col_hi[lo]), obj=float(model.c[lo]), var_type=vt)
        A = model.A
        ind, val, ptr = A.indices.tolist(), A.data.tolist(), A.indptr.tolist()
        for i in range(model.n_rows):
            vs = [xs[j] for j in ind[ptr[i]:ptr[i + 1]]]
            cs = val[ptr[i]:ptr[i + 1]]
            lo, hi = model.row_lo[i], model.row_hi[i]
            if lo == hi:
                m.add_constr(mip.LinExpr(vs, cs, -float(lo), sense=mip.EQUAL))
                continue
            if np.isfinite(hi):
                m.add_constr(mip.LinExpr(vs, cs, -float(hi), sense=mip.LESS_OR_EQUAL))
            if np.isfinite(lo):
                m.add_constr(mip.LinExpr(vs, cs, -float(lo), sense=mip.GREATER_OR_EQUAL))
        if x_start is not None:
            nz = np.flatnonzero(np.asarray(x_start) != 0)
            m.start = [(xs[j], float(x_start[j])) for j in nz.tolist()]
        status = m.optimize(max_seconds=params.time_limit_s if params.time_limit_s is not None else mip.INF)
        S = mip.OptimizationStatus
        x = None
        if m.num_solutions > 0:
            x = np.array([v.x for v in xs], dtype=np.float64)
        bound = m.objective_bound
        bound = float(bound) if bound is not None and np.isfinite(bound) and abs(bound) < 1e30 else None
        if status == S.OPTIMAL:
            term, limit = Termination.OPTIMAL, Limit.NONE
        elif status == S.INFEASIBLE:
            term, limit = Termination.INFEASIBLE, Limit.NONE
        elif status in (S.FEASIBLE, S.NO_SOLUTION_FOUND):
            term, limit = Termination.FEASIBLE, Limit.TIME
        else:
            term, limit = Termination.ERROR, Limit.NONE
        obj = float(m.objective_value) if x is not None and m.objective_value is not None else None
        return Outcome(x=x, objective=obj, bound=bound, termination=term, limit=limit,
                       extra={"cbc_status": status.name})


register_backend(CbcBackend())
