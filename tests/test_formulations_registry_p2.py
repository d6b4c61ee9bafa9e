"""The registered formulations ``binpacking_kv``, ``precedence`` and ``weighted_completion``.

Valid bounds against simulated policies, the KV dual and the online memory price drawn from it,
schedules that respect precedence, the exact small cases, and the CLI.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import lloptim
from lloptim import Problem, SolveParams, Workload, lower_bound, run_policy, summarize
from lloptim.cli import app
from lloptim.dag_plan import list_schedule
from lloptim.errors import SpecError
from lloptim.formulations.binpacking_kv import kv_binpacking_data, kv_price_weights
from lloptim.formulations.precedence import check_schedule, schedule_data
from lloptim.formulations.weighted_completion import weighted_completion_bound, wspt_priority
from lloptim.runtime.engine import Engine
from lloptim.runtime.hybrid import hybrid_policy
from lloptim.runtime.registry import make_policy

runner = CliRunner()
POLICIES = ("hybrid", "hybrid-fused", "sarathi", "vllm", "mcsf", "lpt")


def _memory_problem(seed: int, n: int, clients: int, capacity: int, instances: int = 1) -> Problem:
    """``instances`` identical instances, or (``instances=3``) two: the second with 4x the cache, 2 more clients."""
    rng = np.random.default_rng(seed)
    wl = Workload.from_arrays(rng.integers(20, 200, n), np.clip(np.rint(rng.lognormal(np.log(60), 1.2, n)), 1, 600))
    if instances == 3:
        first = Problem.single(wl, "llama-65b", clients=clients, kv_capacity_tokens=capacity).instances[0]
        second = Problem.single(wl, "llama-65b", clients=clients + 2, kv_capacity_tokens=4 * capacity).instances[0]
        return Problem(wl, (first, second))
    return Problem.single(wl, "llama-65b", clients=clients, kv_capacity_tokens=capacity, instances=instances)


# -- binpacking_kv: a valid bound, with a named dual per instance ---------------------------------
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(15, 60), clients=st.integers(2, 8),
       capacity=st.sampled_from([1024, 2048, 4096]), mode=st.sampled_from(["paged", "reserve"]),
       instances=st.sampled_from([1, 2, 3]))
def test_kv_bound_never_above_any_policys_makespan(seed, n, clients, capacity, mode, instances):
    problem = _memory_problem(seed, n, clients, capacity, instances)
    lp = lloptim.solve(problem, solver="highs", formulation="binpacking_kv", relax=True, kv_mode=mode)
    mip = lloptim.solve(problem, solver="highs", formulation="binpacking_kv", kv_mode=mode,
                        params=SolveParams(time_limit_s=3))
    assert lp.status.value == "optimal" and mip.status.has_solution
    assert np.shape(lp.dual("kv")) == (len(problem.instances),) and np.all(lp.dual("kv") <= 1e-12)
    assert lp.dual_bound <= mip.primal_bound * (1 + 1e-9)
    for name in POLICIES:
        res = run_policy(problem, name, kv_mode=mode)
        assert lp.dual_bound <= res.makespan_s * (1 + 1e-9), name
        assert mip.dual_bound <= res.makespan_s * (1 + 1e-9), name


def test_kv_model_is_at_least_the_memory_aware_bound_and_its_rows_are_named():
    problem = _memory_problem(1, 120, 16, 2048)
    lb = lower_bound(problem)
    assert lb.memory_binds
    res = lloptim.solve(problem, solver="highs", formulation="binpacking_kv", relax=True)
    assert res.dual_bound >= lb.fused_s * (1 - 1e-12)
    kv = res.dual("kv")
    assert kv < 0  # more KV capacity would lower the makespan: memory binds
    # stationarity in D: decode_base * nu = clients * sigma + capacity * kappa
    data = kv_binpacking_data(problem, relax=True)
    nu, sigma = -res.dual("time"), -res.dual("steps")
    assert data.decode_base[0] * nu == pytest.approx(data.clients[0] * sigma + data.capacity[0] * -kv, rel=1e-6)
    assert kv_price_weights(problem).tolist() == [1.0]
    loose = _memory_problem(1, 120, 16, 10 ** 6)
    assert kv_price_weights(loose).tolist() == [0.0]


def test_kv_prices_on_a_mixed_fleet_follow_each_instances_memory():
    rng = np.random.default_rng(3)
    wl = Workload.from_arrays(rng.integers(20, 200, 150), np.clip(np.rint(rng.lognormal(np.log(80), 1.2, 150)), 1, 800))
    tight = Problem.single(wl, "llama-65b", clients=16, kv_capacity_tokens=2048).instances[0]
    roomy = Problem.single(wl, "llama-65b", clients=16, kv_capacity_tokens=10 ** 6).instances[0]
    problem = Problem(wl, (tight, roomy))
    res = lloptim.solve(problem, solver="highs", formulation="binpacking_kv", relax=True)
    kv = res.dual("kv")
    assert kv.shape == (2,) and kv[1] == pytest.approx(0.0, abs=1e-12)
    beta = kv_price_weights(problem)
    assert beta[1] == 0.0 and 0.0 <= beta[0] <= 1.0
    # the LP may send work away from the tight cache: never worse than the memory-aware fleet bound
    assert res.dual_bound >= lower_bound(problem).fused_s * (1 - 1e-9)


def test_online_lp_memory_price_is_the_offline_dual():
    problem = _memory_problem(2, 150, 20, 3072)
    # separate prefill iterations: the rule reads the price at every decision (fused ones, with
    # known lengths, have no decision for it: tests/test_kv_memory.py)
    pol = make_policy("hybrid", memory_prices="lp", fused=False)
    Engine(problem, pol).run()
    its = pol.iterations
    assert its.beta_trace[0][0] == pytest.approx(float(kv_price_weights(problem)[0]))
    assert its.beta_trace[0][0] == 1.0
    # and the price changes what the rule decides
    runs = {p: run_policy(problem, "hybrid", memory_prices=p, price_updates=False, fused=False) for p in ("lp", "none")}
    assert not np.array_equal(runs["lp"].trace_kind, runs["none"].trace_kind)


def test_kv_options_are_checked_by_name():
    problem = _memory_problem(0, 20, 4, 2048)
    with pytest.raises(SpecError, match="options.weights"):
        lloptim.solve(problem, solver="highs", formulation="binpacking_kv", weights=np.ones(20))
    with pytest.raises(SpecError, match="estimates"):
        lloptim.solve(problem, solver="highs", formulation="binpacking_kv", estimates=np.ones(3))
    with pytest.raises(SpecError, match="relax"):
        lloptim.solve(problem, solver="highs", formulation="binpacking_kv", relax="yes")
    with pytest.raises(lloptim.errors.SolverError, match="binpacking_kv"):
        lloptim.solve(problem, solver="greedy", formulation="binpacking_kv")


# -- precedence: schedules that respect the DAG ---------------------------------------------------
@st.composite
def dag_problems(draw, max_n=16):
    n = draw(st.integers(1, max_n))
    pairs = [(i, j) for j in range(n) for i in range(j)]
    chosen = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=min(len(pairs), 2 * n))) if pairs else []
    seed = draw(st.integers(0, 10_000))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    ids = [f"r{i}" for i in range(n)]
    after = [[] for _ in range(n)]
    for u, v in chosen:
        after[perm[v]].append(ids[perm[u]])
    arrivals = rng.uniform(0, 3, n) * (rng.random(n) < draw(st.sampled_from([0.0, 0.5])))
    wl = Workload.from_arrays(rng.integers(5, 80, n), rng.integers(1, 60, n), arrivals, ids=ids, after=after)
    return Problem.single(wl, "llama-65b", clients=draw(st.integers(1, 3)), instances=draw(st.integers(1, 2)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=dag_problems(), exact_max=st.sampled_from([0, 8]))
def test_precedence_solve_never_starts_a_request_before_its_predecessors(problem, exact_max):
    res = lloptim.solve(problem, solver="highs", formulation="precedence", exact_max=exact_max,
                        params=SolveParams(time_limit_s=2))
    assert res.status.has_solution
    sched = res.extra["schedule"]
    data = schedule_data(problem)
    assert check_schedule(data, sched["start_s"], sched["client"]) == ""
    assert np.array_equal(np.asarray(sched["client"]), res.assignment)
    assert data.value(sched["start_s"], sched["client"]) == pytest.approx(res.primal_bound)
    assert res.dual_bound <= res.primal_bound * (1 + 1e-9)
    if problem.n_requests > exact_max:
        assert res.skipped  # proven by the bound, or not searched ("small cases")


def test_precedence_large_case_is_list_scheduled_small_case_is_exact():
    from lloptim import workloads

    big = Problem.single(workloads.workflows("chain", 40, seed=2), clients=6)
    res = lloptim.solve(big, solver="highs", formulation="precedence")
    assert res.backend == "list_schedule" and "small cases" in res.skipped
    assert check_schedule(schedule_data(big), res.extra["schedule"]["start_s"], res.assignment) == ""
    small = Problem.single(workloads.workflows("fan-in", 2, seed=1, width=2), clients=2)
    res = lloptim.solve(small, solver="highs", formulation="precedence", params=SolveParams(time_limit_s=20))
    assert res.status.value == "optimal" and res.gap <= 1e-4


# -- weighted completion ----------------------------------------------------------------------------
def _brute_force_completion(data) -> float:
    n = data.n_requests
    best = np.inf
    for perm in itertools.permutations(range(n)):
        prio = np.empty(n)
        prio[list(perm)] = np.arange(n)
        start, client, _ = list_schedule(data.precedence.predecessors(), data.precedence.successors(), data.weights,
                                         data.client_kind, prio, data.release)
        best = min(best, data.value(start, client))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("model", ["client-chain", "time-indexed"])
def test_weighted_completion_is_exact_on_small_cases(seed, model):
    rng = np.random.default_rng(seed)
    n = 5 if model == "client-chain" else 7
    wl = Workload.from_arrays(rng.integers(5, 80, n), rng.integers(5, 200, n))
    problem = Problem.single(wl, "llama-65b", clients=2)
    weights = rng.uniform(0.5, 3.0, n)
    opts = {} if model == "client-chain" else {"weights": rng.integers(1, 9, n).astype(float), "slot_s": 1.0}
    res = lloptim.solve(problem, solver="highs", formulation="weighted_completion", completion_weights=weights,
                        params=SolveParams(time_limit_s=30, rel_gap=1e-6, always_run=True), **opts)
    data = schedule_data(problem, objective="completion", completion_weights=weights, weights=opts.get("weights"))
    # without releases, some optimal schedule is a list schedule: the best over all orders is the optimum
    assert res.status.value == "optimal" and res.backend == "highs"
    assert res.primal_bound == pytest.approx(_brute_force_completion(data), rel=1e-5)
    assert check_schedule(data, res.extra["schedule"]["start_s"], res.assignment) == ""


def test_time_indexed_slots_must_divide_the_work():
    problem = Problem.single(Workload.from_arrays([10, 20], [5, 9]), clients=2)
    with pytest.raises(SpecError, match="options.slot_s.*divide"):
        lloptim.solve(problem, solver="highs", formulation="weighted_completion", slot_s=1.0)
    with pytest.raises(SpecError, match="options.slot_s"):
        lloptim.solve(problem, solver="highs", formulation="weighted_completion", weights=[1.0, 2.0], slot_s=-1.0)
    with pytest.raises(SpecError, match="options.slot_s"):
        lloptim.solve(problem, solver="highs", formulation="precedence", slot_s=1.0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=dag_problems(10), seed=st.integers(0, 100))
def test_weighted_completion_bound_below_every_schedule(problem, seed):
    rng = np.random.default_rng(seed)
    u = rng.uniform(0.0, 2.0, problem.n_requests)
    res = lloptim.solve(problem, solver="highs", formulation="weighted_completion", completion_weights=u,
                        exact_max=0)
    data = schedule_data(problem, objective="completion", completion_weights=u)
    bound = weighted_completion_bound(data)
    assert res.dual_bound == pytest.approx(max(bound, res.dual_bound))
    assert check_schedule(data, res.extra["schedule"]["start_s"], res.assignment) == ""
    for _ in range(5):  # any list schedule is a schedule: never below the bound
        start, client, _ = list_schedule(data.precedence.predecessors(), data.precedence.successors(), data.weights,
                                         data.client_kind, rng.permutation(problem.n_requests), data.release)
        assert bound <= data.value(start, client) * (1 + 1e-9)


def test_wspt_priority_is_smiths_ratio():
    assert wspt_priority(np.array([4.0, 2.0, 3.0]), np.array([2.0, 2.0, 0.0])).tolist() == [2.0, 1.0, np.inf]


def test_weighted_completion_dispatch_lowers_mean_latency_under_overload():
    from lloptim import workloads
    from lloptim.arrivals import at_load

    problem = at_load(Problem.single(workloads.gsm8k("test", limit=300), clients=16), 1.3, seed=0)
    bound = lower_bound(problem)
    base = summarize(run_policy(problem, "hybrid"), bound)
    wc = summarize(run_policy(problem, hybrid_policy(objective="weighted-completion")), bound)
    assert wc.latency_mean_s < base.latency_mean_s
    with pytest.raises(SpecError, match="objective"):
        hybrid_policy(objective="p99")


# -- the CLI ----------------------------------------------------------------------------------------
def _spec(tmp_path, text: str):
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return str(path)


MEMORY_SPEC = ('[workload]\nsource = "synthetic"\nn = 120\nseed = 3\nsigma = 1.2\n\n'
               '[[instances]]\nprofile = "llama-65b"\nclients = 16\nkv_capacity_tokens = 4096\n')
WORKFLOW_SPEC = ('[workload]\nsource = "workflow"\nshape = "dag"\nworkflows = 3\nseed = 1\n\n'
                 '[[instances]]\nprofile = "llama-65b"\nclients = 3\n')


def test_cli_solve_binpacking_kv_reports_the_memory_aware_bound(tmp_path):
    spec = _spec(tmp_path, MEMORY_SPEC)
    res = runner.invoke(app, ["solve", spec, "--formulation", "binpacking_kv", "--json"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output)
    assert row["formulation"] == "binpacking_kv" and row["kv_price_weights"] == [1.0]
    assert row["lower_bound"]["decode_steps_memory"] > row["lower_bound"]["decode_steps_clients"]
    assert row["dual_bound"] >= row["lower_bound"]["fused_s"] * (1 - 1e-9)
    res = runner.invoke(app, ["solve", spec, "-f", "binpacking_kv"])
    assert res.exit_code == 0 and "memory-aware bound" in res.output and "dual('kv')" in res.output


def test_cli_solve_respects_precedence_by_default(tmp_path):
    spec = _spec(tmp_path, WORKFLOW_SPEC)
    res = runner.invoke(app, ["solve", spec, "--json", "--time-limit", "2"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output)
    assert row["formulation"] == "precedence" and row["lower_bound"]["critical_path_s"] > 0
    problem = lloptim.load_spec(spec)
    assert check_schedule(schedule_data(problem), row["schedule"]["start_s"], row["schedule"]["client"]) == ""
    res = runner.invoke(app, ["solve", spec, "--formulation", "binpacking"])
    assert res.exit_code != 0 and "--formulation" in res.output and "precedence" in res.output
    res = runner.invoke(app, ["solve", spec, "--formulation", "nope"])
    assert res.exit_code != 0 and "unknown formulation" in res.output
    res = runner.invoke(app, ["solve", spec, "-f", "weighted_completion"])
    assert res.exit_code == 0 and "mean completion" in res.output
