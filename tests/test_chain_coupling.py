"""The chain-coupling bound without migration: co-runners pay their prefills on the chain's instance."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lloptim import Problem, lower_bound, run_policy, summarize, workloads
from lloptim.bounds import _cheapest_tokens
from lloptim.hardware import load_profile
from lloptim.problem import Instance
from lloptim.runtime.engine import Fault

POLICIES = ["baseline", "offline", "hybrid", "hybrid-fused", "hybrid-plan", "vllm", "sarathi", "sorted-f", "lpt"]


def _exact_tokens(p, o, chain, c_s, c_kv, entry, carry_ins, budget):
    """Most tokens a budget buys, by enumeration: each co-runner a prefix, the largest entries waived."""
    others = [r for r in range(p.size) if r not in chain]
    best = 0
    for xs in itertools.product(*[range(o[r] + 1) for r in others]):
        cost = sum(c_s * x + c_kv * (x * p[r] + x * (x - 1) / 2) for r, x in zip(others, xs))
        entries = sorted((entry[r] for r, x in zip(others, xs) if x > 0), reverse=True)
        cost += sum(entries[carry_ins:])
        if cost <= budget:
            best = max(best, sum(xs))
    return best


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), seed=st.integers(0, 1000), carry_ins=st.integers(0, 3), data=st.data())
def test_co_runners_entries_relax_the_exact_choice(n, seed, carry_ins, data):
    # the Lagrangian curves never buy fewer tokens than the best integral choice of prefixes and
    # carry-ins (valid), and never more than the curve without entries (never weaker)
    rng = np.random.default_rng(seed)
    p, o = rng.integers(1, 40, n), rng.integers(1, 4, n)
    chain = data.draw(st.lists(st.integers(0, n - 1), max_size=n, unique=True))
    c_s, c_kv = data.draw(st.floats(1e-4, 1e-2)), data.draw(st.floats(0.0, 1e-3))
    entry = rng.uniform(0.0, 0.05, n)
    plain = _cheapest_tokens(p, o, chain, c_s, c_kv)
    priced = _cheapest_tokens(p, o, chain, c_s, c_kv, entry, carry_ins)
    for budget in [0.0, *rng.uniform(0, 0.2, 5)]:
        exact = _exact_tokens(p, o, chain, c_s, c_kv, entry, carry_ins, budget)
        assert exact <= priced(budget) + 1e-9
        assert priced(budget) <= plain(budget) + 1e-9


def _chain_fleet(n: int, seed: int, clients: int = 20, instances: int = 2, slow: float = 1.0,
                 rate: float | None = None) -> Problem:
    base = load_profile("llama-65b")
    profiles = [base] * (instances - 1) + [
        base if slow == 1.0 else replace(base, name="slow", latency=base.latency.scaled(prefill=slow, decode=slow))]
    return Problem(workloads.workflows("chain", n, seed=seed, arrival_rate=rate),
                   tuple(Instance.from_profile(prof, clients, kv_capacity_tokens=81_920, name=f"i{k}")
                         for k, prof in enumerate(profiles)))


@pytest.mark.parametrize("seed", [1, 2])
def test_charging_co_runners_prefills_lifts_the_fleet_chain_bound(seed):
    # 100 three-step chains on 2 x 20 clients, where a chain decides the makespan: the co-runners'
    # prompts are prefilled on the chain's instance, which the bound with migration cannot assume
    problem = _chain_fleet(100, seed)
    loose, tight = lower_bound(problem), lower_bound(problem, migration=False)
    assert tight.fused_s > 1.005 * loose.fused_s and tight.total_s > 1.005 * loose.total_s
    for policy in ("hybrid", "hybrid-fused", "baseline", "sarathi"):
        res = run_policy(problem, policy)
        assert not res.migrations.any()
        assert res.makespan_s >= (tight.fused_s if np.any(res.trace_kind == 2) else tight.total_s)
    # summarize bounds a run without migrations by the tighter bound
    assert summarize(res).lower_bound_s == pytest.approx(tight.fused_s if np.any(res.trace_kind == 2)
                                                          else tight.total_s, rel=1e-12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from(workloads.WORKFLOW_SHAPES), n=st.integers(1, 10), seed=st.integers(0, 1000),
       kinds=st.lists(st.tuples(st.sampled_from([0.6, 1.0, 1.7]), st.integers(1, 6)), min_size=1, max_size=3),
       rate=st.sampled_from([None, 1.0, 4.0]), kv=st.sampled_from([40_000, 3_000]),
       policy=st.sampled_from(POLICIES), fault=st.booleans())
def test_the_bound_without_migration_holds_for_every_policy(shape, n, seed, kinds, rate, kv, policy, fault):
    # random DAGs on mixed fleets, arrivals, KV pressure (preemptions keep a request on its client)
    # and a failed client: never above a makespan, never below the bound with migration
    base = load_profile("llama-65b")
    insts = tuple(Instance.from_profile(replace(base, name=f"x{s}", latency=base.latency.scaled(prefill=s, decode=s)),
                                        c, kv_capacity_tokens=kv, name=f"i{k}") for k, (s, c) in enumerate(kinds))
    problem = Problem(workloads.workflows(shape, n, seed=seed, arrival_rate=rate), insts)
    loose, tight = lower_bound(problem), lower_bound(problem, migration=False)
    assert tight.total_s >= loose.total_s * (1 - 1e-12) and tight.fused_s >= loose.fused_s * (1 - 1e-12)
    fault = fault and problem.n_clients > 1  # a client must survive to serve the rest
    res = run_policy(problem, policy, faults=[Fault(0.5, 0, client=0)] if fault else ())
    assert not res.migrations.any()
    assert res.makespan_s >= (tight.fused_s if np.any(res.trace_kind == 2) else tight.total_s) * (1 - 1e-9)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 24), seed=st.integers(0, 1000), clients=st.integers(1, 8), instances=st.integers(1, 4),
       slow=st.sampled_from([1.0, 1.5]), rate=st.sampled_from([None, 2.0]), policy=st.sampled_from(POLICIES))
def test_the_bound_without_migration_holds_where_a_chain_binds(n, seed, clients, instances, slow, rate, policy):
    # few chains on few clients: the chain-coupling term is what the bound is made of here
    problem = _chain_fleet(n, seed, clients, instances, slow, rate)
    tight = lower_bound(problem, migration=False)
    res = run_policy(problem, policy)
    assert res.makespan_s >= (tight.fused_s if np.any(res.trace_kind == 2) else tight.total_s) * (1 - 1e-9)


def test_the_mixed_fleet_lp_charges_each_instance_its_own_costs():
    # 100 chains on a LLaMA-65B instance and one 1.5x slower, where the pooled coupling treats both
    # as fast: the LP over instance kinds lifts the bound by ~4 % (seed 32), and it still holds
    from lloptim.bounds import _chain_coupling_lp, _token_curves

    problem = _chain_fleet(100, 32, slow=1.5)
    loose, tight = lower_bound(problem), lower_bound(problem, migration=False)
    assert tight.fused_s > 1.03 * loose.fused_s
    for policy in ("hybrid", "hybrid-fused", "baseline", "sarathi", "lpt"):
        res = run_policy(problem, policy)
        assert res.makespan_s >= (tight.fused_s if np.any(res.trace_kind == 2) else tight.total_s)
    # on identical instances there is one kind: the LP is skipped (the pooled bound is the same)
    w = problem.workload
    same = _chain_fleet(100, 32)
    chain = w.precedence.critical_path(w.output_tokens.astype(float))[1]
    curves = _token_curves(w.prompt_tokens, w.output_tokens, chain, 1e-4, 1e-7)
    assert _chain_coupling_lp(same, w.output_tokens.astype(float), chain, True, curves, 0.0) == 0.0


def test_unpaced_instances_leave_the_cheap_co_runners_to_the_paced_one(monkeypatch):
    # while the chain's instance is paced, the other instance takes the dearest co-runner of the
    # window (the most chain seconds per token), so the cheap ones are left for the paced instance
    from lloptim.runtime.request_schedulers import WorkflowQueue

    picks = {False: [], True: []}
    original = WorkflowQueue._cheapest_co_runner

    def spy(self, state, client, too_long, dearest=False):
        window = sorted(self.ready)[:8]
        r = original(self, state, client, too_long, dearest)
        if r is not None:
            picks[dearest].append((self.token_cost[r], [self.token_cost[q] for _, q in window]))
        return r

    monkeypatch.setattr(WorkflowQueue, "_cheapest_co_runner", spy)
    res = run_policy(_chain_fleet(100, 2), "hybrid")
    assert np.all(np.isfinite(res.done_s))
    assert picks[True] and picks[False]  # both rules fire
    # the unpaced instance's picks cost the chain more per token than the paced instance's
    assert np.mean([c for c, _ in picks[True]]) > 1.2 * np.mean([c for c, _ in picks[False]])
