"""The memory-aware bound against exact optima of tiny cases (``benchmarks/memory_optimum.py``'s models).

A non-preemptive schedule is one the engine could run, so its decode steps are at least every
valid lower bound's; the MIP solved to optimality on tiny cases is the tightest such check of the
bound's KV terms (area over capacity, the ramp-up from an empty cache) and client terms. The
time-indexed LP over tokens relaxes preemptive schedules too, so it is never above that optimum.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lloptim import Problem, Workload, lower_bound
from bench_loader import load_benchmark

mo = load_benchmark("memory_optimum")


def _check_schedule(p, o, C, M, start):
    """Per-step clients and KV tokens of a non-preemptive schedule stay within ``C`` and ``M``."""
    H = int(np.max(start + o))
    run = np.zeros(H, dtype=np.int64)
    mem = np.zeros(H, dtype=np.int64)
    for r in range(len(p)):
        assert start[r] >= 0
        run[start[r]:start[r] + o[r]] += 1
        mem[start[r]:start[r] + o[r]] += p[r] + np.arange(1, o[r] + 1)
    assert run.max() <= C and mem.max() <= M
    return H


@st.composite
def tiny_case(draw):
    n = draw(st.integers(2, 6))
    p = np.array(draw(st.lists(st.integers(1, 5), min_size=n, max_size=n)), dtype=np.int64)
    o = np.array(draw(st.lists(st.integers(1, 7), min_size=n, max_size=n)), dtype=np.int64)
    C = draw(st.integers(1, 3))
    # from the largest single request (memory binds hard) to one that never binds
    M = int((p + o).max()) + draw(st.integers(0, int((p + o).sum())))
    return p, o, C, M


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tiny_case())
def test_bound_never_above_exact_nonpreemptive_optimum(case):
    p, o, C, M = case
    steps, dual, status, start = mo.nonpreemptive_mip(p, o, C, M, time_limit_s=30)
    assert _check_schedule(p, o, C, M, start) == steps
    problem = Problem.single(Workload.from_arrays(p, o), "llama-65b", clients=C, kv_capacity_tokens=M,
                             kv_block_tokens=1)
    lb = lower_bound(problem)
    assert lb.decode_steps <= steps
    if status == "optimal":
        # the MIP's own bound agrees with its answer, and the greedy never beats the optimum
        assert dual <= steps + 1e-6
        greedy = mo.greedy_nonpreemptive(p, o, C, M, np.argsort(-o, kind="stable"))
        assert _check_schedule(p, o, C, M, greedy) >= steps


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tiny_case())
def test_preemptive_lp_is_a_relaxation(case):
    p, o, C, M = case
    steps, _, _, _ = mo.nonpreemptive_mip(p, o, C, M, time_limit_s=30)
    lp = mo.preemptive_lower_lp(p, o, C, M, steps, time_limit_s=30)
    assert np.isnan(lp) or lp <= steps + 1e-6
    # every step holds at most M: the LP is at least the area over the capacity, and the client bound
    # (not the longest request: a fractional token may be spread over steps, prompts [1, 1], outputs
    # [1, 1], C 3, M 5 gives 0.8 = area / M)
    area = float((o * p + o * (o + 1) / 2).sum())
    assert np.isnan(lp) or lp >= max(area / M, o.sum() / C) - 1e-6


def test_refill_deficit_grows_with_the_tail():
    rng = np.random.default_rng(0)
    p = rng.integers(20, 201, 1000)
    light = np.clip(np.rint(rng.lognormal(np.log(100), 0.5, 1000)), 1, 2000)
    heavy = np.clip(np.rint(rng.lognormal(np.log(100), 1.5, 1000)), 1, 2000)
    assert 0 < mo.refill_deficit(p, light, 20000) < mo.refill_deficit(p, heavy, 20000) < 0.1
