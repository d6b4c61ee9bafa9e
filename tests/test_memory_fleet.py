"""Memory-bound mixed fleets: the bound's per-instance ramp-up and the dispatch's LP homes.

Two pieces (docs *KV memory*, "Mixed fleets: where the gap is"):

* the fleet bound without migration counts each instance's ramp-up from an empty cache
  (:func:`lloptim.bounds._fleet_ramp_bound`, a minimum over the cases "past the ramp" and
  "within it" of offset fractional assignments); it must never be above a makespan of any
  policy, never below the bound without it, and it must lift the bound where a large cache fills
  slowly;
* the hybrid's memory-aware dispatch on a fleet with known lengths lets the clients of a cache
  with less memory per client prefer, within their next wave of the planned order, the requests
  the offline LP homes there (``fleet_homes``); one instance, identical caches and unknown
  lengths are untouched.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from lloptim import Problem, Workload, lower_bound, run_policy
from lloptim.bounds import fractional_assignment_bound
from lloptim.errors import SpecError
from lloptim.hardware import load_profile
from lloptim.memory import decode_area_tokens
from lloptim.problem import Instance
from lloptim.runtime.engine import Engine
from lloptim.runtime.estimators import noisy_estimates
from lloptim.runtime.memory_schedulers import fleet_memory_split
from lloptim.runtime.policy import RunContext
from lloptim.runtime.registry import make_policy, policy_names
from memory_cases import check_conserved


# -- the offset fractional assignment is the LP -----------------------------------------------------
def _lp(work: np.ndarray, count: np.ndarray, offset: np.ndarray) -> float:
    """``min T s.t. sum_r work[j, r] y[j, r] <= count[j] (T - offset[j]), sum_j y = 1`` by HiGHS."""
    J, R = work.shape
    c = np.r_[np.zeros(J * R), 1.0]
    a_ub = np.zeros((J, J * R + 1))
    for j in range(J):
        a_ub[j, j * R:(j + 1) * R] = work[j]
        a_ub[j, -1] = -count[j]
    a_eq = np.zeros((R, J * R + 1))
    for j in range(J):
        a_eq[np.arange(R), j * R + np.arange(R)] = 1.0
    res = linprog(c, A_ub=a_ub, b_ub=-count * offset, A_eq=a_eq if R else None, b_eq=np.ones(R) if R else None,
                  bounds=[(0, None)] * (J * R) + [(None, None)], method="highs")
    assert res.status == 0
    return float(res.fun)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_offset_fractional_assignment_is_the_lp(data):
    J = data.draw(st.integers(1, 3))
    R = data.draw(st.integers(0, 7))
    work = np.array(data.draw(st.lists(st.lists(st.floats(0, 10), min_size=R, max_size=R), min_size=J, max_size=J)))
    work = work.reshape(J, R)
    count = np.array(data.draw(st.lists(st.integers(1, 3), min_size=J, max_size=J)), dtype=float)
    offset = np.array(data.draw(st.lists(st.floats(0, 5), min_size=J, max_size=J)))
    got = fractional_assignment_bound(work, count, offset=offset)
    want = _lp(work, count, offset)
    # a dual value: never above the LP, and equal to it at convergence
    assert got <= want + 1e-7 * max(1.0, want)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)


# -- the ramp-up bound --------------------------------------------------------------------------------
def _ablation_fleet(seed: int, n: int = 300, small: int = 3072, large: int = 9216, clients: int = 24) -> Problem:
    """A small cache beside a large one (the ablation fleet of ``benchmarks/memory.py``, smaller)."""
    rng = np.random.default_rng(seed)
    wl = Workload.from_arrays(rng.integers(20, 201, n), np.clip(np.rint(rng.lognormal(np.log(100), 1.2, n)), 1, 900))
    insts = tuple(Problem.single(wl, "llama-65b", clients=clients, kv_capacity_tokens=cap).instances[0]
                  for cap in (small, large))
    return Problem(wl, insts)


def test_the_ramp_lifts_the_fleet_bound_where_a_large_cache_fills_slowly():
    problem = _ablation_fleet(0)
    with_migration = lower_bound(problem)                 # no ramp: a migrated request may arrive grown
    without = lower_bound(problem, migration=False)       # each instance fills from its own prompts
    assert without.fused_s > with_migration.fused_s * 1.003
    assert without.total_s > with_migration.total_s * 1.003
    # identical caches pool into one kind (no ramp term there); one instance has its own ramp already
    twins = Problem(problem.workload, (problem.instances[1], problem.instances[1]))
    assert lower_bound(twins, migration=False).fused_s == pytest.approx(lower_bound(twins).fused_s)
    # a cache its clients' prompts fill at once has no ramp: the bound is the one without it
    full = Problem(problem.workload, tuple(Problem.single(problem.workload, "llama-65b", clients=24,
                                                          kv_capacity_tokens=cap).instances[0] for cap in (1200, 2400)))
    assert lower_bound(full, migration=False).fused_s == pytest.approx(lower_bound(full).fused_s)


@st.composite
def mixed_tight_fleets(draw):
    """Small workloads on two or three different instances, caches from tight to roomy."""
    n = draw(st.integers(8, 40))
    prompt = draw(st.lists(st.integers(1, 30), min_size=n, max_size=n))
    output = draw(st.lists(st.integers(5, 80), min_size=n, max_size=n))
    B = draw(st.sampled_from([1, 4, 16]))
    mode = draw(st.sampled_from(["paged", "reserve"]))
    peak = max(p + o for p, o in zip(prompt, output))
    base = load_profile("llama-65b")
    insts = []
    for k in range(draw(st.integers(2, 3))):
        profile = base if draw(st.booleans()) else base.with_latency(base.latency.scaled(1.5, 1.5))
        cap = -(-peak // B) * B + draw(st.integers(0, 3 * peak))
        insts.append(Instance.from_profile(profile, draw(st.integers(2, 6)), cap, name=f"instance-{k}",
                                           kv_mode=mode, kv_block_tokens=B))
    return Problem(Workload.from_arrays(prompt, output), tuple(insts))


@st.composite
def memory_bound_fleets(draw):
    """Heavy-tailed workloads (40-120 requests) on two or three caches whose memory binds, small to roomy."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    n = draw(st.integers(40, 120))
    prompt = rng.integers(5, 60, n)
    output = np.clip(np.rint(rng.lognormal(np.log(30), draw(st.floats(0.5, 1.5)), n)), 1, 300).astype(np.int64)
    B = draw(st.sampled_from([1, 4, 16]))
    peak = int((prompt + output).max())
    base = load_profile("llama-65b")
    insts = []
    for k in range(draw(st.integers(2, 3))):
        profile = base if draw(st.booleans()) else base.with_latency(base.latency.scaled(1.5, 1.5))
        clients = draw(st.integers(2, 8))
        # from a cache its clients' prompts nearly fill to one that holds several of its largest requests
        cap = -(-peak // B) * B + int(draw(st.floats(0, 3)) * clients * 40)
        insts.append(Instance.from_profile(profile, clients, cap, name=f"instance-{k}", kv_mode="paged",
                                           kv_block_tokens=B))
    return Problem(Workload.from_arrays(prompt, output), tuple(insts))


ALL_POLICIES = sorted(policy_names())


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=st.one_of(mixed_tight_fleets(), memory_bound_fleets()), policy=st.sampled_from(ALL_POLICIES))
def test_the_ramp_bound_is_never_above_any_policy_nor_below_the_bound_without_it(problem, policy):
    res = run_policy(problem, policy)
    assert not np.any(res.migrations > 0)
    with_ramp = lower_bound(problem, estimates=problem.workload.output_tokens, migration=False)
    without = lower_bound(problem, estimates=problem.workload.output_tokens)
    assert with_ramp.fused_s >= without.fused_s * (1 - 1e-9)
    assert with_ramp.total_s >= without.total_s * (1 - 1e-9)
    assert res.makespan_s >= with_ramp.fused_s * (1 - 1e-9), "the ramp bound is above a makespan"


# -- the dispatch's LP homes ----------------------------------------------------------------------
def _small_cache_mix(problem: Problem, res) -> float:
    """Mean KV area per output token of the requests the small cache (instance 0) served, tokens."""
    w = problem.workload
    area = decode_area_tokens(w.prompt_tokens, w.output_tokens, problem.instances[0].kv_block_tokens)
    on0 = problem.client_instance()[res.client] == 0
    return float(area[on0].sum() / w.output_tokens[on0].sum())


_conserves = check_conserved


def test_the_lp_homes_the_long_requests_on_the_large_cache():
    problem = _ablation_fleet(1)
    w = problem.workload
    ctx = RunContext(problem, w.output_tokens.astype(np.float64), True, problem.client_instance())
    home = fleet_memory_split(ctx)
    assert set(home.tolist()) == {0, 1}
    # the small cache gets the many short requests, the large one the long ones
    assert (home == 0).sum() > (home == 1).sum()
    assert w.output_tokens[home == 1].mean() > 2 * w.output_tokens[home == 0].mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_caches_take_their_lp_share_and_nothing_is_lost(seed):
    problem = _ablation_fleet(seed)
    runs = {homes: Engine(problem, make_policy("hybrid", fleet_homes=homes), check=True).run()
            for homes in (True, False)}
    for res in runs.values():
        _conserves(problem, res)
        assert res.preemptions.sum() == 0  # known lengths: the projection is exact
    # the small cache holds requests of less KV area per output token with the homes than without
    assert _small_cache_mix(problem, runs[True]) < _small_cache_mix(problem, runs[False])
    assert not np.array_equal(runs[True].client, runs[False].client)


def test_one_instance_identical_caches_and_unknown_lengths_are_untouched():
    problem = _ablation_fleet(0)
    one = Problem(problem.workload, problem.instances[:1])
    twins = Problem(problem.workload, (problem.instances[0], problem.instances[0]))
    for p in (one, twins):
        a, b = (run_policy(p, "hybrid", fleet_homes=h) for h in (True, False))
        np.testing.assert_array_equal(a.client, b.client)
        np.testing.assert_array_equal(a.done_s, b.done_s)
    est = noisy_estimates(problem.workload, 0.5, seed=0)
    a, b = (run_policy(problem, "hybrid", estimates=est, fleet_homes=h) for h in ("known", False))
    np.testing.assert_array_equal(a.done_s, b.done_s)
    # on estimates when asked: the split is made from the estimated KV areas, and it acts
    c = Engine(problem, make_policy("hybrid", fleet_homes=True), estimates=est, check=True).run()
    _conserves(problem, c)
    assert not np.array_equal(c.client, b.client)


def test_a_bad_fleet_homes_option_names_the_option():
    with pytest.raises(SpecError, match="fleet_homes"):
        make_policy("hybrid", fleet_homes="always")
