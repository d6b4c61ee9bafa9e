"""The engine adapters' shared layer (state view, admission, driver loop, trace, calibration) on a fake engine.

No serving engine is needed: ``fake_engine.FakeEngine`` executes steps the way vLLM v1 does and
prices them with a latency model, so an engine run over it must reproduce the simulator exactly.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_engine import FakeEngine
from lloptim import Problem, Workload, summarize
from lloptim.calibrate import fit_engine_steps
from lloptim.engines.common import ENGINE_DEFAULT, EngineError, EngineRun, KVLayout, engine_problem
from lloptim.engines.serve import predict_engine_run, serve_engine, with_profile
from lloptim.errors import PolicyError, SpecError
from lloptim.hardware import HardwareProfile, LatencyModel, load_profile, save_profile
from lloptim.runtime.policy import DECODE, IterationScheduler, Policy, Prefill
from lloptim.runtime.request_schedulers import GlobalQueue

LAT = LatencyModel(prefill_base_s=2e-3, prefill_per_token_s=3e-5, decode_base_s=1.5e-3, decode_per_seq_s=6e-5,
                   decode_per_kv_token_s=2e-7)
POLICIES = [ENGINE_DEFAULT, "baseline", "vllm", "sarathi", "lpt", "offline", "hybrid", "hybrid-fused"]


def _problem(seed: int, n: int = 24, clients: int = 4, instances: int = 1, arrivals: bool = False,
             kv: int = 1 << 20, min_output: int = 1) -> Problem:
    rng = np.random.default_rng(seed)
    arrival = np.sort(rng.exponential(0.02, n)).cumsum() if arrivals else None
    w = Workload.from_arrays(rng.integers(4, 90, n), rng.integers(min_output, 40, n), arrival, name=f"synthetic-{seed}")
    prof = HardwareProfile("fake", LAT, kv_capacity_tokens=kv, clients=clients)
    return Problem.single(w, prof, clients=clients, instances=instances)


def _engines(problem: Problem, blocks: int = 4096, block_size: int = 16, **kw) -> list[FakeEngine]:
    return [FakeEngine(LAT, inst.clients, blocks, block_size, **kw) for inst in problem.instances]


def _check_complete(problem: Problem, res) -> None:
    """Every request finished once, with exactly its requested number of tokens."""
    tokens = res.extra["tokens"]
    want = problem.workload.output_tokens
    assert sorted(tokens) == list(range(problem.n_requests))
    assert all(len(tokens[r]) == want[r] for r in range(problem.n_requests))
    assert not np.isnan(res.done_s).any()
    assert res.generated_tokens == want.sum()
    assert summarize(res).requests_completed == problem.n_requests


def test_engine_problem_counts_decode_steps():
    w = Workload.from_arrays([5, 6, 7], [1, 2, 10], max_output_tokens=[3, 2, 12])
    p = engine_problem(Problem.single(w, "llama-65b", clients=2))
    assert p.workload.output_tokens.tolist() == [1, 1, 9]
    assert p.workload.max_output_tokens.tolist() == [2, 1, 11]
    assert p.workload.prompt_tokens.tolist() == [5, 6, 7]


def test_kv_layout_rounds_to_blocks():
    kv = KVLayout(blocks=10, block_size=16, slack_blocks=1)
    assert kv.capacity_tokens == 160
    assert kv.reservation(1) == 32 and kv.reservation(16) == 32 and kv.reservation(17) == 48
    with pytest.raises(SpecError):
        KVLayout(0, 16)


@pytest.mark.parametrize("arrivals", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
def test_fake_engine_run_reproduces_the_simulator(policy, arrivals):
    """Exact agreement (one-token requests, which finish at their prefill, are modeled one step late)."""
    problem = _problem(1, n=30, clients=4, instances=2, min_output=2, arrivals=arrivals)
    engines = _engines(problem)
    res = serve_engine(problem, policy, engines)
    _check_complete(problem, res)
    prof = problem.instances[0].profile
    pred = predict_engine_run(problem, policy, prof, token_budget=engines[0].budget,
                              kv_capacity_tokens=[e.kv_layout.capacity_tokens for e in engines])
    assert res.makespan_s == pytest.approx(pred.makespan_s, rel=1e-9)
    assert len(res.trace_kind) == len(pred.trace_kind)
    assert res.extra["plan_deviations"] == 0
    assert all(not e.running and not e.waiting for e in engines)


@pytest.mark.parametrize("shape", ["chain", "dag"])
@pytest.mark.parametrize("policy", [ENGINE_DEFAULT, "baseline", "hybrid", "hybrid-fused"])
def test_workflows_run_in_dependency_order_and_match_the_simulator(policy, shape):
    """Requests that wait for others are announced when their predecessors finish, as in the simulator."""
    from lloptim import workloads

    w = workloads.workflows(shape, n_workflows=6, seed=3, arrival_rate=20.0)
    problem = Problem.single(w, HardwareProfile("fake", LAT, kv_capacity_tokens=1 << 20, clients=4), clients=4,
                             instances=2)
    engines = _engines(problem)
    res = serve_engine(problem, policy, engines)
    _check_complete(problem, res)
    preds = w.precedence.predecessors()
    for r, ps in enumerate(preds):
        for q in ps:  # a request started only after each predecessor finished
            assert res.prefill_start_s[r] >= res.done_s[q] - 1e-12
            assert res.ready_s[r] >= res.done_s[q] - 1e-12
    pred = predict_engine_run(problem, policy, problem.instances[0].profile, token_budget=engines[0].budget)
    assert res.makespan_s == pytest.approx(pred.makespan_s, rel=1e-9)
    assert np.allclose(res.ready_s, pred.ready_s)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), clients=st.integers(1, 6), instances=st.integers(1, 3),
       policy=st.sampled_from(POLICIES), arrivals=st.booleans(), budget=st.sampled_from([32, 256, 4096]))
def test_every_request_gets_exactly_its_tokens(seed, clients, instances, policy, arrivals, budget):
    problem = _problem(seed, n=20, clients=clients, instances=instances, arrivals=arrivals)
    engines = _engines(problem, budget=max(budget, clients + 1))
    res = serve_engine(problem, policy, engines, seed=seed)
    _check_complete(problem, res)
    # a request starts after it arrived and finishes after its prefill
    w = problem.workload
    assert np.all(res.prefill_start_s >= w.arrival_s - 1e-12)
    assert np.all(res.done_s >= res.prefill_end_s - 1e-12)
    assert res.extra["preemptions"] == 0


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), blocks=st.integers(8, 24),
       policy=st.sampled_from([p for p in POLICIES if p != ENGINE_DEFAULT]))
def test_policies_never_admit_beyond_the_kv_blocks(seed, blocks, policy):
    """Tight pools: a steered engine never runs out of blocks (the fake raises if it would)."""
    problem = _problem(seed, n=16, clients=6)
    engines = _engines(problem, blocks=blocks, block_size=16)
    res = serve_engine(problem, policy, engines)
    _check_complete(problem, res)
    assert engines[0].max_used <= blocks
    assert res.extra["preemptions"] == 0


def test_engine_default_preempts_under_memory_pressure_and_still_completes():
    problem = _problem(3, n=16, clients=6)
    engines = _engines(problem, blocks=10, block_size=16, preempt=True)
    res = serve_engine(problem, ENGINE_DEFAULT, engines)
    _check_complete(problem, res)
    assert res.extra["preemptions"] > 0
    assert res.preemptions.sum() == res.extra["preemptions"] and res.recomputed_tokens > 0
    # the same pool under the hybrid: by reservation nothing is preempted; paged, the engine preempts
    # the policy's victims and every request still completes exactly
    res = serve_engine(problem, "hybrid", _engines(problem, blocks=10, block_size=16, preempt=True),
                       kv_mode="reserve")
    _check_complete(problem, res)
    assert res.extra["preemptions"] == 0
    res = serve_engine(problem, "hybrid", _engines(problem, blocks=10, block_size=16, preempt=True),
                       kv_mode="paged")
    _check_complete(problem, res)
    assert res.preemptions.sum() == res.extra["preemptions"]


def test_engine_that_schedules_less_than_planned_is_followed():
    """Deviations (here: prompt chunks capped by the engine) are observed and counted, not fatal."""
    problem = _problem(4, n=12, clients=3)
    res = serve_engine(problem, "hybrid", _engines(problem, max_chunk=8))
    _check_complete(problem, res)
    assert res.extra["plan_deviations"] > 0
    assert (res.trace_kind == 2).any()  # the capped prompts went in as chunks


class _PrefillsAnIdleClient(IterationScheduler):
    def decide(self, state):
        idle = next(iter(state.idle), None)
        return Prefill([idle if idle is not None else -1])


class _AlwaysDecodes(IterationScheduler):
    def decide(self, state):
        return DECODE


@pytest.mark.parametrize("its, match", [(_PrefillsAnIdleClient(), "not waiting"),
                                        (_AlwaysDecodes(), "decode with no running client")])
def test_a_policy_error_is_named_and_leaves_the_engine_clean(its, match):
    problem = _problem(5, n=8, clients=2)
    engines = _engines(problem)
    with pytest.raises(PolicyError, match=match):
        serve_engine(problem, Policy("broken", GlobalQueue("fcfs"), its), engines)
    assert engines[0].run is None and not engines[0].waiting and not engines[0].running
    _check_complete(problem, serve_engine(problem, "baseline", engines))  # the engine serves on


def test_a_stuck_engine_is_an_error_not_a_hang():
    problem = _problem(6, n=4, clients=2)
    with pytest.raises(EngineError, match="without processing"):
        serve_engine(problem, "baseline", _engines(problem, stall=True))


def test_kv_admission_rejects_requests_larger_than_the_pool():
    problem = _problem(7, n=4, clients=2)
    with pytest.raises(SpecError, match="KV tokens"):
        serve_engine(problem, "baseline", _engines(problem, blocks=2, block_size=16))


def test_engines_and_instances_must_match():
    problem = _problem(8, n=4, clients=2, instances=2)
    with pytest.raises(SpecError, match="engines"):
        serve_engine(problem, "baseline", _engines(problem)[:1])
    with pytest.raises(SpecError, match="clients"):
        serve_engine(problem, "baseline", [FakeEngine(LAT, 3, 64), FakeEngine(LAT, 2, 64)])
    with pytest.raises(SpecError, match="policy"):
        serve_engine(problem, "no-such-policy", _engines(problem))


def test_idle_replicas_take_work_planned_for_others():
    """Two replicas, one loaded by the plan: the global request scheduler lets the idle one steal."""
    rng = np.random.default_rng(9)
    w = Workload.from_arrays(rng.integers(8, 40, 24), rng.integers(5, 60, 24))
    prof = HardwareProfile("fake", LAT, kv_capacity_tokens=1 << 20, clients=2)
    problem = Problem.single(w, prof, clients=2, instances=2)
    # a plan that puts everything on replica 0's clients; dispatch="plan" steals only when dry
    plan = np.arange(24) % 2
    from lloptim.runtime.lagrangian import LagrangianIterations
    from lloptim.runtime.request_schedulers import AssignedQueues

    policy = Policy("lopsided", AssignedQueues(plan, steal=True), LagrangianIterations())
    res = serve_engine(problem, policy, _engines(problem))
    _check_complete(problem, res)
    instance_of = problem.client_instance()[res.client]
    assert (instance_of == 1).sum() > 0  # replica 1's clients served planned-for-0 requests
    assert policy.requests.steals > 0


def test_clock_must_be_known():
    problem = _problem(10, n=2, clients=1)
    with pytest.raises(SpecError, match="clock"):
        EngineRun(problem, None, [KVLayout(64, 16)], clock="sundial")


def test_fit_engine_steps_recovers_the_latency_model_despite_stalls():
    """Runs priced by a known model, with 5 % of steps stalled 20x: the grouped median fit ignores them."""
    problem = _problem(11, n=40, clients=6)
    runs = [serve_engine(problem, p, _engines(problem, budget=256)) for p in ("baseline", "hybrid", ENGINE_DEFAULT)]
    rng = np.random.default_rng(0)
    for res in runs:
        d = res.trace_duration_s
        d *= rng.lognormal(0.0, 0.02, d.size)
        d[rng.random(d.size) < 0.05] *= 20.0
    cal = fit_engine_steps(runs)
    got = cal.latency
    assert got.prefill_per_token_s == pytest.approx(LAT.prefill_per_token_s, rel=0.15)
    assert got.decode_base_s == pytest.approx(LAT.decode_base_s, rel=0.15)
    assert got.prefill_base_s == pytest.approx(LAT.prefill_base_s, rel=0.3)
    assert cal.extra["steps"] == sum(len(r.trace_kind) for r in runs)
    assert cal.extra["step_median_rel_error"] < 0.05
    assert {p.kind for p in cal.points} == {"prefill", "decode", "mixed"}


def test_fit_engine_steps_needs_engine_runs():
    from lloptim.simulator import run_policy

    sim = run_policy(_problem(12, n=8, clients=2), "baseline")
    with pytest.raises(SpecError, match="engine step details"):
        fit_engine_steps([sim])


def test_calibrate_engine_fits_the_engines_own_steps():
    from lloptim.calibrate import calibrate_engine

    engines = [FakeEngine(LAT, 4, 4096, budget=256)]
    cal, runs = calibrate_engine(engines, policies=("baseline", "hybrid", ENGINE_DEFAULT))
    assert len(runs) == 3 and all(not np.isnan(r.done_s).any() for r in runs)
    assert cal.latency.decode_base_s == pytest.approx(LAT.decode_base_s, rel=0.05)
    assert cal.latency.prefill_per_token_s == pytest.approx(LAT.prefill_per_token_s, rel=0.05)
    assert cal.device == "fake" and cal.extra["steps"] == sum(len(r.trace_kind) for r in runs)
    profile = cal.to_profile(kv_capacity_tokens=engines[0].kv_layout.capacity_tokens, clients=4)
    assert profile.latency == cal.latency


@pytest.mark.parametrize("policy", ["baseline", "hybrid", "hybrid-fused"])
def test_reserve_mode_under_memory_pressure_matches_the_simulator(policy):
    """Reservations on a tight pool: no preemption, and the engine path reproduces the simulator exactly."""
    problem = _problem(13, n=20, clients=6, min_output=2)
    engines = _engines(problem, blocks=16, block_size=16)
    res = serve_engine(problem, policy, engines, kv_mode="reserve")
    _check_complete(problem, res)
    assert res.extra["preemptions"] == 0 and max(res.trace_running) < 6  # memory bound the batch
    pred = predict_engine_run(problem, policy, problem.instances[0].profile, token_budget=engines[0].budget,
                              kv_capacity_tokens=[e.kv_layout.capacity_tokens for e in engines], kv_block_tokens=16,
                              kv_mode="reserve")
    assert res.makespan_s == pytest.approx(pred.makespan_s, rel=1e-9)


class _OldestVictim(PrefillFirstEngine := __import__("lloptim.runtime.iteration_schedulers",
                                                    fromlist=["PrefillFirst"]).PrefillFirst):
    """Prefill-first, preempting the request that started first (vLLM preempts the newest)."""

    chosen: list[int] = []

    def victim(self, state):
        engine = state.engine
        running = [c for c in state.clients if engine.client_state[c] == 2]
        c = min(running, key=lambda x: engine.client_start_step[x])
        self.chosen.append(engine.client_request[c])
        return c


def test_the_engine_preempts_the_policys_victims_first():
    problem = _problem(3, n=16, clients=6)
    engines = _engines(problem, blocks=10, block_size=16, preempt=True)
    its = _OldestVictim()
    its.chosen = []
    seen = []
    original = EngineRun._preempt

    def record(self, s, r):
        seen.append(r)
        return original(self, s, r)

    EngineRun._preempt = record
    try:
        res = serve_engine(problem, Policy("oldest-victim", GlobalQueue("fcfs"), its), engines, kv_mode="paged")
    finally:
        EngineRun._preempt = original
    _check_complete(problem, res)
    assert seen, "the pool was meant to overflow"
    assert seen[0] == its.chosen[0]


DENSE = replace(LAT, dense_attention_per_pair_s=1e-7)


def _dense_problem(seed: int, **kw) -> Problem:
    """:func:`_problem` priced by :data:`DENSE` (attention as one dense matrix over the batch)."""
    p = _problem(seed, **kw)
    prof = HardwareProfile("fake-dense", DENSE, kv_capacity_tokens=p.instances[0].kv_capacity_tokens,
                           clients=p.instances[0].clients)
    return with_profile(p, prof)


@pytest.mark.parametrize(("policy", "budget"), [(ENGINE_DEFAULT, 96), ("sarathi", 96), ("hybrid", 4096),
                                                ("hybrid-fused", 4096)])
def test_dense_attention_engine_reproduces_the_simulator(policy, budget):
    """The trace's query and key counts (chunk prefixes included) are the simulator's, step for step."""
    problem = _dense_problem(21, n=30, clients=4, instances=2, min_output=2)
    engines = [FakeEngine(DENSE, 4, 4096, budget=budget) for _ in range(2)]
    res = serve_engine(problem, policy, engines)
    _check_complete(problem, res)
    assert res.extra["dense_attention"] is True
    pred = predict_engine_run(problem, policy, problem.instances[0].profile, token_budget=budget, like=res)
    assert res.makespan_s == pytest.approx(pred.makespan_s, rel=1e-9)
    # the term matters: priced without it the same run is shorter
    plain = predict_engine_run(problem, policy, replace(problem.instances[0].profile, latency=LAT),
                               token_budget=budget, like=res)
    assert plain.makespan_s < 0.97 * res.makespan_s


def test_fit_engine_steps_recovers_the_dense_attention_term():
    """Runs of a dense-attention engine: the fit finds the pair cost, and predicts a run the linear fit misses."""
    problem = _dense_problem(22, n=40, clients=6)
    runs = [serve_engine(problem, p, [FakeEngine(DENSE, 6, 4096, budget=256)])
            for p in ("baseline", "hybrid", ENGINE_DEFAULT)]
    cal = fit_engine_steps(runs)
    assert cal.latency.dense_attention_per_pair_s == pytest.approx(DENSE.dense_attention_per_pair_s, rel=0.05)
    assert cal.latency.decode_base_s == pytest.approx(DENSE.decode_base_s, rel=0.05)
    assert cal.max_rel_error < 1e-6
    # the same steps fitted as if attention were per request: some step shapes are missed by far
    for r in runs:
        r.extra["dense_attention"] = False
    assert fit_engine_steps(runs).max_rel_error > 0.05
    # the profile keeps the term through TOML
    with tempfile.TemporaryDirectory() as tmp:
        again = load_profile(save_profile(cal.to_profile(kv_capacity_tokens=1 << 16, clients=6),
                                          Path(tmp) / "dense.toml"))
    assert again.latency.dense_attention_per_pair_s == pytest.approx(cal.latency.dense_attention_per_pair_s)


@pytest.mark.parametrize("latency", [LAT, DENSE], ids=["per-request", "dense"])
@pytest.mark.parametrize("policy", [ENGINE_DEFAULT, "baseline", "sarathi", "hybrid-fused"])
def test_price_steps_prices_a_run_as_the_simulator_does(policy, latency):
    """Replaying an engine run's own steps with the model that priced them gives every step's time back."""
    from lloptim.calibrate import engine_steps, price_steps

    problem = _problem(23, n=24, clients=4)
    res = serve_engine(problem, policy, [FakeEngine(latency, 4, 4096, budget=64)])
    st = engine_steps(res)
    got = price_steps(latency, st["kind"], st["prompt_tokens"], st["decodes"], st["kv_tokens"], st["prefix_tokens"])
    assert got == pytest.approx(res.trace_duration_s, rel=1e-12)
    with pytest.raises(SpecError, match="engine step details"):
        from lloptim.simulator import run_policy

        engine_steps(run_policy(problem, "baseline"))


def test_kv_bytes_per_token_reads_the_checkpoint_config(tmp_path):
    # the vLLM engine sizes its KV pool from it (VllmEngine cpu_memory_fraction=None): vLLM's own
    # fraction rule asked a 9 GiB NUMA node for 5 % minus the process's 0.9 GiB, a negative pool
    import json

    from lloptim.engines.vllm import kv_bytes_per_token

    cfg = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256,
           "dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert kv_bytes_per_token(tmp_path, "float32") == 2 * 2 * 2 * 64 * 4   # K and V, layers, kv heads, head dim
    assert kv_bytes_per_token(tmp_path, "auto") == 2 * 2 * 2 * 64 * 2      # the checkpoint's bfloat16
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {**cfg, "head_dim": 32}}))
    assert kv_bytes_per_token(tmp_path, "float16") == 2 * 2 * 2 * 32 * 2
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    assert kv_bytes_per_token(tmp_path, "float32") is None                 # unknown: vLLM sizes the pool
    assert kv_bytes_per_token(tmp_path / "missing", "float32") is None
