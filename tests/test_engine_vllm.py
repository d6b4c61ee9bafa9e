"""lloptim as vLLM's scheduler, on vLLM's CPU engine serving the built-in mini-llama.

One pair of engines (replicas) serves the whole module: six slots and 16 KV blocks of 128 tokens
each, so short requests never press on memory while long ones do.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

from lloptim import Problem, Workload, summarize  # noqa: E402
from lloptim.engines.common import ENGINE_DEFAULT  # noqa: E402
from lloptim.engines.serve import serve_engine  # noqa: E402
from lloptim.errors import PolicyError, SpecError  # noqa: E402
from lloptim.hardware import HardwareProfile, LatencyModel, save_profile  # noqa: E402
from lloptim.runtime.policy import IterationScheduler, Policy, Prefill  # noqa: E402
from lloptim.runtime.request_schedulers import GlobalQueue  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CLIENTS, BLOCKS = 6, 16
POLICIES = [ENGINE_DEFAULT, "baseline", "vllm", "sarathi", "lpt", "offline", "hybrid", "hybrid-fused"]
PROFILE = HardwareProfile("cpu-hand", LatencyModel(2e-3, 4e-5, 2e-3, 5e-5, 2e-7), kv_capacity_tokens=BLOCKS * 128,
                          clients=CLIENTS)


@pytest.fixture(scope="module")
def engines():
    import psutil

    from lloptim.engines.vllm import VllmEngine

    torch.set_num_threads(1)
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    pair = [VllmEngine("mini-llama", clients=CLIENTS, kv_blocks=BLOCKS) for _ in range(2)]
    yield pair
    for e in pair:
        e.close()
    # the engines ran in this process and left no process behind
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children


def _problem(seed: int, n: int, prompt=(8, 90), output=(2, 30), instances: int = 1) -> Problem:
    rng = np.random.default_rng(seed)
    w = Workload.from_arrays(rng.integers(*prompt, n), rng.integers(*output, n), name=f"vllm-test-{seed}")
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
    # scheduling never changes what the model says (vLLM's CPU kernels are batch-invariant here)
    assert res.extra["tokens"] == base.extra["tokens"]
    assert not engines[0].scheduler.requests  # nothing left behind


def test_policies_never_admit_beyond_the_kv_blocks_while_vllm_preempts(engines):
    """Long requests (3-5 blocks each at their peak) on 16 blocks: six at once do not fit.

    Reservations never overflow; prompt-block admission (paged) overflows as outputs grow, and vLLM
    preempts; every run completes with the same tokens.
    """
    problem = _problem(1, 10, prompt=(250, 400), output=(60, 160))
    seen = []
    sched = engines[0].scheduler
    original = type(sched).update_from_output

    def watch(self, so, mro):
        out = original(self, so, mro)
        seen.append(self.kv_cache_manager.block_pool.get_num_free_blocks())
        return out

    type(sched).update_from_output = watch
    try:
        hybrid = serve_engine(problem, "hybrid", engines[:1], clock="cpu", kv_mode="reserve")
        paged = serve_engine(problem, "hybrid", engines[:1], clock="cpu", kv_mode="paged")
        default = serve_engine(problem, ENGINE_DEFAULT, engines[:1], clock="cpu")
    finally:
        type(sched).update_from_output = original
    for res in (hybrid, paged, default):
        _check_complete(problem, res)
        assert res.extra["tokens"] == default.extra["tokens"]
    assert hybrid.extra["preemptions"] == 0  # by reservation nothing is ever preempted
    assert default.extra["preemptions"] > 0  # vLLM admits on the prompt and preempts as outputs grow
    # paged, the policy admits on the prompt too; what vLLM then preempts is recomputed and accounted
    assert paged.preemptions.sum() == paged.extra["preemptions"]
    assert min(seen) >= 0


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
    assert not engines[0].scheduler.requests and not engines[0].engine.has_unfinished_requests()
    _check_complete(problem, serve_engine(problem, "baseline", engines[:1]))


def test_engine_and_problem_must_agree(engines):
    with pytest.raises(SpecError, match="clients"):
        serve_engine(Problem.single(Workload.from_arrays([8], [3]), PROFILE, clients=2), "baseline", engines[:1])
    with pytest.raises(SpecError, match="KV tokens"):
        serve_engine(_problem(4, 2, prompt=(1500, 1600), output=(500, 501)), "baseline", engines[:1])


def test_a_closed_engine_refuses_politely():
    from lloptim.engines.vllm import VllmEngine

    with pytest.raises(SpecError, match="clients"):
        VllmEngine("mini-llama", clients=0)
    with pytest.raises(SpecError, match="model"):
        VllmEngine("/no/such/model")


def test_cli_run_vllm_json(tmp_path):
    from typer.testing import CliRunner

    from lloptim.cli import app

    path = save_profile(PROFILE, tmp_path / "p.toml")
    res = CliRunner().invoke(app, ["run", "--backend", "vllm", "--policy", "hybrid", "--requests", "8", "--clients",
                                   "3", "--kv-blocks", "16", "--profile", str(path), "--clock", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["requests_completed"] == d["requests_total"] == 8
    assert d["backend"] == "vllm" and d["preemptions"] == 0 and d["requests_with_token_mismatch"] is not None
    assert d["predicted_makespan_s"] > 0 and d["tokens_per_s"] > 0


def test_cli_rejects_engine_flags_elsewhere():
    from typer.testing import CliRunner

    from lloptim.cli import app

    res = CliRunner().invoke(app, ["run", "--backend", "simulated", "--kv-blocks", "4"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["run", "--backend", "vllm", "--migrate"])
    assert res.exit_code == 2 and "migrate" in res.output


def test_cli_calibrate_vllm_writes_a_profile_fitted_to_the_engine(tmp_path):
    from typer.testing import CliRunner

    from lloptim.cli import app
    from lloptim.hardware import load_profile

    out = tmp_path / "vllm.toml"
    res = CliRunner().invoke(app, ["calibrate", "--backend", "vllm", "--clients", "4", "--kv-blocks", "32",
                                   "--clock", "cpu", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["device"] == "vllm" and d["r2_decode"] > 0.5 and {p["kind"] for p in d["points"]} >= {"prefill", "decode"}
    prof = load_profile(out)
    assert prof.clients == 4 and prof.latency.decode_base_s > 0
