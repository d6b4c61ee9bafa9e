"""Findings of the memory stress benchmark (``benchmarks/stress_memory.py``), each kept by a test.

* A memory-bound fleet whose instances differ in speed: the hybrid's memory-aware queue handed the
  longest request to whichever client asked first, a slow instance's as readily as a fast one's
  (``fleet_speed_mask``).
* ``--estimator`` with ``--train``: two specs without request ids both number their requests 0,
  1, ...; the training requests were dropped as if they were the scheduled ones.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from bench_loader import load_benchmark
from lloptim import Instance, Problem, Workload, load_profile, lower_bound, run_policy, summarize
from lloptim.cli import app
from lloptim.runtime.estimators import estimate
from lloptim.runtime.memory_schedulers import fleet_speed_mask
from lloptim.runtime.policy import RunContext


def _slow_fast_fleet(seed: int = 0, n: int = 60, long: int = 1500) -> Problem:
    """A slow instance listed first (its clients ask first) and a fast one; one long request, KV binding."""
    base = load_profile("llama-65b")
    slow = replace(base, name="slow", latency=base.latency.scaled(prefill=3.0, decode=3.0))
    rng = np.random.default_rng(seed)
    prompt = rng.integers(50, 300, n)
    out = rng.integers(20, 200, n)
    out[int(rng.integers(n))] = long
    return Problem(Workload.from_arrays(prompt, out),
                   (Instance(slow, 8, 2048, name="slow"), Instance(base, 8, 4096, name="fast")))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("known", [True, False])
def test_hybrid_leaves_the_long_request_to_the_fast_instance(seed, known):
    problem = _slow_fast_fleet(seed)
    w = problem.workload
    est = None if known else w.output_tokens * np.exp(np.random.default_rng(seed + 10).normal(0, 0.5, len(w)))
    bound = lower_bound(problem, migration=False)
    longest = int(np.argmax(w.output_tokens))
    for policy in ("hybrid", "hybrid-fused"):
        res = run_policy(problem, policy, estimates=est, check=True)
        m = summarize(res, bound)
        assert m.requests_completed == len(w) and res.generated_tokens == w.output_tokens.sum()
        # clients 0-7 are the slow instance's: 3x slower decode steps would triple the makespan
        assert res.client[longest] >= 8, (policy, int(res.client[longest]))
        assert m.gap_to_bound < 0.25, (policy, m.gap_to_bound)  # it was 2.06 (3x) before


def test_speed_mask_every_request_may_start_somewhere():
    problem = _slow_fast_fleet(0)
    w = problem.workload
    ctx = RunContext(problem, w.output_tokens.astype(np.float64), True, problem.client_instance())
    mask = fleet_speed_mask(ctx, np.arange(len(w)))
    assert mask.shape == (len(w), 2) and mask.any(axis=1).all()
    longest = int(np.argmax(w.output_tokens))
    assert not mask[longest, 0] and mask[longest, 1]
    # short requests may start on either instance: the slow one is not left idle
    assert mask[np.argsort(w.output_tokens)[: len(w) // 2]].all()


def test_speed_mask_leaves_identical_fleets_and_peers_alone():
    """Identical instances, and MC-SF (a peer as published), run exactly as without the mask."""
    base = _slow_fast_fleet(1)
    twins = Problem(base.workload, (base.instances[1], replace(base.instances[1], name="fast2")))
    import lloptim.runtime.memory_schedulers as ms

    setup = ms.MemoryAwareQueue.setup

    def without(self, ctx):
        setup(self, ctx)
        self.speeds_differ = False

    runs = {}
    for name, patch in (("with", setup), ("without", without)):
        ms.MemoryAwareQueue.setup = patch
        try:
            runs[name] = [run_policy(twins, "hybrid").makespan_s, run_policy(base, "mcsf").makespan_s]
        finally:
            ms.MemoryAwareQueue.setup = setup
    assert runs["with"] == runs["without"]


def test_estimator_trains_on_a_spec_without_ids():
    """A training workload numbered like the scheduled one is other requests, not the same ones."""
    rng = np.random.default_rng(3)
    work = Workload.from_arrays(rng.integers(10, 100, 50), rng.integers(10, 400, 50))
    train = Workload.from_arrays(rng.integers(10, 100, 40), rng.integers(10, 400, 40))
    est = estimate(work, "mean", train)
    assert est[0] == pytest.approx(train.output_tokens.mean())
    # the same requests are still dropped (a case drawn from the training data)
    both = Workload.from_arrays(np.r_[work.prompt_tokens[:5], train.prompt_tokens],
                                np.r_[work.output_tokens[:5], train.output_tokens],
                                ids=[str(i) for i in range(5)] + [f"t{i}" for i in range(40)])
    assert estimate(work, "mean", both)[0] == pytest.approx(train.output_tokens.mean())


def test_cli_train_spec_without_ids(tmp_path):
    spec = tmp_path / "spec.toml"
    train = tmp_path / "train.toml"
    rows = lambda xs: "".join(f"[[requests]]\nprompt_tokens = {p}\noutput_tokens = {o}\n" for p, o in xs)  # noqa: E731
    spec.write_text(rows([(50, 40), (60, 80), (70, 20)]) + "[[instances]]\nclients = 2\n")
    train.write_text(rows([(55, 30), (65, 90)]))
    res = CliRunner().invoke(app, ["simulate", str(spec), "--policy", "hybrid", "--estimator", "mean",
                                   "--train", str(train), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["requests_completed"] == 3


def test_stress_memory_quick_runs_clean(tmp_path, capsys):
    """The benchmark's smoke test on two classes: no crash, no bound above a makespan, API == CLI."""
    stress = load_benchmark("stress_memory")
    out = tmp_path / "rows.csv"
    rc = stress.main(["--quick", "--classes", "reserve-cap", "fleet", "--policies", "hybrid", "vllm",
                      "--csv", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "same" in text and "DIFFERENT" not in text
    assert out.read_text().count("\n") == 1 + 2 * 2
