"""Formulations: the neutral model, bin packing, LP prices and the full MIP."""

from __future__ import annotations

import numpy as np
import pytest

from lloptim import Problem, Workload, lower_bound, simulate, workloads
from lloptim.errors import SpecError
from lloptim.formulations.binpacking import (assignment_to_x, binpacking_data, binpacking_lower_bound,
                                             build_binpacking, loads, x_to_assignment)
from lloptim.formulations.full_mip import build_full_mip, decode_schedule, start_from_run
from lloptim.formulations.lp_bound import decode_steps_bound, lp_prices, price_lp, prices_from_duals, tightened_lower_bound
from lloptim.simulator import run_policy
from lloptim.solvers import SolveParams, solve
from lloptim.solvers.registry import get_backend


def small(n=30, clients=4, instances=1):
    return Problem.single(workloads.gsm8k("test", limit=n), clients=clients, instances=instances)


def test_binpacking_model_shape_and_feasibility():
    p = small(20, 3)
    d = binpacking_data(p)
    m = build_binpacking(d, t_lower=binpacking_lower_bound(d))
    assert m.A.shape == (20 + 3, 20 * 3 + 1)
    assert m.con_groups == {"assign": slice(0, 20), "load": slice(20, 23)}
    assert m.n_integer == 60
    a = np.arange(20) % 3
    x = assignment_to_x(d, a)
    assert m.max_violation(x) < 1e-9
    assert m.objective(x) == pytest.approx(loads(d, a).max())
    np.testing.assert_array_equal(x_to_assignment(d, x), a)
    relaxed = m.without_groups("load")
    assert relaxed.n_rows == 20 and relaxed.con_groups == {"assign": slice(0, 20)}
    assert not m.relaxed().is_mip
    with pytest.raises(SpecError, match="con_groups"):
        m.without_groups("nope")


def test_weights_per_instance_and_bad_weights():
    p = small(10, 2, instances=2)
    d = binpacking_data(p, weights=np.column_stack([np.arange(1, 11.0), 2 * np.arange(1, 11.0)]))
    assert not d.uniform and d.n_clients == 4
    assert d.weight_matrix().shape == (10, 4)
    np.testing.assert_array_equal(d.weight_matrix()[:, 2], 2 * np.arange(1, 11.0))
    with pytest.raises(SpecError, match="weights"):
        binpacking_data(p, weights=np.ones(9))
    with pytest.raises(SpecError, match=r"weights\[3\]"):
        binpacking_data(p, weights=np.r_[np.ones(3), -1.0, np.ones(6)])


def test_closed_form_bound_parts():
    p = small(5, 4)
    d = binpacking_data(p, weights=np.array([5.0, 4, 3, 3, 3]))
    assert binpacking_lower_bound(d) == 6.0  # L2 bound: 4th + 5th largest share a client
    d1 = binpacking_data(p, weights=np.array([5.5, 4, 3, 3, 1]))
    assert binpacking_lower_bound(d1) == pytest.approx(5.5)  # the largest job
    d2 = binpacking_data(p, weights=np.array([5.0, 4, 3, 2, 3]))
    assert binpacking_lower_bound(d2) == 5.0  # integral weights: ceil(17/4) = 5


def test_lp_prices_uniform_and_by_highs():
    p = small(12, 3, instances=2)
    W = np.column_stack([np.linspace(1, 3, 12), 1.5 * np.linspace(1, 3, 12)])
    d = binpacking_data(p, weights=W)
    pr = lp_prices(d)
    assert pr["load"].shape == (6,) and np.all(pr["load"] >= 0) and pr["load"].sum() == pytest.approx(1.0)
    # LP optimum = sum of the assign duals (dual objective)
    lp = get_backend("highs").solve_lp(price_lp(d))
    assert pr["assign"].sum() == pytest.approx(lp["objective"], rel=1e-7)
    # the faster instance's clients are priced higher: their time is worth more
    assert pr["load"][:3].sum() > pr["load"][3:].sum()
    du = binpacking_data(small(12, 3))
    pu = lp_prices(du)
    np.testing.assert_allclose(pu["load"], 1 / 3)
    m = price_lp(du)
    pu2 = prices_from_duals(m, get_backend("highs").solve_lp(m)["row_duals"])
    np.testing.assert_allclose(pu2["load"], 1 / 3, atol=1e-9)
    assert pu2["assign"].sum() == pytest.approx(du.w.sum() / 3)


def test_decode_steps_bound_feeds_lower_bound():
    p = small(60, 7)
    steps = decode_steps_bound(p, time_limit_s=5)
    o = p.workload.output_tokens
    assert steps >= int(np.ceil(o.sum() / 7))
    lb = tightened_lower_bound(p, time_limit_s=5)
    assert lb.decode_steps == max(steps, lower_bound(p).decode_steps)
    assert lb.total_s >= lower_bound(p).total_s - 1e-12
    with pytest.raises(SpecError, match="instances"):
        decode_steps_bound(small(10, 2, instances=2))


TINY = [([40, 8, 25, 60], [2, 6, 3, 2]), ([12, 30, 7, 20, 15], [3, 5, 2, 4, 3])]


@pytest.mark.slow  # a few seconds of branch and bound
@pytest.mark.parametrize("prompts,outputs", TINY)
def test_full_mip_between_bound_and_simulator(prompts, outputs):
    p = Problem.single(Workload.from_arrays(prompts, outputs), clients=2, kv_capacity_tokens=1000)
    lb = lower_bound(p).total_s
    sim = simulate(p, "lpt").makespan_s
    res = solve(p, "highs", SolveParams(time_limit_s=30), formulation="full_mip")
    assert res.status.value == "optimal"
    assert lb - 1e-9 <= res.primal_bound <= sim + 1e-9
    assert res.dual_bound <= res.primal_bound
    # the assignment is a valid client per request and the schedule replays to the reported makespan
    assert res.assignment.shape == (len(prompts),) and set(res.assignment.tolist()) <= {0, 1}
    assert res.extra["schedule"]["kinds"][0] == "prefill"


def test_full_mip_start_from_simulator_is_feasible():
    p = Problem.single(Workload.from_arrays([12, 30, 7, 20, 15], [3, 5, 2, 4, 3]), clients=2, kv_capacity_tokens=1000)
    m = build_full_mip(p)
    run = run_policy(p, "lpt")
    x = start_from_run(m, run)
    assert m.max_violation(x) < 1e-7
    sched = decode_schedule(p, m, x)
    assert sched.makespan_s == pytest.approx(run.makespan_s, rel=1e-12)
    assert m.objective(x) == pytest.approx(run.makespan_s, rel=1e-9)
    with pytest.raises(SpecError, match="instances"):
        build_full_mip(small(4, 2, instances=2))
