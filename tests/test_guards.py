"""Size guards: the estimators track real runs, grow with the sizes, and refuse with a named fix.

Time is never asserted here (the machine is shared); the iteration estimate, which the time
estimate is linear in, is checked against real runs of several workload classes instead, and the
greedy start's skip rule against LPT itself. ``benchmarks/size_guards.py`` measures the seconds
and bytes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lloptim import Problem, guards, run_policy, simulate, workloads
from lloptim.errors import TooLargeError
from lloptim.problem import Instance

PROBLEMS = {
    "gsm8k": lambda: Problem.single(workloads.gsm8k("test"), "llama-65b"),
    "heavy-tail": lambda: Problem.single(workloads.synthetic(3000, seed=3, sigma=1.5, max_tokens=4096), clients=64,
                                         kv_capacity_tokens=10**6),
    "poisson-underload": lambda: Problem.single(workloads.synthetic(2000, seed=4, arrival_rate=5.0), clients=40,
                                                kv_capacity_tokens=10**6),
    "poisson-overload": lambda: Problem.single(workloads.synthetic(3000, seed=5, arrival_rate=300.0), clients=40,
                                               kv_capacity_tokens=10**6),
    "many-instances": lambda: Problem.single(workloads.gsm8k("test", limit=600), "llama-65b", instances=32),
    "long-chains": lambda: Problem.single(workloads.workflows("chain", 4, seed=1, depth=40), "llama-65b"),
    "dags": lambda: Problem.single(workloads.workflows("dag", 60, seed=2, arrival_rate=1.0), "llama-65b",
                                   instances=2),
}


@pytest.mark.parametrize("name", sorted(PROBLEMS))
@pytest.mark.parametrize("policy", ["baseline", "hybrid"])
def test_iteration_estimate_tracks_real_runs(name, policy):
    problem = PROBLEMS[name]()
    actual = run_policy(problem, policy).trace_kind.size
    est = guards.RunSize.of(problem).iterations()
    assert 0.5 * actual <= est <= 4 * actual, (name, policy, actual, est)


def test_costs_grow_with_the_sizes():
    base = guards.RunSize.of(PROBLEMS["gsm8k"]())
    cost = guards.simulation_cost(base)
    # more clients first mean fewer, larger iterations; beyond the requests they only add state
    for knob, factor in (("requests", 10), ("clients", 1000), ("instances", 10)):
        bigger = guards.simulation_cost(base.scaled(knob, factor))
        assert bigger.memory_bytes > cost.memory_bytes and bigger.seconds > cost.seconds, knob
    assert guards.case_study_cost(200).seconds > guards.case_study_cost(100).seconds
    assert guards.reproduction_cost(base, 100).seconds > guards.reproduction_cost(base, 0).seconds


def test_the_issue_sizes_are_refused_and_the_defaults_pass():
    lim = guards.Limits(16 * 2**30, guards.CLI_MAX_SECONDS)  # the issue's machine, the CLI's hour
    default = guards.RunSize.of(PROBLEMS["gsm8k"]())
    guards.check(guards.reproduction_cost(default, 100), lim)  # `lloptim reproduce` as shipped
    guards.check(guards.simulation_cost(default.scaled("requests", 100)), lim)  # 131,900 requests: fine
    with pytest.raises(TooLargeError) as info:
        guards.check(guards.reproduction_cost(default, 100_000_000), lim)
    assert info.value.field == "cases"
    with pytest.raises(TooLargeError) as info:  # spec count = 100000
        guards.check(guards.simulation_cost(default.scaled("instances", 100_000)), lim)
    assert info.value.field == "instances[].count" and "square" in info.value.problem
    with pytest.raises(TooLargeError) as info:  # run --clients 1000000000
        guards.check(guards.simulation_cost(default.scaled("clients", 25_000_000)), lim)
    assert info.value.field == "instances[].clients" and "memory" in info.value.problem


def test_largest_fitting_value_fits_and_is_named():
    lim = guards.Limits(8 * 2**30, 600.0)
    problem = PROBLEMS["gsm8k"]()
    size = guards.RunSize.of(problem)
    with pytest.raises(TooLargeError) as info:
        guards.check(guards.reproduction_cost(size, 10**7), lim,
                     lower={"cases": (10**7, lambda x: guards.reproduction_cost(size, int(x)))})
    best = int(info.value.fix.split("at most about ")[1].split(" ")[0].rstrip(",").replace(",", ""))
    fits = guards.reproduction_cost(size, best)
    assert fits.seconds <= lim.seconds and fits.memory_bytes <= lim.memory_bytes
    assert guards.reproduction_cost(size, int(best * 1.1) + 2).seconds > lim.seconds


def test_guard_settings_name_flags_and_overrides(monkeypatch):
    monkeypatch.setattr(guards, "limits", lambda: guards.Limits(2**30, guards._SETTINGS.get().get("max_seconds")
                                                                or math.inf))
    huge = Problem.single(workloads.gsm8k("test", limit=4), clients=2_000_000)
    with guards.guard_settings(fields={"clients": "--clients"}, override="pass --no-size-guard"):
        with pytest.raises(TooLargeError) as info:
            guards.check_simulation(huge)
    assert info.value.field == "--clients" and "--no-size-guard" in info.value.fix
    assert "at most about" in info.value.fix
    with guards.guard_settings(enabled=False):
        guards.check_simulation(huge)
    with guards.unguarded():
        assert not guards.enabled()
    assert guards.enabled()
    monkeypatch.setenv("LLOPTIM_SIZE_GUARD", "0")
    assert not guards.enabled()
    guards.check_simulation(huge)


def test_api_has_no_time_limit_and_cli_does():
    slow = guards.Estimate("x", 1.0, 10**9)
    guards.check(slow)  # the Python API: only memory
    with guards.guard_settings(max_seconds=guards.CLI_MAX_SECONDS):
        with pytest.raises(TooLargeError):
            guards.check(slow)


@settings(max_examples=60, deadline=None)
@given(w=st.lists(st.floats(0.01, 100.0), min_size=2, max_size=300), clients=st.integers(2, 12))
def test_lpt_excess_bounds_lpt(w, clients):
    """The skip rule of the greedy start is sound: LPT never exceeds average + the computed excess."""
    from lloptim.formulations.binpacking import BinPackingData, loads
    from lloptim.solvers.greedy import lpt

    weights = np.asarray(w)
    data = BinPackingData(weights[:, None].copy(), np.zeros(clients, dtype=np.int64), True)
    makespan = float(loads(data, lpt(data)).max())
    assert makespan <= weights.sum() / clients + guards._lpt_excess(weights, clients) + 1e-9


def test_solve_guard_skips_a_proven_start_and_sizes_the_search():
    problem = Problem.single(workloads.synthetic(20_000, seed=1), clients=40, kv_capacity_tokens=10**6)
    loose, tight = guards.solve_cost(problem, rel_gap=1e-2), guards.solve_cost(problem, rel_gap=0.0)
    assert tight.memory_bytes > 5 * loose.memory_bytes and tight.memory_driver == "rel_gap"
    assert 0 < tight.fits["rel_gap"] < 1e-2  # the gap that would skip the search
    assert guards.solve_cost(problem, rel_gap=tight.fits["rel_gap"] * 1.01).memory_bytes == loose.memory_bytes


def test_solve_refuses_before_allocating(monkeypatch):
    from lloptim.solvers import SolveParams, solve

    monkeypatch.setattr(guards, "limits", lambda: guards.Limits(2**28))
    monkeypatch.setattr("lloptim.solvers.greedy.lpt", lambda *a, **k: pytest.fail("the greedy start ran"))
    problem = Problem.single(workloads.synthetic(50_000, seed=1), clients=8, kv_capacity_tokens=10**6)
    with pytest.raises(TooLargeError) as info:
        solve(problem, "greedy", SolveParams(rel_gap=0.0))
    assert info.value.field == "params.rel_gap" and "at least" in info.value.fix


def test_mixed_fleet_and_problem_sizes():
    prof = Instance.from_profile("llama-65b").profile
    fast = Instance(prof, 40, 10**6, "fast")
    slow = Instance(prof.with_latency(prof.latency.scaled(2.0, 2.0)), 20, 10**6, "slow")
    problem = Problem(workloads.synthetic(2000, seed=2), (fast, slow, slow))
    size = guards.RunSize.of(problem)
    assert size.clients == 80 and size.instances == 3
    mixed = guards.solve_cost(problem, rel_gap=1e-4)
    assert mixed.memory_bytes >= 8 * 2000 * 80  # the (R, C) weight matrix of a mixed fleet
    simulate(problem, "baseline")  # and it runs under the guard
