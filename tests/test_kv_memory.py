"""KV memory as vLLM manages it: paged blocks and preemption, reservations, the memory-aware bound, the peers."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lloptim import Problem, Workload, lower_bound, run_policy, summarize, workloads
from lloptim.errors import PolicyError, SpecError
from lloptim.hardware import load_profile
from lloptim.memory import blocks, decode_area_tokens, reservation_tokens
from lloptim.problem import Instance
from lloptim.runtime.engine import RUNNING, Engine
from lloptim.runtime.estimators import noisy_estimates
from lloptim.runtime.iteration_schedulers import PrefillFirst
from lloptim.runtime.kv import ProjectedMemory, choose_victim, projected_peak_blocks
from lloptim.runtime.policy import Policy
from lloptim.runtime.registry import make_policy, policy_names
from lloptim.runtime.request_schedulers import GlobalQueue
from lloptim.spec import load_spec

ALL_POLICIES = sorted(policy_names())


# -- the memory model --------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(p=st.integers(1, 60), o=st.integers(1, 80), B=st.integers(1, 20), floor=st.one_of(st.none(), st.integers(0, 150)))
def test_kv_area_is_the_sum_of_block_holdings(p, o, B, floor):
    brute = sum(B * blocks(max(p + k, floor or 0), B) for k in range(1, o + 1))
    got = decode_area_tokens([p], [o], B, None if floor is None else [floor])[0]
    assert got == brute
    if floor is None and B == 1:
        assert got == o * p + o * (o + 1) // 2


def test_reservation_is_the_cap_or_the_estimate_never_the_truth():
    w = Workload.from_arrays([10, 10], [5, 50], max_output_tokens=[0, 80])
    assert w.capped.tolist() == [False, True]
    # request 0 is uncapped: it reserves its estimate (7), not its true length (5)
    assert reservation_tokens(w.prompt_tokens, w.max_output_tokens, [7.0, 3.0]).tolist() == [17, 90]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_projected_memory_agrees_with_stepping_the_set(data):
    n = data.draw(st.integers(0, 6))
    B = data.draw(st.integers(1, 8))
    cap = data.draw(st.integers(5, 80))
    t = np.array(data.draw(st.lists(st.integers(1, 40), min_size=n, max_size=n)), dtype=np.int64)
    rem = np.array(data.draw(st.lists(st.integers(1, 30), min_size=n, max_size=n)), dtype=np.int64)
    pm = ProjectedMemory(t, rem, cap, B)
    m = data.draw(st.integers(1, 5))
    t0 = np.array(data.draw(st.lists(st.integers(1, 40), min_size=m, max_size=m)), dtype=np.int64)
    r0 = np.array(data.draw(st.lists(st.integers(1, 30), min_size=m, max_size=m)), dtype=np.int64)

    def held(ts, rs, tau):
        return sum(blocks(int(a) + tau, B) for a, b in zip(ts, rs) if b >= tau)

    expect = [all(held(np.append(t, a), np.append(rem, b), tau) <= cap for tau in range(1, int(b) + 1))
              for a, b in zip(t0, r0)]
    assert pm.fits(t0, r0).tolist() == expect
    assert pm.first_fit(t0, r0) == (expect.index(True) if True in expect else -1)
    assert projected_peak_blocks(t, rem, B) == (max(held(t, rem, tau) for tau in range(1, 31)) if n else 0)


def test_victim_rules():
    clients, admitted, tokens, remaining = [7, 3, 9], [5, 9, 2], [100, 40, 40], [10.0, 50.0, 80.0]
    assert choose_victim("newest", clients, admitted, tokens, remaining) == 3
    assert choose_victim("fewest-tokens", clients, admitted, tokens, remaining) == 3  # tie on 40: the newer
    assert choose_victim("longest-remaining", clients, admitted, tokens, remaining) == 9
    with pytest.raises(SpecError, match="victim"):
        choose_victim("oldest", clients, admitted, tokens, remaining)


# -- the engine: paged blocks, preemption, conservation ---------------------------------------------
@st.composite
def tight_problems(draw):
    """Small workloads on one or two instances whose KV caches hold only a few requests."""
    n = draw(st.integers(1, 24))
    prompt = draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    output = draw(st.lists(st.integers(1, 50), min_size=n, max_size=n))
    capped = draw(st.booleans())
    caps = [o + draw(st.integers(0, 10)) for o in output] if capped else None
    arrivals = draw(st.one_of(st.none(), st.lists(st.floats(0, 3), min_size=n, max_size=n)))
    B = draw(st.sampled_from([1, 4, 16]))
    peak = max(p + max(o, c) for p, o, c in zip(prompt, output, caps or output))
    cap = -(-peak // B) * B + draw(st.integers(0, 3 * peak))
    mode = draw(st.sampled_from(["paged", "reserve"]))
    clients = draw(st.integers(1, 6))
    base = load_profile("llama-65b")
    insts = [Instance.from_profile(base, clients, cap, name="instance-0", kv_mode=mode, kv_block_tokens=B)]
    if draw(st.booleans()):
        slow = replace(base, name="slow", latency=base.latency.scaled(1.5, 1.5))
        insts.append(Instance.from_profile(slow, draw(st.integers(1, 4)), cap + draw(st.integers(0, 100)),
                                           name="instance-1", kv_mode=mode, kv_block_tokens=B))
    wl = Workload.from_arrays(prompt, output, arrivals, caps)
    return Problem(wl, tuple(insts))


def _check_conservation(problem: Problem, res) -> None:
    w = problem.workload
    assert np.all(~np.isnan(res.done_s)), "a request was lost"
    assert res.generated_tokens == w.total_output_tokens
    # each request takes part in exactly its output's decode steps, preempted or not (no duplicate)
    assert int(res.trace_running[res.trace_kind != 0].sum()) == w.total_output_tokens + res.wasted_tokens
    assert np.all(res.client >= 0)
    assert np.all(res.prefill_start_s >= w.arrival_s - 1e-12) and np.all(res.prefill_end_s < res.done_s)
    caps = np.array([i.kv_capacity_tokens for i in problem.instances])
    assert np.all(res.trace_kv_tokens <= caps[res.trace_instance])
    # a preemption recomputes or (preemption="swap") swaps its victim
    assert res.recomputed_tokens >= 0 and (res.recomputed_tokens + res.swapped_out_tokens > 0) == (
        res.preemptions.sum() > 0)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=tight_problems(), policy=st.sampled_from(ALL_POLICIES), known=st.booleans(),
       seed=st.integers(0, 1000))
def test_no_request_lost_or_duplicated_and_kv_never_over_capacity(problem, policy, known, seed):
    est = None
    if not known:
        est = np.maximum(problem.workload.output_tokens * np.random.default_rng(seed).lognormal(0, 0.7, len(
            problem.workload)), 1.0)
    res = Engine(problem, make_policy(policy), estimates=est, check=True).run()  # check: KV recounted every iteration
    _check_conservation(problem, res)
    m = summarize(res)
    assert m.makespan_s >= m.lower_bound_s * (1 - 1e-9), "the bound is above a makespan"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=tight_problems(), policy=st.sampled_from(["vllm", "sarathi", "hybrid", "lpt"]),
       victim=st.sampled_from(["newest", "fewest-tokens", "longest-remaining"]), mode=st.sampled_from(["paged",
                                                                                                       "reserve"]))
def test_every_victim_rule_and_mode_conserves(problem, policy, victim, mode):
    res = Engine(problem, make_policy(policy), victim=victim, kv_mode=mode, check=True).run()
    _check_conservation(problem, res)
    bound = lower_bound(problem, kv_mode=mode, estimates=problem.workload.output_tokens)
    assert res.makespan_s >= bound.fused_s * (1 - 1e-9)
    if not (res.trace_kind == 2).any():
        assert res.makespan_s >= bound.total_s * (1 - 1e-9)


def test_preemption_recomputes_with_prompt_and_generated_tokens():
    # four requests of 8 + 40 tokens, a cache of 96 tokens in blocks of 8: two fit whole, four start
    wl = Workload.from_arrays([8] * 4, [40] * 4)
    problem = Problem.single(wl, "llama-65b", clients=4, kv_capacity_tokens=96, kv_block_tokens=8)
    res = Engine(problem, make_policy("vllm"), check=True).run()
    assert res.preemptions.sum() > 0
    # recompute: every preempted request re-prefills its prompt and what it had generated, and no decode
    # step is repeated (the output tokens are kept)
    assert res.recomputed_tokens > 8 * res.preemptions.sum()
    assert res.wasted_tokens == 0
    assert int(res.trace_prefill_tokens.sum()) == 8 * 4 + res.recomputed_tokens
    assert int(res.trace_running[res.trace_kind == 1].sum()) == 160


def test_vllm_puts_the_preempted_request_first_and_lets_nobody_overtake_it():
    class Recorder(PrefillFirst):
        """vLLM's admission, recording what it saw right after each preemption."""

        def __init__(self):
            super().__init__(2048, head_of_line=True)
            self.preempted: list[int] = []
            self.seen: list[tuple[int, list[int], list[int]]] = []

        def on_preempt(self, request, client, generated):
            self.preempted.append(client)

        def decide(self, state):
            d = super().decide(state)
            if self.preempted and self.preempted[-1] in state.waiting:
                self.seen.append((self.preempted[-1], list(state.waiting), list(getattr(d, "clients", []))))
            return d

    wl = Workload.from_arrays([8, 8, 8, 2, 2], [40, 40, 40, 30, 30])
    problem = Problem.single(wl, "llama-65b", clients=5, kv_capacity_tokens=96, kv_block_tokens=8)
    rec = Recorder()
    res = Engine(problem, Policy("vllm-rec", GlobalQueue("fcfs"), rec), check=True).run()
    assert res.preemptions.sum() > 0 and rec.seen
    for victim, waiting, prefilled in rec.seen:
        assert waiting[0] == victim  # first in line
        assert not prefilled or prefilled[0] == victim  # nobody overtakes it


def test_a_policy_may_choose_the_victim():
    class Oldest(PrefillFirst):
        def victim(self, state):
            running = [c for c in state.clients if state.engine.client_state[c] == RUNNING]
            return min(running, key=lambda c: state.engine.client_start_step[c])

    class Bad(PrefillFirst):
        def victim(self, state):
            return 10_000

    wl = Workload.from_arrays([8] * 4, [40] * 4)
    problem = Problem.single(wl, "llama-65b", clients=4, kv_capacity_tokens=96, kv_block_tokens=8)
    res = Engine(problem, Policy("oldest", GlobalQueue("fcfs"), Oldest()), check=True).run()
    assert res.preemptions.sum() > 0 and res.generated_tokens == 160
    with pytest.raises(PolicyError, match="victim"):
        Engine(problem, Policy("bad", GlobalQueue("fcfs"), Bad())).run()


def test_reserve_mode_reserves_by_cap_or_estimate_never_by_the_truth():
    # identical prompts and estimates; the true lengths differ. Reserve mode must decide identically
    # until something finishes: it cannot know the truth.
    p = [20] * 8
    est = np.full(8, 30.0)
    runs = []
    for o in ([10] + [30] * 7, [60] + [30] * 7):
        problem = Problem.single(Workload.from_arrays(p, o), "llama-65b", clients=8, kv_capacity_tokens=200,
                                 kv_mode="reserve", kv_block_tokens=1)
        runs.append(Engine(problem, make_policy("vllm"), estimates=est, check=True).run())
    first = min(r.done_s.min() for r in runs)
    n = int((runs[0].trace_start_s < first - 1e-12).sum())
    assert n > 1
    assert np.array_equal(runs[0].trace_kv_tokens[:n], runs[1].trace_kv_tokens[:n])
    # 20 + 30 reserved per request: four fit in 200 tokens, whatever their true length
    assert runs[0].trace_kv_tokens[0] == 200
    # the request that outgrew its estimate grew block by block (and preempted if it had to)
    assert runs[1].generated_tokens == 60 + 30 * 7


def test_gsm8k_never_binds_memory_so_both_modes_give_the_reproduction():
    problem = Problem.single(workloads.gsm8k("test"), "llama-65b")
    bound = lower_bound(problem)
    assert not bound.memory_binds and bound.total_s == pytest.approx(171.97640829744086, rel=1e-12)
    for mode in ("paged", "reserve"):
        res = run_policy(problem, "hybrid", kv_mode=mode)
        assert res.makespan_s == pytest.approx(173.16050401392107, rel=1e-12)
        assert res.preemptions.sum() == 0
    assert run_policy(problem, "baseline").makespan_s == pytest.approx(201.0, abs=5e-3)


# -- the memory-aware bound --------------------------------------------------------------------
def test_memory_bound_binds_and_counts_blocks_and_reservations():
    rng = np.random.default_rng(0)
    wl = Workload.from_arrays(rng.integers(20, 200, 300), np.clip(np.rint(rng.lognormal(np.log(100), 1.2, 300)), 1, 900))
    loose = lower_bound(Problem.single(wl, "llama-65b", clients=40, kv_capacity_tokens=200_000))
    tight = Problem.single(wl, "llama-65b", clients=40, kv_capacity_tokens=4096)
    lb = lower_bound(tight)
    assert lb.memory_binds and lb.decode_steps_memory > lb.decode_steps_clients == loose.decode_steps_clients
    assert lb.total_s > loose.total_s and lb.fused_s > loose.fused_s
    area = decode_area_tokens(wl.prompt_tokens, wl.output_tokens, 16).sum()
    assert lb.kv_area_token_steps == area and lb.decode_steps_memory >= int(np.ceil(area / 4096))
    # reservations hold more than paged blocks: the reserve-mode bound is at least as high
    capped = Workload.from_arrays(wl.prompt_tokens, wl.output_tokens, max_output_tokens=np.full(300, 900))
    res = lower_bound(Problem.single(capped, "llama-65b", clients=40, kv_capacity_tokens=4096), kv_mode="reserve")
    assert res.kv_mode == "reserve" and res.decode_steps_memory > lb.decode_steps_memory


@pytest.mark.slow
def test_bound_is_below_the_full_mip_optimum_when_memory_binds():
    pytest.importorskip("highspy")
    from lloptim.solvers import SolveParams, solve

    wl = Workload.from_arrays([6, 9, 4, 7], [3, 2, 4, 2], max_output_tokens=[3, 2, 4, 2])
    problem = Problem.single(wl, "llama-65b", clients=3, kv_capacity_tokens=20, kv_mode="reserve",
                             kv_block_tokens=1)
    lb = lower_bound(problem, kv_mode="reserve")
    mip = solve(problem, solver="highs", formulation="full_mip", params=SolveParams(time_limit_s=30))
    assert lb.total_s <= mip.primal_bound * (1 + 1e-9)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=tight_problems(), policy=st.sampled_from(ALL_POLICIES))
def test_memory_bound_never_above_any_policy(problem, policy):
    res = run_policy(problem, policy)
    lb = lower_bound(problem, estimates=problem.workload.output_tokens)
    assert res.makespan_s >= lb.fused_s * (1 - 1e-9)


# -- the peers and the prices -----------------------------------------------------------------------
def _memory_bound_problem(seed: int = 0, n: int = 200, capacity: int = 4096) -> Problem:
    rng = np.random.default_rng(seed)
    wl = Workload.from_arrays(rng.integers(20, 200, n), np.clip(np.rint(rng.lognormal(np.log(100), 1.2, n)), 1, 900))
    return Problem.single(wl, "llama-65b", clients=40, kv_capacity_tokens=capacity)


def test_mcsf_admits_shortest_first_within_projected_memory():
    problem = _memory_bound_problem()
    res = Engine(problem, make_policy("mcsf"), check=True).run()
    _check_conservation(problem, res)
    assert res.preemptions.sum() == 0  # known lengths: the projection is exact
    o = problem.workload.output_tokens
    # shortest first: the requests started in the first second are among the shortest
    early = res.prefill_start_s < 1.0
    assert o[early].max() <= np.quantile(o, 0.5)


def test_wait_paces_types_and_serves_everything():
    problem = _memory_bound_problem(1)
    res = Engine(problem, make_policy("wait"), check=True).run()
    _check_conservation(problem, res)
    # paced: at most a few requests start per decode step, never the whole batch at once
    assert np.isnan(res.prefill_start_s).sum() == 0
    assert np.sum(res.prefill_start_s == 0.0) < problem.n_clients


def test_memory_aware_hybrid_beats_the_memory_blind_peers_and_never_preempts():
    problem = _memory_bound_problem(2)
    bound = lower_bound(problem)
    assert bound.memory_binds
    gaps = {p: summarize(run_policy(problem, p), bound).gap_to_bound for p in ("hybrid-fused", "sarathi", "vllm", "lpt")}
    assert gaps["hybrid-fused"] < min(gaps["sarathi"], gaps["vllm"], gaps["lpt"])
    assert run_policy(problem, "hybrid-fused").preemptions.sum() == 0


def test_memory_price_changes_the_hybrids_decisions():
    problem = _memory_bound_problem(3, capacity=6144)
    # separate prefill iterations: the price enters the prefill-or-decode rule
    runs = {prices: run_policy(problem, "hybrid", memory_prices=prices, fused=False) for prices in ("none", "lp")}
    assert not np.array_equal(runs["none"].trace_kind, runs["lp"].trace_kind)
    pol = make_policy("hybrid", memory_prices="lp", fused=False)
    Engine(problem, pol).run()
    its = pol.iterations
    assert its.beta_trace[0][0] == 1.0  # memory sets this instance's decode steps: the LP prices memory only
    with pytest.raises(SpecError, match="memory_prices"):
        make_policy("hybrid", memory_prices="lots")


# -- spec, CLI, validation --------------------------------------------------------------------
def test_spec_sets_the_kv_mode_per_instance_and_names_bad_fields():
    text = """
[workload]
source = "synthetic"
n = 20

[[instances]]
profile = "llama-65b"
kv_mode = "reserve"
kv_block_tokens = 32
"""
    p = load_spec(text=text)
    assert p.instances[0].kv_mode == "reserve" and p.instances[0].kv_block_tokens == 32
    with pytest.raises(SpecError, match="kv_mode"):
        load_spec(text=text.replace('"reserve"', '"swap"'))
    with pytest.raises(SpecError, match="kv_block_tokens"):
        load_spec(text=text.replace("32", "0"))


def test_a_request_that_needs_more_blocks_than_the_cache_is_refused_up_front():
    wl = Workload.from_arrays([60], [40])
    Problem.single(wl, "llama-65b", clients=1, kv_capacity_tokens=100, kv_block_tokens=1)
    with pytest.raises(SpecError, match="blocks of 16: 112"):
        Problem.single(wl, "llama-65b", clients=1, kv_capacity_tokens=100, kv_block_tokens=16)
    with pytest.raises(SpecError, match="kv_mode"):
        Engine(Problem.single(wl, "llama-65b", clients=1, kv_capacity_tokens=100, kv_block_tokens=1),
               make_policy("vllm"), kv_mode="swap")


def test_cli_simulate_kv_mode_json(capsys):
    from typer.testing import CliRunner

    from lloptim.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["simulate", "--policy", "vllm", "--kv-mode", "reserve", "--json"])
    assert out.exit_code == 0, out.output
    import json

    d = json.loads(out.output)
    assert d["kv_mode"] == "reserve" and d["preemptions"] == 0 and d["memory_binds"] is False
    assert {"kv_utilization", "kv_peak_tokens", "recomputed_tokens", "lower_bound_s"} <= set(d)
    bad = runner.invoke(app, ["simulate", "--kv-mode", "swap"])
    assert bad.exit_code == 2 and "--kv-mode" in bad.output
    bad = runner.invoke(app, ["simulate", "--victim", "oldest"])
    assert bad.exit_code == 2 and "--victim" in bad.output


# -- the torch backend honours preemption ------------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("policy", ["vllm", "sarathi", "hybrid", "hybrid-fused"])
def test_torch_preempted_requests_recompute_to_the_same_tokens(policy):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from lloptim.backends.models import load_model
    from lloptim.backends.torch_backend import TorchBackend, token_mismatches
    from lloptim.hardware import HardwareProfile, LatencyModel

    torch.set_num_threads(1)
    model = load_model("tiny-llama", device="cpu")
    rng = np.random.default_rng(3)
    wl = Workload.from_arrays(rng.integers(4, 20, 12), rng.integers(6, 30, 12))
    prof = HardwareProfile("tiny-hand", LatencyModel(1e-3, 1e-5, 1e-3, 3e-5, 5e-7), kv_capacity_tokens=64, clients=4)
    problem = Problem.single(wl, prof, kv_block_tokens=4)
    be = TorchBackend(problem, model)
    opts = {"token_budget": 8} if policy in ("sarathi", "hybrid-fused") else {}
    est = None if policy in ("vllm", "sarathi") else np.full(12, 12.0)  # the hybrids preempt when estimates are wrong
    res = Engine(problem, make_policy(policy, **opts), backend=be, estimates=est, check=True).run()
    assert res.preemptions.sum() > 0 and be.counters["preemptions"] == res.preemptions.sum()
    assert max(token_mismatches(be).values()) == 0
    assert {r: len(t) for r, t in be.generated.items()} == {r: int(o) for r, o in enumerate(wl.output_tokens)}


def test_the_hybrid_preempts_the_cheapest_recompute():
    from lloptim.runtime.lagrangian import LagrangianIterations

    chosen = []

    class Recording(LagrangianIterations):
        def victim(self, state):
            c = super().victim(state)
            engine = state.engine
            held = {x: engine.prompt[engine.client_request[x]] + state.decode_steps - engine.client_start_step[x]
                    for x in state.clients if engine.client_state[x] == RUNNING}
            chosen.append(held[c] == min(held.values()))
            return c

    problem = _memory_bound_problem(4, n=120, capacity=3072)
    est = np.full(problem.n_requests, 60.0)  # wrong estimates: the projection admits too much
    pol = make_policy("hybrid-fused")
    pol.iterations = Recording(fused=True)
    res = Engine(problem, pol, estimates=est, check=True).run()
    _check_conservation(problem, res)
    assert chosen and all(chosen) and res.preemptions.sum() == len(chosen)


# -- the memory price in fused admission (priced headroom) -----------------------------------------
@pytest.mark.parametrize("fused", [True, "auto"])
@pytest.mark.parametrize("seed", [4, 5])
def test_memory_price_steers_fused_admission(seed, fused):
    """Fused iterations, unknown lengths: the memory price sets the dispatch's projection headroom.

    Fails if the price is ignored: the unpriced run projects at the median and the LP-priced one
    (memory sets the decode steps here, beta = 1) optimistically, so the LP run admits requests
    earlier, keeps more KV memory in use and so preempts more; both serve every request and token
    once and never exceed the cache.
    """
    problem = _memory_bound_problem(seed, capacity=6144)
    est = noisy_estimates(problem.workload, 0.5, seed=seed)
    runs = {}
    for prices in ("none", "lp"):
        pol = make_policy("hybrid", memory_prices=prices, fused=fused, price_updates=False)
        res = runs[prices] = Engine(problem, pol, estimates=est, check=True).run()
        _check_conservation(problem, res)
        assert pol.iterations.fusing  # "auto" fuses where the known requests can fill the cache
        assert np.all(res.trace_kind != 0)  # no separate prefill iteration
    none, lp = runs["none"], runs["lp"]
    assert not np.array_equal(none.assign_s, lp.assign_s)  # the admissions differ
    decode = [r.trace_kind != 0 for r in (none, lp)]
    mean_kv = [r.trace_kv_tokens[d].mean() for r, d in zip((none, lp), decode)]
    assert mean_kv[1] > mean_kv[0]  # priced memory is kept fuller
    assert lp.preemptions.sum() >= none.preemptions.sum()


def test_projection_scale_follows_the_memory_weight():
    """The priced headroom: the median at beta 0, HEADROOM_Z[1]'s quantile at beta 1, monotone; 1 when lengths are known."""
    from lloptim.runtime.lagrangian import HEADROOM_Z

    problem = _memory_bound_problem(6, capacity=6144)
    est = noisy_estimates(problem.workload, 0.5, seed=6)
    pol = make_policy("hybrid", memory_prices="lp", fused=True, price_updates=False)
    engine = Engine(problem, pol, estimates=est)
    engine.run()
    its = pol.iterations
    state = engine.states[0]
    scales = []
    for beta in (0.0, 0.25, 0.5, 1.0):
        its.beta[0] = beta
        scales.append(its.projection_scale(state))
    assert scales[0] == pytest.approx(1.0)
    assert scales[-1] == pytest.approx(np.exp(its.sigma * HEADROOM_Z[1]))
    assert all(a > b for a, b in zip(scales, scales[1:]))
    known = make_policy("hybrid", memory_prices="lp", fused=True)
    engine = Engine(problem, known)
    engine.run()
    known.iterations.beta[0] = 1.0
    assert known.iterations.projection_scale(engine.states[0]) == 1.0


def test_auto_fuses_on_one_instance_only_where_memory_can_bind():
    """``fused="auto"``: separate prefills where the cache holds every client's largest request, fused where not."""
    free = Problem.single(_memory_bound_problem(7).workload, "llama-65b", clients=8, kv_capacity_tokens=65536)
    bound = _memory_bound_problem(7, capacity=4096)
    for problem, fuses in ((free, False), (bound, True)):
        pol = make_policy("hybrid")
        res = Engine(problem, pol, check=True).run()
        _check_conservation(problem, res)
        assert pol.iterations.fusing is fuses
        assert bool(np.any(res.trace_kind == 0)) is not fuses


def test_plan_variants_serve_the_plan_within_projected_memory():
    """hybrid-fused-plan with known lengths never preempts; the same plan served memory-blind does."""
    from lloptim.runtime.lagrangian import LagrangianIterations
    from lloptim.runtime.rolling import RollingPlan, RollingQueues

    problem = _memory_bound_problem(8, capacity=4096)
    aware = Engine(problem, make_policy("hybrid-fused-plan"), check=True).run()
    _check_conservation(problem, aware)
    assert aware.preemptions.sum() == 0
    blind = Engine(problem, Policy("blind-plan", RollingQueues(RollingPlan(), steal=True),
                                   LagrangianIterations(fused=True)), check=True).run()
    _check_conservation(problem, blind)
    assert blind.preemptions.sum() > 0
    separate = Engine(problem, make_policy("hybrid-plan"), check=True).run()
    _check_conservation(problem, separate)
