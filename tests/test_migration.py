"""Live migration of running requests between instances (opt-in, costed by the profiles)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lloptim import Problem, workloads
from lloptim.bounds import lower_bound
from lloptim.errors import ProfileError, SpecError
from lloptim.hardware import HardwareProfile, LatencyModel, load_profile, transfer_time_between
from lloptim.metrics import summarize
from lloptim.problem import Instance, Workload
from lloptim.runtime.engine import KIND_MIGRATE
from lloptim.runtime.migration import EndGameMigration, expected_finish_s, with_migration
from lloptim.simulator import run_policy


def _profile(name: str, decode_scale: float = 1.0, transfer: bool = True) -> HardwareProfile:
    lat = LatencyModel(1e-3, 1e-5, 1e-2 * decode_scale, 1e-3 * decode_scale, 1e-6 * decode_scale,
                       *((1e-3, 1e-6) if transfer else (None, None)))
    return HardwareProfile(name, lat, kv_capacity_tokens=100_000, clients=4)


def _problem(workload: Workload, scales=(1.0, 3.0), clients=(4, 4), transfer=True) -> Problem:
    insts = tuple(Instance.from_profile(_profile(f"p{k}", s, transfer), c, name=f"instance-{k}")
                  for k, (s, c) in enumerate(zip(scales, clients)))
    return Problem(workload, insts, name="hetero")


def _check_conservation(problem: Problem, res) -> None:
    w = problem.workload
    assert np.all(np.isfinite(res.done_s)), "every request completes"
    assert res.generated_tokens == int(w.output_tokens.sum()), "every output token is generated exactly once"
    # a request is decoded for exactly its output length, across the instances it ran on
    decodes = res.trace_running[(res.trace_kind == 1) | (res.trace_kind == 2)].sum()
    assert int(decodes) == int(w.output_tokens.sum())
    assert int((res.trace_kind == KIND_MIGRATE).sum()) == int(res.migrations.sum())


def test_transfer_cost_is_stated_by_the_profile():
    lat = LatencyModel(1e-3, 1e-5, 1e-2, 1e-3, 1e-6, kv_transfer_base_s=2e-3, kv_transfer_per_token_s=1e-5)
    assert lat.transfer_time(100) == pytest.approx(3e-3)
    slow = replace(lat, kv_transfer_base_s=5e-3)
    assert transfer_time_between(lat, slow, 100) == pytest.approx(6e-3)
    with pytest.raises(ProfileError, match="kv_transfer"):
        LatencyModel(1e-3, 1e-5, 1e-2, 1e-3, 1e-6, kv_transfer_base_s=2e-3)
    with pytest.raises(ProfileError, match="kv_transfer_base_s"):
        LatencyModel(1e-3, 1e-5, 1e-2, 1e-3, 1e-6).transfer_time(10)
    assert load_profile("llama-65b").latency.transfer_time(200) == pytest.approx(0.002 + 200 * 1.31e-5)


def test_expected_finish_matches_the_latency_model_step_by_step():
    lat = _profile("x").latency
    rem, kv = np.array([3.0, 5.0, 1.0]), np.array([10.0, 20.0, 7.0])
    t, r, k = 0.0, rem.copy(), kv.copy()
    while (r > 0).any():
        on = r > 0
        t += lat.decode_time(int(on.sum()), float(k[on].sum()))
        k[on] += 1
        r[on] -= 1
    assert expected_finish_s(2.0, lat, rem, kv) == pytest.approx(2.0 + t)


def test_migration_moves_the_tail_to_the_fast_instance_and_conserves_everything():
    w = workloads.synthetic(40, seed=3)
    problem = _problem(w)
    plain = run_policy(problem, "baseline")
    moved = run_policy(problem, with_migration("baseline"))
    _check_conservation(problem, moved)
    assert moved.migrations.sum() > 0
    assert moved.policy == "baseline+migrate"
    # moves go from the slow instance (1) to the fast one (0), never back and forth
    inst = problem.client_instance()
    assert np.all(inst[moved.client[moved.migrations > 0]] == 0)
    assert moved.makespan_s < plain.makespan_s - 1e-9
    m = summarize(moved)
    assert m.migrations == int(moved.migrations.sum()) and m.makespan_s >= lower_bound(problem).total_s


@settings(max_examples=25, deadline=None)
@given(n=st.integers(4, 30), seed=st.integers(0, 10_000), slow=st.floats(1.0, 6.0),
       clients=st.tuples(st.integers(1, 4), st.integers(1, 4)), policy=st.sampled_from(["baseline", "hybrid", "lpt"]))
def test_with_known_lengths_migration_never_lengthens_a_run(n, seed, slow, clients, policy):
    """Known lengths make the end-game forecast exact: each move lowers the expected makespan."""
    problem = _problem(workloads.synthetic(n, seed=seed), scales=(1.0, slow), clients=clients)
    plain = run_policy(problem, policy)
    moved = run_policy(problem, with_migration(policy))
    _check_conservation(problem, moved)
    assert moved.makespan_s <= plain.makespan_s + 1e-9
    if moved.migrations.sum():
        assert moved.makespan_s < plain.makespan_s


def test_single_instance_and_unknown_lengths_are_safe():
    w = workloads.synthetic(30, seed=1)
    single = Problem.single(w, _profile("one"), clients=4)
    a, b = run_policy(single, "hybrid"), run_policy(single, with_migration("hybrid"))
    assert b.migrations.sum() == 0 and a.makespan_s == b.makespan_s
    problem = _problem(w)
    est = np.full(len(w), float(w.output_tokens.mean()))
    res = run_policy(problem, with_migration("hybrid"), estimates=est)
    _check_conservation(problem, res)


def test_migration_needs_a_stated_cost_and_a_capable_backend():
    w = workloads.synthetic(10, seed=0)
    with pytest.raises(SpecError, match="kv_transfer"):
        run_policy(_problem(w, transfer=False), with_migration("baseline"))

    class NoMigrate:
        name = "frozen"

        def __init__(self, problem):
            from lloptim.backends.simulated import SimulatedBackend

            self._inner = SimulatedBackend(problem)
            self.prefill, self.decode, self.release = self._inner.prefill, self._inner.decode, self._inner.release

    problem = _problem(w)
    with pytest.raises(SpecError, match="cannot migrate"):
        run_policy(problem, with_migration("baseline"), backend=NoMigrate(problem))
    with pytest.raises(SpecError, match="min_gain_s"):
        EndGameMigration(min_gain_s=-1.0)


def test_cli_simulate_migrate(tmp_path):
    from typer.testing import CliRunner

    from lloptim.cli import app

    spec = tmp_path / "spec.toml"
    spec.write_text('[workload]\nsource = "synthetic"\nn = 40\nseed = 3\n\n'
                    '[[instances]]\nprofile = "llama-65b"\nclients = 4\n\n'
                    '[[instances]]\nprofile = "llama-65b"\nclients = 2\n')
    runs = {}
    for flags in ([], ["--migrate"]):
        res = CliRunner().invoke(app, ["simulate", str(spec), "--policy", "baseline", *flags, "--json"])
        assert res.exit_code == 0, res.output
        runs[bool(flags)] = json.loads(res.stdout)
    d = runs[True]
    assert d["policy"] == "baseline+migrate" and d["requests_completed"] == 40 and d["migrations"] >= 1
    assert runs[False]["migrations"] == 0 and d["makespan_s"] < runs[False]["makespan_s"]


@pytest.mark.torch
def test_torch_migration_keeps_every_token_exact():
    """A request whose KV cache moves to another replica mid-generation says exactly what it says alone."""
    pytest.importorskip("torch")
    from lloptim.backends.torch_backend import TorchBackend, token_mismatches

    rng = np.random.default_rng(0)
    w = Workload.from_arrays(rng.integers(4, 24, 12), rng.integers(2, 30, 12), name="tiny")
    problem = _problem(w, scales=(1.0, 5.0), clients=(2, 2))
    be = TorchBackend(problem, "tiny-llama", device="cpu")
    res = run_policy(problem, with_migration("baseline"), backend=be)
    _check_conservation(problem, res)
    assert res.migrations.sum() > 0 and be.counters["migrations"] == int(res.migrations.sum())
    assert max(token_mismatches(be).values()) == 0
