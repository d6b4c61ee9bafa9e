"""Mixed fleets: the hybrid's end-game plan, the exact fleet LP under limits, and honest solves."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_bounds import _primal_lp

from lloptim import Problem, workloads
from lloptim.bounds import fractional_assignment_bound, lower_bound
from lloptim.formulations.binpacking import binpacking_data
from lloptim.formulations.lp_bound import lp_prices
from lloptim.hardware import load_profile
from lloptim.problem import Instance
from lloptim.runtime.hybrid import hybrid_policy
from lloptim.simulator import run_policy
from lloptim.solvers import SolveParams, solve

BASE = load_profile("llama-65b")


def _fleet(wl, kinds, name: str = "fleet") -> Problem:
    """``kinds``: ``(prefill scale, decode scale, clients)`` per instance."""
    insts = []
    for k, (pre, dec, clients) in enumerate(kinds):
        prof = replace(BASE, name=f"x{pre}-{dec}", latency=BASE.latency.scaled(prefill=pre, decode=dec))
        insts.append(Instance.from_profile(prof, clients, name=f"instance-{k}"))
    return Problem(wl, tuple(insts), name=name)




# -- the end game ------------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(n=st.integers(5, 120), seed=st.integers(0, 10_000),
       kinds=st.lists(st.tuples(st.sampled_from([0.6, 1.0, 1.5, 2.0]), st.sampled_from([1.0, 1.6, 2.0]),
                                st.integers(1, 6)), min_size=2, max_size=4),
       tail=st.sampled_from([1.0, 5.0, 100.0]))
def test_end_game_serves_every_request_once_above_the_bound(n, seed, kinds, tail):
    problem = _fleet(workloads.synthetic(n, seed=seed), kinds)
    pol = hybrid_policy(tail_plan=tail)
    res = run_policy(problem, pol)
    assert np.all(np.isfinite(res.done_s)) and np.all(res.client >= 0)
    assert res.generated_tokens == int(problem.workload.output_tokens.sum())
    lb = lower_bound(problem)
    bound = lb.fused_s if np.any(res.trace_kind == 2) else lb.total_s
    assert res.makespan_s >= bound * (1 - 1e-9)
    # with a threshold of 100 requests per client the whole queue is planned at the first dispatch
    if tail == 100.0:
        assert pol.requests.tail_at_s == 0.0


def test_end_game_balances_a_mixed_fleet():
    """GSM8K test on 2 fast + 2 slow instances of 10 clients: ~8 requests per client, where the
    longest-first list schedule leaves clients and instances a short request apart."""
    problem = _fleet(workloads.gsm8k("test", limit=320), [(1.0, 1.0, 10)] * 2 + [(1.5, 1.5, 10)] * 2)
    lb = lower_bound(problem).fused_s
    with_eg = hybrid_policy()
    runs = {"end game": run_policy(problem, with_eg), "none": run_policy(problem, hybrid_policy(tail_plan=None))}
    assert with_eg.requests.tail_at_s is not None and with_eg.requests.tail_at_s > 0
    assert not np.array_equal(runs["end game"].client, runs["none"].client)
    gaps = {k: r.makespan_s / lb - 1 for k, r in runs.items()}
    assert gaps["end game"] < gaps["none"]
    assert gaps["end game"] < 0.02


def test_auto_fuses_prompts_on_a_fleet_only():
    fleet = _fleet(workloads.gsm8k("test", limit=80), [(1.0, 1.0, 5), (1.5, 1.5, 5)])
    res = run_policy(fleet, hybrid_policy())
    assert np.any(res.trace_kind == 2) and not np.any(res.trace_kind == 0)
    single = Problem.single(workloads.gsm8k("test", limit=80), clients=5)
    assert np.any(run_policy(single, hybrid_policy()).trace_kind == 0)


def test_identical_fleets_and_single_instances_without_the_end_game_are_unchanged():
    single = Problem.single(workloads.gsm8k("test", limit=120), clients=8)
    a, b = run_policy(single, hybrid_policy()), run_policy(single, hybrid_policy(tail_plan=None))
    assert np.array_equal(a.client, b.client) and a.makespan_s == b.makespan_s


# -- the exact fleet LP under limits -----------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(J=st.integers(2, 4), R=st.integers(1, 25), seed=st.integers(0, 10_000), copies=st.integers(2, 3))
def test_identical_rows_are_pooled_to_the_same_optimum(J, R, seed, copies):
    rng = np.random.default_rng(seed)
    work = rng.uniform(0.1, 10.0, (J, R)) * rng.uniform(0.5, 3.0, (J, 1))
    count = rng.integers(1, 5, J).astype(float)
    # each kind as several identical rows (instances), as a fleet's BinPackingData gives them
    rows = np.repeat(work, copies, axis=0)
    counts = np.repeat(count, copies)
    lp = _primal_lp(work, count * copies)
    bound, mu = fractional_assignment_bound(rows, counts, return_prices=True)
    assert lp * (1 - 1e-7) <= bound <= lp * (1 + 1e-9) + 1e-12
    assert mu.shape == (J * copies,) and mu.sum() == pytest.approx(1.0)
    assert bound == pytest.approx(float((mu[:, None] * rows / counts[:, None]).min(axis=0).sum()))


def test_fleet_lp_cut_short_is_still_a_bound():
    rng = np.random.default_rng(3)
    work = rng.uniform(0.1, 10.0, (5, 400)) * rng.uniform(0.5, 3.0, (5, 1))
    count = np.array([1.0, 2.0, 3.0, 1.0, 2.0])
    exact = fractional_assignment_bound(work, count)
    t0 = time.perf_counter()
    cut, mu = fractional_assignment_bound(work, count, return_prices=True, time_limit_s=0.0)
    assert time.perf_counter() - t0 < 2.0
    assert 0 < cut <= exact * (1 + 1e-12)
    assert np.all(mu >= 0) and mu.sum() == pytest.approx(1.0)


def _three_kinds() -> Problem:
    kinds = [(1.0, 1.0, 40)] * 2 + [(1.5, 1.5, 40), (0.6, 1.6, 40)]
    return _fleet(workloads.gsm8k("test"), kinds, name="3 kinds")


def test_lp_prices_honour_a_time_limit():
    data = binpacking_data(_three_kinds())
    t0 = time.perf_counter()
    prices = lp_prices(data, time_limit_s=0.05)
    assert time.perf_counter() - t0 < 0.05 * 1.1 + 1.0
    assert prices["load"].sum() == pytest.approx(1.0) and np.all(prices["load"] >= 0)
    # whatever the limit, the prices certify a valid bound: at most the exact one
    assert prices["assign"].sum() <= lp_prices(binpacking_data(_three_kinds()))["assign"].sum() * (1 + 1e-9)


@pytest.mark.parametrize("time_limit", [0.3, 1.0])
def test_greedy_on_a_mixed_fleet_honours_its_limit_and_stops_when_certified(time_limit):
    problem = _three_kinds()
    t0 = time.perf_counter()
    res = solve(problem, solver="greedy", params=SolveParams(time_limit_s=time_limit, rel_gap=1e-6))
    assert time.perf_counter() - t0 <= 1.1 * time_limit + 1.0
    assert res.dual_bound <= res.primal_bound
    # at a 1 % gap the exact fleet bound certifies the greedy start at once: no search to the limit
    t0 = time.perf_counter()
    res = solve(problem, solver="greedy", params=SolveParams(time_limit_s=30.0, rel_gap=0.01))
    assert time.perf_counter() - t0 < 10.0
    assert res.gap <= 0.01


@pytest.mark.parametrize("fault_at", [5.0, 29.0, 36.0])  # the end game starts near 28 s
def test_end_game_survives_client_and_instance_failures(fault_at):
    from lloptim.runtime.engine import Fault

    problem = _fleet(workloads.gsm8k("test", limit=200), [(1.0, 1.0, 6), (1.0, 1.0, 6), (1.5, 1.5, 6)])
    faults = [Fault(fault_at, 0, client=2), Fault(fault_at + 0.5, 2)]
    pol = hybrid_policy()
    res = run_policy(problem, pol, faults=faults)
    assert pol.requests.tail_at_s is not None
    assert np.all(np.isfinite(res.done_s))
    assert res.failed_clients == 1 + 6
    # nothing ran on the failed instance after it failed
    on_failed = (res.trace_instance == 2) & (res.trace_start_s > fault_at + 0.5 + 1e-9)
    assert not on_failed.any()


def test_end_game_gives_way_to_arrivals():
    """At the first dispatch of an online run the queue is short: the end game starts, and the
    first arrival during the run sends its requests back to the least-slack queue."""
    from lloptim.arrivals import at_load

    problem = at_load(_fleet(workloads.gsm8k("test", limit=300), [(1.0, 1.0, 8), (1.5, 1.5, 8)]), 1.2, seed=1)
    pol = hybrid_policy()
    res = run_policy(problem, pol)
    assert np.all(np.isfinite(res.done_s))
    assert pol.requests.tail_at_s is not None  # it did start
    assert pol.requests.tail is None and pol.requests.arrivals_during_run
    # requests spread over the clients (a plan left in place would send every arrival to one)
    assert np.bincount(res.client, minlength=problem.n_clients).max() < 0.1 * problem.n_requests
    assert np.all(res.prefill_start_s >= problem.workload.arrival_s - 1e-9)
    lb = lower_bound(problem)
    assert res.makespan_s >= lb.fused_s * (1 - 1e-9)
