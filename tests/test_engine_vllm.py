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

from lloptim import Problem  # noqa: E402
from lloptim.engines.common import ENGINE_DEFAULT  # noqa: E402
from lloptim.engines.serve import serve_engine  # noqa: E402
from lloptim.runtime.policy import Policy  # noqa: E402

from engine_contract import (BLOCKS, CLIENTS, POLICIES, check_bad_engine_arguments_are_named,  # noqa: E402
                             check_complete, check_engine_and_problem_must_agree,
                             check_policy_error_is_named_and_the_engine_serves_on, cli_run_json, make_problem)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


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


def _problem(seed: int, n: int, **kw) -> Problem:
    return make_problem("vllm", seed, n, **kw)


@pytest.fixture(scope="module")
def default_run(engines):
    problem = _problem(0, 14)
    return problem, serve_engine(problem, ENGINE_DEFAULT, engines[:1], clock="cpu")


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_serves_every_request_exactly(engines, default_run, policy):
    problem, base = default_run
    res = base if policy == ENGINE_DEFAULT else serve_engine(problem, policy, engines[:1], clock="cpu")
    check_complete(problem, res)
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
        check_complete(problem, res)
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
    check_complete(problem, res)
    assert (problem.client_instance()[res.client] == 1).any() and policy.requests.steals > 0


def test_a_policy_error_is_a_named_error_and_the_engine_serves_on(engines):
    check_policy_error_is_named_and_the_engine_serves_on(engines, _problem(3, 6), left_clean=lambda e: not e.scheduler.requests and not e.engine.has_unfinished_requests())


def test_engine_and_problem_must_agree(engines):
    check_engine_and_problem_must_agree(engines, "vllm")


def test_a_closed_engine_refuses_politely():
    from lloptim.engines.vllm import VllmEngine

    check_bad_engine_arguments_are_named(VllmEngine)


def test_cli_run_vllm_json(tmp_path):
    _ = cli_run_json(tmp_path, "vllm")


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
