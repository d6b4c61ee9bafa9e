"""Chains at time 0 on a fleet: the chain rules count part of the running requests' progress.

WorkflowQueue Notes, *Progress on a fleet*: the remaining work the binding chain and the pacing
weigh a chain against took every unfinished request at its whole estimate, about half a wave of
requests too much, so on 100 chains on 2 x 20 clients the pacing saw the work, not the chain, as
binding and the deciding chain ran at full batches to the end.
"""

from __future__ import annotations

import numpy as np
import pytest

import lloptim.runtime.request_schedulers as rs
from lloptim import Problem, lower_bound, run_policy, workloads
from lloptim.runtime.hybrid import hybrid_policy
from lloptim.runtime.request_schedulers import PROGRESS_SHARE, WorkflowQueue


def _chains(n: int, seed: int, instances: int = 2, clients: int = 20, rate: float | None = None) -> Problem:
    return Problem.single(workloads.workflows("chain", n, seed=seed, arrival_rate=rate), "llama-65b",
                          clients=clients, instances=instances, kv_capacity_tokens=81_920)


@pytest.mark.parametrize("n, seeds, mean_below", [(100, (1, 2, 5), 0.033), (60, (1, 2, 3), 0.037)])
def test_fleet_chains_end_closer_to_the_bound(n, seeds, mean_below):
    # without the progress: 100 chains 3.67 / 3.72 / 4.72 % above the bound (mean 4.04 %), 60
    # chains 5.23 / 3.27 / 4.47 % (4.32 %); with it 2.88 / 2.59 / 3.49 % and 3.50 / 2.72 / 3.39 %
    gaps = []
    for seed in seeds:
        problem = _chains(n, seed)
        bound = lower_bound(problem, migration=False).fused_s
        res = run_policy(problem, "hybrid")
        assert np.all(np.isfinite(res.done_s))
        assert res.generated_tokens == int(problem.workload.output_tokens.sum())
        assert bound <= res.makespan_s
        gaps.append(res.makespan_s / bound - 1.0)
    assert np.mean(gaps) < mean_below, gaps


def test_the_remaining_work_takes_off_a_share_of_the_running_requests_progress(monkeypatch):
    # checked against the engine's own counters at every pacing of a paced run
    seen = []
    original = WorkflowQueue._pacing

    def spy(self, state):
        done = 0.0
        for st in state.engine.states:
            for c in st.clients:
                r = int(st.engine.client_request[c])
                if r < 0 or c in st.idle:
                    continue
                ran = st.decode_steps - st.engine.client_start_step[c] if c not in st.waiting else 0
                done += min(ran, self.est_steps[r] - 1.0) if ran > 0 else 0.0
        seen.append((self._left_work(), self.left_steps, done, self._left_work(progress=False)))
        return original(self, state)

    monkeypatch.setattr(WorkflowQueue, "_pacing", spy)
    run_policy(_chains(100, 5), "hybrid")
    assert len(seen) > 100
    work, left, done, plain = np.array(seen).T
    np.testing.assert_allclose(work, np.maximum(left - PROGRESS_SHARE * done, 0.0), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(plain, left)
    assert np.any(done > 0.0)


@pytest.mark.parametrize("case", ["one instance", "arrivals on a fleet"])
def test_one_instance_and_workflows_arriving_over_time_are_left_as_they_were(case, monkeypatch):
    # the share is a fleet rule for workflows known from the start: elsewhere any share gives the
    # same schedule (one instance: the binding-chain rule took 30 fan-in workflows, seed 5, from
    # 3.27 to 4.33 %; arrivals: online DAGs' p99 latency 1.08 to 1.23 times Sarathi's)
    if case == "one instance":
        problem = Problem.single(workloads.workflows("fan-in", 30, seed=5), "llama-65b", clients=40,
                                 kv_capacity_tokens=81_920)
    else:
        problem = Problem.single(workloads.workflows("dag", 40, seed=3, arrival_rate=0.75), "llama-65b",
                                 clients=20, instances=2, kv_capacity_tokens=81_920)
    default = run_policy(problem, hybrid_policy())
    monkeypatch.setattr(rs, "PROGRESS_SHARE", 1.0)
    full = run_policy(problem, hybrid_policy())
    assert default.makespan_s == full.makespan_s
    np.testing.assert_array_equal(default.client, full.client)
    np.testing.assert_array_equal(default.done_s, full.done_s)


def test_workflows_that_join_branches_are_left_as_they_were(monkeypatch):
    # fan-outs joined by one request on a 1x + 1.5x fleet at time 0 (benchmarks/stress_flow.py
    # ``dag-fleet``, held-out seed 500): with the share the pacing held clients idle beside the
    # wide map whose join waits for all of it, 6.95 -> 15.22 % above the bound; any share now gives
    # the old schedule there
    from bench_loader import load_benchmark

    sf = load_benchmark("stress_flow")
    problem = next(p for label, p, _ in sf.cases("dag-fleet", 500, False) if label.startswith("fanout"))
    assert problem.workload.precedence is not None
    default = run_policy(problem, hybrid_policy())
    monkeypatch.setattr(rs, "PROGRESS_SHARE", 0.0)
    none = run_policy(problem, hybrid_policy())
    np.testing.assert_array_equal(default.done_s, none.done_s)
    assert default.makespan_s <= 1.08 * lower_bound(problem, migration=False).fused_s
