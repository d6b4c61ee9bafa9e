"""HiGHS through highspy: the model goes over as CSC arrays in one ``passModel`` call.

Common parameters map to HiGHS options ``time_limit``, ``mip_rel_gap``, ``threads`` and
``random_seed``; ``solver_options`` go to ``setOptionValue`` verbatim (an unknown option is an
error). The incumbent is passed with ``setSolution``. HiGHS honours its time limit in every phase
we measured on an idle machine (20.6 s for a 20 s limit on the 1319 x 200 bin packing, 7.5 s of
it presolve), but not everywhere under load (69 s for a 30 s limit on the same packing with side
constraints, 3 agents on 2 cores): time-limited MIPs from :data:`ISOLATE_NNZ` non-zeros therefore
run in a child process stopped at the deadline, small ones in-process. An LP solved to optimality
returns its row duals, already in lloptim's convention.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from lloptim.errors import SolverError
from lloptim.formulations.compiled import LinearModel
from lloptim.solvers.params import SolveParams
from lloptim.solvers.registry import Backend, Capabilities, Outcome, register_backend
from lloptim.solvers.result import Limit, Termination

__all__ = ["HighsBackend", "ISOLATE_NNZ"]

#: Non-zeros from which a time-limited HiGHS MIP runs in a child process that is stopped at the
#: deadline (count): below it HiGHS returns on time by itself; above it a phase that does not look
#: at the clock can take many seconds on a loaded machine (69 s for a 30 s limit, measured).
ISOLATE_NNZ = 50_000


def _fresh_scheduler_after_fork() -> None:
    """In a forked child, drop the HiGHS thread pool inherited from the parent (its threads did not survive)."""
    highspy = sys.modules.get("highspy")
    if highspy is not None:
        try:
            highspy.Highs.resetGlobalScheduler(False)
        except Exception:  # noqa: BLE001 - an older highspy without it: nothing to reset
            pass


# a HiGHS run in a forked child deadlocks on the parent's dead worker threads without this
os.register_at_fork(after_in_child=_fresh_scheduler_after_fork)


def _highs(model: LinearModel, params: SolveParams | None, integer: bool):
    """A ``highspy.Highs`` holding ``model`` with the parameters applied."""
    import highspy

    h = highspy.Highs()
    verbose = bool(params and params.verbose)
    h.setOptionValue("output_flag", verbose)
    lp = highspy.HighsLp()
    lp.num_col_ = model.n_cols
    lp.num_row_ = model.n_rows
    lp.col_cost_ = model.c
    lp.offset_ = model.offset
    lp.col_lower_ = model.col_lo
    lp.col_upper_ = model.col_hi
    lp.row_lower_ = model.row_lo
    lp.row_upper_ = model.row_hi
    lp.sense_ = highspy.ObjSense.kMinimize if model.sense == "min" else highspy.ObjSense.kMaximize
    A = model.csc()
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.num_col_ = model.n_cols
    lp.a_matrix_.num_row_ = model.n_rows
    lp.a_matrix_.start_ = A.indptr.astype(np.int32)
    lp.a_matrix_.index_ = A.indices.astype(np.int32)
    lp.a_matrix_.value_ = A.data
    if integer and model.is_mip:
        kint, kcont = highspy.HighsVarType.kInteger, highspy.HighsVarType.kContinuous
        lp.integrality_ = [kint if f else kcont for f in model.integrality.tolist()]
    status = h.passModel(lp)
    if status == highspy.HighsStatus.kError:
        raise SolverError("highs: passModel rejected the model")
    if params is not None:
        opts = {"mip_rel_gap": params.rel_gap, "random_seed": int(params.seed)}
        if params.time_limit_s is not None:
            opts["time_limit"] = float(params.time_limit_s)
        if params.threads is not None:
            opts["threads"] = int(params.threads)
        opts.update(params.backend_options())
        for k, v in opts.items():
            if h.setOptionValue(k, v) == highspy.HighsStatus.kError:
                raise SolverError(f"highs: option {k}={v!r} was rejected (check the name and type in the HiGHS docs)")
    return h


class HighsBackend(Backend):
    """HiGHS branch and cut (MIP) and simplex (LP, with duals)."""

    name = "highs"
    description = "HiGHS MIP/LP via highspy (CSC passModel, MIP start, dual bound, LP duals)"
    capabilities = Capabilities(supports_mip=True, supports_lp_duals=True, supports_time_limit=True,
                                supports_mip_start=True, needs_package="highspy")
    formulations = ("binpacking", "full_mip")

    def estimate_mem_mb(self, model: LinearModel) -> float:
        """About 0.25 KiB per non-zero plus 300 MiB (HiGHS keeps a few copies of the matrix and the tree)."""
        return 300.0 + model.nnz / 4096.0

    def isolated(self, model, params) -> bool:
        """A time-limited MIP of at least :data:`ISOLATE_NNZ` non-zeros runs in a child process.

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
        return params.time_limit_s is not None and model.is_mip and model.nnz >= ISOLATE_NNZ

    def solve_model(self, model, x_start, params):
        """Solve ``model`` with HiGHS (branch and cut when it has integer columns).

        Parameters
        ----------
        model : LinearModel
            The compiled model.
        x_start : numpy.ndarray or None
            A column vector of ``model``, shape ``(n_cols,)``, passed with ``setSolution`` as the
            starting solution; None: no start.
        params : SolveParams
            ``time_limit_s`` (seconds left of the solve; the time spent loading the model is
            taken off before HiGHS starts), ``rel_gap``, ``threads`` and ``seed`` become the
            HiGHS options ``time_limit``, ``mip_rel_gap``, ``threads`` and ``random_seed``,
            ``verbose`` sets ``output_flag``; ``solver_options`` are set verbatim and override them.

        Returns
        -------
        Outcome
            ``x`` when HiGHS holds a feasible solution, its objective and the dual bound (the MIP
            dual bound, or the LP objective for a model without integer columns), the
            termination (``Limit.TIME`` on the time limit, ``Limit.ITERATION`` on an iteration or
            solution limit or an interrupt), the row duals of an LP solved to optimality (HiGHS's
            ``row_dual`` is already ``d(objective)/d(rhs)``, for minimization and maximization
            alike) and ``extra`` with the HiGHS status, node count and gap.

        Raises
        ------
        SolverError
            HiGHS rejects the model or an option.
        """
        t_enter = time.perf_counter()
        import highspy

        h = _highs(model, params, integer=True)
        if params.time_limit_s is not None:  # loading the model counted against the limit
            h.setOptionValue("time_limit", max(1e-3, float(params.time_limit_s) - (time.perf_counter() - t_enter)))
        if x_start is not None:
            sol = highspy.HighsSolution()
            sol.col_value = np.asarray(x_start, dtype=np.float64)
            sol.value_valid = True
            h.setSolution(sol)
        h.run()
        ms = h.getModelStatus()
        info = h.getInfo()
        MS = highspy.HighsModelStatus
        has_x = info.primal_solution_status == highspy.SolutionStatus.kSolutionStatusFeasible
        sol = h.getSolution()
        x = np.asarray(sol.col_value) if has_x else None
        bound = float(info.mip_dual_bound) if model.is_mip else float(info.objective_function_value)
        if not np.isfinite(bound) or abs(bound) >= 1e30 or (not model.is_mip and ms != MS.kOptimal):
            bound = None
        extra = {"highs_status": h.modelStatusToString(ms), "mip_nodes": int(getattr(info, "mip_node_count", 0)),
                 "mip_gap": float(getattr(info, "mip_gap", np.nan))}
        if ms == MS.kOptimal:
            term, limit = Termination.OPTIMAL, Limit.NONE
        elif ms == MS.kInfeasible:
            term, limit = Termination.INFEASIBLE, Limit.NONE
        elif ms in (MS.kUnbounded, MS.kUnboundedOrInfeasible):
            term, limit = (Termination.UNBOUNDED if ms == MS.kUnbounded else Termination.INFEASIBLE), Limit.NONE
            extra["note"] = h.modelStatusToString(ms)
        elif ms == MS.kTimeLimit:
            term, limit = Termination.FEASIBLE, Limit.TIME
        elif ms in (MS.kIterationLimit, MS.kSolutionLimit) or ms.name == "kInterrupt":
            term, limit = Termination.FEASIBLE, Limit.ITERATION
        else:
            term, limit = Termination.ERROR, Limit.NONE
        duals = None
        if not model.is_mip and ms == MS.kOptimal and info.dual_solution_status == highspy.SolutionStatus.kSolutionStatusFeasible:
            duals = np.asarray(sol.row_dual, dtype=np.float64).copy()
        obj = float(info.objective_function_value) if has_x else None
        return Outcome(x=x, objective=obj, bound=bound, termination=term, limit=limit, row_duals=duals, extra=extra)


register_backend(HighsBackend())
