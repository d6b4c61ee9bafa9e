"""cvxpy's MILP path (``pip install lloptim[cvxpy]``), solved by whatever MILP solver cvxpy finds.

The :class:`~lloptim.formulations.model.LinearModel` becomes two cvxpy variables (integer and
continuous columns, with their bounds as variable attributes) and three matrix constraints
(equality, ``<=`` and ``>=`` rows): no per-variable Python objects. Caveats handled here:

* cvxpy ignores ``Variable.value`` as a MIP start for HiGHS, so no start is passed
  (``supports_mip_start=False``); the pipeline's greedy incumbent remains the fallback;
* canonicalization (``Problem.get_problem_data``) runs first and its time counts against the
  limit: the solver gets what is left (measured: 3.5 s of canonicalization at 1319 x 200, which
  used to come on top of the limit);
* a HiGHS time-out without an incumbent comes back as ``user_limit`` with a meaningless vector: the
  pipeline's feasibility check rejects it and keeps the incumbent;
* duals: cvxpy's multipliers are those of ``minimize`` (a maximization is ``minimize -f``) with
  ``<=``/``==`` rows read as ``lhs - rhs <= 0``/``== 0``; they are converted to lloptim's
  ``d(objective)/d(rhs)``: ``-dual`` for ``<=`` and ``==`` rows and ``+dual`` for ``>=`` rows of a
  minimization, the opposite signs for a maximization;
* canonicalization is memory-hungry (:meth:`CvxpyBackend.estimate_mem_mb`).
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from lloptim.errors import SolverError
from lloptim.formulations.compiled import LinearModel
from lloptim.solvers.registry import Backend, Capabilities, Outcome, register_backend
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
    capabilities = Capabilities(supports_mip=True, supports_lp_duals=True, supports_time_limit=True,
                                supports_mip_start=False, needs_package="cvxpy", pip_extra="cvxpy")
    formulations = ("binpacking", "full_mip")

    def estimate_mem_mb(self, model: LinearModel) -> float:
        """About 4 KiB per non-zero (canonicalization keeps several sparse copies) plus 300 MiB."""
        return 300.0 + model.nnz * 4.0 / 1024.0

    def isolated(self, model, params) -> bool:
        """A time-limited model of at least ``ISOLATE_NNZ`` non-zeros runs in a child process (as HiGHS's).

        Parameters
        ----------
        model : LinearModel
            The compiled model about to be solved.
        params : SolveParams
            Its parameters (``time_limit_s`` in seconds).

        Returns
        -------
        bool
            Whether the search runs in a child process.
        """
        from lloptim.solvers.highs import ISOLATE_NNZ

        return params.time_limit_s is not None and model.nnz >= ISOLATE_NNZ

    def solve_model(self, model, x_start, params):
        """Solve ``model`` as a cvxpy problem with the first installed MILP solver.

        Parameters
        ----------
        model : LinearModel
            The compiled model.
        x_start : numpy.ndarray or None
            Ignored: cvxpy does not pass a MIP start to HiGHS (``supports_mip_start=False``).
        params : SolveParams
            ``solver_options["cvxpy_solver"]`` picks the solver (default: the first installed of
            HiGHS, SCIP, GLPK_MI, CBC, Gurobi, CPLEX, Xpress); the other ``solver_options`` go to
            the solver as options. With HiGHS, ``rel_gap``, ``seed``, ``time_limit_s`` (seconds
            left of the solve, less the canonicalization) and ``threads`` fill in
            ``mip_rel_gap``, ``random_seed``, ``time_limit`` and ``threads`` unless given there;
            ``verbose`` is passed to every solver.

        Returns
        -------
        Outcome
            ``x`` when every variable has a value and it violates no bound, row or integrality by
            more than ``1e-5`` (else None), its objective, the solver's MIP dual bound when it
            reports one, the termination, an LP's row duals (converted, see the module
            docstring) and ``extra["cvxpy_status"]``/``extra["cvxpy_solver"]``; a cvxpy
            ``SolverError`` during the solve gives an ``ERROR`` outcome.

        Raises
        ------
        SolverError
            No MILP solver is installed (and ``cvxpy_solver`` was not given).
        """
        t_enter = time.perf_counter()  # the time limit counts from the call: importing cvxpy counts too
        import cvxpy as cp

        opts = dict(params.backend_options())
        solver = opts.pop("cvxpy_solver", None) or _milp_solver(cp)
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
        cons, kinds = [], []

        def rows(idx):
            # index the constant matrix by rows and columns rather than slicing a cvxpy expression
            out = 0
            for cols, var in parts:
                out = out + A[idx][:, cols] @ var
            return out
        for idx, kind in ((eq, "=="), (le, "<="), (ge, ">=")):
            if idx.size:
                expr = rows(idx)
                cons.append(expr == lo[idx] if kind == "==" else expr <= hi[idx] if kind == "<=" else expr >= lo[idx])
                kinds.append((idx, kind))
        obj = sum(model.c[cols] @ var for cols, var in parts) + model.offset
        prob = cp.Problem(cp.Minimize(obj) if model.sense == "min" else cp.Maximize(obj), cons)
        extra = {"cvxpy_solver": solver}
        try:
            with warnings.catch_warnings():  # "may be inaccurate" on a time-out: the pipeline checks x itself
                warnings.simplefilter("ignore", UserWarning)
                data, chain, inverse = prob.get_problem_data(solver=solver)
                extra["cvxpy_canonicalize_s"] = time.perf_counter() - t_enter
                if solver == "HIGHS":
                    opts.setdefault("mip_rel_gap", params.rel_gap)
                    opts.setdefault("random_seed", int(params.seed))
                    if params.time_limit_s is not None:
                        # reading the answer back costs about what canonicalizing did: keep that aside
                        spent = time.perf_counter() - t_enter
                        left = float(params.time_limit_s) - 2 * spent
                        if left <= 0:
                            extra["cvxpy_status"] = "canonicalization used up the time limit"
                            return Outcome(termination=Termination.FEASIBLE, limit=Limit.TIME, extra=extra)
                        opts.setdefault("time_limit", left)
                    if params.threads is not None:
                        opts.setdefault("threads", int(params.threads))
                raw = chain.solve_via_data(prob, data, warm_start=False, verbose=params.verbose, solver_opts=opts)
                prob.unpack_results(raw, chain, inverse)
        except cp.error.SolverError as exc:
            extra["error"] = str(exc)
            return Outcome(termination=Termination.ERROR, extra=extra)
        st = prob.status
        extra["cvxpy_status"] = st
        x = None
        if all(var.value is not None for _, var in parts):
            x = np.zeros(model.n_cols)
            for cols, var in parts:
                x[cols] = var.value
            if model.max_violation(x) > 1e-5:  # user_limit without incumbent: a meaningless vector
                x = None
        info = (prob.solver_stats.extra_stats if prob.solver_stats is not None else None)
        if model.is_mip:
            # HiGHS's bound is of cvxpy's minimization (-f for a maximization) and leaves out the constant
            raw_bound = getattr(info, "mip_dual_bound", None)
            ok = raw_bound is not None and np.isfinite(raw_bound) and abs(raw_bound) < 1e30 and solver == "HIGHS"
            bound = (float(raw_bound) if model.sense == "min" else -float(raw_bound)) + model.offset if ok else None
        else:
            bound = float(prob.value) if st == cp.OPTIMAL else None
        if st == cp.OPTIMAL:
            term, limit = Termination.OPTIMAL, Limit.NONE
        elif st in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
            term, limit = Termination.INFEASIBLE, Limit.NONE
        elif st in (cp.UNBOUNDED, cp.UNBOUNDED_INACCURATE):
            term, limit = Termination.UNBOUNDED, Limit.NONE
        elif st in (cp.USER_LIMIT, cp.OPTIMAL_INACCURATE):
            term, limit = Termination.FEASIBLE, Limit.TIME
        else:
            term, limit = Termination.ERROR, Limit.NONE
        duals = None
        if not model.is_mip and st == cp.OPTIMAL and all(c.dual_value is not None for c in cons):
            duals = np.zeros(model.n_rows)
            flip = 1.0 if model.sense == "min" else -1.0
            for c, (idx, kind) in zip(cons, kinds):
                sign = flip * (1.0 if kind == ">=" else -1.0)
                duals[idx] += sign * np.asarray(c.dual_value, dtype=np.float64).reshape(-1)
        return Outcome(x=x, objective=None if x is None else float(prob.value), bound=bound, termination=term,
                       limit=limit, row_duals=duals, extra=extra)


register_backend(CvxpyBackend())
