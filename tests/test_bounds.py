"""The makespan lower bound for instances that differ (fractional assignment bound by its dual)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from lloptim import Problem, workloads
from lloptim.bounds import fractional_assignment_bound, lower_bound
from lloptim.hardware import load_profile
from lloptim.problem import Instance
from lloptim.simulator import run_policy


def _primal_lp(work: np.ndarray, count: np.ndarray) -> float:
    """``min T s.t. sum_r work[j, r] y[j, r] <= count[j] T, sum_j y[j, r] = 1, y >= 0`` with HiGHS."""
    J, R = work.shape
    n = J * R + 1
    c = np.zeros(n)
    c[-1] = 1.0
    a_ub = np.zeros((J, n))
    for j in range(J):
        a_ub[j, j * R:(j + 1) * R] = work[j]
        a_ub[j, -1] = -count[j]
    a_eq = np.zeros((R, n))
    for j in range(J):
        a_eq[np.arange(R), j * R + np.arange(R)] = 1.0
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(J), A_eq=a_eq, b_eq=np.ones(R), bounds=[(0, None)] * n,
                  method="highs")
    assert res.status == 0
    return float(res.fun)


@settings(max_examples=40, deadline=None)
@given(J=st.integers(1, 4), R=st.integers(1, 30), seed=st.integers(0, 10_000))
def test_dual_bound_never_exceeds_the_lp_and_is_tight(J, R, seed):
    rng = np.random.default_rng(seed)
    work = rng.uniform(0.1, 10.0, (J, R)) * rng.uniform(0.5, 3.0, (J, 1))
    count = rng.integers(1, 5, J).astype(float)
    lp = _primal_lp(work, count)
    bound, mu = fractional_assignment_bound(work, count, return_prices=True)
    assert bound <= lp * (1 + 1e-9) + 1e-12
    # solved as an LP, the bound is the optimum for any number of kinds (it used to be searched)
    assert bound >= lp * (1 - 1e-7)
    assert mu.shape == (J,) and np.all(mu >= 0) and mu.sum() == pytest.approx(1.0)
    assert bound == pytest.approx(float((mu[:, None] * work / count[:, None]).min(axis=0).sum()))


def test_fleet_bound_is_the_same_on_every_run():
    """Two runs on a 2-fast + 2-slow fleet used to give different bounds (48.87 and 40.73)."""
    problem = _fleet(workloads.gsm8k("test"), [(1.0, 20), (1.0, 20), (2.0, 20), (2.0, 20)])
    bounds = {lower_bound(problem).total_s for _ in range(3)}
    assert len(bounds) == 1


def _fleet(wl, kinds) -> Problem:
    base = load_profile("llama-65b")
    insts = []
    for k, (scale, clients) in enumerate(kinds):
        prof = replace(base, name=f"x{scale}", latency=base.latency.scaled(prefill=scale, decode=scale))
        insts.append(Instance.from_profile(prof, clients, name=f"instance-{k}"))
    return Problem(wl, tuple(insts), name="fleet")


def test_heterogeneous_bound_is_tight_for_the_hybrid():
    """One LLaMA-65B replica and one 1.5x slower: the old cheapest-instance bound was 17 % loose."""
    problem = _fleet(workloads.gsm8k("test"), [(1.0, 20), (1.5, 20)])
    lb = lower_bound(problem)
    same = lower_bound(_fleet(workloads.gsm8k("test"), [(1.0, 20), (1.0, 20)]))
    assert lb.total_s > 1.15 * same.total_s
    hybrid = run_policy(problem, "hybrid")
    assert lb.total_s <= hybrid.makespan_s < 1.02 * lb.total_s
    # the offline plan prices requests per instance: the slower replica gets less work
    inst = problem.client_instance()[run_policy(problem, "offline").client]
    assert (inst == 1).sum() < 0.45 * len(inst)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 60), seed=st.integers(0, 10_000),
       kinds=st.lists(st.tuples(st.sampled_from([0.5, 1.0, 1.7, 3.0]), st.integers(1, 6)), min_size=2, max_size=4),
       policy=st.sampled_from(["baseline", "lpt", "hybrid", "hybrid-fused", "sarathi"]))
def test_no_policy_beats_the_bound_on_mixed_fleets(n, seed, kinds, policy):
    problem = _fleet(workloads.synthetic(n, seed=seed), kinds)
    lb = lower_bound(problem)
    res = run_policy(problem, policy)
    bound = lb.fused_s if np.any(res.trace_kind == 2) else lb.total_s
    assert res.makespan_s >= bound * (1 - 1e-9)
    assert lb.fused_s <= lb.total_s + 1e-12
