"""The online plans stop on work budgets, not on the clock; options a dispatch would ignore are errors.

The rolling plan (:mod:`lloptim.runtime.rolling`), the end game (:mod:`lloptim.runtime.endgame`)
and the local search under them (:func:`lloptim.solvers.greedy.local_search`) count their work
(elements touched, simplex iterations); the wall clock is only a safety net. A loaded machine is
modelled by a ``time.perf_counter`` that jumps at every read: the schedules must not move, and a
run whose budgets are unbounded must still end on the safety net.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from lloptim import Instance, Problem, load_profile, run_policy, workloads
from lloptim.arrivals import at_load
from lloptim.errors import SpecError
from lloptim.formulations.binpacking import BinPackingData, loads
from lloptim.runtime.hybrid import PLAN_ONLY, SEPARATE_ONLY, SORTED_ONLY, hybrid_policy, offline_policy
from lloptim.runtime.iteration_schedulers import PrefillFirst
from lloptim.runtime.policy import Policy
from lloptim.runtime.registry import make_policy
from lloptim.runtime.rolling import RollingPlan, RollingQueues
from lloptim.solvers.greedy import WorkBudget, local_search, lpt


class _JumpingClock:
    """``time.perf_counter`` of a loaded machine: ``step_s`` seconds later at every read."""

    def __init__(self, step_s: float) -> None:
        self.ticks = itertools.count()
        self.step_s = step_s
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return next(self.ticks) * self.step_s


def _fleet_problem(seed: int, load: float | None, n: int = 300) -> Problem:
    """Heavy-tailed requests on a mixed fleet (2 fast + 2 1.5x slower instances, 10 clients each)."""
    base = load_profile("llama-65b")
    slow = base.with_latency(base.latency.scaled(1.5, 1.5))
    wl = workloads.synthetic(n, seed=seed, prompt_median=100, output_median=80, sigma=1.2, max_tokens=1500)
    insts = tuple(Instance.from_profile(p, clients=10, kv_capacity_tokens=10**6, name=f"i{k}")
                  for k, p in enumerate((base, base, slow, slow)))
    problem = Problem(wl, insts)
    return problem if load is None else at_load(problem, load, seed)


def _same_schedule(a, b) -> None:
    np.testing.assert_array_equal(a.client, b.client)
    np.testing.assert_array_equal(a.done_s, b.done_s)
    assert a.makespan_s == b.makespan_s


@pytest.mark.parametrize("policy", ["hybrid-plan", "hybrid-fused-plan", "hybrid", "offline"])
@pytest.mark.parametrize("load", [None, 1.5])
def test_a_loaded_machine_gives_the_same_schedule(monkeypatch, policy, load):
    # at time 0 the first plan's local search (here about 130 steps, one clock read each) and the
    # hybrid's end game (5-20 steps per client pool) run, at 150 % load the revisions. With the
    # old wall-clock budgets (first plan and end game 1 s, revisions 0.05 s) this clock cut the
    # first plan and the end game after ten reads and every revision at its first check, and the
    # schedules moved; the safety nets now (20 s, 2 s per revision: 200 and 20 reads) are not reached
    problem = _fleet_problem(11, load, n=600)
    idle = run_policy(problem, policy)
    clock = _JumpingClock(0.1)
    monkeypatch.setattr(time, "perf_counter", clock)
    loaded = run_policy(problem, policy)
    assert clock.reads > 0
    _same_schedule(loaded, idle)
    assert np.all(np.isfinite(loaded.done_s)) and loaded.client.min() >= 0


def test_the_safety_net_ends_a_plan_without_a_work_budget(monkeypatch):
    # budgets far beyond any run, and a clock 100 s later at every read: every search is cut at its
    # first check (the first plan is LPT's, about 130 steps short), and the run still serves every
    # request
    problem = _fleet_problem(12, None, n=600)
    unbounded = 10**15

    def policy() -> Policy:
        plan = RollingPlan(plan_work=unbounded, revision_work=unbounded)
        return Policy("plan", RollingQueues(plan, steal=True), PrefillFirst())

    idle = run_policy(problem, policy())
    monkeypatch.setattr(time, "perf_counter", _JumpingClock(100.0))
    cut = run_policy(problem, policy())
    assert np.all(np.isfinite(cut.done_s)) and cut.client.min() >= 0
    assert np.all(cut.done_s >= problem.workload.arrival_s)
    assert not np.array_equal(cut.client, idle.client)  # the safety net, not the budget, stopped it


def _instance(seed: int, R: int = 400, C: int = 16, kinds: int = 1):
    rng = np.random.default_rng(seed)
    w = rng.lognormal(0.0, 1.0, R)
    if kinds == 1:
        return BinPackingData(w[:, None].copy(), np.zeros(C, dtype=np.int64), True)
    scale = rng.uniform(1.0, 2.0, kinds)
    return BinPackingData(np.ascontiguousarray(w[:, None] * scale[None, :]), np.arange(C) % kinds, False)


@pytest.mark.parametrize("kinds", [1, 3])
def test_local_search_stops_on_its_work_budget_not_on_the_clock(monkeypatch, kinds):
    data = _instance(1, kinds=kinds)
    start = lpt(data)
    budget = 200_000
    idle = local_search(data, start, work_limit=budget)
    monkeypatch.setattr(time, "perf_counter", _JumpingClock(0.1))
    loaded = local_search(data, start, time_limit_s=1e6, work_limit=budget)
    np.testing.assert_array_equal(loaded, idle)
    # the clock alone would have cut it: a 0.05 s limit stops at the first check
    cut = local_search(data, start, time_limit_s=0.05)
    np.testing.assert_array_equal(cut, start)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "10"])
def test_plan_work_budgets_must_be_counts(bad):
    for name in ("plan_work", "revision_work"):
        with pytest.raises(SpecError, match=f"policy.{name}"):
            RollingPlan(**{name: bad})
    with pytest.raises(SpecError, match="local_search.work_limit"):
        local_search(_instance(0), lpt(_instance(0)), work_limit=bad)


def test_an_unknown_plan_solver_is_an_error_before_any_work():
    # on a fleet the greedy first plan never calls the backend: the name would go unchecked
    with pytest.raises(SpecError, match="policy.solver: unknown solver 'gurobi-ish'"):
        make_policy("hybrid-plan", solver="gurobi-ish")
    with pytest.raises(SpecError, match="policy.solver"):
        offline_policy(solver="gurobi-ish")


def test_work_budget_counts_and_stops():
    b = WorkBudget(10)
    assert not b.exhausted()
    b.charge(9)
    assert not b.exhausted()
    b.charge(1)
    assert b.exhausted() and b.spent == 10
    assert not WorkBudget(None).exhausted()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), kinds=st.sampled_from([1, 2]), budgets=st.lists(st.integers(0, 3_000_000),
                                                                                     min_size=2, max_size=4))
def test_more_work_never_gives_a_longer_makespan(seed, kinds, budgets):
    # the search is a descent of the max load: a later stop on the same trajectory is no worse,
    # and every stop is a complete assignment
    data = _instance(seed, R=150, C=12, kinds=kinds)
    start = lpt(data)
    spans = []
    for work in sorted(budgets):
        a = local_search(data, start, work_limit=work)
        assert a.shape == start.shape and a.min() >= 0 and a.max() < data.n_clients
        spans.append(float(loads(data, a).max()))
    assert float(loads(data, start).max()) >= spans[0] - 1e-9
    assert all(x >= y - 1e-9 for x, y in zip(spans, spans[1:]))
    assert np.array_equal(local_search(data, start, work_limit=0), start)


def test_the_solve_pipeline_reads_start_work():
    from lloptim.solvers import SolveParams, solve

    problem = Problem.single(workloads.synthetic(300, seed=4, prompt_median=100, output_median=80, sigma=1.2,
                                                 max_tokens=1500), clients=16)
    none = solve(problem, solver="greedy", params=SolveParams(solver_options={"start_work": 0}))
    full = solve(problem, solver="greedy", params=SolveParams(solver_options={"start_work": 10**9}))
    assert full.primal_bound < none.primal_bound
    assert full.primal_bound == solve(problem, solver="greedy").primal_bound
    with pytest.raises(SpecError, match="work_limit"):
        solve(problem, solver="greedy", params=SolveParams(solver_options={"start_work": -1}))


# -- options a dispatch would ignore ------------------------------------------------------------

#: a value other than the default for every option one dispatch alone reads
_OTHER = {"slack_weight": 2.0, "prices": "uniform", "tail_plan": None, "objective": "weighted-completion",
          "start_planner": lambda ctx, rows=None: rows, "fill_ramp": False, "fleet_homes": False,
          "urgency_horizon": False, "order_candidates": 4, "order_budget_s": 5.0, "pace_scale": 0.5,
          "plan_paced": False, "due_factor": 1.0, "rollout_epochs": 3, "rollout_candidates": 6,
          "rollout_budget_s": 10.0, "memory_handover": False, "urgency": False, "urgency_lookahead": True,
          "solver": "highs",
          "steal": False, "weights": "bound"}


def test_every_single_dispatch_option_has_a_test_value():
    assert set(_OTHER) == set(SORTED_ONLY) | set(PLAN_ONLY)


@pytest.mark.parametrize("name", sorted(SORTED_ONLY))
def test_a_sorted_only_option_with_the_plan_is_an_error(name):
    with pytest.raises(SpecError, match=f"policy.hybrid.{name}: applies to the sorted dispatch only") as err:
        hybrid_policy(dispatch="plan", **{name: _OTHER[name]})
    assert "leave" in err.value.fix and name in err.value.fix
    for policy in ("hybrid-plan", "hybrid-fused-plan"):
        with pytest.raises(SpecError, match=name):
            make_policy(policy, **{name: _OTHER[name]})
    # the default, given explicitly, changes nothing and is accepted
    hybrid_policy(dispatch="plan", **{name: SORTED_ONLY[name]})


@pytest.mark.parametrize("name", sorted(PLAN_ONLY))
def test_a_plan_only_option_with_the_sorted_dispatch_is_an_error(name):
    with pytest.raises(SpecError, match=f"policy.hybrid.{name}: applies to the planned dispatch only"):
        hybrid_policy(**{name: _OTHER[name]})
    for policy in ("hybrid", "hybrid-fused"):
        with pytest.raises(SpecError, match=name):
            make_policy(policy, **{name: _OTHER[name]})
    hybrid_policy(**{name: PLAN_ONLY[name]})
    hybrid_policy(dispatch="plan", **{name: _OTHER[name]})  # where it is read


@pytest.mark.parametrize("name, value", [("setup_weight", 2.0), ("forecast", "none"),
                                         ("survival", np.linspace(1.0, 0.0, 50))])
def test_a_separate_prefill_option_with_always_fused_prompts_is_an_error(name, value):
    assert set(SEPARATE_ONLY) == {"setup_weight", "forecast", "survival"}
    with pytest.raises(SpecError, match=f"policy.hybrid.{name}: tunes the choice of a separate prefill"):
        hybrid_policy(fused=True, **{name: value})
    for policy in ("hybrid-fused", "hybrid-fused-plan"):
        with pytest.raises(SpecError, match=name):
            make_policy(policy, **{name: value})
    for fused in (False, "auto"):  # where the rule weighs separate prefills, it is read
        hybrid_policy(fused=fused, **{name: value})


def test_survival_needs_a_forecast_that_reads_it():
    surv = np.linspace(1.0, 0.0, 50)
    with pytest.raises(SpecError, match="policy.hybrid.survival"):
        hybrid_policy(survival=surv, forecast="lognormal")
    hybrid_policy(survival=surv, forecast="survival")
    hybrid_policy(survival=surv)


def test_order_budget_needs_order_candidates():
    with pytest.raises(SpecError, match="policy.hybrid.order_budget_s"):
        hybrid_policy(order_budget_s=5.0)
    hybrid_policy(order_candidates=4, order_budget_s=5.0)


@pytest.mark.parametrize("policy, option", [("hybrid-plan", "dispatch"), ("hybrid-fused-plan", "fused"),
                                            ("hybrid-fused", "fused")])
def test_a_variant_s_fixed_option_is_an_error(policy, option):
    with pytest.raises(SpecError, match=f"policy.{policy}.{option}: is fixed"):
        make_policy(policy, **{option: "sorted" if option == "dispatch" else False})


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1", True])
def test_time_limits_must_be_positive_seconds(bad):
    with pytest.raises(SpecError, match="time_limit_s"):
        hybrid_policy(time_limit_s=bad)
    with pytest.raises(SpecError, match="time_limit_s"):
        offline_policy(time_limit_s=bad)


def test_the_cli_refuses_an_ignored_option_before_any_work():
    from lloptim.cli import app

    runner = CliRunner()
    for policy, option, words in (("hybrid-plan", "order_candidates=4", "order_candidates"),
                                  ("hybrid-fused-plan", "slack_weight=2", "slack_weight"),
                                  ("hybrid", "weights=bound", "weights"),
                                  ("hybrid-plan", "dispatch=sorted", "fixed")):
        res = runner.invoke(app, ["simulate", "-p", policy, "-o", option])
        assert res.exit_code == 2, (policy, option, res.output)
        assert words in res.output and "--policy-option" in res.output and "Traceback" not in res.output
        assert "makespan" not in res.output  # refused, not simulated


def test_the_end_game_lp_stops_on_iterations_not_on_the_clock():
    from lloptim.runtime.endgame import ENDGAME_LP_ITERATIONS
    from lloptim.runtime.fleet import split_lp

    rng = np.random.default_rng(0)
    v = rng.uniform(1.0, 3.0, (3, 200))
    owed = np.array([5.0, 0.0, 20.0])
    cut = split_lp(v, owed, max_iter=5)
    assert cut.status == 1 and cut.nit == 5  # HiGHS's iteration limit, the same on any machine
    budget = ENDGAME_LP_ITERATIONS * (v.size + v.shape[1] + v.shape[0] + 1)
    full = split_lp(v, owed, time_limit_s=20.0, max_iter=budget)
    free = split_lp(v, owed)
    assert full.status == 0 and full.nit < budget / 10  # the budget only stops a solve gone wrong
    assert full.x[-1] == pytest.approx(free.x[-1], rel=1e-9)
