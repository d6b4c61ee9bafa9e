"""Rollout: re-choosing the hybrid's dispatch variant during the run (``hybrid_policy(rollout_epochs=N)``).

With known lengths and every request present, at each decision point the hybrid replays the run
from time 0 with its switches so far and each candidate from here, and switches to the shortest:
the run is then the last simulation it kept, never longer than without rollout, and it serves
every request and token once, within the cache and in precedence order. The decisions depend on
counts of handed-out requests, not on the wall clock. With estimates or arrivals it simulates
nothing; bad options stop before the run with an error naming the option.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from lloptim import Problem, run_policy, workloads
from lloptim.arrivals import at_load
from lloptim.cli import app
from lloptim.errors import SpecError
from lloptim.runtime import order_choice
from lloptim.runtime.estimators import noisy_estimates
from lloptim.runtime.hybrid import hybrid_policy
from lloptim.runtime.order_choice import WORKFLOW_VARIANTS, rollout_points
from memory_cases import check_conserved, lognormal_memory_problem

runner = CliRunner()


def _chains(n: int = 30, clients: int = 10, seed: int = 0) -> Problem:
    wl = workloads.workflows("chain", n, seed=seed)
    return Problem.single(wl, "llama-65b", clients=clients, instances=2, kv_capacity_tokens=81_920)


def _makespan(res) -> float:
    return float(np.nanmax(res.done_s))


def test_decision_points_are_shares_of_the_requests():
    assert rollout_points(1000, 3) == [250, 500, 750]
    assert rollout_points(1000, 1) == [500]
    assert rollout_points(3, 8) == [1, 2]  # no more points than the run has room for, none at 0 or n
    assert rollout_points(1, 4) == []


@pytest.mark.parametrize("order_candidates", [1, 3])
def test_memory_rollout_runs_its_last_simulation_and_is_never_longer_than_without_it(order_candidates):
    better = 0
    for seed in range(4):
        problem = lognormal_memory_problem(300, 12, seed, 1.0)
        policy = hybrid_policy(fused=True, rollout_epochs=3, order_candidates=order_candidates)
        res = run_policy(problem, policy, check=True)
        without = run_policy(problem, hybrid_policy(fused=True, order_candidates=order_candidates), check=True)
        rollout = policy.requests.rollout
        assert rollout.skipped is None and 1 <= rollout.simulations <= 1 + 3 * 3
        assert rollout.tried[0][1] is None  # the run as it stood, simulated first ...
        assert rollout.tried[0][2] == pytest.approx(_makespan(without), rel=1e-12)  # ... is the run without rollout
        assert _makespan(res) == pytest.approx(rollout.current_s, rel=1e-12)  # the replays are exact
        assert _makespan(res) == pytest.approx(min(m for _, _, m in rollout.tried), rel=1e-12)
        assert _makespan(res) <= _makespan(without) + 1e-9
        assert [at for at, _ in rollout.switches] == sorted({at for at, _ in rollout.switches})
        assert all(at in (75, 150, 225) for at, _ in rollout.switches)
        better += _makespan(res) < _makespan(without) - 1e-9
        check_conserved(problem, res)
        assert int(res.preemptions.sum()) == 0
    assert better >= 2


def test_workflow_rollout_runs_its_last_simulation_and_keeps_the_precedence():
    better = 0
    for seed in range(4):
        problem = _chains(seed=seed)
        policy = hybrid_policy(rollout_epochs=2, rollout_candidates=6)
        res = run_policy(problem, policy, check=True)
        default = run_policy(problem, "hybrid", check=True)
        rollout = policy.requests.rollout
        assert _makespan(res) <= _makespan(default) + 1e-9
        if rollout.simulations:
            assert _makespan(res) == pytest.approx(rollout.current_s, rel=1e-12)
            assert all(v is None or v in WORKFLOW_VARIANTS[:6] for _, v, _ in rollout.tried)
        better += _makespan(res) < _makespan(default) - 1e-9
        w = problem.workload
        assert res.generated_tokens == w.total_output_tokens and np.all(np.isfinite(res.done_s))
        edges = w.precedence.edges
        assert np.all(res.done_s[edges[:, 0]] <= res.assign_s[edges[:, 1]] + 1e-9)
    assert better >= 1


def test_the_same_decisions_on_a_busy_and_an_idle_machine(monkeypatch):
    """A jumping wall clock (a loaded machine) changes nothing while the safety net is not reached."""
    problem = lognormal_memory_problem(300, 12, 1, 1.0)
    quiet = hybrid_policy(fused=True, rollout_epochs=3, rollout_budget_s=1e9)
    res_quiet = run_policy(problem, quiet)
    ticks = itertools.count()
    monkeypatch.setattr(order_choice.time, "perf_counter", lambda: 1e5 * next(ticks) ** 1.5)
    busy = hybrid_policy(fused=True, rollout_epochs=3, rollout_budget_s=1e9)
    res_busy = run_policy(problem, busy)
    assert busy.requests.rollout.switches == quiet.requests.rollout.switches
    assert busy.requests.rollout.simulations == quiet.requests.rollout.simulations
    np.testing.assert_array_equal(res_busy.done_s, res_quiet.done_s)


def test_a_spent_safety_net_stops_after_the_run_as_it_stands():
    problem = lognormal_memory_problem(200, 8, 2, 1.0)
    policy = hybrid_policy(fused=True, rollout_epochs=3, rollout_budget_s=1e-9)
    res = run_policy(problem, policy)
    rollout = policy.requests.rollout
    assert rollout.simulations == 1 and rollout.switches == [] and "safety net" in rollout.skipped
    np.testing.assert_array_equal(res.assign_s, run_policy(problem, "hybrid-fused").assign_s)


def test_estimates_arrivals_and_nothing_to_choose_simulate_nothing():
    problem = lognormal_memory_problem(200, 8, 1, 1.0)
    est = noisy_estimates(problem.workload, 0.5, seed=1)
    policy = hybrid_policy(fused=True, rollout_epochs=3)
    res = run_policy(problem, policy, estimates=est)
    assert policy.requests.rollout.simulations == 0 and "estimated" in policy.requests.rollout.skipped
    np.testing.assert_array_equal(res.assign_s, run_policy(problem, "hybrid-fused", estimates=est).assign_s)
    arriving = at_load(problem, 1.2, 0)
    policy = hybrid_policy(fused=True, rollout_epochs=3)
    res = run_policy(arriving, policy)
    assert policy.requests.rollout.simulations == 0 and "arrive" in policy.requests.rollout.skipped
    np.testing.assert_array_equal(res.assign_s, run_policy(arriving, "hybrid-fused").assign_s)
    # workflows on one instance are never paced; requests without memory binding have no planned order
    for p in (Problem.single(workloads.workflows("chain", 20, seed=0), "llama-65b", clients=10,
                             kv_capacity_tokens=81_920),
              Problem.single(workloads.synthetic(60, seed=0), "llama-65b", clients=8)):
        policy = hybrid_policy(rollout_epochs=2)
        res = run_policy(p, policy)
        assert policy.requests.rollout.simulations == 0 and policy.requests.rollout.skipped
        np.testing.assert_array_equal(res.assign_s, run_policy(p, "hybrid").assign_s)


@pytest.mark.parametrize("opts, field", [({"rollout_epochs": -1}, "rollout_epochs"),
                                         ({"rollout_epochs": 2.5}, "rollout_epochs"),
                                         ({"rollout_epochs": True}, "rollout_epochs"),
                                         ({"rollout_epochs": 2, "rollout_candidates": 1}, "rollout_candidates"),
                                         ({"rollout_epochs": 2, "rollout_budget_s": 0}, "rollout_budget_s"),
                                         ({"rollout_candidates": 6}, "rollout_candidates"),
                                         ({"rollout_budget_s": 10.0}, "rollout_budget_s"),
                                         ({"rollout_epochs": 2, "dispatch": "plan"}, "rollout_epochs")])
def test_bad_options_are_refused_before_the_run(opts, field):
    with pytest.raises(SpecError, match=field):
        run_policy(lognormal_memory_problem(20, 2, 0, 1.0), "hybrid", **opts)


def test_the_cli_reaches_the_rollout_and_names_a_bad_option(tmp_path):
    spec = tmp_path / "chains.toml"
    spec.write_text('[workload]\nsource = "workflow"\nshape = "chain"\nworkflows = 30\nseed = 0\n\n'
                    '[[instances]]\nprofile = "llama-65b"\nclients = 10\nkv_capacity_tokens = 81920\n\n'
                    '[[instances]]\nprofile = "llama-65b"\nclients = 10\nkv_capacity_tokens = 81920\n')
    base = ["simulate", str(spec), "-p", "hybrid", "--json"]
    default = runner.invoke(app, base)
    rolled = runner.invoke(app, base + ["-o", "rollout_epochs=2", "-o", "rollout_candidates=6"])
    assert default.exit_code == 0 and rolled.exit_code == 0, rolled.output
    assert json.loads(rolled.stdout)["makespan_s"] <= json.loads(default.stdout)["makespan_s"] + 1e-9
    bad = runner.invoke(app, base + ["-o", "rollout_epochs=0.5"])
    assert bad.exit_code == 2 and "rollout_epochs" in bad.output and "Traceback" not in bad.output
