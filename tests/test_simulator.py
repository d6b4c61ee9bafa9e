"""The engine on the simulated backend: conservation, exact times, bounds, capacity, faults."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lloptim import Problem, Workload, lower_bound, run_policy, summarize, workloads
from lloptim.errors import PolicyError
from lloptim.runtime.engine import Engine, Fault
from lloptim.runtime.policy import DECODE, IterationScheduler, Policy, Prefill
from lloptim.runtime.registry import make_policy
from lloptim.runtime.request_schedulers import GlobalQueue, RoundRobinQueues

PEERS = ["baseline", "vllm", "sarathi", "sorted-f", "lpt"]


def test_two_client_schedule_by_hand(toy_profile):
    # r0 (p=10, o=2) and r2 (p=5, o=1) dealt to client 0, r1 (p=20, o=1) to client 1.
    wl = Workload.from_arrays([10, 20, 5], [2, 1, 1])
    res = run_policy(Problem.single(wl, toy_profile), "baseline")
    # prefill {r0, r1}: 1 + 0.1*30 = 4.0; decode (n=2, kv=30): 0.5+0.2+0.3 = 1.0 -> r1 done at 5.0
    # decode (n=1, kv=11): 0.71 -> r0 done at 5.71; prefill r2: 1.5; decode (n=1, kv=5): 0.65 -> 7.86
    assert res.done_s == pytest.approx([5.71, 5.0, 7.86])
    assert res.prefill_start_s == pytest.approx([0.0, 0.0, 5.71])
    assert res.trace_kind.tolist() == [0, 1, 1, 0, 1]
    assert res.trace_duration_s == pytest.approx([4.0, 1.0, 0.71, 1.5, 0.65])
    m = summarize(res)
    assert m.makespan_s == pytest.approx(7.86)
    busy = 4.0 * 2 + 1.0 * 2 + 0.71 + 1.5 + 0.65
    assert m.utilization == pytest.approx(busy / (2 * 7.86))


@pytest.mark.parametrize("policy", PEERS + ["offline", "hybrid"])
def test_conservation_and_bound_on_gsm8k(gsm8k_small, policy):
    res = run_policy(gsm8k_small, policy)
    m = summarize(res)
    assert m.requests_completed == gsm8k_small.n_requests
    assert res.generated_tokens == gsm8k_small.workload.total_output_tokens
    # every request ran on exactly one client, and its times are ordered
    assert np.all(res.client >= 0)
    assert np.all(res.assign_s <= res.prefill_start_s) and np.all(res.prefill_start_s < res.prefill_end_s)
    assert np.all(res.prefill_end_s < res.done_s)
    # decode participation adds up to the output tokens (one token per request per decode step)
    assert int(res.trace_running[res.trace_kind != 0].sum()) == gsm8k_small.workload.total_output_tokens
    assert m.makespan_s >= m.lower_bound_s * (1 - 1e-12)
    assert 0 < m.utilization <= 1 + 1e-12


@st.composite
def small_problems(draw):
    n = draw(st.integers(1, 40))
    prompt = draw(st.lists(st.integers(1, 60), min_size=n, max_size=n))
    output = draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    arrivals = draw(st.one_of(st.none(), st.lists(st.floats(0, 5), min_size=n, max_size=n)))
    clients = draw(st.integers(1, 6))
    instances = draw(st.integers(1, 2))
    return Problem.single(Workload.from_arrays(prompt, output, arrivals), "llama-65b", clients=clients,
                          instances=instances)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems(), st.sampled_from(PEERS + ["hybrid", "offline"]))
def test_every_policy_serves_everything_above_the_bound(problem, policy):
    res = run_policy(problem, policy)
    assert np.all(~np.isnan(res.done_s))
    assert res.generated_tokens == problem.workload.total_output_tokens
    assert np.all(res.prefill_start_s >= problem.workload.arrival_s - 1e-12)
    m = summarize(res)
    assert m.makespan_s >= m.lower_bound_s * (1 - 1e-9)


class _Greedy(IterationScheduler):
    """Prefills everything waiting, ignoring the KV cache: the engine must refuse."""

    def decide(self, state):
        return Prefill(list(state.waiting)) if state.waiting else DECODE


def test_kv_capacity_is_enforced_and_respected():
    wl = Workload.from_arrays([50] * 6, [50] * 6, max_output_tokens=[50] * 6)
    # reserve mode: each capped request reserves prompt + cap = 100 tokens; 250 tokens hold two
    problem = Problem.single(wl, "llama-65b", clients=6, kv_capacity_tokens=250, kv_mode="reserve",
                             kv_block_tokens=10)
    with pytest.raises(PolicyError, match="KV"):
        Engine(problem, Policy("bad", RoundRobinQueues(), _Greedy())).run()
    for name in ["baseline", "vllm", "sarathi", "hybrid"]:
        res = Engine(problem, make_policy(name), check=True).run()
        # at most two requests in flight at any time
        starts, ends = res.prefill_start_s, res.done_s
        for t in np.unique(starts):
            assert np.sum((starts <= t) & (ends > t)) <= 2
        assert res.generated_tokens == wl.total_output_tokens and res.preemptions.sum() == 0
        assert max(res.extra["kv_peak_tokens"]) <= 250
    # paged mode: blocks on demand, more requests in flight, preemption when the blocks run out
    paged = Problem.single(wl, "llama-65b", clients=6, kv_capacity_tokens=250, kv_block_tokens=10)
    for name in ["baseline", "vllm", "sarathi", "hybrid", "hybrid-fused", "mcsf"]:
        res = Engine(paged, make_policy(name), check=True).run()
        assert res.generated_tokens == wl.total_output_tokens
        assert res.trace_kv_tokens.max() <= 250 and max(res.extra["kv_peak_tokens"]) <= 250
        if name in ("baseline", "vllm", "sarathi"):  # admit while prompts fit, preempt when blocks run out
            assert res.preemptions.sum() > 0 and res.recomputed_tokens > 0
        else:  # projected-fit admission with known lengths: never a preemption
            assert res.preemptions.sum() == 0


def test_faults_requeue_and_complete(gsm8k_small):
    faults = [Fault(2.0, 0, client=3), Fault(5.0, 0, client=7)]
    for name in ["baseline", "vllm", "hybrid", "offline"]:
        res = run_policy(gsm8k_small, name, faults=faults)
        assert np.all(~np.isnan(res.done_s))
        assert res.generated_tokens == gsm8k_small.workload.total_output_tokens
        assert res.failed_clients == 2 and res.requeued >= 1
        assert not np.any(np.isin(res.client[res.done_s > 5.0 + 1e-9], [3, 7]))


def test_instance_failure_moves_work_to_the_other_instance():
    problem = Problem.single(workloads.gsm8k("test", limit=120), "llama-65b", clients=6, instances=2)
    res = run_policy(problem, "vllm", faults=[Fault(3.0, 1)])
    assert np.all(~np.isnan(res.done_s))
    assert res.failed_clients == 6
    late = res.done_s > 3.0 + 1e-9
    assert np.all(problem.client_instance()[res.client[late]] == 0)


def test_policy_errors_are_named():
    problem = Problem.single(Workload.from_arrays([5, 5], [2, 2]), "llama-65b", clients=2)

    class DecodeOnly(IterationScheduler):
        def decide(self, state):
            return DECODE

    with pytest.raises(PolicyError, match="no running client"):
        Engine(problem, Policy("x", GlobalQueue(), DecodeOnly())).run()


def test_arrivals_are_respected():
    wl = workloads.synthetic(80, seed=1, arrival_rate=20.0)
    problem = Problem.single(wl, "llama-65b", clients=8)
    for name in ["baseline", "vllm", "sarathi", "hybrid"]:
        res = run_policy(problem, name)
        assert np.all(res.assign_s >= wl.arrival_s - 1e-12)
        assert res.generated_tokens == wl.total_output_tokens
    assert lower_bound(problem).total_s >= wl.arrival_s.max()


def test_lower_bound_parts_add_up(gsm8k_small):
    lb = lower_bound(gsm8k_small)
    assert lb.total_s == pytest.approx(lb.token_s + lb.decode_base_s + lb.prefill_base_s)
    assert lb.fused_s <= lb.total_s
    # a larger proven step count only tightens the bound
    assert lower_bound(gsm8k_small, decode_steps=lb.decode_steps + 10).total_s > lb.total_s
