"""What every real-engine adapter must do, written once for the vLLM and transformers test modules.

Each engine module keeps its own fixture (how its engines start and what they leave behind) and its
engine-specific checks; the shared setting, problems and checks live here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from lloptim import Problem, Workload, summarize
from lloptim.engines.common import ENGINE_DEFAULT
from lloptim.engines.serve import serve_engine
from lloptim.errors import PolicyError, SpecError
from lloptim.hardware import HardwareProfile, LatencyModel, save_profile
from lloptim.runtime.policy import IterationScheduler, Policy, Prefill
from lloptim.runtime.request_schedulers import GlobalQueue

CLIENTS, BLOCKS = 6, 16
POLICIES = [ENGINE_DEFAULT, "baseline", "vllm", "sarathi", "lpt", "offline", "hybrid", "hybrid-fused"]
PROFILE = HardwareProfile("cpu-hand", LatencyModel(2e-3, 4e-5, 2e-3, 5e-5, 2e-7), kv_capacity_tokens=BLOCKS * 128,
                          clients=CLIENTS)


def make_problem(tag: str, seed: int, n: int, prompt=(8, 90), output=(2, 30), instances: int = 1) -> Problem:
    """``n`` seeded requests (prompt and output token ranges) on ``instances`` replicas of :data:`PROFILE`."""
    rng = np.random.default_rng(seed)
    w = Workload.from_arrays(rng.integers(*prompt, n), rng.integers(*output, n), name=f"{tag}-test-{seed}")
    return Problem.single(w, PROFILE, clients=CLIENTS, instances=instances)


def check_complete(problem, res) -> None:
    """Every request served once, with exactly its requested number of tokens."""
    tokens = res.extra["tokens"]
    want = problem.workload.output_tokens
    assert sorted(tokens) == list(range(problem.n_requests))
    assert [len(tokens[r]) for r in range(problem.n_requests)] == want.tolist()
    assert summarize(res).requests_completed == problem.n_requests


class PrefillsAnIdleClient(IterationScheduler):
    """A broken iteration scheduler: prefills a client that has nothing waiting."""

    def decide(self, state):
        return Prefill([next(iter(state.idle), -1)])


def check_policy_error_is_named_and_the_engine_serves_on(engines, problem, left_clean=None) -> None:
    """A policy's error surfaces as a named error; ``left_clean(engine)`` holds after it; the engine serves on."""
    with pytest.raises(PolicyError, match="not waiting"):
        serve_engine(problem, Policy("broken", GlobalQueue("fcfs"), PrefillsAnIdleClient()), engines[:1])
    if left_clean is not None:
        assert left_clean(engines[0])
    check_complete(problem, serve_engine(problem, "baseline", engines[:1]))


def check_engine_and_problem_must_agree(engines, tag: str) -> None:
    """A problem whose clients or KV tokens differ from the engine's is refused by name."""
    with pytest.raises(SpecError, match="clients"):
        serve_engine(Problem.single(Workload.from_arrays([8], [3]), PROFILE, clients=2), "baseline", engines[:1])
    with pytest.raises(SpecError, match="KV tokens"):
        serve_engine(make_problem(tag, 4, 2, prompt=(1500, 1600), output=(500, 501)), "baseline", engines[:1])


def check_bad_engine_arguments_are_named(engine_cls) -> None:
    """Zero clients and a missing model directory are named errors."""
    with pytest.raises(SpecError, match="clients"):
        engine_cls("mini-llama", clients=0)
    with pytest.raises(SpecError, match="model"):
        engine_cls("/no/such/model")


def cli_run_json(tmp_path, backend: str) -> tuple[dict, str]:
    """``lloptim run --backend BACKEND --json`` on 8 requests; its JSON (checked) and its whole output."""
    from typer.testing import CliRunner

    from lloptim.cli import app

    path = save_profile(PROFILE, tmp_path / "p.toml")
    res = CliRunner().invoke(app, ["run", "--backend", backend, "--policy", "hybrid", "--requests", "8", "--clients",
                                   "3", "--kv-blocks", "16", "--profile", str(path), "--clock", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["requests_completed"] == d["requests_total"] == 8
    assert d["backend"] == backend and d["preemptions"] == 0 and d["requests_with_token_mismatch"] is not None
    assert d["predicted_makespan_s"] > 0 and d["tokens_per_s"] > 0
    return d, res.output
