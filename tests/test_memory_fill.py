"""The hybrid's fill-up rule: from an empty KV cache, start the requests that fill it fastest.

From an empty cache every client is busy long before the memory is. Where memory sets the
decode steps (:func:`lloptim.runtime.memory_schedulers.memory_sets_steps`), the memory-aware
dispatch (``fill_ramp``) hands idle clients the fitting requests that will hold the most KV memory
when the cache fills, until it first fills or first refuses a request; the cache must then fill
sooner, with no preemption and no token lost, and nothing changes where the clients bind, in
reserve mode, or for MC-SF.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lloptim import Problem, lower_bound, run_policy
from lloptim.errors import SpecError
from lloptim.runtime.memory_schedulers import memory_sets_steps
from lloptim.runtime.policy import RunContext
from memory_cases import lognormal_memory_problem


def _problem(n: int, clients: int, seed: int, rho: float, block: int = 4, sigma: float = 1.2) -> Problem:
    """:func:`memory_cases.lognormal_memory_problem` with sigma 1.2 unless told."""
    return lognormal_memory_problem(n, clients, seed, rho, block, sigma)


def _fill_step(problem: Problem, res, level: float = 0.9) -> int:
    """First decode step in which the cache holds ``level`` of its capacity (the run's length if never)."""
    inst = problem.instances[0]
    held = res.trace_kv_tokens[(res.trace_kind == 1) | (res.trace_kind == 2)]
    full = held >= level * inst.kv_blocks * inst.kv_block_tokens
    return int(np.argmax(full)) if full.any() else int(held.size)


def _check_run(problem: Problem, res) -> None:
    """Every request served once with all its tokens, the cache within capacity, no preemption."""
    w = problem.workload
    assert np.all(np.isfinite(res.done_s))
    assert res.generated_tokens == w.total_output_tokens
    assert int(res.trace_running[res.trace_kind != 0].sum()) == w.total_output_tokens
    assert res.trace_kv_tokens.max() <= problem.instances[0].kv_capacity_tokens
    assert int(res.preemptions.sum()) == 0


@pytest.mark.parametrize("seed", range(4))
def test_the_cache_fills_sooner_with_the_first_requests_that_hold_the_most(seed):
    problem = _problem(300, 10, seed, 1.2)
    off = run_policy(problem, "hybrid-fused", fill_ramp=False, check=True)
    on = run_policy(problem, "hybrid-fused", fill_ramp=True, check=True)
    _check_run(problem, on)
    # another first wave: fatter requests (larger prompts that last until the cache is full)
    w = problem.workload
    first_on, first_off = on.assign_s == 0, off.assign_s == 0
    assert not np.array_equal(first_on, first_off)
    assert w.prompt_tokens[first_on].mean() > w.prompt_tokens[first_off].mean()
    # and the cache fills in at most half the steps
    assert 2 * _fill_step(problem, on) <= _fill_step(problem, off)


def test_it_pays_where_memory_binds():
    """The issue's rho-1.0 class scaled down: 400 requests, 20 clients; the rule is the default."""
    gaps = []
    for seed in range(3):
        problem = _problem(400, 20, seed, 1.0, sigma=1.0)
        lb = lower_bound(problem).fused_s
        on = run_policy(problem, "hybrid-fused", check=True)
        off = run_policy(problem, "hybrid-fused", fill_ramp=False, check=True)
        _check_run(problem, on)
        gaps.append((np.nanmax(on.done_s) / lb - 1, np.nanmax(off.done_s) / lb - 1))
    on_mean, off_mean = np.mean(gaps, axis=0)
    assert on_mean < off_mean


@pytest.mark.parametrize("case", ["clients-bind", "reserve", "unknown"])
def test_nothing_changes_where_the_rule_does_not_apply(case):
    problem = _problem(200, 8, 3, 0.7 if case == "clients-bind" else 1.3)
    kv_mode = "reserve" if case == "reserve" else None
    est = None
    if case == "unknown":
        est = problem.workload.output_tokens * np.exp(np.random.default_rng(0).normal(0, 0.5, problem.n_requests))
    a = run_policy(problem, "hybrid-fused", kv_mode=kv_mode, estimates=est, fill_ramp=False)
    b = run_policy(problem, "hybrid-fused", kv_mode=kv_mode, estimates=est, check=True)  # the default, "known"
    np.testing.assert_array_equal(a.assign_s, b.assign_s)
    if case == "unknown":
        # asked for on estimates too, it acts
        c = run_policy(problem, "hybrid-fused", estimates=est, fill_ramp=True, check=True)
        assert not np.array_equal(a.assign_s, c.assign_s)
        assert np.all(np.isfinite(c.done_s)) and c.generated_tokens == problem.workload.total_output_tokens
    if case == "clients-bind":
        ctx = RunContext(problem, problem.workload.output_tokens.astype(float), True, problem.client_instance())
        assert not memory_sets_steps(ctx)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), rho=st.floats(0.6, 2.5), clients=st.integers(2, 12),
       n=st.integers(5, 120), block=st.sampled_from([1, 4, 16]))
def test_memory_sets_steps_is_the_bounds_own_verdict(seed, rho, clients, n, block):
    """With the true lengths on one instance, the gate says what the memory-aware bound says."""
    problem = _problem(n, clients, seed, rho, block)
    ctx = RunContext(problem, problem.workload.output_tokens.astype(float), True, problem.client_instance())
    lb = lower_bound(problem)
    assert memory_sets_steps(ctx) == (lb.decode_steps_memory >= lb.decode_steps_clients)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), rho=st.floats(0.9, 2.5), clients=st.integers(2, 12),
       n=st.integers(5, 150), block=st.sampled_from([1, 4, 16]), policy=st.sampled_from(["hybrid", "hybrid-fused"]))
def test_fill_ramp_serves_everything_within_capacity(seed, rho, clients, n, block, policy):
    """Known lengths: within capacity at every step (``check``), every token once, no preemption when fused."""
    problem = _problem(n, clients, seed, rho, block)
    res = run_policy(problem, policy, check=True)
    w = problem.workload
    assert np.all(np.isfinite(res.done_s))
    assert res.generated_tokens == w.total_output_tokens
    assert res.trace_kv_tokens.max() <= problem.instances[0].kv_capacity_tokens
    if policy == "hybrid-fused":
        assert int(res.preemptions.sum()) == 0
    assert np.nanmax(res.done_s) >= lower_bound(problem).fused_s - 1e-9


def test_a_bad_fill_ramp_is_a_spec_error():
    with pytest.raises(SpecError, match="fill_ramp"):
        run_policy(_problem(20, 4, 0, 1.2), "hybrid", fill_ramp="always")
