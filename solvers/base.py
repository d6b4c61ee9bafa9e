"""``lloptim.solve``: one entry point for any model, and for a problem through a formulation.

``solve(model, solver)`` compiles a :class:`~lloptim.Model`, checks the backend's memory estimate,
hands the matrix form to the backend and maps the answer back (``value(x)``, ``dual("load")``).

``solve(problem, solver, formulation=...)`` runs a registered formulation
(:mod:`lloptim.solvers.formulation_registry`) through the same steps every built-in one takes:

1. validate the inputs (naming the offending field) and compute the formulation's numbers;
2. compute its proven bound and a heuristic start (the *incumbent*), within the time limit;
3. if the start already meets ``rel_gap`` against the bound, stop: the answer is proven, and the
   result says the requested backend was skipped (``SolveParams(always_run=True)`` runs it
   anyway);
4. otherwise build the model (tightened with the bound and the start's objective), check the
   backend's memory estimate (:func:`~lloptim.solvers.limits.memory_guard`), and solve it with
   the start as a MIP start, with whatever is left of the time limit;
5. check the backend's answer (feasible for the model, decoded, objective recomputed from the
   problem), keep the start when the backend has nothing better (a time-out, a crash): a limit
   never turns into an error;
6. report the best bound known (the formulation's, the backend's, and the one its prices prove),
   the status, which backend's work is returned, and the timings.

Heuristic backends (``greedy``, ``lagrangian``) solve a formulation directly instead of step 4.
"""

from __future__ import annotations

import time

import numpy as np

from lloptim import guards
from lloptim.errors import SolverError, SpecError
from lloptim.formulations.binpacking import BinPackingData
from lloptim.formulations.compiled import LinearModel
from lloptim.formulations.model import Model
from lloptim.problem import Problem
from lloptim.solvers.formulation_registry import Formulation, Incumbent, get_formulation
from lloptim.solvers.isolation import can_isolate, run_isolated
from lloptim.solvers.limits import GRACE_S, Deadline, memory_guard, memory_limit_mb, peak_rss_mb
from lloptim.solvers.params import SolveParams
from lloptim.solvers.registry import Backend, FormulationTask, Outcome, get_backend
from lloptim.solvers.result import Limit, SolveResult, Termination

# Outcome, FormulationTask (BinPackingTask), memory_guard and peak_rss_mb stay importable from here
# for older code; they are documented where they live (registry, limits)
__all__ = ["solve", "run_backend", "check_assignment", "relative_gap", "FORMULATIONS", "START_SHARE",
           "FEASIBILITY_TOL"]

#: Old name of :class:`~lloptim.solvers.registry.FormulationTask` (a bin packing's task).
BinPackingTask = FormulationTask
#: Names of the built-in formulations (more can be registered with
#: :func:`~lloptim.solvers.formulation_registry.register_formulation`).
FORMULATIONS = ("binpacking", "full_mip", "binpacking_kv", "precedence", "weighted_completion")
#: Share of the time left that the start heuristic may use when a search follows (dimensionless).
START_SHARE = 0.25
#: Largest violation of a row, bound or integrality (relative to the row's scale) an answer may have.
FEASIBILITY_TOL = 1e-6


def relative_gap(primal: float | None, dual: float | None, sense: str = "min") -> float | None:
    """``|primal - dual| / |primal|`` with the sign that makes it >= 0 for valid bounds.

    Parameters
    ----------
    primal : float or None
        Objective of an answer.
    dual : float or None
        A bound on the optimum (below for ``min``, above for ``max``).
    sense : str
        ``"min"`` or ``"max"``.

    Returns
    -------
    float or None
        The relative gap (0 when both are 0, ``inf`` when only the answer is 0), None when
        either is missing.
    """
    if primal is None or dual is None or not np.isfinite(primal) or not np.isfinite(dual):
        return None
    diff = max(0.0, (primal - dual) if sense == "min" else (dual - primal))
    scale = abs(primal)
    if scale < 1e-12:
        return 0.0 if diff <= 1e-12 else float("inf")
    return diff / scale


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


def _violation(lm: LinearModel, x: np.ndarray) -> float:
    """Largest violation of a row, bound or integrality, rows and bounds relative to their size."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape != (lm.n_cols,) or not np.isfinite(x).all():
        return np.inf
    ax = lm.A @ x
    scale_r = 1.0 + np.abs(np.where(np.isfinite(lm.row_hi), lm.row_hi, np.where(np.isfinite(lm.row_lo), lm.row_lo, 0)))
    scale_c = 1.0 + np.abs(np.where(np.isfinite(lm.col_hi), lm.col_hi, np.where(np.isfinite(lm.col_lo), lm.col_lo, 0)))
    parts = [((lm.row_lo - ax) / scale_r).max(initial=0.0), ((ax - lm.row_hi) / scale_r).max(initial=0.0),
             ((lm.col_lo - x) / scale_c).max(initial=0.0), ((x - lm.col_hi) / scale_c).max(initial=0.0)]
    xi = x[lm.integrality]
    parts.append(float(np.abs(xi - np.round(xi)).max(initial=0.0)) / 10)  # integrality: 1e-5 absolute
    return float(max(parts))


def _backend_params(params: SolveParams, deadline: Deadline) -> SolveParams:
    """The parameters a backend receives: the time left now, the memory allowance, its own options."""
    left = deadline.remaining()
    return SolveParams(None if left is None else max(left, 1e-3), params.rel_gap, params.threads, params.seed,
                       None, params.verbose, params.backend_options(), memory_limit_mb(params), False)


def _better(a: float | None, b: float | None, sense: str) -> bool:
    """Whether objective ``a`` beats ``b`` (None never beats anything)."""
    if a is None or not np.isfinite(a):
        return False
    if b is None or not np.isfinite(b):
        return True
    return a < b if sense == "min" else a > b


def _tighter(bounds: list, sense: str) -> float | None:
    vals = [float(b) for b in bounds if b is not None and np.isfinite(b)]
    if not vals:
        return None
    return max(vals) if sense == "min" else min(vals)


def _status(answer_ok: bool, gap: float | None, rel_gap: float, out: Outcome, heuristic: bool) -> tuple:
    """Status and limit of a result (see :mod:`lloptim.solvers.result`)."""
    if not answer_ok:
        t = out.termination
        if t in (Termination.INFEASIBLE, Termination.UNBOUNDED, Termination.ERROR):
            return t, Limit.NONE
        return Termination.NO_SOLUTION, out.limit
    if out.termination is Termination.OPTIMAL and not heuristic:
        return Termination.OPTIMAL, Limit.NONE
    if gap is not None and gap <= rel_gap + 1e-12:
        return Termination.OPTIMAL, Limit.NONE
    if heuristic:
        return Termination.HEURISTIC, out.limit
    return Termination.FEASIBLE, out.limit if out.limit is not Limit.NONE else Limit.GAP


def run_backend(backend: Backend, lm: LinearModel, x_start, params: SolveParams, deadline: Deadline) -> Outcome:
    """Call ``backend.solve_model`` within the deadline and the memory allowance; never raise for a crash.

    When :meth:`Backend.isolated <lloptim.solvers.registry.Backend.isolated>` says so, the solve runs in
    a child process (:func:`~lloptim.solvers.isolation.run_isolated`) that is stopped at the deadline
    or past the allowance; the outcome then says ``Limit.TIME`` or ``Limit.MEMORY`` with no answer,
    and the caller keeps its start and bound.

    Parameters
    ----------
    backend : ~lloptim.solvers.registry.Backend
        A model solver.
    lm : LinearModel
        The compiled model.
    x_start : numpy.ndarray or None
        A MIP start (a column vector), or None.
    params : SolveParams
        The solve's parameters (the time left is read from ``deadline``; ``max_mem_mb`` in MiB).
    deadline : Deadline
        The solve's deadline.

    Returns
    -------
    Outcome
        The backend's outcome; a crash becomes ``Termination.ERROR`` with the message in ``extra``.

    Raises
    ------
    SolverError, SpecError
        User errors (a bad option), raised again from a child process too.
    """
    if deadline.expired():
        return Outcome(termination=Termination.FEASIBLE, limit=Limit.TIME,
                       extra={"note": "no time was left for the search"})
    bparams = _backend_params(params, deadline)
    try:
        if backend.isolated(lm, bparams) and can_isolate():
            grace = deadline.grace_s()
            if bparams.time_limit_s is not None:
                # asked to stop as much before the deadline as it may overrun it: it normally stops by
                # itself and hands its answer and bound back; the kill is for when it does not
                bparams.time_limit_s = max(0.05, bparams.time_limit_s - (grace - GRACE_S))
            run = run_isolated(backend.solve_model, (lm, x_start, bparams), deadline.at, bparams.max_mem_mb, grace)
            extra = {"isolated": True, "child_wall_s": run.wall_s, "child_grown_mb": run.grown_mb}
            if run.reason == "time":
                extra["stopped"] = f"{backend.name} was stopped at the deadline (it did not stop itself)"
                return Outcome(termination=Termination.FEASIBLE, limit=Limit.TIME, peak_mb=run.peak_mb, extra=extra)
            if run.reason == "memory":
                extra["stopped"] = (f"{backend.name} was stopped past the memory allowance of "
                                    f"{bparams.max_mem_mb:,.0f} MiB")
                return Outcome(termination=Termination.FEASIBLE, limit=Limit.MEMORY, peak_mb=run.peak_mb, extra=extra)
            if run.reason:
                extra["error"] = f"{backend.name}: {run.reason}"
                return Outcome(termination=Termination.ERROR, peak_mb=run.peak_mb, extra=extra)
            out = run.value
            out.peak_mb = max(out.peak_mb, run.peak_mb)
            out.extra.update(extra)
            return out
        return backend.solve_model(lm, x_start, bparams)
    except (SolverError, SpecError):
        raise
    except Exception as exc:  # noqa: BLE001 - a backend crash must not lose the start; keep it and say why
        return Outcome(termination=Termination.ERROR, extra={"error": f"{type(exc).__name__}: {exc}"})


def _read_x(lm: LinearModel, out: Outcome, extra: dict) -> np.ndarray | None:
    """The backend's column vector if it is feasible for the model, else None (and why, in ``extra``)."""
    if out.x is None:
        return None
    v = _violation(lm, out.x)
    if v > FEASIBILITY_TOL:
        extra["rejected_x"] = f"the backend's vector violates the model by {v:.3g}"
        return None
    x = np.array(out.x, dtype=np.float64)
    x[lm.integrality] = np.round(x[lm.integrality])  # integral within 1e-5 (checked): report the integers
    return x


def solve(model_or_problem, solver: str = "greedy", params: SolveParams | None = None,
          weights: np.ndarray | None = None, formulation: str = "binpacking", estimates: np.ndarray | None = None,
          start: dict | None = None, **options) -> SolveResult:
    """Solve a :class:`~lloptim.Model`, or a problem through a formulation, with backend ``solver``.

    Parameters
    ----------
    model_or_problem : Model or LinearModel or Problem
        A model (solved as it is), or a problem (solved through ``formulation``).
    solver : str
        Backend name, see :func:`~lloptim.solvers.registry.available_solvers` (default
        ``"greedy"``, which solves the bin packing only; models need ``highs``, ``cbc`` or
        ``cvxpy``).
    params : SolveParams or None
        Time limit (seconds, for the whole call), gap, threads, seed, memory allowance (MiB)...
        (default: no time limit, ``rel_gap=1e-4``).
    weights : numpy.ndarray or None
        Bin packing only: seconds of client time per request, ``(R,)`` or ``(R, n_instances)``;
        default :func:`lloptim.work.request_work_s` (from ``estimates`` when given).
    formulation : str
        For a problem: a registered formulation, ``"binpacking"`` (default, every backend),
        ``"full_mip"`` (model backends, one small instance) or a user's.
    estimates : numpy.ndarray or None
        Bin packing only: output-length estimates for the default weights, tokens.
    start : dict or None
        For a model: a feasible answer to start from, variable name -> values shaped like the
        variable (a MIP start; the fallback answer if the search finds nothing better).
    **options
        Further options of the formulation's ``prepare`` hook (``horizon`` for the full MIP).

    Returns
    -------
    SolveResult
        Status, limit, bounds, gap, the answer (``value(x)``, ``assignment`` for a problem),
        duals of an LP (``dual(name)``), which backend ran, and timings.

    Raises
    ------
    SpecError
        Unknown solver or formulation, bad parameters, weights, options or start; the message
        names the field (and never prints the model).
    SolverError
        The backend's package is missing, or it cannot solve this kind of input.
    ModelTooLargeError
        The backend's memory estimate for the model exceeds the allowance.
    TooLargeError
        The bin packing's greedy start is estimated to need more memory than is available
        (:func:`lloptim.guards.check_solve`).
    """
    deadline = Deadline.starting_now(None)
    if params is None:
        params = SolveParams()
    if not isinstance(params, SolveParams):
        raise SpecError("params", f"must be a SolveParams, got {type(params).__name__}", "pass SolveParams(...)")
    deadline = Deadline(deadline.start, params.time_limit_s)
    backend = get_backend(solver)
    if isinstance(model_or_problem, (Model, LinearModel)):
        if weights is not None or estimates is not None or options or formulation != "binpacking":
            bad = "weights" if weights is not None else "estimates" if estimates is not None else (
                sorted(options)[0] if options else "formulation")
            raise SpecError(bad, "applies to a problem, not to a model", "leave it out when solving a model")
        return _solve_model(model_or_problem, backend, params, start, deadline)
    if not isinstance(model_or_problem, Problem):
        raise SpecError("problem", f"must be a lloptim.Model or a lloptim.Problem, got "
                        f"{type(model_or_problem).__name__}", "build a Model, or load a Problem from a spec")
    if start is not None:
        raise SpecError("start", "applies to a model; a problem takes params.warm_start",
                        "pass SolveParams(warm_start=assignment)")
    form = get_formulation(formulation)
    if not backend.solves(form.name):
        models = [n for n in ("highs", "cbc", "cvxpy")]
        raise SolverError(f"solver {solver!r} does not solve the {form.name!r} formulation "
                          f"(fix: use one of {models})")
    if form.name == "binpacking":
        guards.check_solve(model_or_problem, params.rel_gap, weights)  # before the (R, C) arrays of the start
    if weights is not None:
        options["weights"] = weights
    if estimates is not None:
        options["estimates"] = estimates
    return _solve_formulation(model_or_problem, form, backend, params, options, deadline)


def _solve_model(model, backend: Backend, params: SolveParams, start: dict | None, deadline: Deadline) -> SolveResult:
    if not backend.capabilities.supports_mip:
        raise SolverError(f"solver {backend.name!r} solves the bin-packing formulation only, not a model "
                          f"(fix: use solver='highs', 'cbc' or 'cvxpy')")
    t0 = time.perf_counter()
    built = model if isinstance(model, Model) else None
    lm = model.compile() if built is not None else model
    if "column_of_label" not in lm.meta:
        lm.meta["column_of_label"] = np.arange(lm.n_cols)
    x_start = None
    extra: dict = {"model": lm.summary()}
    start_obj = None
    if start is not None:
        if built is None:
            raise SpecError("start", "is given per variable name, which a compiled model does not have",
                            "solve the Model itself")
        x_start = built.start_vector(start)
        v = _violation(lm, x_start)
        if v > FEASIBILITY_TOL:
            raise SpecError("start", f"is not feasible for the model (violation {v:.3g})",
                            "give values that satisfy every constraint and bound")
        start_obj = lm.objective(x_start)
    memory_guard(backend, lm, params)
    t1 = time.perf_counter()
    out = run_backend(backend, lm, x_start if backend.capabilities.supports_mip_start else None, params, deadline)
    t2 = time.perf_counter()
    x = _read_x(lm, out, extra)
    if out.termination in (Termination.UNBOUNDED, Termination.INFEASIBLE):
        x = None  # an unbounded model's feasible point is not an answer
    primal = lm.objective(x) if x is not None else None
    from_start = False
    if start_obj is not None and _better(start_obj, primal, lm.sense):
        x, primal, from_start = x_start, start_obj, True
    dual = out.bound
    if not lm.is_mip and out.termination is Termination.OPTIMAL and x is not None and not from_start:
        dual = primal if dual is None else dual
    if dual is not None and primal is not None and _better(primal, dual, lm.sense):
        extra["bound_clipped_from"] = dual  # a solver's bound passes the answer by round-off only
        dual = primal
    gap = relative_gap(primal, dual, lm.sense)
    status, limit = _status(x is not None, gap, params.rel_gap, out, heuristic=False)
    if from_start and out.termination is Termination.ERROR:
        status = Termination.HEURISTIC
    duals = out.row_duals if (not lm.is_mip and status is Termination.OPTIMAL and not from_start) else None
    extra.update(out.extra)
    extra["backend_bound"], extra["backend_objective"] = out.bound, out.objective
    return SolveResult(status=status, limit=limit, primal_bound=primal, dual_bound=dual, gap=gap, assignment=None,
                       build_s=t1 - t0, solve_s=t2 - t1, peak_mem_mb=max(peak_rss_mb(), out.peak_mb),
                       backend="start" if from_start and out.termination is Termination.ERROR else backend.name,
                       formulation="model", extra=extra, solver=backend.name, x=x, _model=built, _compiled=lm,
                       _row_duals=duals)


def _incumbent(form: Formulation, data, params: SolveParams, deadline: Deadline, heuristic: bool) -> Incumbent | None:
    if form.incumbent is None:
        return None
    budget = deadline.remaining() if heuristic else deadline.share(START_SHARE, floor_s=0.05)
    inc = form.incumbent(data, params, Deadline.starting_now(budget))
    if inc is not None and (inc.objective is None or not np.isfinite(inc.objective)):
        return None
    return inc


def _solve_formulation(problem: Problem, form: Formulation, backend: Backend, params: SolveParams, options: dict,
                       deadline: Deadline) -> SolveResult:
    t0 = deadline.start
    data = form.prepare(problem, **options)
    heuristic = not backend.capabilities.supports_mip
    bound = float(form.bound(data)) if form.bound is not None else None
    inc = _incumbent(form, data, params, deadline, heuristic)
    t_start = time.perf_counter()
    extra: dict = dict(inc.extra) if inc is not None else {}
    inc_obj = inc.objective if inc is not None else None
    if inc is not None:
        extra.update(start_source=inc.source, start_objective=inc_obj)
    if bound is not None:
        extra["formulation_bound"] = bound
    skip = ""
    if (not heuristic and not params.run_always and inc is not None
            and (g := relative_gap(inc_obj, bound, form.sense)) is not None and g <= params.rel_gap):
        skip = (f"{backend.name} skipped: the {inc.source} start is already within rel_gap of the bound "
                f"({100 * g:.4g} % <= {100 * params.rel_gap:.4g} %); always_run=True runs it anyway")
    no_search = ""
    if (not skip and not heuristic and not params.run_always and inc is not None and form.search is not None
            and not form.search(data)):
        no_search = (f"{backend.name} skipped: the {form.name} model is searched only on small cases; "
                     f"the answer is the {inc.source} start")
    model = lm = x = None
    build_s = 0.0
    answer, primal, dec_extra = None, None, {}
    if skip:
        out = Outcome(termination=Termination.OPTIMAL)
    elif no_search:
        out = Outcome(termination=Termination.HEURISTIC)
    elif heuristic:
        task = FormulationTask(form.name, data, bound, None if inc is None else inc.answer,
                               np.inf if inc_obj is None else inc_obj, _backend_params(params, deadline))
        task.params.warm_start = params.warm_start
        try:
            out = backend.solve_task(task)
        except (SolverError, SpecError):
            raise
        except Exception as exc:  # noqa: BLE001 - keep the start and say why
            out = Outcome(termination=Termination.ERROR, extra={"error": f"{type(exc).__name__}: {exc}"})
        answer, primal = _check_answer(form, data, out.assignment)
        if out.limit is Limit.NONE and deadline.expired():
            out.limit = Limit.TIME  # the heuristic was cut short by the time limit
    else:
        model = form.build(data, bound, inc_obj)
        lm = model.compile()
        build_s = time.perf_counter() - t_start
        memory_guard(backend, lm, params)
        x_start = None
        if inc is not None and inc.values is not None:
            vals = inc.values_for(model)  # None: the start has no values in this model (still the fallback)
            if vals is not None:
                x_start = model.start_vector(vals) if isinstance(vals, dict) else np.asarray(vals, dtype=np.float64)
            if x_start is not None and (v := _violation(lm, x_start)) > FEASIBILITY_TOL:
                # a start the model rejects is neither a MIP start nor a fallback answer
                extra["start_rejected"] = f"the {inc.source} start violates the model by {v:.3g}"
                inc, inc_obj, x_start = None, None, None
        out = run_backend(backend, lm, x_start if backend.capabilities.supports_mip_start else None, params,
                           deadline)
        x = _read_x(lm, out, extra)
        if x is not None:
            decoded = form.decode(data, model, x)
            answer, primal = decoded[0], decoded[1]
            dec_extra = decoded[2] if len(decoded) > 2 else {}
            if answer is None:
                extra["rejected_x"] = "the backend's vector does not decode to an answer"
                x = None
        extra["model"] = lm.summary()
    t_solve = time.perf_counter()
    # the better of the backend's answer and the start
    ran = backend.name
    if inc is not None and (answer is None or _better(inc_obj, primal, form.sense)):
        if answer is None and not skip and out.termination is not Termination.OPTIMAL:
            extra["fallback"] = f"{backend.name} returned no better feasible answer; kept the {inc.source} start"
        answer, primal, dec_extra = inc.answer, inc_obj, {}
        x = None
        if skip or no_search or out.termination is Termination.ERROR:
            ran = inc.source
    extra.update(dec_extra)
    multipliers, cert_bound = ({}, None)
    if form.certify is not None:
        multipliers, cert_bound = form.certify(data, out.multipliers)
    elif out.multipliers:
        multipliers = out.multipliers
    dual = _tighter([bound, out.bound, cert_bound], form.sense)
    if dual is not None and primal is not None and _better(primal, dual, form.sense):
        extra["bound_clipped_from"] = dual  # bounds can pass the recomputed objective by round-off only
        dual = primal
    gap = relative_gap(primal, dual, form.sense)
    status, limit = _status(answer is not None, gap, params.rel_gap, out, heuristic or bool(skip) or ran != backend.name)
    if skip:
        status, limit = Termination.OPTIMAL, Limit.NONE
    skip = skip or no_search
    if out.termination is Termination.ERROR and answer is not None:
        extra["backend_termination"] = "error"
    extra.update(out.extra)
    extra["backend_bound"], extra["backend_objective"] = out.bound, out.objective
    if x is None and model is not None and answer is not None and inc is not None and inc.values is not None:
        vals = inc.values_for(model)
        if vals is not None:
            x = model.start_vector(vals) if isinstance(vals, dict) else np.asarray(vals, dtype=np.float64)
    # without a model, value(name) reads the start's values, built only when asked (R x C can be large)
    same = inc is not None and answer is not None and (answer is inc.answer or (
        isinstance(answer, np.ndarray) and np.array_equal(answer, inc.answer)))
    values = (lambda inc=inc: _lazy_values(inc)) if model is None and same else None
    # an LP formulation solved to optimality answers dual(name) like a model does
    duals = (out.row_duals if lm is not None and not lm.is_mip and out.termination is Termination.OPTIMAL
             and x is not None and not same else None)
    return SolveResult(status=status, limit=limit, primal_bound=primal, dual_bound=dual, gap=gap,
                       assignment=answer, multipliers=multipliers, build_s=build_s, solve_s=t_solve - t_start - build_s,
                       peak_mem_mb=max(peak_rss_mb(), out.peak_mb), backend=ran, formulation=form.name, extra=extra,
                       solver=backend.name, start_s=t_start - t0, skipped=skip, x=x, _model=model, _compiled=lm,
                       _values=values, _row_duals=duals)


def _lazy_values(inc: Incumbent) -> dict | None:
    """The start's variable values by name, when they can be had without a model."""
    if isinstance(inc.values, dict):
        return inc.values
    try:
        vals = inc.values(None)
    except Exception:  # noqa: BLE001 - a hook that needs the model: no values without one
        return None
    return vals if isinstance(vals, dict) else None


def _check_answer(form: Formulation, data, answer) -> tuple:
    """A heuristic's answer and its objective recomputed, or ``(None, None)`` when it is not valid."""
    if answer is None:
        return None, None
    if isinstance(data, BinPackingData):
        from lloptim.formulations.binpacking import loads

        a = check_assignment(answer, data.n_requests, data.n_clients)
        return (a, float(loads(data, a).max())) if a is not None else (None, None)
    return None, None
