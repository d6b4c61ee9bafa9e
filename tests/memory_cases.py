"""Memory-bound test problems and run checks shared by the memory tests (fill-up, urgency, order choice, fleets)."""

from __future__ import annotations

import numpy as np

from lloptim import Problem, Workload
from lloptim.memory import decode_area_tokens


def lognormal_memory_problem(n: int, clients: int, seed: int, rho: float, block: int = 4,
                             sigma: float = 1.0) -> Problem:
    """``n`` lognormal requests on one instance whose cache makes the KV-area steps ``rho`` x the client steps.

    Prompts are uniform in 5-39 tokens, outputs lognormal (median 20 tokens, ``sigma``) clipped to
    1-300; the capacity (whole blocks of ``block`` tokens) is the decode KV area divided by ``rho``
    times the client-bound decode steps, and never below the largest request plus a block.
    """
    rng = np.random.default_rng(seed)
    p = rng.integers(5, 40, n)
    o = np.clip(np.rint(rng.lognormal(np.log(20), sigma, n)), 1, 300).astype(np.int64)
    area = float(decode_area_tokens(p, o, block).sum())
    cap = max(int(area / (rho * o.sum() / clients)), int((p + o).max()) + block)
    return Problem.single(Workload.from_arrays(p, o), "llama-65b", clients=clients,
                          kv_capacity_tokens=-(-cap // block) * block, kv_block_tokens=block)


def check_conserved(problem: Problem, res) -> None:
    """Every request finished with all its tokens, none duplicated, every cache within its capacity."""
    w = problem.workload
    assert np.all(~np.isnan(res.done_s)), "a request was lost"
    assert res.generated_tokens == w.total_output_tokens
    # each request takes part in exactly its output's decode steps, preempted or not (no duplicate)
    assert int(res.trace_running[res.trace_kind != 0].sum()) == w.total_output_tokens + res.wasted_tokens
    caps = np.array([i.kv_capacity_tokens for i in problem.instances])
    assert np.all(res.trace_kv_tokens <= caps[res.trace_instance])
