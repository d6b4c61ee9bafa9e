"""cvxpy's MILP path (``pip install lloptim[cvxpy]``), solved by whatever MILP solver cvxpy finds.

The :class:`~lloptim.formulations.model.LinearModel` becomes two cvxpy variables (integer and
continuous columns, with their bounds as variable attributes) and three matrix constraints
(equality, ``<=`` and ``>=`` rows): no per-variable Python objects. Caveats handled here:

* cvxpy ignores ``Variable.value`` as a MIP start for HiGHS, so no start is passed
  (``supports_mip_start=False``); the pipeline's greedy incumbent remains the fallback;
* a HiGHS time-out without an incumbent comes back as ``user_limit`` with a meaningless vector: the
  pipeline's feasibility check rejects it and keeps the incumbent;
* canonicalization is memory-hungry (:meth:`CvxpyBackend.estimate_mem_mb`).
"""

from __future__ import annotations

import warnings

import numpy as np

from lloptim.errors import SolverError
from lloptim.formulations.model import LinearModel
from lloptim.solvers.registry import Backend, Capabilities, register_backend
from lloptim.solvers.result import Limit, Termination

__all__ = ["CvxpyBackend"]


def _milp_solver(cp) -> str:
    for name in ("HIGHS", "SCIP", "GLPK_MI", "CBC", "GUROBI", "CPLEX", "XPRESS"):
        if name in cp.installed_solvers():
            return name
    raise SolverError("cvxpy: no MILP solver is installed (fix: pip install highspy)")


def _bounds(lo: np.ndarray, hi: np.ndarray):
    # cvxpy wants None for an absent side; keep arrays only where a side is finite somewhere
    return [lo if np.isfinite(lo).any() else None, hi if np.isfinite(hi).any() else None]


class CvxpyBackend(Backend):
    """cvxpy MILP modelling layer over HiGHS (or another installed MILP solver)."""

    name = "cvxpy"
    description = "cvxpy MILP (matrix constraints) sent to the first installed MILP solver (HiGHS here)"
    capabilities = Capabilities(supports_mip=True, supports_time_limit=True, supports_mip_start=False,
                                needs_package="cvxpy", pip_extra="cvxpy")
    formulations = ("binpacking", "full_mip")

    def estimate_mem_mb(self, model: LinearModel) -> float:
        """About 4 KiB per non-zero (canonicalization keeps several sparse copies) plus 300 MiB."""
        return 300.0 + model.nnz * 4.0 / 1024.0

    def solve_model(self, model, x_start, params):
        """Solve ``model`` as a cvxpy MILP with the first installed MILP solver.

        Parameters
        ----------
        model : LinearModel
            The model (objective in seconds for every lloptim formulation).
        x_start : numpy.ndarray or None
            Ignored: cvxpy does not pass a MIP start to HiGHS (``supports_mip_start=False``).
        params : SolveParams
            ``solver_options["cvxpy_solver"]`` picks the solver (default: the first installed of
            HiGHS, SCIP, GLPK_MI, CBC, Gurobi, CPLEX, Xpress); the other ``solver_options`` (except
            ``max_mem_mb``) go to ``Problem.solve`` as keyword arguments. With HiGHS, ``rel_gap``,
            ``seed``, ``time_limit_s`` (seconds) and ``threads`` fill in ``mip_rel_gap``,
            ``random_seed``, ``time_limit`` and ``threads`` unless given there; ``verbose`` is
            passed to every solver.

        Returns
        -------
        Outcome
            ``x`` when every variable has a value and it violates no bound, row or integrality by
            more than ``1e-5`` (else None), its objective (seconds), the solver's MIP dual bound when it
            reports one, the termination and ``extra["cvxpy_status"]``/``extra["cvxpy_solver"]``;
            a cvxpy ``SolverError`` during the solve gives an ``ERROR`` outcome.

        Raises
        ------
        SolverError
            No MILP solver is installed (and ``cvxpy_solver`` was not given).
        """
        import cvxpy as cp

        from lloptim.solvers.base import Outcome

        solver = params.solver_options.get("cvxpy_solver") or _milp_solver(cp)
        ii = np.flatnonzero(model.integrality)
        ic = np.flatnonzero(~model.integrality)
        A = model.A.tocsc()
        parts = []
        if ii.size:
            xi = cp.Variable(ii.size, integer=True, bounds=_bounds(model.col_lo[ii], model.col_hi[ii]))
            parts.append((ii, xi))
        if ic.size:
            xc = cp.Variable(ic.size, bounds=_bounds(model.col_lo[ic], model.col_hi[ic]))
            parts.append((ic, xc))
        lo, hi = model.row_lo, model.row_hi
        eq = np.flatnonzero(lo == hi)
        le = np.flatnonzero((lo != hi) & np.isfinite(hi))
        ge = np.flatnonzero((lo != hi) & np.isfinite(lo))
        cons = []

        def rows(idx):
            # index the constant matrix by rows and columns rather than slicing a cvxpy expression
            out = 0
            for cols, var in parts:
                out = out + A[idx][:, cols] @ var
            return out
        if eq.size:
            cons.append(rows(eq) == lo[eq])
        if le.size:
            cons.append(rows(le) <= hi[le])
        if ge.size:
            cons.append(rows(ge) >= lo[ge])
        obj = sum(model.c[cols] @ var for cols, var in parts) + model.offset
        prob = cp.Problem(cp.Minimize(obj) if model.sense == "min" else cp.Maximize(obj), cons)
        opts = {k: v for k, v in params.solver_options.items() if k not in ("max_mem_mb", "cvxpy_solver")}
        if solver == "HIGHS":
            opts.setdefault("mip_rel_gap", params.rel_gap)
            opts.setdefault("random_seed", int(params.seed))
            if params.time_limit_s is not None:
                opts.setdefault("time_limit", float(params.time_limit_s))
            if params.threads is not None:
                opts.setdefault("threads", int(params.threads))
        try:
            with warnings.catch_warnings():  # "may be inaccurate" on a time-out: the pipeline checks x itself
                warnings.simplefilter("ignore", UserWarning)
                prob.solve(solver=solver, verbose=params.verbose, **opts)
        except cp.error.SolverError as exc:
            return Outcome(termination=Termination.ERROR, extra={"error": str(exc)})
        st = prob.status
        x = None
        if all(var.value is not None for _, var in parts):
            x = np.zeros(model.n_cols)
            for cols, var in parts:
                x[cols] = var.value
            if model.max_violation(x) > 1e-5:  # user_limit without incumbent: a meaningless vector
                x = None
        info = (prob.solver_stats.extra_stats if prob.solver_stats is not None else None)
        bound = getattr(info, "mip_dual_bound", None)
        bound = float(bound) if bound is not None and np.isfinite(bound) and abs(bound) < 1e30 else None
        if st == cp.OPTIMAL:
            term, limit = Termination.OPTIMAL, Limit.NONE
        elif st in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
            term, limit = Termination.INFEASIBLE, Limit.NONE
        elif st in (cp.USER_LIMIT, cp.OPTIMAL_INACCURATE):
            term, limit = Termination.FEASIBLE, Limit.TIME
        else:
            term, limit = Termination.ERROR, Limit.NONE
        return Outcome(x=x, objective=None if x is None else float(prob.value), bound=bound, termination=term,
                       limit=limit, extra={"cvxpy_status": st, "cvxpy_solver": solver})


register_backend(CvxpyBackend())
