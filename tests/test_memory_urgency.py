"""The memory-aware dispatch's urgency horizon: the running requests' work counts.

A queued request becomes *urgent* (never overtaken) when its output is at least the decode steps
the rest of the work needs at full speed. Counting only the queue's work there, a long request
became urgent while the admitted requests would still run well past its end, so the long
requests ended early and the run ended on short ones with the cache half full. With
``urgency_horizon`` (the hybrid's default with known lengths, one instance) the admitted
requests' remaining steps and KV area count too: the run's last tenth holds more memory, the
longest requests end nearer the end, the makespan is shorter where memory binds, and nothing is
lost, preempted or over the capacity; with noisy estimates, in reserve mode and on a fleet
nothing changes.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lloptim import Instance, Problem, load_profile, lower_bound, run_policy
from lloptim.errors import SpecError
from lloptim.runtime.estimators import noisy_estimates
from lloptim.runtime.memory_schedulers import MemoryAwareQueue
from memory_cases import lognormal_memory_problem


_problem = lognormal_memory_problem


def _check_run(problem: Problem, res, preempt: bool = False) -> None:
    """Every request served once with all its tokens, every cache within capacity, no preemption."""
    w = problem.workload
    assert np.all(np.isfinite(res.done_s))
    assert res.generated_tokens == w.total_output_tokens
    assert int(res.trace_running[res.trace_kind != 0].sum()) == w.total_output_tokens
    assert res.trace_kv_tokens.max() <= max(i.kv_capacity_tokens for i in problem.instances)
    if not preempt:
        assert int(res.preemptions.sum()) == 0


def _tail_memory(problem: Problem, res, fraction: float = 0.1) -> float:
    """Mean KV memory held in the last ``fraction`` of the decode steps, over the capacity."""
    held = res.trace_kv_tokens[(res.trace_kind == 1) | (res.trace_kind == 2)]
    inst = problem.instances[0]
    return float(held[int((1 - fraction) * held.size):].mean()) / (inst.kv_blocks * inst.kv_block_tokens)


@pytest.mark.parametrize("seed", range(5))
def test_the_run_ends_on_a_fuller_cache_and_the_longest_requests_end_later(seed):
    problem = _problem(400, 20, seed, 1.0)
    on = run_policy(problem, "hybrid-fused", check=True)  # the default with known lengths
    off = run_policy(problem, "hybrid-fused", urgency_horizon=False, check=True)
    _check_run(problem, on)
    assert _tail_memory(problem, on) > _tail_memory(problem, off) + 0.05
    longest = np.argsort(-problem.workload.output_tokens)[:20]
    assert on.done_s[longest].max() / np.nanmax(on.done_s) > off.done_s[longest].max() / np.nanmax(off.done_s)


def test_it_pays_where_memory_binds():
    """The rho-1.0 class of ``benchmarks/memory.py`` scaled down: 400 requests, 20 clients."""
    gaps = []
    for seed in range(5):
        problem = _problem(400, 20, seed, 1.0)
        lb = lower_bound(problem).fused_s
        on = run_policy(problem, "hybrid-fused")
        off = run_policy(problem, "hybrid-fused", urgency_horizon=False)
        gaps.append((np.nanmax(on.done_s) / lb - 1, np.nanmax(off.done_s) / lb - 1))
    gaps = np.array(gaps)
    assert gaps[:, 0].mean() < gaps[:, 1].mean() - 0.003
    assert np.sum(gaps[:, 0] < gaps[:, 1]) >= 4


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(20, 160), clients=st.integers(2, 12), seed=st.integers(0, 10**6),
       rho=st.floats(0.6, 2.5), sigma=st.floats(0.5, 1.6), block=st.sampled_from([1, 4, 16]),
       mode=st.sampled_from(["paged", "reserve"]))
def test_every_request_and_token_once_within_the_cache(n, clients, seed, rho, sigma, block, mode):
    problem = _problem(n, clients, seed, rho, block, sigma)
    res = run_policy(problem, "hybrid-fused", kv_mode=mode, urgency_horizon=True, check=True)
    _check_run(problem, res)
    assert res.trace_kv_tokens.max() <= problem.instances[0].kv_blocks * problem.instances[0].kv_block_tokens


def test_noisy_estimates_leave_it_off_by_default_and_true_turns_it_on():
    problem = _problem(300, 12, 3, 1.0)
    est = noisy_estimates(problem.workload, 0.5, seed=3)
    default = run_policy(problem, "hybrid-fused", estimates=est, check=True)
    off = run_policy(problem, "hybrid-fused", estimates=est, urgency_horizon=False, check=True)
    on = run_policy(problem, "hybrid-fused", estimates=est, urgency_horizon=True, check=True)
    np.testing.assert_array_equal(default.assign_s, off.assign_s)
    assert not np.array_equal(on.assign_s, off.assign_s)
    _check_run(problem, on, preempt=True)


def test_reserve_mode_runs_the_same_schedule():
    """With reservations (measured mixed on fixed caches) the horizon stays the queue's."""
    problem = _problem(300, 12, 2, 1.0)
    on = run_policy(problem, "hybrid-fused", kv_mode="reserve", urgency_horizon=True, check=True)
    off = run_policy(problem, "hybrid-fused", kv_mode="reserve", urgency_horizon=False, check=True)
    np.testing.assert_array_equal(on.assign_s, off.assign_s)


def test_a_fleet_runs_the_same_schedule():
    """On several instances the queue's projection is one instance's: the horizon stays the queue's."""
    p = _problem(300, 10, 1, 1.0)
    base = load_profile("llama-65b")
    inst = p.instances[0]
    fleet = Problem(p.workload, tuple(Instance.from_profile(base, 10, inst.kv_capacity_tokens, name=f"i{k}",
                                                             kv_block_tokens=inst.kv_block_tokens) for k in range(2)))
    on = run_policy(fleet, "hybrid-fused", urgency_horizon=True, check=True)
    off = run_policy(fleet, "hybrid-fused", urgency_horizon=False, check=True)
    np.testing.assert_array_equal(on.assign_s, off.assign_s)
    np.testing.assert_array_equal(on.done_s, off.done_s)


def test_bad_values_are_refused_before_the_run():
    with pytest.raises(SpecError, match="urgency_horizon"):
        run_policy(_problem(20, 2, 0, 1.0), "hybrid", urgency_horizon="always")
    with pytest.raises(ValueError, match="urgency_horizon"):
        MemoryAwareQueue("planned", urgency_horizon=1.5)
