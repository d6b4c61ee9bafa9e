"""The hybrid's start plan where memory can bind: ``start_planner`` and ``benchmarks/memory_start_plan.py``'s LP plan.

Where an instance's KV cache can fill up, the hybrid hands out requests in the order of a start
plan (target start steps; by default the golden-ratio spread of
:func:`lloptim.runtime.memory_schedulers.planned_start_keys`). A planner passed as
``start_planner`` must decide that order (the first request handed out is its first, and another
order changes the run) while the dispatch's fit checks keep the cache within its capacity and
every request and token is served once, whatever the order.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lloptim import Problem, Workload, lower_bound, run_policy, summarize
from lloptim.errors import SpecError
from lloptim.memory import decode_area_tokens
from lloptim.runtime.hybrid import hybrid_policy
from lloptim.runtime.memory_schedulers import MemoryAwareQueue
from bench_loader import load_benchmark

msp = load_benchmark("memory_start_plan")


def _memory_bound(n: int, clients: int, seed: int, rho: float = 1.0, block: int = 4) -> Problem:
    """``n`` requests with lognormal outputs and a cache at which the KV-area steps are ``rho`` x the client steps."""
    rng = np.random.default_rng(seed)
    p = rng.integers(5, 40, n)
    o = np.clip(np.rint(rng.lognormal(np.log(20), 1.2, n)), 1, 300).astype(np.int64)
    area = float(decode_area_tokens(p, o, block).sum())
    cap = max(int(area / (rho * o.sum() / clients)), int((p + o).max()) + block)
    cap = -(-cap // block) * block
    return Problem.single(Workload.from_arrays(p, o), "llama-65b", clients=clients, kv_capacity_tokens=cap,
                          kv_block_tokens=block)


def _check_run(problem: Problem, res, preemption_free: bool = True) -> None:
    """Every request served once with all its tokens, the cache within capacity, no preemption (known lengths).

    ``preemption_free=False`` for separate prefill iterations: there a prefill batch can wait longer
    than the start delay the projection assumes, so a preemption can follow even with known lengths
    (docs, *KV memory*; the default order does it too, e.g. 13 requests on 7 clients, seed 13).
    """
    w = problem.workload
    assert np.all(np.isfinite(res.done_s))
    assert res.generated_tokens == w.total_output_tokens
    assert int(res.trace_running[res.trace_kind != 0].sum()) == w.total_output_tokens + res.wasted_tokens
    assert res.trace_kv_tokens.max() <= problem.instances[0].kv_capacity_tokens
    if preemption_free:
        assert int(res.preemptions.sum()) == 0
    assert summarize(res).makespan_s >= lower_bound(problem).fused_s * (1 - 1e-9)


def _first_wave(res) -> np.ndarray:
    """The requests handed out at the first dispatch (rows)."""
    return np.flatnonzero(res.assign_s == res.assign_s.min())


def test_the_start_planner_decides_the_order():
    problem = _memory_bound(80, 8, seed=3)
    calls = []

    def shortest_first(ctx, rows=None):
        calls.append(None if rows is None else len(rows))
        est = np.asarray(ctx.estimates, dtype=np.float64)
        return est if rows is None else est[rows]

    # without the fill-up rule (which picks the first wave by what it holds when the cache fills,
    # tests/test_memory_fill.py) the order decides from the first request on
    default = run_policy(problem, "hybrid", fill_ramp=False, check=True)
    planned = run_policy(problem, "hybrid", start_planner=shortest_first, fill_ramp=False, check=True)
    assert calls, "the planner was never asked"
    _check_run(problem, default)
    _check_run(problem, planned)
    o = problem.workload.output_tokens
    # the first requests handed out are the planner's first (an empty cache takes the head)
    wave = _first_wave(planned)
    assert np.argmin(o) in wave and o[wave].max() <= np.sort(o)[wave.size]
    assert set(_first_wave(default)) != set(wave)
    assert not np.allclose(default.assign_s, planned.assign_s)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(10, 60), clients=st.integers(2, 8),
       rho=st.floats(0.8, 2.5), fused=st.booleans())
@example(seed=13, n=13, clients=7, rho=1.453125, fused=False)  # separate iterations: one preemption
def test_any_start_order_keeps_the_cache_within_capacity_and_conserves(seed, n, clients, rho, fused):
    problem = _memory_bound(n, clients, seed, rho)
    keys = np.random.default_rng(seed + 1).permutation(n).astype(np.float64)

    def planner(ctx, rows=None):
        return keys if rows is None else keys[rows]

    res = run_policy(problem, hybrid_policy(fused=fused, start_planner=planner), check=True)
    _check_run(problem, res, preemption_free=fused)


def test_a_start_planner_must_be_a_function():
    with pytest.raises(SpecError, match="start_planner"):
        hybrid_policy(start_planner=3)
    with pytest.raises(ValueError, match="planner"):
        MemoryAwareQueue("planned", planner="golden")


def _timed_feasible(p, o, C, M, B, start, targets) -> int:
    H = int(np.max(start + o))
    run, mem = np.zeros(H, dtype=np.int64), np.zeros(H, dtype=np.int64)
    for r in range(p.size):
        run[start[r]:start[r] + o[r]] += 1
        mem[start[r]:start[r] + o[r]] += B * -(-(p[r] + np.arange(1, o[r] + 1)) // B)
    assert run.max() <= C and mem.max() <= M
    assert np.all(start >= np.floor(targets - targets.min()))  # none before its target
    return H


def test_the_lp_plan_is_a_feasible_spread_and_changes_the_hybrids_decisions():
    problem = _memory_bound(150, 10, seed=11)
    w, inst = problem.workload, problem.instances[0]
    C, M, B = inst.clients, inst.kv_capacity_tokens, inst.kv_block_tokens
    targets, info = msp.fluid_start_plan(w.prompt_tokens, w.output_tokens, C, M, B, classes=8, buckets=30)
    assert targets.shape == (150,) and np.all(np.isfinite(targets)) and np.all(targets >= 0)
    bound = lower_bound(problem)
    steps = max(bound.decode_steps_clients, bound.decode_steps_memory)
    # the fluid plan ends within its search range, never before the work of the clients allows
    assert w.output_tokens.sum() / C <= info["horizon_steps"] <= 1.3 * 1.01 * steps + 1
    # every length starts early and late (a spread, not longest first)
    o = w.output_tokens
    short, long_ = o <= np.median(o), o >= np.quantile(o, 0.75)
    assert targets[short].min() < np.median(targets) < targets[short].max()
    assert targets[long_].min() < np.median(targets)
    # as a schedule: clients and KV within capacity at every step, no request before its target
    start = msp.timed_schedule(w.prompt_tokens, o, C, M, B, targets)
    assert _timed_feasible(w.prompt_tokens, o, C, M, B, start, targets) >= steps
    # as the hybrid's order: it decides the dispatch, and the run stays feasible
    plan_info: dict = {}
    lp = run_policy(problem, "hybrid", start_planner=msp.lp_planner(plan_info), fill_ramp=False, check=True)
    golden = run_policy(problem, "hybrid", fill_ramp=False, check=True)
    assert plan_info["solves"] >= 2
    _check_run(problem, lp)
    assert not np.allclose(lp.assign_s, golden.assign_s)
    assert np.argmin(targets - 1e-6 * o) in _first_wave(lp)
