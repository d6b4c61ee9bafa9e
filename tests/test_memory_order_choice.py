"""The opt-in choice among start orders by simulation (``hybrid_policy(order_candidates=K)``).

With known lengths and every request present, the hybrid simulates ``K`` candidate orders (the
default and phase shifts of its spread) and runs the one of the shortest simulated makespan: the
run is then that simulation exactly, never longer than the default order's, and it serves every
request and token once within the cache. With estimates or arrivals it keeps the default order
and simulates nothing; bad options stop before the run.
"""

from __future__ import annotations

import numpy as np
import pytest

from lloptim import run_policy
from lloptim.arrivals import at_load
from lloptim.errors import SpecError
from lloptim.runtime.estimators import noisy_estimates
from lloptim.runtime.hybrid import hybrid_policy
from lloptim.runtime.memory_schedulers import planned_start_keys
from lloptim.runtime.policy import RunContext
from memory_cases import lognormal_memory_problem


_problem = lognormal_memory_problem


def _planner(policy):
    return policy.requests.memory.planner


def test_the_run_is_the_best_simulated_candidate_and_never_longer_than_the_default():
    better = 0
    for seed in range(5):
        problem = _problem(300, 12, seed, 1.0)
        policy = hybrid_policy(fused=True, order_candidates=4)
        res = run_policy(problem, policy, check=True)
        default = run_policy(problem, "hybrid-fused", check=True)
        tried = _planner(policy).tried
        assert [phase for phase, _ in tried] == [0.0, 0.25, 0.5, 0.75]
        assert tried[0][1] == pytest.approx(np.nanmax(default.done_s), rel=1e-12)  # candidate 0 is the default
        assert np.nanmax(res.done_s) == pytest.approx(min(m for _, m in tried), rel=1e-12)
        assert np.nanmax(res.done_s) <= np.nanmax(default.done_s) + 1e-9
        better += np.nanmax(res.done_s) < np.nanmax(default.done_s) - 1e-9
        w = problem.workload
        assert res.generated_tokens == w.total_output_tokens
        assert res.trace_kv_tokens.max() <= problem.instances[0].kv_capacity_tokens
        assert int(res.preemptions.sum()) == 0
    assert better >= 2


def test_phase_zero_is_the_default_order_and_other_phases_differ():
    problem = _problem(200, 8, 0, 1.0)
    ctx = RunContext(problem, problem.workload.output_tokens.astype(np.float64), known_lengths=True,
                     client_instance=np.zeros(problem.n_clients, dtype=np.int64))
    base = planned_start_keys(ctx)
    np.testing.assert_array_equal(planned_start_keys(ctx, phase=0.0), base)
    shifted = planned_start_keys(ctx, phase=0.5)
    assert not np.array_equal(np.argsort(shifted, kind="stable"), np.argsort(base, kind="stable"))


def test_estimates_and_arrivals_keep_the_default_order_unsimulated():
    problem = _problem(200, 8, 1, 1.0)
    est = noisy_estimates(problem.workload, 0.5, seed=1)
    policy = hybrid_policy(fused=True, order_candidates=4)
    res = run_policy(problem, policy, estimates=est)
    assert _planner(policy).tried == [] and _planner(policy).chosen is None
    np.testing.assert_array_equal(res.assign_s, run_policy(problem, "hybrid-fused", estimates=est).assign_s)
    arriving = at_load(problem, 1.2, 0)
    policy = hybrid_policy(fused=True, order_candidates=4)
    res = run_policy(arriving, policy)
    assert _planner(policy).tried == []
    np.testing.assert_array_equal(res.assign_s, run_policy(arriving, "hybrid-fused").assign_s)


def test_where_memory_alone_binds_the_one_order_is_simulated_once():
    """At rho 2.0 the planned order is longest first: no spread, every phase the same order."""
    problem = _problem(200, 8, 3, 2.5)
    policy = hybrid_policy(fused=True, order_candidates=4)
    res = run_policy(problem, policy)
    assert len(_planner(policy).tried) == 1
    np.testing.assert_array_equal(res.assign_s, run_policy(problem, "hybrid-fused").assign_s)


def test_a_spent_budget_stops_after_the_default_order():
    problem = _problem(200, 8, 2, 1.0)
    policy = hybrid_policy(fused=True, order_candidates=4, order_budget_s=1e-9)
    res = run_policy(problem, policy)
    assert len(_planner(policy).tried) == 1
    np.testing.assert_array_equal(res.assign_s, run_policy(problem, "hybrid-fused").assign_s)


@pytest.mark.parametrize("opts, field", [({"order_candidates": 0}, "order_candidates"),
                                         ({"order_candidates": 2.5}, "order_candidates"),
                                         ({"order_candidates": 2, "order_budget_s": 0}, "order_budget_s"),
                                         ({"order_candidates": 2, "start_planner": planned_start_keys},
                                          "order_candidates")])
def test_bad_options_are_refused_before_the_run(opts, field):
    with pytest.raises(SpecError, match=field):
        run_policy(_problem(20, 2, 0, 1.0), "hybrid", **opts)
