"""lloptim as the scheduler of transformers' continuous batching, serving the built-in mini-llama on CPU.

One pair of engines (replicas sharing the weights) serves the whole module: six slots and a paged
cache of 16 blocks, so short requests never press on memory while long ones do.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers.generation.continuous_batching.scheduler")

from lloptim import Problem  # noqa: E402
from lloptim.engines.common import ENGINE_DEFAULT  # noqa: E402
from lloptim.engines.serve import serve_engine  # noqa: E402
from lloptim.runtime.policy import Policy  # noqa: E402

from engine_contract import (BLOCKS, CLIENTS, POLICIES, check_bad_engine_arguments_are_named,  # noqa: E402
                             check_complete, check_engine_and_problem_must_agree,
                             check_policy_error_is_named_and_the_engine_serves_on, cli_run_json, make_problem)

pytestmark = [pytest.mark.hf, pytest.mark.slow]


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


def _problem(seed: int, n: int, **kw) -> Problem:
    return make_problem("hf", seed, n, **kw)


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
    check_complete(problem, hybrid)
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
    check_complete(problem, res)
    assert (problem.client_instance()[res.client] == 1).any() and policy.requests.steals > 0


def test_a_policy_error_is_a_named_error_and_the_engine_serves_on(engines):
    check_policy_error_is_named_and_the_engine_serves_on(engines, _problem(3, 6))


def test_engine_and_problem_must_agree(engines):
    check_engine_and_problem_must_agree(engines, "hf")


def test_bad_engine_arguments_are_named():
    from lloptim.engines.hf import HFEngine

    check_bad_engine_arguments_are_named(HFEngine)


def test_cli_run_hf_json(tmp_path):
    _, output = cli_run_json(tmp_path, "hf")
    assert "Loading weights" not in output  # no transformers progress bar among the CLI's output


def test_cli_rejects_engine_flags_elsewhere():
    from typer.testing import CliRunner

    from lloptim.cli import app

    res = CliRunner().invoke(app, ["run", "--backend", "simulated", "--kv-blocks", "4"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["run", "--backend", "hf", "--ray"])
    assert res.exit_code == 2 and "--ray" in res.output
