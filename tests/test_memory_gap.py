"""``benchmarks/memory_gap.py``: a run's decode steps cut into spans, how busy clients and KV memory were in each.

The decomposition must account for every decode step, request and idle resource-step of the run,
and its reading of the excess over the bound (a run's steps are the KV area over the capacity plus
its idle memory-steps; the bound's are the area plus its ramp-up) must hold against the engine's
own KV trace, for any policy, with or without preemptions.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lloptim import Problem, Workload, run_policy
from lloptim.memory import decode_area_tokens
from bench_loader import load_benchmark

mg = load_benchmark("memory_gap")


def _problem(n: int, clients: int, seed: int, rho: float, block: int = 4) -> Problem:
    """``n`` lognormal requests and a cache at which the KV-area steps are ``rho`` x the client steps."""
    rng = np.random.default_rng(seed)
    p = rng.integers(5, 40, n)
    o = np.clip(np.rint(rng.lognormal(np.log(20), 1.2, n)), 1, 300).astype(np.int64)
    area = float(decode_area_tokens(p, o, block).sum())
    cap = max(int(area / (rho * o.sum() / clients)), int((p + o).max()) + block)
    return Problem.single(Workload.from_arrays(p, o), "llama-65b", clients=clients,
                          kv_capacity_tokens=-(-cap // block) * block, kv_block_tokens=block)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), rho=st.sampled_from([0.8, 1.0, 1.5]), parts=st.integers(1, 12),
       policy=st.sampled_from(["hybrid-fused", "hybrid", "vllm", "lpt"]))
def test_spans_account_for_the_whole_run(seed, rho, parts, policy):
    problem = _problem(50, 5, seed, rho)
    res = run_policy(problem, policy)
    rows, tot = mg.gap_by_part(problem, res, parts=parts)
    inst = problem.instances[0]
    M = inst.kv_blocks * inst.kv_block_tokens
    dec = (res.trace_kind == 1) | (res.trace_kind == 2)
    S = int(dec.sum())
    assert len(rows) == parts and tot["decode_steps"] == S
    # the spans partition the decode steps, and each step falls in exactly one of the four classes
    assert sum(r["steps"] for r in rows) == S
    assert rows[0]["from_step"] == 0 and rows[-1]["to_step"] == S
    assert all(r["clients_full_only"] + r["memory_full_only"] + r["both_full"] + r["neither_full"] == r["steps"]
               for r in rows)
    # every request starts decoding in exactly one span
    assert sum(r["started"] for r in rows) == problem.n_requests
    # idle resource-steps add up to the run's, which are the steps minus the work done in them
    n = res.trace_participants[dec] / inst.clients
    h = res.trace_kv_tokens[dec] / M
    assert np.isclose(sum(r["idle_client_steps"] for r in rows), tot["idle_client_steps"])
    assert np.isclose(sum(r["idle_memory_steps"] for r in rows), tot["idle_memory_steps"])
    assert np.isclose(tot["idle_memory_steps"], S - h.sum())
    assert np.isclose(tot["idle_client_steps"], S - n.sum())
    # the KV memory held over the run is the bound's area (fused prefills hold the prompt one step
    # more), so the steps above the bound's memory steps are the idle memory-steps minus its ramp-up
    prompt_blocks = float((-(-problem.workload.prompt_tokens // inst.kv_block_tokens)).sum() * inst.kv_block_tokens)
    held = float(res.trace_kv_tokens[dec].sum())
    area = tot["area_steps"] * M
    assert area - 1e-6 <= held <= area + prompt_blocks + 1e-6
    excess = S - tot["bound_steps_memory"]
    explained = tot["idle_memory_steps"] - tot["bound_ramp_steps"]
    assert explained - 1e-6 <= excess <= explained + prompt_blocks / M + 1e-6
    # the bound is never above the run, and its ramp-up is never negative
    assert tot["bound_steps"] <= S and tot["bound_ramp_steps"] >= -1e-9


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), rho=st.sampled_from([0.8, 1.0, 1.5]), parts=st.integers(2, 12),
       policy=st.sampled_from(["hybrid-fused", "hybrid", "vllm", "lpt"]))
def test_work_left_is_what_the_rest_of_the_run_does(seed, rho, parts, policy):
    problem = _problem(50, 5, seed, rho)
    res = run_policy(problem, policy)
    rows, tot = mg.gap_by_part(problem, res, parts=parts)
    inst = problem.instances[0]
    M = inst.kv_blocks * inst.kv_block_tokens
    w = problem.workload
    if int(res.preemptions.sum()):
        # a recomputed request's progress is not its steps since it first began: not reported
        assert all(np.isnan([r["work_left_clients"], r["work_left_memory"], r["lost"], r["lost_too_thin"],
                             r["lost_too_fat"]]).all() for r in rows)
        return
    # at the start, the whole workload: its output over the clients, its KV area over the cache
    assert rows[0]["steps_left"] == tot["decode_steps"]
    assert np.isclose(rows[0]["work_left_clients"], w.output_tokens.sum() / inst.clients)
    assert np.isclose(rows[0]["work_left_memory"], tot["area_steps"])
    # the output tokens left at a span's start are the ones the run's later decode steps generate
    dec = (res.trace_kind == 1) | (res.trace_kind == 2)
    running = res.trace_running[dec]
    assert all(np.isclose(r["work_left_clients"] * inst.clients, running[r["from_step"]:].sum()) for r in rows)
    for r, nxt in zip(rows, rows[1:]):
        # the work left only shrinks, by no more than the span's steps could do (C tokens, M tokens a step)
        assert nxt["work_left_clients"] <= r["work_left_clients"] + 1e-9
        assert nxt["work_left_memory"] <= r["work_left_memory"] + 1e-9
        assert r["work_left_clients"] - nxt["work_left_clients"] <= r["steps"] + 1e-9
        assert r["work_left_memory"] - nxt["work_left_memory"] <= r["steps"] + 1e-9
    # the rest of the run cannot take fewer steps than its work needs by either resource
    assert all(r["steps_left"] >= max(r["work_left_clients"], r["work_left_memory"]) - 1e-9 for r in rows)
    # the steps lost add up to the run's steps above its work's larger need; a step loses at most
    # itself and never gains (no step does more than C tokens or M tokens of KV area); the too thin
    # and too fat steps are disjoint parts of it
    need = max(rows[0]["work_left_clients"], rows[0]["work_left_memory"])
    assert np.isclose(sum(r["lost"] for r in rows), tot["decode_steps"] - need)
    assert all(-1e-9 <= r["lost"] <= r["steps"] + 1e-9 for r in rows)
    assert all(r["lost_too_thin"] >= -1e-9 and r["lost_too_fat"] >= -1e-9 for r in rows)
    assert all(r["lost_too_thin"] + r["lost_too_fat"] <= r["lost"] + 1e-9 for r in rows)
