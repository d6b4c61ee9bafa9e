"""The chain-gap study (benchmarks/chain_gap.py): its scripted schedules are valid and never beat the bound."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bench_loader import load_benchmark
from lloptim import lower_bound, run_policy

chain_gap = load_benchmark("chain_gap")


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), chains=st.integers(2, 8), clients=st.integers(2, 4), data=st.data())
def test_scripted_schedules_are_valid_and_above_the_bound(seed, chains, clients, data):
    problem = chain_gap.analogue(chains, clients, seed)
    n, rng = problem.n_requests, np.random.default_rng(seed)
    inst = rng.integers(0, 2, n)
    prio = rng.permutation(n).astype(np.float64)
    cap = [data.draw(st.integers(1, clients)), data.draw(st.integers(1, clients))]
    policy = chain_gap.Policy("scripted", chain_gap.ScriptedQueues(inst, prio, cap),
                              chain_gap.make_policy("hybrid").iterations)
    res = run_policy(problem, policy)
    assert np.all(np.isfinite(res.done_s))
    # each request on its instance, after its predecessors
    assert np.array_equal(problem.client_instance()[res.client], inst)
    e = problem.workload.precedence.edges
    assert np.all(res.assign_s[e[:, 1]] >= res.done_s[e[:, 0]] - 1e-9)
    # the bound without migration holds for every schedule: these are schedules no policy makes
    assert res.done_s.max() >= lower_bound(problem, migration=False).fused_s * (1 - 1e-9)


def test_the_search_starts_from_the_hybrid_and_only_improves():
    problem = chain_gap.analogue(6, 3, seed=1)
    res = run_policy(problem, "hybrid")
    first, best, cap = chain_gap.search(problem, res, 40, np.random.default_rng(0))
    assert best <= first < np.inf
    assert len(cap) == 2 and all(1 <= c <= 3 for c in cap)
    assert best >= lower_bound(problem, migration=False).fused_s * (1 - 1e-9)
