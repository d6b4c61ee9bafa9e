"""The backlog bound (:func:`lloptim.bounds.backlog_bound`): work that cannot be done before ``a``."""

from __future__ import annotations

from dataclasses import replace

import networkx as nx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lloptim import Problem, lower_bound, run_policy, workloads
from lloptim.bounds import _early_tokens, backlog_bound
from lloptim.hardware import load_profile
from lloptim.problem import Instance
from lloptim.runtime.engine import Fault
from lloptim.runtime.migration import with_migration

POLICIES = ["baseline", "offline", "hybrid", "hybrid-fused", "hybrid-plan", "vllm", "sarathi", "sorted-f", "lpt"]


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 8), per_slot=st.integers(1, 5))
def test_early_tokens_is_the_max_flow(seed, n, per_slot):
    # requests -> the slots they may use (the latest J_r), at most u_r tokens each, per_slot per slot
    rng = np.random.default_rng(seed)
    slots = rng.integers(0, 7, n)
    cap = np.minimum(rng.integers(0, 9, n), slots)
    g = nx.DiGraph()
    for r in range(n):
        g.add_edge("s", ("r", r), capacity=int(cap[r]))
        for j in range(int(slots[r])):
            g.add_edge(("r", r), ("slot", j), capacity=1)
    for j in range(int(slots.max(initial=0))):
        g.add_edge(("slot", j), "t", capacity=per_slot)
    flow = nx.maximum_flow_value(g, "s", "t") if g.has_node("t") else 0
    assert _early_tokens(slots, cap, per_slot) == flow


def _fleet(kinds: list[tuple[float, int]]) -> tuple[Instance, ...]:
    base = load_profile("llama-65b")
    return tuple(Instance.from_profile(replace(base, name=f"x{s}", latency=base.latency.scaled(prefill=s, decode=s)),
                                       c, kv_capacity_tokens=40_000, name=f"i{k}") for k, (s, c) in enumerate(kinds))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from(workloads.WORKFLOW_SHAPES + ("independent",)), n=st.integers(1, 14),
       seed=st.integers(0, 10_000), rate=st.sampled_from([0.5, 2.0, 8.0, 40.0]),
       kinds=st.lists(st.tuples(st.sampled_from([0.6, 1.0, 1.7]), st.integers(1, 8)), min_size=1, max_size=3),
       policy=st.sampled_from(POLICIES), extra=st.sampled_from(["", "migrate", "fault"]))
def test_the_backlog_bound_is_never_above_a_makespan(shape, n, seed, rate, kinds, policy, extra):
    # arrivals from light to heavy overload, workflows or independent requests, mixed fleets, faults
    if shape == "independent":
        wl = workloads.synthetic(4 * n, seed=seed, arrival_rate=4 * rate)
    else:
        wl = workloads.workflows(shape, n, seed=seed, arrival_rate=rate)
    problem = Problem(wl, _fleet(kinds))
    total, fused = backlog_bound(problem)
    lb = lower_bound(problem)
    assert fused <= total and (lb.backlog_s, lb.backlog_fused_s) == (total, fused)
    assert lb.total_s >= max(total, lb.window_s) and lb.fused_s >= max(fused, lb.window_fused_s)
    faults = [Fault(0.5, 0, 0)] if extra == "fault" and kinds[0][1] > 1 else ()  # client 0 of instance 0 fails
    res = run_policy(problem, with_migration(policy) if extra == "migrate" else policy, faults=faults)
    fused_run = bool(np.any(res.trace_kind == 2))
    assert res.makespan_s >= (fused if fused_run else total) * (1 - 1e-9)


@pytest.mark.parametrize("seed", [1, 3])
def test_overloaded_workflows_raise_the_bound_by_the_backlog(seed):
    # 20 DAGs at one a second on 12 clients: the first seconds run small batches, which the window
    # bound (all later work at full batches from a threshold on) cannot see
    problem = Problem.single(workloads.workflows("dag", 20, seed=seed, arrival_rate=1.0), "llama-65b", clients=12,
                             kv_capacity_tokens=81_920)
    lb = lower_bound(problem)
    assert lb.backlog_fused_s > 1.02 * max(lb.window_fused_s, lb.critical_path_fused_s)
    assert lb.fused_s == lb.backlog_fused_s and lb.total_s == lb.backlog_s
    for policy in ("hybrid", "sarathi", "baseline"):
        res = run_policy(problem, policy)
        assert res.makespan_s >= (lb.fused_s if np.any(res.trace_kind == 2) else lb.total_s)
    assert run_policy(problem, "hybrid").makespan_s <= 1.03 * lb.fused_s


def test_no_backlog_when_everything_is_ready_at_zero():
    problem = Problem.single(workloads.gsm8k("test", limit=50), clients=8)
    assert backlog_bound(problem) == (0.0, 0.0)
    assert lower_bound(problem).backlog_s == 0.0
