"""The solve pipeline every backend shares: validation, bounds, incumbent, guard, checks, result.

:func:`solve` always

1. validates the inputs (naming the offending field);
2. computes the closed-form lower bound and an LPT + local-search incumbent (improved by a valid
   warm start), so every backend starts from a bound and a feasible answer;
3. for MIP backends, builds the model with ``T >= bound`` and ``T <= incumbent`` and hands over the
   incumbent as a MIP start, after checking the backend's memory estimate (:func:`memory_guard`);
4. checks the backend's answer (every request on exactly one valid client), recomputes its objective
   from the weights, and keeps the incumbent when the backend has nothing better (a time-out
   without a solution, an infeasible vector): a limit never turns into an error;
5. attaches prices of client time and the timings and memory high-water mark.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import numpy as np
import psutil

from lloptim.errors import ModelTooLargeError, SolverError, SpecError
from lloptim.formulations.binpacking import (BinPackingData, assignment_to_x, binpacking_data,
                                             binpacking_lower_bound, build_binpacking, loads, x_to_assignment)
from lloptim.formulations.model import LinearModel
from lloptim import guards
from lloptim.problem import Problem, as_problem
from lloptim.solvers.params import SolveParams
from lloptim.solvers.registry import Backend, get_backend
from lloptim.solvers.result import Limit, SolveResult, Termination

__all__ = ["solve", "Outcome", "BinPackingTask", "solve_binpacking_as_mip", "memory_guard", "check_assignment",
           "peak_rss_mb", "FORMULATIONS"]

#: Names of the formulations :func:`solve` accepts for its ``formulation`` argument (no unit):
#: the bin packing of :mod:`lloptim.formulations.binpacking` and the full MIP of
#: :mod:`lloptim.formulations.full_mip`.
FORMULATIONS = ("binpacking", "full_mip")
MEM_FRACTION = 0.8  # share of the currently available memory a backend's estimate may claim


@dataclass
class Outcome:
    """What a backend hands back to the pipeline (before checks).

    Attributes
    ----------
    assignment, x
        The backend's solution as an assignment or as a model column vector (either may be None).
    objective
        The backend's own objective value (informational; the pipeline recomputes it), seconds.
    bound
        The backend's proven dual bound, seconds (None: none).
    termination
        ``OPTIMAL`` when the backend proved optimality, else ``FEASIBLE`` (or ``ERROR``/``INFEASIBLE``).
    limit
        What stopped it.
    multipliers
        Prices the backend computed itself (Lagrangian), or None.
    extra
        Details for :attr:`SolveResult.extra`.
    """

    assignment: np.ndarray | None = None
    x: np.ndarray | None = None
    objective: float | None = None
    bound: float | None = None
    termination: Termination = Termination.FEASIBLE
    limit: Limit = Limit.NONE
    multipliers: dict | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class BinPackingTask:
    """A bin-packing solve as backends see it.

    Attributes
    ----------
    data
        The instance.
    bound
        Closed-form lower bound, seconds.
    incumbent
        Best known assignment (greedy or warm start).
    incumbent_obj
        Its makespan, seconds.
    params
        The parameters.
    """

    data: BinPackingData
    bound: float
    incumbent: np.ndarray
    incumbent_obj: float
    params: SolveParams


def peak_rss_mb() -> float:
    """High-water mark of this process's resident memory, MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def check_assignment(assignment, n_requests: int, n_clients: int) -> np.ndarray | None:
    """``assignment`` as int64 if it puts every request on exactly one valid client, else None.

    Parameters
    ----------
    assignment : array_like or None
        A backend's answer: the global client index of each request (integers, or floats with
        integral values); None passes through.
    n_requests : int
        Number of requests ``R`` (count): the length ``assignment`` must have.
    n_clients : int
        Number of clients ``C`` over all instances (count): every index must be in ``[0, C)``.

    Returns
    -------
    numpy.ndarray or None
        ``assignment`` as int64, shape ``(R,)``; None when it is None, has the wrong shape, holds
        non-integral values or a client index out of range.
    """
    if assignment is None:
        return None
    a = np.asarray(assignment)
    if a.shape != (n_requests,) or not (np.issubdtype(a.dtype, np.integer) or np.all(a == np.round(a))):
        return None
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= n_clients):
        return None
    return a


def memory_guard(backend: Backend, model: LinearModel, params: SolveParams) -> float:
    """Refuse a model the backend cannot hold; return its estimate, MiB.

    The limit is ``solver_options["max_mem_mb"]`` if given, else 80 % of the memory available now.

    Parameters
    ----------
    backend : ~lloptim.solvers.registry.Backend
        The backend that would solve the model (its :meth:`~lloptim.solvers.registry.Backend.estimate_mem_mb` is asked).
    model : LinearModel
        The model about to be handed to it.
    params : SolveParams
        The solve's parameters; ``solver_options["max_mem_mb"]`` (MiB), when present, is the limit.

    Returns
    -------
    float
        The backend's memory estimate for ``model``, MiB.

    Raises
    ------
    ModelTooLargeError
        When the backend's estimate exceeds the limit.
    """
    est = backend.estimate_mem_mb(model)
    limit = params.solver_options.get("max_mem_mb")
    if limit is None:
        limit = MEM_FRACTION * psutil.virtual_memory().available / 2**20
    if est > limit:
        raise ModelTooLargeError(
            f"{backend.name}: the {model.name} model ({model.n_integer:,} integer columns, {model.nnz:,} non-zeros) "
            f"needs about {est / 1024:.1f} GiB, more than the {limit / 1024:.1f} GiB allowed "
            f"(fix: use solver='highs' or 'greedy', fewer requests/clients, or raise solver_options['max_mem_mb'])")
    return est


def _greedy_incumbent(data: BinPackingData, params: SolveParams) -> tuple[np.ndarray, float, dict]:
    from lloptim.solvers.greedy import lpt, local_search

    # stop polishing at a tenth of the requested gap: the MIP start needs no better
    # and never past the caller's time limit: the incumbent is a start, not the answer
    a = local_search(data, lpt(data), target=binpacking_lower_bound(data) * (1 + params.rel_gap / 10),
                     time_limit_s=params.time_limit_s)
    obj = float(loads(data, a).max())
    src = "greedy"
    warm = params.check_warm_start(data.n_requests, data.n_clients)
    if warm is not None:
        wobj = float(loads(data, warm).max())
        if wobj < obj:
            a, obj, src = warm, wobj, "warm_start"
    return a, obj, {"incumbent_source": src, "incumbent_obj": obj}


def solve_binpacking_as_mip(backend: Backend, task: BinPackingTask) -> Outcome:
    """Build the bin-packing MIP (tightened by the task's bound and incumbent) and solve it with ``backend``.

    The makespan column ``T`` is bounded below by ``task.bound`` and above by ``task.incumbent_obj``
    (plus a tiny slack, relative ``1e-9``, so the incumbent stays feasible), both seconds; the
    incumbent is passed as a MIP start when the backend supports one.

    Parameters
    ----------
    backend : ~lloptim.solvers.registry.Backend
        A MIP backend (one that implements :meth:`~lloptim.solvers.registry.Backend.solve_model`).
    task : BinPackingTask
        The instance, its lower bound and incumbent (seconds) and the parameters.

    Returns
    -------
    Outcome
        The backend's outcome, with ``assignment`` decoded from its column vector when it gave only
        ``x`` (None if that vector is not integral one-hot), and the model's sizes in
        ``extra["model"]``.

    Raises
    ------
    ModelTooLargeError
        The backend's memory estimate for the model exceeds the limit (:func:`memory_guard`).
    """
    data = task.data
    # a relative slack on the upper bound: a start with T exactly at the bound must stay feasible
    model = build_binpacking(data, t_lower=task.bound, t_upper=task.incumbent_obj * (1 + 1e-9) + 1e-12)
    memory_guard(backend, model, task.params)
    start = assignment_to_x(data, task.incumbent) if backend.capabilities.supports_mip_start else None
    out = backend.solve_model(model, start, task.params)
    if out.x is not None and out.assignment is None:
        out.assignment = x_to_assignment(data, out.x)
    out.extra.setdefault("model", model.summary())
    return out


PIPELINE_OPTIONS = ("always_run", "horizon")  # read by the pipeline, never passed to a backend


def _backend_params(params: SolveParams) -> SolveParams:
    opts = {k: v for k, v in params.solver_options.items() if k not in PIPELINE_OPTIONS}
    return SolveParams(params.time_limit_s, params.rel_gap, params.threads, params.seed, params.warm_start,
                       params.verbose, opts)


def _finish(backend: Backend, formulation: str, params: SolveParams, out: Outcome, assignment, primal: float,
            fallback_assignment, fallback_obj: float, bound: float, multipliers: dict, t0: float, t1: float,
            extra: dict) -> SolveResult:
    """Pick the better of the backend's answer and the incumbent, and assemble the result."""
    if assignment is None or primal > fallback_obj:
        if assignment is None:
            extra["fallback"] = "backend returned no feasible assignment; kept the incumbent"
        assignment, primal = fallback_assignment, fallback_obj
    dual = bound if out.bound is None or not np.isfinite(out.bound) else max(bound, float(out.bound))
    extra["backend_bound"] = out.bound
    extra["backend_objective"] = out.objective
    if dual > primal:  # a solver's bound can exceed the recomputed objective by round-off only
        extra["bound_clipped_from"] = dual
        dual = primal
    gap = (primal - dual) / primal if primal > 0 else 0.0
    if out.termination in (Termination.ERROR, Termination.INFEASIBLE) and assignment is not None:
        extra["backend_termination"] = out.termination.value
        status, limit = Termination.FEASIBLE, out.limit
    elif out.termination is Termination.OPTIMAL or gap <= params.rel_gap + 1e-12:
        status, limit = Termination.OPTIMAL, Limit.NONE
    else:
        status, limit = Termination.FEASIBLE, out.limit
    extra.update(out.extra)
    return SolveResult(status=status, limit=limit, primal_bound=float(primal), dual_bound=float(dual),
                       gap=float(max(gap, 0.0)), assignment=assignment, multipliers=multipliers,
                       build_s=t1 - t0, solve_s=time.perf_counter() - t1, peak_mem_mb=peak_rss_mb(),
                       backend=backend.name, formulation=formulation, extra=extra)


def solve(problem: Problem, solver: str = "greedy", params: SolveParams | None = None,
          weights: np.ndarray | None = None, formulation: str = "binpacking",
          estimates: np.ndarray | None = None) -> SolveResult:
    """Assign the requests of ``problem`` to clients with backend ``solver``.

    Parameters
    ----------
    problem
        The problem; clients of all instances are the bins (instance-major global indices).
    solver
        Backend name, see :func:`~lloptim.solvers.registry.available_solvers`.
    params
        :class:`SolveParams` (default: no time limit, ``rel_gap=1e-4``).
    weights
        Seconds of client time per request, ``(R,)`` or ``(R, n_instances)``; default
        :func:`lloptim.work.request_work_s` (from ``estimates`` when given).
    formulation
        ``"binpacking"`` (every backend) or ``"full_mip"`` (MIP backends, one small instance; the
        objective is then the served makespan and ``weights`` are ignored).
    estimates
        Output-length estimates for the default weights, tokens.

    Returns
    -------
    SolveResult
        Always with a feasible assignment for the bin packing.

    Raises
    ------
    SpecError
        Unknown solver or formulation, bad parameters, weights or warm start.
    SolverError
        The backend's package is missing, or it cannot solve this formulation.
    ModelTooLargeError
        The backend's memory estimate for the model exceeds the available memory.
    TooLargeError
        The greedy start is estimated to need more memory than is available
        (:func:`lloptim.guards.check_solve`).
    """
    t0 = time.perf_counter()
    problem = as_problem(problem)
    if params is None:
        params = SolveParams()
    if not isinstance(params, SolveParams):
        raise SpecError("params", f"must be a SolveParams, got {type(params).__name__}", "pass SolveParams(...)")
    if formulation not in FORMULATIONS:
        raise SpecError("formulation", f"unknown formulation {formulation!r}", f"use one of {list(FORMULATIONS)}")
    backend = get_backend(solver)
    if formulation not in backend.formulations:
        raise SolverError(f"solver {solver!r} does not solve the {formulation!r} formulation "
                          f"(fix: use one of {[n for n in ('highs', 'cbc', 'cvxpy')]})")
    if formulation == "full_mip":
        return _solve_full_mip(problem, backend, params, t0)
    guards.check_solve(problem, params.rel_gap, weights)  # before the (R, C) arrays of the greedy start
    data = binpacking_data(problem, weights, estimates)
    incumbent, inc_obj, extra = _greedy_incumbent(data, params)
    bound = binpacking_lower_bound(data)
    always = bool(params.solver_options.get("always_run", False))
    backend_params = _backend_params(params)
    task = BinPackingTask(data, bound, incumbent, inc_obj, backend_params)
    t1 = time.perf_counter()
    try:
        if not always and inc_obj - bound <= params.rel_gap * inc_obj and backend.name != "greedy":
            # the incumbent is already proven within rel_gap: a search could only confirm it
            out = Outcome(assignment=incumbent, objective=inc_obj, termination=Termination.OPTIMAL,
                          extra={"skipped_backend": "incumbent already within rel_gap of the bound "
                                                    "(solver_options={'always_run': True} runs it anyway)"})
        else:
            out = backend.solve_binpacking(task)
    except (SolverError, SpecError):
        raise
    except Exception as exc:  # a backend crash must not lose the incumbent; keep it and say why
        out = Outcome(termination=Termination.ERROR, extra={"error": f"{type(exc).__name__}: {exc}"})
    a = check_assignment(out.assignment, data.n_requests, data.n_clients)
    primal = float(loads(data, a).max()) if a is not None else np.inf
    multipliers = out.multipliers
    if multipliers is None:
        from lloptim.formulations.lp_bound import lp_prices

        multipliers = lp_prices(data)
    return _finish(backend, formulation, params, out, a, primal, incumbent, inc_obj, bound, multipliers,
                   t0, t1, extra)


def _solve_full_mip(problem: Problem, backend: Backend, params: SolveParams, t0: float) -> SolveResult:
    from lloptim.bounds import lower_bound
    from lloptim.formulations.full_mip import build_full_mip, decode_schedule, start_from_run
    from lloptim.simulator import run_policy

    bound = lower_bound(problem).total_s
    # a hair below the bound: it is exact up to round-off, and the simulator's start must stay feasible
    model = build_full_mip(problem, horizon=params.solver_options.get("horizon"),
                           makespan_lower=bound * (1 - 1e-9))
    memory_guard(backend, model, params)
    # the simulator's LPT schedule is a feasible start and the fallback answer
    run = run_policy(problem, "lpt")
    start = start_from_run(model, run)
    start_sched = decode_schedule(problem, model, start)
    t1 = time.perf_counter()
    out = backend.solve_model(model, start if backend.capabilities.supports_mip_start else None,
                              _backend_params(params))
    a, primal, extra = None, np.inf, {"model": model.summary(), "simulated_lpt_s": run.makespan_s}
    if out.x is not None and model.max_violation(out.x) < 1e-5:
        sched = decode_schedule(problem, model, out.x)
        a, primal = sched.assignment, sched.makespan_s
        extra["schedule"] = {"kinds": sched.kinds, "client_order": sched.client_order}
    prices = {"load": np.full(problem.n_clients, 1.0 / problem.n_clients)}
    return _finish(backend, "full_mip", params, out, a, primal, start_sched.assignment, start_sched.makespan_s,
                   bound, prices, t0, t1, extra)
