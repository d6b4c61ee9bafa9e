"""Size guards: estimate the memory and time of a run from its size, and refuse what cannot finish.

A first run on too large an input should end in a second with a message, not after minutes of
swapping or a kill by the kernel. Every entry point that can be asked for more than a machine
holds estimates the cost from the sizes alone (requests, output tokens, clients, instances, case
count), in microseconds, and raises :class:`~lloptim.errors.TooLargeError` naming the setting to
lower, what would fit, and how to override:

* :func:`simulation_cost`: the runtime engine (``lloptim simulate``, :func:`lloptim.simulate`,
  ``lloptim run``), checked by :func:`lloptim.simulator.run_policy`;
* :func:`solve_cost`: the solve pipeline's greedy start (LPT + local search), the weight matrix
  of a mixed fleet and its LP prices, checked at the top of :func:`lloptim.solvers.solve`;
* :func:`reproduction_cost`: ``lloptim reproduce`` (the main comparison, the noise sweep and the
  case study), checked by :func:`lloptim.experiments.reproduce`.

Cost models. The engine runs one iteration at a time: its time is about ``a * iterations + b *
requests + c * clients + d * instances + e * iterations * instances**2`` (the last term: an
instance with nothing to do re-scans the other instances each time it wakes), its memory about
``alpha * iterations + beta * requests + gamma * clients + delta * instances`` (the trace keeps one
record per iteration). Iterations are estimated from the token counts: each busy instance (the
request schedulers fill clients in order) runs about ``max(output_tokens / clients used, 90th
percentile of output, output tokens along the longest chain of dependent requests)`` decode
steps, more when arrivals are sparse (decodes then batch only the requests that overlap), plus at
most one prefill per request. The greedy start's peak is the move/swap step of
:func:`lloptim.solvers.greedy.local_search`: it scores the requests of the most loaded client
against those of the :data:`~lloptim.solvers.greedy.SWAP_PARTNERS` least loaded ones at once
(four float64 arrays of that many pairs), and it is skipped when the closed-form bound already
proves the LPT start within the requested gap. A mixed fleet adds its ``(requests, clients)``
weight matrix and the HiGHS LP of its prices, whose time grows as its columns to the power 1.7.

Calibration. The coefficients (:data:`ENGINE_TIME_S`, :data:`ENGINE_BYTES`, :data:`CASE_BYTES`,
:data:`PAIR_BYTES`, :data:`PRICE_LP_S`) come from ``python benchmarks/size_guards.py``, which runs
each case of a grid (GSM8K, light and heavy-tailed synthetic workloads, Poisson arrivals below
and above capacity, up to 10^6 clients and 128 instances, a mixed fleet, the greedy start with
``--gap 0``, the price LP) in a fresh process, measures wall time and the peak resident memory,
fits the engine's coefficients by non-negative least squares on relative error, and prints
measured vs estimated; the values here are an envelope of the measurements (a least-squares fit
is a mean, and a guard must not underestimate memory). Measured on 2 shared cores (``benchmarks/results/size_guards.txt``): time
estimates 1.1-6x the measured wall time, memory estimates 1.0-8.5x the measured peak. That is
what a refusal needs: the limits are far from the sizes anyone runs by accident, and the message
says it is an estimate and how to run anyway.

Limits. Memory: :data:`MEMORY_FRACTION` of the memory available when the check runs
(``psutil``). Time: unlimited for the Python API, :data:`CLI_MAX_SECONDS` for the command line,
where a run longer than that is almost always a typo. Override: ``--no-size-guard`` on the command
line, ``with lloptim.guards.unguarded():`` in Python, or the environment variable
``LLOPTIM_SIZE_GUARD=0`` (which child processes inherit).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping

import numpy as np

from lloptim.errors import TooLargeError

__all__ = ["RunSize", "Estimate", "Limits", "simulation_cost", "solve_cost", "case_study_cost",
           "reproduction_cost", "check", "check_simulation", "check_solve", "unguarded", "guard_settings",
           "limits", "enabled", "format_bytes", "format_seconds", "MEMORY_FRACTION", "CLI_MAX_SECONDS",
           "ENGINE_TIME_S", "ENGINE_BYTES", "CASE_BYTES", "DEFAULT_FIELDS"]

#: Share of the memory available at the check that a run may be estimated to use.
MEMORY_FRACTION = 0.8
#: Estimated seconds above which the command line refuses a run (one hour).
CLI_MAX_SECONDS = 3600.0

#: Engine time coefficients in seconds per iteration, per request, per client, per instance, and per
#: ``iteration x instance**2`` (idle instances re-scanning the others when they wake).
ENGINE_TIME_S = {"iteration": 2.5e-5, "request": 3e-5, "client": 5e-6, "instance": 1e-4, "idle_scan": 8e-8}
#: Engine memory coefficients in bytes (a run's fixed cost, and per iteration for the trace record,
#: decision time and the hybrid's re-planning state, per request for the workload arrays and
#: per-request state and results, per client for client state and policy queues, per instance).
ENGINE_BYTES = {"base": 48 * 2**20, "iteration": 1200, "request": 500, "client": 900, "instance": 4000}
#: Bytes held per case of the case study until it ends (its task and its result).
CASE_BYTES = 4000
#: Simulator runs of :func:`lloptim.experiments.reproduce` on the main problem (the main policies,
#: the unknown-length runs and the noise sweep).
REPRODUCE_RUNS = 23
#: Runs kept in memory until the report is written (the main runs, for the figures).
REPRODUCE_KEPT_RUNS = 11
#: Bytes per pair scored in one move/swap step of the greedy local search (four float64 arrays and
#: a mask).
PAIR_BYTES = 40
#: Fixed memory of the greedy start (its subset tables and loads), bytes.
SOLVE_BASE_BYTES = 64 * 2**20
#: Seconds of the HiGHS price LP of a mixed fleet (:func:`lloptim.formulations.lp_bound.lp_prices`)
#: at :data:`PRICE_LP_COLUMNS` columns (requests x clients), growing as the columns to the power
#: :data:`PRICE_LP_EXPONENT` (measured: 0.6-1.7 s at 40,000 columns, 6.5-18 s at 160,000, 34-75 s at
#: 320,000, on 2 busy cores).
PRICE_LP_S = 0.8
#: Columns (requests x clients) of the price LP that :data:`PRICE_LP_S` was measured at.
PRICE_LP_COLUMNS = 40_000
#: Growth exponent of the price LP's time in its columns.
PRICE_LP_EXPONENT = 1.7

#: How a size is named to a Python user when the caller gave no names (see :func:`guard_settings`).
DEFAULT_FIELDS = {
    "requests": "the requests (workload.n, workload.limit or [[requests]])",
    "clients": "instances[].clients",
    "instances": "instances[].count",
    "cases": "cases",
    "rel_gap": "params.rel_gap",
}


@dataclass(frozen=True)
class RunSize:
    """What the cost of a simulation depends on.

    Attributes
    ----------
    requests
        Requests (count).
    output_tokens
        Output tokens over all requests, tokens.
    output_q90
        90th percentile of the output lengths, tokens.
    output_mean
        Mean output length, tokens.
    clients
        Clients over all instances (count).
    instances
        Instances (count).
    arrival_rate
        Requests per second over the arrival span; ``None`` when all arrive at once.
    decode_base_s
        Smallest fixed cost of a decode step over the instances, seconds.
    critical_tokens
        Output tokens along the longest chain of dependent requests (0 without precedence): their
        decode steps cannot overlap, tokens.
    """

    requests: int
    output_tokens: float
    output_q90: float
    output_mean: float
    clients: int
    instances: int
    arrival_rate: float | None = None
    decode_base_s: float = 0.03
    critical_tokens: float = 0.0

    @classmethod
    def of(cls, problem) -> "RunSize":
        """The sizes of a :class:`~lloptim.problem.Problem` (one vectorized pass over the requests)."""
        w = problem.workload
        o = w.output_tokens
        span = float(w.arrival_s.max() - w.arrival_s.min()) if len(w) else 0.0
        rate = len(w) / span if span > 0 else None
        critical = 0.0
        if getattr(w, "precedence", None) is not None:
            critical = float(np.max(w.precedence.earliest_start(o) + o))
        return cls(requests=len(w), output_tokens=float(o.sum()), output_q90=float(np.percentile(o, 90)),
                   output_mean=float(o.mean()), clients=int(problem.n_clients), instances=len(problem.instances),
                   arrival_rate=rate, decode_base_s=min(i.profile.latency.decode_base_s for i in problem.instances),
                   critical_tokens=critical)

    def scaled(self, knob: str, factor: float) -> "RunSize":
        """These sizes with one of them scaled (the others kept; per-instance clients kept with instances).

        Parameters
        ----------
        knob
            ``"requests"`` (output tokens and arrival rate scale along), ``"clients"`` or
            ``"instances"``.
        factor
            Multiplier (ratio).
        """
        if knob == "requests":  # more workflows of the same shape: the longest chain stays
            rate = None if self.arrival_rate is None else self.arrival_rate * factor
            return replace(self, requests=max(1, int(self.requests * factor)),
                           output_tokens=self.output_tokens * factor, arrival_rate=rate)
        if knob == "clients":
            return replace(self, clients=max(self.instances, int(self.clients * factor)))
        if knob == "instances":
            m = max(1, int(self.instances * factor))
            return replace(self, instances=m, clients=max(m, int(self.clients * m / self.instances)))
        raise ValueError(knob)

    def iterations(self) -> float:
        """Estimated iterations of one run over all instances (see the module docstring)."""
        R, C, m = self.requests, self.clients, self.instances
        used = max(1, min(C, R))
        # the request schedulers fill clients in order, so only the instances whose clients got
        # requests run iterations (measured: 1,319 requests on 128 x 40 clients keep 33 busy)
        busy = max(1, min(m, -(-R // max(1, C // m))))
        # a chain of dependent requests decodes one after another, whatever the clients
        steps = busy * max(self.output_tokens / used, self.output_q90, self.critical_tokens)
        if self.arrival_rate is not None:
            # sparse arrivals: only the requests that overlap decode together (Little's law, with
            # the shortest step, so the batch is under- and the iteration count overestimated)
            overlap = min(float(used), max(1.0, self.arrival_rate * self.output_mean * self.decode_base_s))
            steps = max(steps, self.output_tokens / overlap)
        return steps + R


@dataclass(frozen=True)
class Estimate:
    """Estimated cost of a run.

    Attributes
    ----------
    what
        The run, in words ("simulating 1,319 requests on 40 clients").
    memory_bytes
        Peak memory beyond what is already allocated, bytes.
    seconds
        Wall time on one core of this kind of machine, seconds.
    memory_driver, time_driver
        The size that contributes most to each (a key of :data:`DEFAULT_FIELDS`).
    detail
        What dominates, in words (for the message).
    fits
        For each size that can be lowered, the largest value that would pass the limits the
        estimate was checked against (filled in by :func:`check`).
    """

    what: str
    memory_bytes: float
    seconds: float
    memory_driver: str = "requests"
    time_driver: str = "requests"
    detail: str = ""
    fits: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    """What a run may use.

    Attributes
    ----------
    memory_bytes
        Largest estimated peak memory, bytes.
    seconds
        Largest estimated wall time, seconds (``inf``: no limit).
    """

    memory_bytes: float
    seconds: float = math.inf


_ENABLED: ContextVar[bool] = ContextVar("lloptim_size_guard_enabled", default=True)
_SETTINGS: ContextVar[dict] = ContextVar("lloptim_size_guard_settings", default={})


def enabled() -> bool:
    """Whether size guards refuse here (not inside :func:`unguarded`, nor with ``LLOPTIM_SIZE_GUARD=0``)."""
    return _ENABLED.get() and os.environ.get("LLOPTIM_SIZE_GUARD", "1").strip().lower() not in ("0", "off", "no",
                                                                                               "false")


@contextmanager
def unguarded() -> Iterator[None]:
    """Run the block without size guards (for runs you know fit, or want to try anyway)."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


@contextmanager
def guard_settings(enabled: bool = True, max_seconds: float | None = None, override: str | None = None,
                   fields: Mapping[str, str] | None = None) -> Iterator[None]:
    """Set how the guards inside the block refuse, and how their messages name things.

    The command line wraps each command in this, so an error names its flags.

    Parameters
    ----------
    enabled
        False turns the guards off, as :func:`unguarded`.
    max_seconds
        Time limit, seconds (``None``: none).
    override
        How to run anyway, for the message (``"pass --no-size-guard"``).
    fields
        Names of the sizes as the user set them: keys of :data:`DEFAULT_FIELDS` to a flag or spec
        key (``{"clients": "--clients"}``).
    """
    tokens = [_ENABLED.set(enabled and _ENABLED.get()),
              _SETTINGS.set({**_SETTINGS.get(), "max_seconds": max_seconds, "override": override,
                             "fields": {**_SETTINGS.get().get("fields", {}), **(fields or {})}})]
    try:
        yield
    finally:
        _SETTINGS.reset(tokens[1])
        _ENABLED.reset(tokens[0])


def limits() -> Limits:
    """The limits a check applies now: the memory available (bytes), and the time limit of
    :func:`guard_settings` (seconds; ``inf`` outside it)."""
    import psutil

    seconds = _SETTINGS.get().get("max_seconds")
    return Limits(MEMORY_FRACTION * psutil.virtual_memory().available, math.inf if seconds is None else seconds)


def format_bytes(n: float) -> str:
    """``n`` bytes in words (``"3.7 GiB"``)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:.0f} bytes"


def format_seconds(s: float) -> str:
    """``s`` seconds in words (``"3.2 hours"``)."""
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if s >= size:
            return f"{s / size:,.1f} {unit}"
    return f"{s:.1f} s"


def _sizes_text(size: RunSize) -> str:
    return (f"{size.requests:,} requests ({size.output_tokens:,.0f} output tokens) on {size.clients:,} clients of "
            f"{size.instances:,} instance{'s' if size.instances != 1 else ''}")


def _engine_terms(size: RunSize) -> tuple[dict, dict]:
    it = size.iterations()
    m = size.instances
    t, b = ENGINE_TIME_S, ENGINE_BYTES
    time_terms = {"requests": t["iteration"] * it + t["request"] * size.requests,
                  "clients": t["client"] * size.clients,
                  "instances": t["instance"] * m + t["idle_scan"] * it * m * (m - 1)}
    mem_terms = {"requests": b["base"] + b["iteration"] * it + b["request"] * size.requests,
                 "clients": b["client"] * size.clients, "instances": b["instance"] * m}
    return time_terms, mem_terms


def simulation_cost(size, runs: int = 1, kept_runs: int = 1) -> Estimate:
    """Estimated cost of ``runs`` simulations of one problem, of which ``kept_runs`` stay in memory.

    Parameters
    ----------
    size
        A :class:`RunSize` or a :class:`~lloptim.problem.Problem`.
    runs
        Simulations run one after another (count).
    kept_runs
        Their results held at once (count); the engine's working memory is counted once.

    Returns
    -------
    Estimate
        The cost, with the size that dominates each resource.
    """
    size = size if isinstance(size, RunSize) else RunSize.of(size)
    time_terms, mem_terms = _engine_terms(size)
    seconds = runs * sum(time_terms.values())
    # a finished run keeps its trace and per-request results, not the engine's per-client state
    kept = (kept_runs - 1) * (ENGINE_BYTES["iteration"] * size.iterations() / 4 + 100 * size.requests)
    memory = sum(mem_terms.values()) + max(0.0, kept)
    what = f"{runs} simulations of {_sizes_text(size)}" if runs > 1 else f"simulating {_sizes_text(size)}"
    detail = ""
    if max(time_terms, key=time_terms.get) == "instances" and size.instances > 1:
        detail = "the engine's time grows with the square of the number of instances"
    return Estimate(what, memory, seconds, max(mem_terms, key=mem_terms.get), max(time_terms, key=time_terms.get),
                    detail)


def case_study_cost(n_cases: int, n_requests: int = 1319, workers: int = 1) -> Estimate:
    """Estimated cost of :func:`~lloptim.experiments.case_study`: two runs per case, results kept.

    Parameters
    ----------
    n_cases
        Cases (count).
    n_requests
        Requests per case (count), drawn from GSM8K train.
    workers
        Cases run at once (count): 1 locally, the CPUs of a local Ray.
    """
    from lloptim.workloads import gsm8k

    o = gsm8k("train").output_tokens
    one = RunSize(requests=n_requests, output_tokens=float(o.mean()) * n_requests,
                  output_q90=float(np.percentile(o, 90)), output_mean=float(o.mean()), clients=40, instances=1)
    per_case = simulation_cost(one)
    return Estimate(f"a case study of {n_cases:,} cases of {n_requests:,} requests", per_case.memory_bytes
                    + CASE_BYTES * n_cases, 2 * per_case.seconds * n_cases / max(1, workers), "cases", "cases")


def reproduction_cost(problem, cases: int, n_requests: int = 1319, workers: int = 1) -> Estimate:
    """Estimated cost of :func:`~lloptim.experiments.reproduce` on ``problem`` with ``cases`` cases.

    Parameters
    ----------
    problem
        The main problem (or its :class:`RunSize`).
    cases
        Cases of the case study (count).
    n_requests
        Requests per case (count).
    workers
        Cases run at once (count).
    """
    main = simulation_cost(problem, runs=REPRODUCE_RUNS, kept_runs=REPRODUCE_KEPT_RUNS)
    main = replace(main, what=f"{REPRODUCE_RUNS} simulations of {_sizes_text(RunSize.of(problem) if not isinstance(problem, RunSize) else problem)}")
    if cases <= 0:
        return replace(main, what=f"the reproduction ({main.what})")
    study = case_study_cost(cases, n_requests, workers)
    mem_driver = main.memory_driver if main.memory_bytes >= study.memory_bytes else "cases"
    time_driver = main.time_driver if main.seconds >= study.seconds else "cases"
    return Estimate(f"the reproduction ({main.what}, then {study.what})", max(main.memory_bytes, study.memory_bytes), main.seconds + study.seconds,
                    mem_driver, time_driver, main.detail if time_driver != "cases" else "")


def solve_cost(problem, rel_gap: float = 1e-4, weights: np.ndarray | None = None) -> Estimate:
    """Estimated peak memory of the solve pipeline's start (weights, greedy start, LP prices), and
    the time of a mixed fleet's price LP.

    Parameters
    ----------
    problem
        The problem (clients of all instances are the bins).
    rel_gap
        The relative gap asked for: the local search is skipped when the bound proves LPT within
        a tenth of it (LPT's makespan is at most the average load plus the largest weight).
    weights
        Per-request weights as given to :func:`~lloptim.solvers.solve`, if any.

    Returns
    -------
    Estimate
        Memory, and the seconds of the price LP of a mixed fleet (0 for identical clients: the
        search itself is bounded by the solver's time limit).
    """
    from lloptim.solvers.greedy import MAX_SWAP_PAIRS, SWAP_PARTNERS, WIDE_SWAP_PARTNERS
    from lloptim.work import request_work_s

    R, C, m = problem.n_requests, problem.n_clients, len(problem.instances)
    kinds = {(i.profile.latency, i.clients) for i in problem.instances}
    uniform = (weights is not None and np.ndim(weights) == 1) or len(kinds) == 1
    w = None
    if weights is not None:
        given = np.asarray(weights, dtype=np.float64)
        if given.ndim in (1, 2) and given.shape[0] == R and given.size and np.all(np.isfinite(given)):
            w = given.reshape(R, -1).min(axis=1)
    if w is None:  # no (valid) weights given: the pipeline's default, or it names the bad ones itself
        w = request_work_s(problem)
    mem = {"requests": SOLVE_BASE_BYTES + 16.0 * R * m}  # the (R, instances) weight matrix and its copy
    on_max = -(-R // C) + 1  # requests on the most loaded client after LPT
    avg = float(w.sum()) / C
    excess = _lpt_excess(w, C) if uniform else math.inf
    gap_needed = 10 * excess / avg if avg > 0 else 0.0
    pairs = 0.0
    if excess > avg * rel_gap / 10 and C > 1:  # the local search runs
        others = max(0, R - on_max)
        if uniform and C > SWAP_PARTNERS + 1:
            # first the requests of the least loaded clients; when no swap among them helps, all the
            # others, or (too many pairs) those of a wider set of clients: the larger block sets the peak
            first = min(others, SWAP_PARTNERS * on_max)
            second = min(others, WIDE_SWAP_PARTNERS * on_max) if on_max * R > MAX_SWAP_PAIRS else others
            partners = max(first, second)
        else:
            partners = others
        pairs = on_max * partners
        mem["rel_gap"] = PAIR_BYTES * pairs
    seconds = 0.0
    if not uniform:
        mem["clients"] = 8.0 * R * C + 200.0 * R * C  # the (R, C) weight matrix; the price LP's columns
        seconds = PRICE_LP_S * (R * C / PRICE_LP_COLUMNS) ** PRICE_LP_EXPONENT
    detail = (f"its local search scores {on_max:,} x {pairs / max(on_max, 1):,.0f} request pairs at once"
              if pairs else "")
    if seconds > 60:
        detail = "; ".join(x for x in (detail, f"the price LP of a mixed fleet has {R * C:,} columns") if x)
    driver = max(mem, key=mem.get)
    if driver == "rel_gap" and not gap_needed < 1:
        driver = "requests"  # no gap skips the search: fewer requests per client is the way
    return Estimate(f"the start of a solve of {R:,} requests on {C:,} clients", sum(mem.values()), seconds,
                    driver, "requests", detail, {"rel_gap": gap_needed} if gap_needed < 1 else {})


def _lpt_excess(w: np.ndarray, clients: int) -> float:
    """Upper bound on (LPT makespan - average load) for identical clients, seconds.

    The client that ends with the makespan got its last request ``j`` when it was the least loaded,
    so at most the average of the requests before ``j``; hence ``makespan - average <= w_j (1 - 1/C)
    - (sum of the requests after j) / C`` for that ``j``, and at most the maximum over all ``j`` of the
    right-hand side (one sort and a cumulative sum).
    """
    if clients <= 1 or w.size == 0:
        return 0.0
    order = np.sort(w)[::-1]
    after = np.concatenate([np.cumsum(order[::-1])[::-1][1:], [0.0]])
    return float(max(0.0, np.max(order * (1 - 1 / clients) - after / clients)))


def _field(key: str) -> str:
    return _SETTINGS.get().get("fields", {}).get(key) or DEFAULT_FIELDS.get(key, key)


def _largest_fitting(cost_of, limit: Limits, start: float) -> int | None:
    """Largest integer ``x <= start`` with ``cost_of(x)`` within ``limit`` (bisection on a monotone cost)."""
    def ok(x: float) -> bool:
        e = cost_of(x)
        return e.memory_bytes <= limit.memory_bytes and e.seconds <= limit.seconds

    lo, hi = 0.0, float(start)
    if not ok(1.0):
        return None
    lo = 1.0
    for _ in range(60):
        if hi - lo < 1:
            break
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return int(lo)


def check(estimate: Estimate, limit: Limits | None = None, lower=None) -> Estimate:
    """Raise :class:`~lloptim.errors.TooLargeError` if ``estimate`` exceeds ``limit``; else return it.

    Parameters
    ----------
    estimate
        The cost.
    limit
        Default :func:`limits`.
    lower
        ``{size key: (current value, callable value -> Estimate)}``: sizes the user can lower; the
        message names the largest value of the dominating one that would fit.

    Returns
    -------
    Estimate
        ``estimate`` (with :attr:`Estimate.fits`) when it fits or the guards are off.
    """
    if not enabled():
        return estimate
    limit = limits() if limit is None else limit
    over_mem = estimate.memory_bytes > limit.memory_bytes
    over_time = estimate.seconds > limit.seconds
    if not (over_mem or over_time):
        return estimate
    driver = estimate.memory_driver if over_mem else estimate.time_driver
    need = []
    if over_mem:
        need.append(f"about {format_bytes(estimate.memory_bytes)} of memory ({format_bytes(limit.memory_bytes)} "
                    "can be used here)")
    if over_time:
        need.append(f"about {format_seconds(estimate.seconds)} (the limit is {format_seconds(limit.seconds)})")
    problem = f"{estimate.what} would take {' and '.join(need)}"
    if estimate.detail:
        problem += f"; {estimate.detail}"
    fld = _field(driver)
    fits = dict(estimate.fits)
    if lower and driver in lower:
        current, cost_of = lower[driver]
        best = _largest_fitting(cost_of, limit, current)
        if best is not None:
            fits[driver] = best
    if driver == "rel_gap" and "rel_gap" in fits:
        fix = f"ask for a gap of at least {fits['rel_gap']:.2g} with {fld} (the start then needs no search)"
    elif driver in fits:
        fix = f"lower {fld} to at most about {fits[driver]:,}"
    else:
        fix = f"lower {fld}"
    override = _SETTINGS.get().get("override") or "run it inside `with lloptim.guards.unguarded():`"
    raise TooLargeError(fld, problem + " (an estimate from the sizes)", f"{fix}, or {override} to try anyway")


def check_simulation(problem, runs: int = 1) -> Estimate:
    """Check ``runs`` simulations of ``problem`` against the limits (see :func:`check`).

    Parameters
    ----------
    problem
        The problem (its sizes are read in one pass).
    runs
        Simulations of it run one after another (count).

    Returns
    -------
    Estimate
        The estimate (memory in bytes, time in seconds); empty when the guards are off.
    """
    if not enabled():
        return Estimate("", 0.0, 0.0)
    size = RunSize.of(problem)
    est = simulation_cost(size, runs)
    # what a user sets: requests, clients *per instance* (a flag or spec key), instances
    current = {"requests": size.requests, "clients": max(1, size.clients // size.instances),
               "instances": size.instances}
    knobs = {k: (v, (lambda k, v: lambda x: simulation_cost(size.scaled(k, x / v), runs))(k, v))
             for k, v in current.items()}
    return check(est, lower=knobs)


def check_solve(problem, rel_gap: float = 1e-4, weights: np.ndarray | None = None) -> Estimate:
    """Check the solve pipeline's start on ``problem`` against the limits (see :func:`check`).

    Parameters
    ----------
    problem
        The problem.
    rel_gap
        The relative gap asked for (decides whether the local search runs).
    weights
        Per-request weights given to the solve, seconds, if any.

    Returns
    -------
    Estimate
        The estimate (memory in bytes); empty when the guards are off.
    """
    if not enabled():
        return Estimate("", 0.0, 0.0)
    return check(solve_cost(problem, rel_gap, weights))
