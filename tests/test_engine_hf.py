"""lloptim as the scheduler of transformers' continuous batching, serving the built-in mini-llama on CPU.

One pair of engines (replicas sharing the weights) serves the whole module: six slots and a paged
cache of 16 blocks, so short requests never press on memory while long ones do.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers.generation.continuous_batching.scheduler")

from lloptim import Problem, Workload, summarize  # noqa: E402
from lloptim.engines.common import ENGINE_DEFAULT  # noqa: E402
from lloptim.engines.serve import serve_engine  # noqa: E402
from lloptim.errors import PolicyError, SpecError  # noqa: E402
from lloptim.hardware import HardwareProfile, LatencyModel, save_profile  # noqa: E402
from lloptim.runtime.policy import IterationScheduler, Policy, Prefill  # noqa: E402
from lloptim.runtime.request_schedulers import GlobalQueue  # noqa: E402

pytestmark = [pytest.mark.hf, pytest.mark.slow]

CLIENTS, BLOCKS = 6, 16
POLICIES = [ENGINE_DEFAULT, "baseline", "vllm", "sarathi", "lpt", "offline", "hybrid", "hybrid-fused"]
PROFILE = HardwareProfile("cpu-hand", LatencyModel(2e-3, 4e-5, 2e-3, 5e-5, 2e-7), kv_capacity_tokens=BLOCKS * 128,
                          clients=CLIENTS)


@pytest.fixture(scope="module")
def engines():
    import threading

    from lloptim.engines.hf import HFEngine

    torch.set_num_threads(1)
    threads = set(threading.enumerate())
    # float64: batches of other shapes cannot flip a greedy near-tie, so every schedule's tokens agree
    first = HFEngine("mini-llama", clients=CLIENTS, kv_blocks=BLOCKS, dtype="float64")
    pair = [first, HFEngine(first.module, clients=CLIENTS, kv_blocks=BLOCKS)]
    yield pair
    for e in pair:
        e.close()
    # every generation thread has ended
    assert all(not t.is_alive() for t in set(threading.enumerate()) - threads if "generation" in t.name)


def _problem(seed: int, n: int, prompt=(8, 90), output=(2, 30), instances: int = 1) -> Problem:
    rng = np.random.default_rng(seed)
    w = Workload.from_arrays(rng.integers(*prompt, n), rng.integers(*output, n), name=f"hf-test-{seed}")
    return Problem.single(w, PROFILE, clients=CLIENTS, instances=instances)


def _check_complete(problem, res) -> None:
    tokens = res.extra["tokens"]
    want = problem.workload.output_tokens
    assert sorted(tokens) == list(range(problem.n_requests))
    assert [len(tokens[r]) for r in range(problem.n_requests)] == want.tolist()
    assert summarize(res).requests_completed == problem.n_requests


@pytest.fixture(scope="module")
def default_run(engines):
    problem = _problem(0, 14)
    return problem, serve_engine(problem, ENGINE_DEFAULT, engines[:1], clock="cpu")


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_serves_every_request_exactly(engines, default_run, policy):
    problem, base = default_run
    res = base if policy == ENGINE_DEFAULT else serve_engine(problem, policy, engines[:1], clock="cpu")
    _check_complete(problem, res)
    assert res.extra["preemptions"] == 0 and res.extra["plan_deviations"] == 0
    # scheduling never changes what the model says (in float64)
    assert res.extra["tokens"] == base.extra["tokens"]


def test_policies_never_admit_beyond_the_kv_blocks(engines):
    """Long requests (pages of 256 tokens; two to three per request at their peak) on 16 blocks."""
    from lloptim.engines.hf import LloptimHFScheduler

    problem = _problem(1, 10, prompt=(250, 400), output=(60, 160))
    starved = []
    original = LloptimHFScheduler._schedule

    def watch(self, link, token_budget, cache_budget):
        out = original(self, link, token_budget, cache_budget)
        starved.append(len(self.starved_requests))
        return out

    LloptimHFScheduler._schedule = watch
    try:
        hybrid = serve_engine(problem, "hybrid", engines[:1], clock="cpu")
    finally:
        LloptimHFScheduler._schedule = original
    _check_complete(problem, hybrid)
    assert hybrid.extra["preemptions"] == 0 and hybrid.extra["plan_deviations"] == 0
    assert starved and max(starved) == 0  # no request ever failed to get its pages
    layout = engines[0].kv_layout
    # admission really was the bottleneck: fewer than six requests ran at once
    assert max(hybrid.trace_running) < CLIENTS
    assert layout.blocks == BLOCKS


def test_replicas_serve_and_steal_from_each_other(engines):
    problem = _problem(2, 20, instances=2)
    from lloptim.runtime.lagrangian import LagrangianIterations
    from lloptim.runtime.request_schedulers import AssignedQueues

    plan = np.arange(problem.n_requests) % CLIENTS  # all on replica 0's clients
    policy = Policy("lopsided", AssignedQueues(plan, steal=True), LagrangianIterations())
    res = serve_engine(problem, policy, engines, clock="cpu")
    _check_complete(problem, res)
    assert (problem.client_instance()[res.client] == 1).any() and policy.requests.steals > 0


class _PrefillsAnIdleClient(IterationScheduler):
    def decide(self, state):
        return Prefill([next(iter(state.idle), -1)])


def test_a_policy_error_is_a_named_error_and_the_engine_serves_on(engines):
    problem = _problem(3, 6)
    with pytest.raises(PolicyError, match="not waiting"):
        serve_engine(problem, Policy("broken", GlobalQueue("fcfs"), _PrefillsAnIdleClient()), engines[:1])
    _check_complete(problem, serve_engine(problem, "baseline", engines[:1]))


def test_engine_and_problem_must_agree(engines):
    with pytest.raises(SpecError, match="clients"):
        serve_engine(Problem.single(Workload.from_arrays([8], [3]), PROFILE, clients=2), "baseline", engines[:1])
    with pytest.raises(SpecError, match="KV tokens"):
        serve_engine(_problem(4, 2, prompt=(1500, 1600), output=(500, 501)), "baseline", engines[:1])


def test_bad_engine_arguments_are_named():
    from lloptim.engines.hf import HFEngine

    with pytest.raises(SpecError, match="clients"):
        HFEngine("mini-llama", clients=0)
    with pytest.raises(SpecError, match="model"):
        HFEngine("/no/such/model")


def test_cli_run_hf_json(tmp_path):
    from typer.testing import CliRunner

    from lloptim.cli import app

    path = save_profile(PROFILE, tmp_path / "p.toml")
    res = CliRunner().invoke(app, ["run", "--backend", "hf", "--policy", "hybrid", "--requests", "8", "--clients",
                                   "3", "--kv-blocks", "16", "--profile", str(path), "--clock", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["requests_completed"] == d["requests_total"] == 8
    assert d["backend"] == "hf" and d["preemptions"] == 0 and d["requests_with_token_mismatch"] is not None
    assert d["predicted_makespan_s"] > 0 and d["tokens_per_s"] > 0
    assert "Loading weights" not in res.output  # no transformers progress bar among the CLI's output


def test_cli_rejects_engine_flags_elsewhere():
    from typer.testing import CliRunner

    from lloptim.cli import app

    res = CliRunner().invoke(app, ["run", "--backend", "simulated", "--kv-blocks", "4"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["run", "--backend", "hf", "--ray"])
    assert res.exit_code == 2 and "--ray" in res.output
