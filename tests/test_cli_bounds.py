"""``lloptim solve`` and ``compare`` report the makespan bound that applies to each kind of run.

A plan (and every policy without ``--migrate``) runs each request on one instance and is bounded
by ``lower_bound(problem, migration=False)``; ``--migrate`` runs only by ``lower_bound(problem)``.
Both are printed where they differ and both are in ``--json`` (``lower_bound_no_migration``,
``lower_bound``).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import lloptim
from lloptim.bounds import lower_bound
from lloptim.cli import app
from lloptim.hardware import load_profile, save_profile

runner = CliRunner()


def _spec(tmp_path, workload: str, slow: bool) -> str:
    """A spec of ``workload`` on a LLaMA-65B instance and a second one, 1.5x slower if ``slow``."""
    second = "llama-65b"
    if slow:
        base = load_profile("llama-65b")
        second = str(save_profile(base.with_latency(base.latency.scaled(1.5, 1.5)), tmp_path / "slow.toml"))
    path = tmp_path / "spec.toml"
    path.write_text(f'[workload]\n{workload}\n\n[[instances]]\nprofile = "llama-65b"\nclients = 4\n\n'
                    f'[[instances]]\nprofile = "{second}"\nclients = 4\n')
    return str(path)


CHAINS = 'source = "workflow"\nshape = "chain"\nworkflows = 12\nseed = 32'
REQUESTS = 'source = "synthetic"\nn = 40\nseed = 3'


def test_solve_reports_both_bounds_on_a_mixed_fleet_with_chains(tmp_path):
    spec = _spec(tmp_path, CHAINS, slow=True)
    problem = lloptim.load_spec(spec)
    anywhere, fixed = lower_bound(problem), lower_bound(problem, migration=False)
    assert fixed.total_s > anywhere.total_s * 1.001  # the case: the co-runners' prefills bind without migration
    res = runner.invoke(app, ["solve", spec, "--json", "--time-limit", "2"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output)
    assert row["lower_bound"]["total_s"] == pytest.approx(anywhere.total_s, rel=1e-9)
    assert row["lower_bound"]["fused_s"] == pytest.approx(anywhere.fused_s, rel=1e-9)
    assert row["lower_bound_no_migration"]["total_s"] == pytest.approx(fixed.total_s, rel=1e-9)
    assert row["lower_bound_no_migration"]["fused_s"] == pytest.approx(fixed.fused_s, rel=1e-9)
    res = runner.invoke(app, ["solve", spec, "--time-limit", "2"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    plan = next(line for line in lines if line.startswith("makespan bound without migration"))
    moved = next(line for line in lines if line.startswith("makespan bound with migration"))
    assert f"{fixed.total_s:,.2f} s ({fixed.fused_s:,.2f} s fused)" in plan
    assert f"{anywhere.total_s:,.2f} s ({anywhere.fused_s:,.2f} s fused)" in moved and "--migrate" in moved


def test_solve_prints_one_bound_where_they_agree(tmp_path):
    spec = _spec(tmp_path, REQUESTS, slow=True)  # no precedence: migration changes nothing
    res = runner.invoke(app, ["solve", spec])
    assert res.exit_code == 0, res.output
    assert "with or without migration" in res.output and "--migrate" not in res.output
    problem = lloptim.load_spec(spec)
    assert f"{lower_bound(problem).total_s:,.2f} s" in res.output


def test_solve_on_one_instance_reports_the_bound_without_migration(tmp_path):
    path = tmp_path / "one.toml"
    path.write_text(f'[workload]\n{CHAINS}\n\n[[instances]]\nprofile = "llama-65b"\nclients = 4\n')
    res = runner.invoke(app, ["solve", str(path), "--json", "--time-limit", "2"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output)
    fixed = lower_bound(lloptim.load_spec(str(path)), migration=False)
    assert row["lower_bound_no_migration"]["total_s"] == pytest.approx(fixed.total_s, rel=1e-9)
    assert row["lower_bound_no_migration"]["total_s"] >= row["lower_bound"]["total_s"] * (1 - 1e-12)
    res = runner.invoke(app, ["solve", str(path), "--time-limit", "2"])
    assert res.exit_code == 0 and "one instance, nothing migrates" in res.output
    assert f"{fixed.total_s:,.2f} s" in res.output


def test_compare_reports_both_bounds(tmp_path):
    spec = _spec(tmp_path, REQUESTS, slow=True)
    res = runner.invoke(app, ["compare", spec, "--solvers", "greedy", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    problem = lloptim.load_spec(spec)
    assert out["results"][0]["backend"] == "greedy"
    assert out["lower_bound"]["total_s"] == pytest.approx(lower_bound(problem).total_s, rel=1e-9)
    assert out["lower_bound_no_migration"]["total_s"] == pytest.approx(
        lower_bound(problem, migration=False).total_s, rel=1e-9)
    res = runner.invoke(app, ["compare", spec, "--solvers", "greedy"])
    assert res.exit_code == 0 and "makespan bound:" in res.output


def test_runs_without_migration_are_never_below_the_reported_bound(tmp_path):
    """Policies without ``--migrate`` run each request on one instance: the bound ``solve`` reports holds for them."""
    spec = _spec(tmp_path, CHAINS, slow=True)
    res = runner.invoke(app, ["solve", spec, "--json", "--time-limit", "2"])
    row = json.loads(res.output)
    problem = lloptim.load_spec(spec)
    for policy in ("hybrid", "baseline"):
        run = lloptim.run_policy(problem, policy)
        assert run.makespan_s >= row["lower_bound_no_migration"]["fused_s"] * (1 - 1e-9)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 60), seed=st.integers(0, 10_000), rate=st.sampled_from([None, 2.0, 20.0]),
       slow=st.sampled_from([1.0, 1.5, 2.0]), clients=st.sampled_from([2, 8, 20]))
def test_without_precedence_migration_changes_the_bound_only_by_release_dates(n, seed, rate, slow, clients):
    """Independent requests: migration changes the bound only through the release-date fleet term."""
    import numpy as np

    from lloptim import Instance, Problem, workloads

    wl = workloads.synthetic(n, seed=seed)
    if rate is not None:
        wl = wl.with_arrivals(np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n)))
    base = load_profile("llama-65b")
    fleet = (Instance.from_profile(base, clients=clients, name="a"),
             Instance.from_profile(base.with_latency(base.latency.scaled(slow, slow)), clients=clients, name="b"))
    problem = Problem(wl, fleet)
    a, b = lower_bound(problem), lower_bound(problem, migration=False)
    assert a.fleet_release_s == 0.0
    if rate is None:
        assert b.fleet_release_s == 0.0
    assert (b.total_s, b.fused_s) == (max(a.total_s, b.fleet_release_s), max(a.fused_s, b.fleet_release_s))
