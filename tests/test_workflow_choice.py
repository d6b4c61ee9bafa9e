"""The opt-in choice of the workflow dispatch's chain pacing by simulation (``hybrid_policy(order_candidates=K)``).

On workflows present at time 0 with known lengths, the hybrid simulates ``K`` variants of its
workflow dispatch (:data:`~lloptim.runtime.order_choice.WORKFLOW_VARIANTS`, the default first) and
runs the one of the shortest simulated makespan: the run is that simulation exactly, never longer
than the default's, and serves every request and token once in precedence order. With estimates
or arrivals over time it keeps the default and simulates nothing; bad options stop before the run
with an error naming the option, from the API and from the CLI.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from lloptim import Problem, run_policy, workloads
from lloptim.cli import app
from lloptim.errors import SpecError
from lloptim.runtime.estimators import noisy_estimates
from lloptim.runtime.hybrid import hybrid_policy
from lloptim.runtime.order_choice import WORKFLOW_VARIANTS

runner = CliRunner()


def _chains(n: int = 30, clients: int = 10, seed: int = 0, rate: float | None = None) -> Problem:
    wl = workloads.workflows("chain", n, seed=seed, arrival_rate=rate)
    return Problem.single(wl, "llama-65b", clients=clients, instances=2, kv_capacity_tokens=81_920)


def _served_in_order(problem: Problem, res) -> None:
    w = problem.workload
    assert res.generated_tokens == w.total_output_tokens
    assert np.all(np.isfinite(res.done_s))
    edges = w.precedence.edges
    assert np.all(res.done_s[edges[:, 0]] <= res.assign_s[edges[:, 1]] + 1e-9)  # no step before its predecessor


def test_the_run_is_the_best_simulated_variant_and_never_longer_than_the_default():
    better = 0
    for seed in range(4):
        problem = _chains(seed=seed)
        policy = hybrid_policy(order_candidates=4)
        res = run_policy(problem, policy, check=True)
        default = run_policy(problem, "hybrid", check=True)
        choice = policy.requests.workflow_choice
        assert [k for k, _ in choice.tried] == [0, 1, 2, 3]
        assert choice.tried[0][1] == pytest.approx(np.nanmax(default.done_s), rel=1e-12)  # the default first
        assert np.nanmax(res.done_s) == pytest.approx(min(m for _, m in choice.tried), rel=1e-12)
        assert np.nanmax(res.done_s) <= np.nanmax(default.done_s) + 1e-9
        better += np.nanmax(res.done_s) < np.nanmax(default.done_s) - 1e-9
        # the chosen variant run directly is the same run
        direct = run_policy(problem, hybrid_policy(**WORKFLOW_VARIANTS[choice.chosen]))
        np.testing.assert_array_equal(direct.done_s, res.done_s)
        _served_in_order(problem, res)
    assert better >= 2


def test_a_scale_of_the_pacing_changes_the_schedule_and_scale_one_is_the_default():
    problem = _chains(seed=0)
    default = run_policy(problem, "hybrid")
    np.testing.assert_array_equal(run_policy(problem, hybrid_policy(pace_scale=1.0)).assign_s, default.assign_s)
    tight = run_policy(problem, hybrid_policy(pace_scale=0.5), check=True)
    assert not np.array_equal(tight.assign_s, default.assign_s)
    _served_in_order(problem, tight)


def test_estimates_and_arrivals_keep_the_default_unsimulated():
    problem = _chains(seed=1)
    est = noisy_estimates(problem.workload, 0.5, seed=1)
    policy = hybrid_policy(order_candidates=4)
    res = run_policy(problem, policy, estimates=est)
    assert policy.requests.workflow_choice.tried == [] and policy.requests.workflow_choice.chosen is None
    np.testing.assert_array_equal(res.assign_s, run_policy(problem, "hybrid", estimates=est).assign_s)
    arriving = _chains(seed=1, rate=2.0)
    policy = hybrid_policy(order_candidates=4)
    res = run_policy(arriving, policy)
    assert policy.requests.workflow_choice.tried == []
    np.testing.assert_array_equal(res.assign_s, run_policy(arriving, "hybrid").assign_s)


def test_a_spent_budget_stops_after_the_default():
    problem = _chains(seed=2)
    policy = hybrid_policy(order_candidates=4, order_budget_s=1e-9)
    res = run_policy(problem, policy)
    assert len(policy.requests.workflow_choice.tried) == 1
    np.testing.assert_array_equal(res.assign_s, run_policy(problem, "hybrid").assign_s)


def test_more_candidates_than_variants_try_each_variant_once():
    problem = _chains(seed=0)
    policy = hybrid_policy(order_candidates=40)
    run_policy(problem, policy)
    assert [k for k, _ in policy.requests.workflow_choice.tried] == list(range(len(WORKFLOW_VARIANTS)))


@pytest.mark.parametrize("opts, field", [({"order_candidates": 2, "pace_scale": 0.8}, "pace_scale"),
                                         ({"order_candidates": 2, "plan_paced": False}, "plan_paced"),
                                         ({"pace_scale": 0.0}, "pace_scale"),
                                         ({"pace_scale": float("nan")}, "pace_scale"),
                                         ({"order_candidates": 0}, "order_candidates"),
                                         ({"dispatch": "plan", "pace_scale": 0.8}, "pace_scale")])
def test_bad_options_are_refused_before_the_run(opts, field):
    with pytest.raises(SpecError, match=field):
        run_policy(_chains(6, clients=2), "hybrid", **opts)


def test_the_cli_reaches_the_choice_and_refuses_a_fixed_scale_with_it(tmp_path):
    # seed 1: on seed 0 the default (PROGRESS_SHARE) now ends where the choice does (21.21 s)
    spec = tmp_path / "chains.toml"
    spec.write_text('[workload]\nsource = "workflow"\nshape = "chain"\nworkflows = 30\nseed = 1\n\n'
                    '[[instances]]\nprofile = "llama-65b"\nclients = 10\nkv_capacity_tokens = 81920\n\n'
                    '[[instances]]\nprofile = "llama-65b"\nclients = 10\nkv_capacity_tokens = 81920\n')
    base = ["simulate", str(spec), "-p", "hybrid", "--json"]
    default = runner.invoke(app, base)
    chosen = runner.invoke(app, base + ["-o", "order_candidates=4"])
    assert default.exit_code == 0 and chosen.exit_code == 0, chosen.output
    assert json.loads(chosen.stdout)["makespan_s"] < json.loads(default.stdout)["makespan_s"]
    both = runner.invoke(app, base + ["-o", "order_candidates=4", "-o", "pace_scale=0.8"])
    assert both.exit_code == 2 and "pace_scale" in both.output and "Traceback" not in both.output


def test_where_nothing_is_paced_the_default_is_simulated_once():
    """On one instance no chain is paced, so every variant is the default's run: one simulation."""
    wl = workloads.workflows("chain", 30, seed=4)
    problem = Problem.single(wl, "llama-65b", clients=20, kv_capacity_tokens=81_920)
    policy = hybrid_policy(order_candidates=8)
    res = run_policy(problem, policy)
    assert len(policy.requests.workflow_choice.tried) == 1 and policy.requests.workflow_choice.chosen == 0
    np.testing.assert_array_equal(res.assign_s, run_policy(problem, "hybrid").assign_s)


@pytest.mark.parametrize("n, seed", [(40, 6), (60, 0)])
def test_where_the_default_was_never_paced_on_a_fleet_every_variant_is_the_same_run(n, seed):
    """The early stop is exact: no variant changes a run whose pacing never asked for fewer than every client."""
    problem = _chains(n, seed=seed)
    policy = hybrid_policy()
    default = run_policy(problem, policy)
    assert not policy.requests.ever_paced
    for variant in WORKFLOW_VARIANTS[1:]:
        np.testing.assert_array_equal(run_policy(problem, hybrid_policy(**variant)).assign_s, default.assign_s)
    chosen = hybrid_policy(order_candidates=8)
    run_policy(problem, chosen)
    assert len(chosen.requests.workflow_choice.tried) == 1
