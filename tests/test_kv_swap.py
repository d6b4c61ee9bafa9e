"""Swap preemption (vLLM's other mode): KV caches copied to a bounded host space and back, costed."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_kv_memory import _check_conservation, tight_problems

from lloptim import Problem, Workload, run_policy, summarize
from lloptim.errors import ProfileError, SpecError
from lloptim.hardware import load_profile
from lloptim.problem import Instance
from lloptim.runtime.engine import KIND_DECODE, KIND_MIXED, KIND_SWAP, Engine, Fault
from lloptim.runtime.kv import PREEMPTION_MODES
from lloptim.runtime.registry import make_policy

PEERS = ("vllm", "sarathi", "hybrid", "hybrid-fused", "baseline")


def _memory_bound(seed: int = 0, n: int = 120, capacity: int = 2048, profile=None) -> Problem:
    """Heavy-tailed outputs on one instance whose cache holds a fraction of its clients' peaks."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(20, 120, n)
    output = np.clip(np.rint(rng.lognormal(np.log(60.0), 1.0, n)), 1, 600).astype(np.int64)
    capacity = max(capacity, -(-int((prompt + output).max()) // 16) * 16 + 16)
    return Problem.single(Workload.from_arrays(prompt, output), profile or "llama-65b", clients=16,
                          kv_capacity_tokens=capacity, kv_block_tokens=16)


def _noisy(problem: Problem, seed: int) -> np.ndarray:
    out = problem.workload.output_tokens
    return np.maximum(out * np.random.default_rng(seed).lognormal(0, 0.5, out.size), 1.0)


def _check_swap(problem: Problem, res, swap_space: int | None) -> None:
    """Swap accounting: every swapped token came back, host space within its size, cost as stated."""
    assert res.swapped_in_tokens == res.swapped_out_tokens  # no fault: every swapped request resumed
    decode = (res.trace_kind == KIND_DECODE) | (res.trace_kind == KIND_MIXED)
    assert int(res.trace_running[decode].sum()) == problem.workload.total_output_tokens + res.wasted_tokens
    for k, inst in enumerate(problem.instances):
        space = inst.kv_capacity_tokens if swap_space is None else swap_space
        assert res.extra["swap_peak_tokens"][k] <= res.extra["swap_space_tokens"][k] <= space
    per_token = {inst.profile.latency.kv_swap_per_token_s for inst in problem.instances}
    if len(per_token) == 1:
        assert res.swap_s == pytest.approx(per_token.pop() * (res.swapped_out_tokens + res.swapped_in_tokens))
    # swap-outs are stalls of their own (kind 4); swap-ins are inside the iterations that resume
    assert float(res.trace_duration_s[res.trace_kind == KIND_SWAP].sum()) <= res.swap_s + 1e-9


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=tight_problems(), policy=st.sampled_from(PEERS), seed=st.integers(0, 1000),
       space=st.one_of(st.none(), st.integers(0, 400)))
def test_swap_conserves_requests_and_tokens_within_kv_and_host_space(problem, policy, seed, space):
    res = Engine(problem, make_policy(policy), estimates=_noisy(problem, seed), preemption="swap",
                 swap_space_tokens=space, check=True).run()  # check: KV and host space recounted every iteration
    _check_conservation(problem, res)
    _check_swap(problem, res, space)
    m = summarize(res)
    assert m.makespan_s >= m.lower_bound_s * (1 - 1e-9), "the bound is above a makespan"


@pytest.mark.parametrize("policy", PEERS)
def test_swap_replaces_recompute_on_a_memory_bound_workload(policy):
    problem = _memory_bound(1)
    est = _noisy(problem, 1)
    rec = run_policy(problem, policy, estimates=est, check=True)
    swp = run_policy(problem, policy, estimates=est, preemption="swap", check=True)
    assert rec.preemptions.sum() > 0, "the case must preempt"
    assert rec.swapped_out_tokens == 0 and rec.extra["preemption"] == "recompute"
    # a host space as large as the cache holds every victim here: nothing is recomputed
    assert swp.recomputed_tokens == 0 and swp.swapped_out_tokens > 0
    _check_conservation(problem, swp)
    _check_swap(problem, swp, None)
    m = summarize(swp)
    assert m.swapped_out_tokens == swp.swapped_out_tokens and m.swap_s == pytest.approx(swp.swap_s)
    assert m.makespan_s >= m.lower_bound_s
    # the bound does not depend on the preemption mode (the KV area is schedule-independent)
    assert m.lower_bound_s == pytest.approx(summarize(rec).lower_bound_s)


def test_no_host_space_is_recompute_exactly():
    problem = _memory_bound(2)
    est = _noisy(problem, 2)
    rec = run_policy(problem, "vllm", estimates=est)
    zero = run_policy(problem, "vllm", estimates=est, preemption="swap", swap_space_tokens=0, check=True)
    assert zero.swapped_out_tokens == 0 and zero.recomputed_tokens == rec.recomputed_tokens > 0
    assert zero.makespan_s == rec.makespan_s
    np.testing.assert_array_equal(zero.done_s, rec.done_s)


def test_full_host_space_falls_back_to_recompute():
    problem = _memory_bound(3, n=160, capacity=1536)
    est = _noisy(problem, 3)
    # room for about one victim at a time: the others are recomputed
    small = run_policy(problem, "vllm", estimates=est, preemption="swap", swap_space_tokens=320, check=True)
    assert small.swapped_out_tokens > 0 and small.recomputed_tokens > 0
    assert small.extra["swap_peak_tokens"][0] <= 320
    _check_conservation(problem, small)
    _check_swap(problem, small, 320)
    n_swapped = small.swapped_out_tokens
    big = run_policy(problem, "vllm", estimates=est, preemption="swap", check=True)
    assert big.recomputed_tokens < small.recomputed_tokens and big.swapped_out_tokens > n_swapped


def test_swap_cost_is_in_the_makespan():
    base = load_profile("llama-65b")

    def run(per_token: float):
        prof = replace(base, latency=replace(base.latency, kv_swap_per_token_s=per_token))
        problem = _memory_bound(4, profile=prof)
        return run_policy(problem, "vllm", estimates=_noisy(problem, 4), preemption="swap", check=True)

    free, costly = run(0.0), run(1e-3)
    assert free.swap_s == 0.0 and free.swapped_out_tokens > 0
    # same decisions (vLLM's do not depend on time here): the makespan grows by the copies' time
    assert costly.swapped_out_tokens == free.swapped_out_tokens
    assert costly.swap_s == pytest.approx(1e-3 * (costly.swapped_out_tokens + costly.swapped_in_tokens))
    assert costly.makespan_s == pytest.approx(free.makespan_s + costly.swap_s, rel=1e-9)
    # swap-outs stall the instance: recorded as iterations of their own
    outs = costly.trace_duration_s[costly.trace_kind == KIND_SWAP]
    assert outs.size >= int(costly.preemptions.sum()) and outs.min() > 0


def test_a_profile_without_swap_cost_is_refused_before_any_work():
    base = load_profile("llama-65b")
    assert base.latency.kv_swap_per_token_s == pytest.approx(1.31e-5)  # stated in the shipped profile
    prof = replace(base, name="no-swap", latency=replace(base.latency, kv_swap_per_token_s=None))
    problem = _memory_bound(0, profile=prof)
    with pytest.raises(SpecError) as err:
        Engine(problem, make_policy("vllm"), preemption="swap")
    assert err.value.field == "latency.kv_swap_per_token_s" and "no-swap" in str(err.value)
    assert "kv_swap_per_token_s" in err.value.fix
    with pytest.raises(ProfileError, match="kv_swap_per_token_s"):
        prof.latency.swap_time(10)
    run_policy(problem, "vllm")  # recompute needs no swap cost
    with pytest.raises(SpecError, match="preemption"):
        Engine(problem, make_policy("vllm"), preemption="migrate")
    with pytest.raises(SpecError, match="swap_space_tokens"):
        Engine(_memory_bound(0), make_policy("vllm"), preemption="swap", swap_space_tokens=-1)
    assert PREEMPTION_MODES == ("recompute", "swap")


def test_a_backend_that_cannot_swap_is_refused():
    from lloptim.backends.simulated import SimulatedBackend

    class NoSwap(SimulatedBackend):
        name = "no-swap"
        swap_out = None  # not callable: the capability is missing
        swap_in = None

    problem = _memory_bound(0)
    with pytest.raises(SpecError) as err:
        Engine(problem, make_policy("vllm"), backend=NoSwap(problem), preemption="swap")
    assert err.value.field == "preemption" and "no-swap" in str(err.value)
    # the torch backend swaps (tests/test_torch_swap.py); Ray replicas do not yet: refused the same way
    torch_backend = pytest.importorskip("lloptim.backends.torch_backend")
    assert callable(torch_backend.TorchBackend.swap_out) and callable(torch_backend.TorchBackend.swap_in)
    distributed = pytest.importorskip("lloptim.distributed")
    assert not callable(getattr(distributed.RayBackend, "swap_out", None))


def test_a_fault_frees_the_host_space_of_swapped_requests():
    problem = _memory_bound(5, n=160, capacity=1536)
    est = _noisy(problem, 5)
    clean = run_policy(problem, "vllm", estimates=est, preemption="swap")
    faults = [Fault(t, 0, c) for t, c in ((0.3 * clean.makespan_s, 3), (0.5 * clean.makespan_s, 7))]
    res = run_policy(problem, "vllm", estimates=est, preemption="swap", faults=faults, check=True)
    assert np.all(~np.isnan(res.done_s)) and res.generated_tokens == problem.workload.total_output_tokens
    assert res.swapped_in_tokens <= res.swapped_out_tokens


def test_two_instances_each_with_their_own_host_space():
    base = load_profile("llama-65b")
    slow = replace(base, name="slow", latency=replace(base.latency.scaled(1.5, 1.5), kv_swap_per_token_s=3e-5))
    wl = _memory_bound(6, n=200).workload
    insts = (Instance.from_profile(base, 12, 1536, name="a", kv_block_tokens=16),
             Instance.from_profile(slow, 8, 1280, name="b", kv_block_tokens=16))
    problem = Problem(wl, insts)
    res = run_policy(problem, "hybrid", estimates=_noisy(problem, 6), preemption="swap", swap_space_tokens=640,
                     check=True)
    _check_conservation(problem, res)
    _check_swap(problem, res, 640)
    assert res.extra["swap_space_tokens"] == [640, 640]


def test_cli_preemption_swap(tmp_path):
    from typer.testing import CliRunner

    from lloptim.cli import app

    spec = tmp_path / "mem.toml"
    spec.write_text('[workload]\nsource = "synthetic"\nn = 150\noutput_median = 150\nsigma = 1.0\nseed = 3\n'
                    '[[instances]]\nprofile = "llama-65b"\nkv_capacity_tokens = 4096\n')
    runner = CliRunner()
    out = {}
    for mode in PREEMPTION_MODES:
        res = runner.invoke(app, ["simulate", str(spec), "--policy", "vllm", "--preemption", mode, "--json"])
        assert res.exit_code == 0, res.output
        out[mode] = json.loads(res.output)
    assert out["recompute"]["recomputed_tokens"] > 0 and out["recompute"]["swapped_out_tokens"] == 0
    assert out["swap"]["recomputed_tokens"] == 0 and out["swap"]["swapped_out_tokens"] > 0
    assert out["swap"]["swap_s"] > 0 and out["swap"]["swapped_in_tokens"] == out["swap"]["swapped_out_tokens"]
    res = runner.invoke(app, ["simulate", str(spec), "--policy", "vllm", "--preemption", "swap", "--swap-space", "0",
                              "--json"])
    assert json.loads(res.output)["recomputed_tokens"] == out["recompute"]["recomputed_tokens"]
    bad = runner.invoke(app, ["simulate", str(spec), "--preemption", "swop"])
    assert bad.exit_code != 0 and "--preemption" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["simulate", str(spec), "--swap-space", "100"])
    assert bad.exit_code != 0 and "--swap-space" in bad.output and "--preemption swap" in bad.output
    bad = runner.invoke(app, ["simulate", str(spec), "--preemption", "swap", "--swap-space", "-5"])
    assert bad.exit_code != 0 and "--swap-space" in bad.output
