"""The workflow plan stops on a work budget, not on the clock: the same plan on any machine."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import lloptim.dag_plan as dag_plan
from lloptim import Instance, Problem, run_policy, workloads
from lloptim.dag_plan import REVISION_WORK, plan_workflows
from lloptim.hardware import load_profile


class _SlowClock:
    """A ``time`` module whose ``perf_counter`` jumps ``step_s`` seconds at every read (a loaded machine)."""

    def __init__(self, step_s: float) -> None:
        self.ticks = itertools.count()
        self.step_s = step_s

    def perf_counter(self) -> float:
        return next(self.ticks) * self.step_s


def _chains_case():
    wl = workloads.workflows("chain", 100, seed=1)
    lat = [wl.prompt_tokens, wl.output_tokens]
    weights = 0.03 * np.asarray(lat[1], dtype=np.float64) + 1e-4 * np.asarray(lat[0], dtype=np.float64)
    return wl.precedence, weights, np.zeros(40, dtype=np.int64)


def test_passes_stop_on_the_work_budget_not_on_a_slow_clock(monkeypatch):
    dag, w, kinds = _chains_case()
    n = w.size
    fast = plan_workflows(dag, w, kinds, exact=False, time_limit_s=1e9, work_limit=REVISION_WORK)
    # a machine so loaded that every clock read is 0.1 s later: the old 0.05 s budget ran out at once
    monkeypatch.setattr(dag_plan, "time", _SlowClock(0.1))
    slow = plan_workflows(dag, w, kinds, exact=False, time_limit_s=20.0, work_limit=REVISION_WORK)
    again = plan_workflows(dag, w, kinds, exact=False, time_limit_s=20.0, work_limit=REVISION_WORK)
    for p in (slow, again):
        assert p.passes == fast.passes >= 1
        np.testing.assert_array_equal(p.start_s, fast.start_s)
        np.testing.assert_array_equal(p.client, fast.client)
        assert p.makespan_s == fast.makespan_s
    # the budget bounds the passes: each costs 2 n placements after the first forward pass's n
    tight = plan_workflows(dag, w, kinds, exact=False, work_limit=3 * n - 1)
    assert tight.passes == 0
    one = plan_workflows(dag, w, kinds, exact=False, work_limit=3 * n, max_passes=6)
    assert one.passes == min(1, fast.passes)


def test_the_safety_net_still_stops_a_runaway_plan(monkeypatch):
    dag, w, kinds = _chains_case()
    monkeypatch.setattr(dag_plan, "time", _SlowClock(100.0))
    plan = plan_workflows(dag, w, kinds, exact=False, time_limit_s=20.0, work_limit=None)
    assert plan.passes == 0 and np.isfinite(plan.makespan_s)


@pytest.mark.parametrize("shape, n, instances", [("dag", 30, 1), ("chain", 60, 2)])
def test_the_hybrid_serves_workflows_the_same_under_a_slow_clock(monkeypatch, shape, n, instances):
    # the first plan and every revision (re-plans for the pacing on the fleet): with the old
    # wall-clock budgets (1 s, 0.05 s) this clock cut the passes and changed both schedules
    wl = workloads.workflows(shape, n, seed=3)
    llama = load_profile("llama-65b")
    clients = 40 // instances
    problem = Problem(wl, tuple(Instance.from_profile(llama, clients, 81_920) for _ in range(instances)))
    ref = run_policy(problem, "hybrid")
    monkeypatch.setattr(dag_plan, "time", _SlowClock(0.3))
    slow = run_policy(problem, "hybrid")
    np.testing.assert_array_equal(slow.done_s, ref.done_s)
    np.testing.assert_array_equal(slow.client, ref.client)


def test_the_exact_plan_stops_on_nodes(monkeypatch):
    pytest.importorskip("highspy")
    from lloptim.precedence import Precedence

    rng = np.random.default_rng(0)
    n = 12
    edges = [(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < 0.15]
    prec = Precedence.from_edges(n, np.array(edges, dtype=np.int64).reshape(-1, 2))
    w = rng.uniform(1, 10, (n, 2)).round(1)
    kinds = np.array([0, 1])
    plans = [plan_workflows(prec, w, kinds, node_limit=50) for _ in range(2)]
    assert all(p.method == "mip" for p in plans)
    np.testing.assert_array_equal(plans[0].start_s, plans[1].start_s)
    assert plans[0].bound_s <= plans[0].makespan_s
