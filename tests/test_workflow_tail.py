"""The tail of an online workflow run: the prompt of the chain that decides the makespan in its own prefill."""

from __future__ import annotations

import numpy as np
import pytest

from lloptim import Problem, run_policy, workloads
from lloptim.runtime.request_schedulers import WorkflowQueue


def _chains(n: int, seed: int) -> Problem:
    return Problem.single(workloads.workflows("chain", n, seed=seed, arrival_rate=0.5), "llama-65b", clients=40,
                          kv_capacity_tokens=81_920)


@pytest.mark.parametrize("n, seed", [(10, 1), (20, 1)])
def test_the_deciding_chain_is_prefilled_alone_and_ends_sooner(n, seed, monkeypatch):
    # chains arriving at 0.5/s on 40 clients: the last chain decides the makespan; its handoffs
    # are prefill iterations of their own (a fused chunk would wait a whole decode step)
    problem = _chains(n, seed)
    res = run_policy(problem, "hybrid")
    own = res.trace_kind == 0
    assert own.any() and np.all(res.trace_running[own] <= 4)  # only beside few running requests
    assert np.any(res.trace_kind == 2)  # the others still fuse
    baseline = run_policy(problem, "baseline").makespan_s
    monkeypatch.setattr(WorkflowQueue, "decides_makespan", lambda self, request: False)
    fused_only = run_policy(problem, "hybrid")
    assert not np.any(fused_only.trace_kind == 0)
    assert res.makespan_s < fused_only.makespan_s - 0.02
    assert res.makespan_s <= baseline


def test_nothing_decides_the_makespan_without_precedence_or_pacing():
    from lloptim.runtime.policy import RunContext

    for problem, queue in ((Problem.single(workloads.gsm8k("test", limit=20), clients=4), WorkflowQueue()),
                           (_chains(4, 1), WorkflowQueue(pace=False))):
        ctx = RunContext(problem, problem.workload.output_tokens.astype(float), True, problem.client_instance())
        queue.setup(ctx)
        assert not any(queue.decides_makespan(r) for r in range(len(problem.workload)))
