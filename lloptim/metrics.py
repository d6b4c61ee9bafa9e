"""Metrics of a run: makespan, utilization, bubbles, latency percentiles, throughput, the bound.

Utilization (``../shared/design/paper.md``): the time clients spend in an iteration that works on
their request (a prefill or fused iteration that processes it, or a decode step that advances it),
summed over clients, divided by ``clients x makespan``. A client that has no request, waits for its
prefill, or is stalled while other clients prefill, is in a *bubble*.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from lloptim.bounds import LowerBound, lower_bound
from lloptim.runtime.engine import KIND_DECODE, KIND_MIXED, RunResult
from lloptim.runtime.estimators import estimate_quality

__all__ = ["RunMetrics", "summarize", "client_busy_time", "first_token_times", "workflow_latency"]


@dataclass(frozen=True)
class RunMetrics:
    """Summary of one run. Times in seconds unless the name says otherwise.

    Percentiles are over the requests that have the quantity (NaN when none has).

    Attributes
    ----------
    policy
        Name of the policy.
    backend
        Name of the backend.
    known_lengths
        Whether the policy saw the true output lengths.
    requests_total
        Requests in the problem (count).
    requests_completed
        Requests that finished (count).
    output_tokens
        Output tokens of the finished requests, tokens.
    makespan_s
        When the last request finished, seconds.
    utilization
        Busy client-seconds (:func:`client_busy_time`) over ``clients x makespan``, fraction in [0, 1].
    bubble_share
        ``1 - utilization``: share of client time in bubbles, fraction.
    lower_bound_s
        The makespan lower bound, seconds: :attr:`~lloptim.bounds.LowerBound.fused_s` when the run
        used mixed iterations, :attr:`~lloptim.bounds.LowerBound.total_s` otherwise; it counts the
        KV memory of the run's KV mode.
    gap_to_bound
        ``makespan / lower_bound - 1``, relative (0.05 is 5 % above the bound; NaN if the bound is 0).
    critical_path_s
        The critical-path part of the bound, seconds: the longest chain of dependent requests
        (arrivals included; :func:`~lloptim.bounds.critical_path_bound`), for the run's kind of
        iterations like ``lower_bound_s``.
    throughput_tokens_per_s
        Output tokens per second of makespan.
    ttft_mean_s, ttft_p50_s, ttft_p99_s
        Mean, median and 99th percentile time to first token, seconds: from arrival to the end of
        the request's first decoding iteration.
    latency_mean_s, latency_p50_s, latency_p99_s
        Mean, median and 99th percentile end-to-end latency, seconds: from arrival to finish.
    prefill_iterations, decode_iterations, mixed_iterations
        Iterations of each kind over all instances (count).
    decision_latency_us_p50, decision_latency_us_p99
        Median and 99th percentile wall time of the policy's iteration decisions, microseconds
        (0 when decisions were not measured).
    requeued
        Requests a fault handed back to the request scheduler (count, with repeats).
    wasted_tokens
        Output tokens decoded for requests a fault then took back, tokens.
    failed_clients
        Clients that failed during the run (count).
    migrations
        Moves of running requests between instances with their KV caches (count; see
        :mod:`lloptim.runtime.migration`).
    wall_s
        Wall-clock time of the run, seconds.
    kv_mode
        KV mode of the run (``"paged"``, ``"reserve"``, or ``"mixed"`` across instances).
    preemptions
        Preemptions of running requests for KV memory (count, with repeats).
    requests_preempted
        Requests preempted at least once (count).
    recomputed_tokens
        KV tokens prefilled again after preemptions, tokens.
    swapped_out_tokens
        KV tokens copied to host memory by swap preemptions, tokens (0 unless ``preemption="swap"``).
    swapped_in_tokens
        KV tokens copied back from host memory when swapped requests resumed, tokens.
    swap_s
        Instance time spent on those copies, seconds (summed over instances; inside the makespan).
    kv_utilization
        KV memory allocated, averaged over the instances' busy time, over their capacity
        (fraction in [0, 1]).
    kv_peak_tokens
        Most KV memory any instance held at once, tokens.
    memory_binds
        Whether the bound's decode steps are set by the KV memory rather than the clients.
    workflows
        Workflows in the problem (count): weakly connected components of the precedence DAG, each
        request without predecessors or successors one of its own (:func:`workflow_latency`).
    workflow_latency_mean_s, workflow_latency_p99_s
        Mean and 99th percentile end-to-end latency of the workflows, seconds: from a workflow's
        first arrival to the finish of its last request (over the workflows whose requests all
        finished). Without precedence these are the requests' ``latency_mean_s`` and
        ``latency_p99_s``.
    estimate_ratio_median, estimate_rank_correlation
        With estimated output lengths (``known_lengths`` False): the median of estimate / true
        length over the requests and the Spearman rank correlation of estimates and true lengths
        (:func:`~lloptim.runtime.estimators.estimate_quality`; NaN with known lengths, and the
        correlation NaN when the estimates are all equal).
    """

    policy: str
    backend: str
    known_lengths: bool
    requests_total: int
    requests_completed: int
    output_tokens: int
    makespan_s: float
    utilization: float
    bubble_share: float
    lower_bound_s: float
    gap_to_bound: float
    critical_path_s: float
    throughput_tokens_per_s: float
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    latency_mean_s: float
    latency_p50_s: float
    latency_p99_s: float
    prefill_iterations: int
    decode_iterations: int
    mixed_iterations: int
    decision_latency_us_p50: float
    decision_latency_us_p99: float
    requeued: int
    wasted_tokens: int
    failed_clients: int
    migrations: int
    wall_s: float
    kv_mode: str = "paged"
    preemptions: int = 0
    requests_preempted: int = 0
    recomputed_tokens: int = 0
    swapped_out_tokens: int = 0
    swapped_in_tokens: int = 0
    swap_s: float = 0.0
    kv_utilization: float = 0.0
    kv_peak_tokens: int = 0
    memory_binds: bool = False
    workflows: int = 0
    workflow_latency_mean_s: float = float("nan")
    workflow_latency_p99_s: float = float("nan")
    estimate_ratio_median: float = float("nan")
    estimate_rank_correlation: float = float("nan")

    def to_dict(self) -> dict:
        """Plain dictionary (JSON-ready)."""
        return asdict(self)


def client_busy_time(result: RunResult) -> float:
    """Client-seconds spent in iterations that worked on the client's request."""
    return float(np.dot(result.trace_duration_s, result.trace_participants))


def first_token_times(result: RunResult) -> np.ndarray:
    """End of each request's first decoding iteration, seconds (NaN if it never decoded).

    Parameters
    ----------
    result
        The run.

    Returns
    -------
    numpy.ndarray
        ``(R,)`` absolute times, seconds: the first decode or mixed iteration of the request's
        instance that starts at or after the end of its prefill.
    """
    out = np.full(result.done_s.shape, np.nan)
    inst_of_client = result.problem.client_instance()
    decoding = (result.trace_kind == KIND_DECODE) | (result.trace_kind == KIND_MIXED)
    for k in range(len(result.problem.instances)):
        sel = decoding & (result.trace_instance == k) & (result.trace_running > 0)
        starts = result.trace_start_s[sel]
        ends = starts + result.trace_duration_s[sel]
        rows = np.flatnonzero((result.client >= 0) & (inst_of_client[np.maximum(result.client, 0)] == k))
        if not rows.size or not starts.size:
            continue
        i = np.searchsorted(starts, result.prefill_end_s[rows] - 1e-12, side="left")
        ok = i < starts.size
        out[rows[ok]] = ends[i[ok]]
    return out


def workflow_latency(result: RunResult) -> np.ndarray:
    """End-to-end latency of each workflow, seconds: its first arrival to its last request's finish.

    A workflow is a weakly connected component of the precedence DAG
    (:meth:`~lloptim.precedence.Precedence.workflows`); without precedence every request is one,
    and this is each request's latency. A request's own latency counts from its arrival, which for
    a follow-up step generated with its workflow is the workflow's arrival too, so the workflow's
    latency is the largest of its requests' when they all arrive together.

    Parameters
    ----------
    result
        The run.

    Returns
    -------
    numpy.ndarray
        ``(W,)`` latencies, seconds, in the order of the workflow labels (NaN for a workflow with
        an unfinished request).
    """
    workload = result.problem.workload
    arrival, done = workload.arrival_s, result.done_s
    if workload.precedence is None:
        return done - arrival
    label = workload.precedence.workflows()
    n = int(label.max()) + 1 if label.size else 0
    first = np.full(n, np.inf)
    np.minimum.at(first, label, arrival)
    last = np.full(n, -np.inf)
    np.maximum.at(last, label, np.where(np.isnan(done), np.inf, done))  # an unfinished request: NaN below
    out = last - first
    out[np.isinf(out)] = np.nan
    return out


def summarize(result: RunResult, bound: LowerBound | None = None) -> RunMetrics:
    """Compute :class:`RunMetrics` of ``result``; ``bound`` defaults to :func:`~lloptim.bounds.lower_bound`.

    Parameters
    ----------
    result
        The run.
    bound
        Makespan lower bound of ``result.problem`` (seconds); pass one to avoid recomputing it
        across runs of the same problem. The default is computed for the run: with
        ``migration=False`` when no running request moved between instances.

    Returns
    -------
    RunMetrics
        The summary.
    """
    problem = result.problem
    modes = result.extra.get("kv_mode")
    if bound is None:
        # a run that moved no running request is a schedule without migration: the stronger bound holds
        bound = lower_bound(problem, kv_mode=modes, kv_block_tokens=result.extra.get("kv_block_tokens"),
                            estimates=result.extra.get("estimates"), migration=bool(np.any(result.migrations > 0)))
    makespan = result.makespan_s
    completed = int(np.count_nonzero(~np.isnan(result.done_s)))
    busy = client_busy_time(result)
    util = busy / (problem.n_clients * makespan) if makespan > 0 else 0.0
    fused = bool(np.any(result.trace_kind == KIND_MIXED))
    lb = bound.fused_s if fused else bound.total_s
    arrival = problem.workload.arrival_s
    e2e = result.done_s - arrival
    flows = workflow_latency(result)
    ttft = first_token_times(result) - arrival
    dec_us = result.decision_ns / 1e3
    preempt = result.preemptions if result.preemptions is not None else np.zeros(0, dtype=np.int64)
    estimates = result.extra.get("estimates")
    ratio, rank = (float("nan"), float("nan")) if estimates is None or result.known_lengths else \
        estimate_quality(problem.workload.output_tokens, estimates)

    def pct(a: np.ndarray, q: float) -> float:
        a = a[~np.isnan(a)]
        return float(np.percentile(a, q)) if a.size else float("nan")

    def mean(a: np.ndarray) -> float:
        a = a[~np.isnan(a)]
        return float(a.mean()) if a.size else float("nan")

    return RunMetrics(
        policy=result.policy, backend=result.backend, known_lengths=result.known_lengths,
        requests_total=problem.n_requests, requests_completed=completed, output_tokens=int(result.generated_tokens),
        makespan_s=makespan, utilization=util, bubble_share=1.0 - util, lower_bound_s=lb,
        gap_to_bound=makespan / lb - 1.0 if lb > 0 else float("nan"),
        critical_path_s=bound.critical_path_fused_s if fused else bound.critical_path_s,
        throughput_tokens_per_s=result.generated_tokens / makespan if makespan > 0 else 0.0,
        ttft_mean_s=mean(ttft), ttft_p50_s=pct(ttft, 50), ttft_p99_s=pct(ttft, 99),
        latency_mean_s=mean(e2e), latency_p50_s=pct(e2e, 50), latency_p99_s=pct(e2e, 99),
        prefill_iterations=int(np.count_nonzero(result.trace_kind == 0)),
        decode_iterations=int(np.count_nonzero(result.trace_kind == KIND_DECODE)),
        mixed_iterations=int(np.count_nonzero(result.trace_kind == KIND_MIXED)),
        decision_latency_us_p50=pct(dec_us, 50) if dec_us.size else 0.0,
        decision_latency_us_p99=pct(dec_us, 99) if dec_us.size else 0.0,
        requeued=result.requeued, wasted_tokens=result.wasted_tokens, failed_clients=result.failed_clients,
        migrations=int(result.migrations.sum()), wall_s=result.wall_s,
        kv_mode=(modes[0] if len(set(modes)) == 1 else "mixed") if modes else bound.kv_mode,
        preemptions=int(preempt.sum()), requests_preempted=int(np.count_nonzero(preempt)),
        recomputed_tokens=int(result.recomputed_tokens), swapped_out_tokens=int(result.swapped_out_tokens),
        swapped_in_tokens=int(result.swapped_in_tokens), swap_s=float(result.swap_s), kv_utilization=_kv_utilization(result),
        kv_peak_tokens=int(max(result.extra.get("kv_peak_tokens", [0]) or [0])), memory_binds=bound.memory_binds,
        workflows=int(flows.size), workflow_latency_mean_s=mean(flows), workflow_latency_p99_s=pct(flows, 99),
        estimate_ratio_median=ratio, estimate_rank_correlation=rank,
    )


def _kv_utilization(result: RunResult) -> float:
    """KV tokens allocated, weighted by iteration time, over the capacity of the instance that ran it."""
    kv = result.trace_kv_tokens
    if kv is None or not kv.size:
        return 0.0
    cap = np.array([inst.kv_capacity_tokens for inst in result.problem.instances], dtype=np.float64)
    frac = kv / cap[result.trace_instance]
    total = result.trace_duration_s.sum()
    return float(np.dot(frac, result.trace_duration_s) / total) if total > 0 else 0.0
