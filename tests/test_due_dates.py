"""Workflow due dates (``hybrid_policy(due_factor=...)``, on by default) and the per-workflow latency metric."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from lloptim import Problem, Workload, lower_bound, run_policy, summarize, workloads
from lloptim.cli import app
from lloptim.errors import SpecError
from lloptim.hardware import HardwareProfile, LatencyModel
from lloptim.metrics import workflow_latency
from lloptim.runtime.hybrid import hybrid_policy
from lloptim.runtime.request_schedulers import DUE_FACTOR, WorkflowQueue


def _online(n: int, seed: int, rate: float | None, clients: int = 16, instances: int = 1) -> Problem:
    """``n`` layered DAG workflows on GSM8K lengths arriving at ``rate`` per second (None: all at 0)."""
    return Problem.single(workloads.workflows("dag", n, seed=seed, arrival_rate=rate), "llama-65b", clients=clients,
                          instances=instances, kv_capacity_tokens=81_920)


def _queue(monkeypatch) -> list:
    """Keep every WorkflowQueue a run sets up (to read its state after the run)."""
    kept = []
    original = WorkflowQueue.setup

    def setup(self, ctx):
        kept.append(self)
        original(self, ctx)

    monkeypatch.setattr(WorkflowQueue, "setup", setup)
    return kept


# -- what the due dates are for ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_due_dates_bound_the_wait_of_requests_the_plan_keeps_for_last(seed):
    # 40 DAG workflows at 0.5/s overload 16 clients: the plan keeps short last steps of early
    # workflows for the end (the p99 is 1.8-2.7x Sarathi's); due dates serve them by their
    # workflow's due date, at no more than a point of makespan
    problem = _online(40, seed, 0.5)
    plain = summarize(run_policy(problem, hybrid_policy(due_factor=None)))
    due = summarize(run_policy(problem, hybrid_policy(due_factor=1.0)))
    fcfs = summarize(run_policy(problem, "sarathi"))
    assert plain.latency_p99_s > 1.5 * fcfs.latency_p99_s  # the starvation the rule is for
    assert due.latency_p99_s <= 0.7 * plain.latency_p99_s
    assert due.latency_p99_s <= 1.05 * fcfs.latency_p99_s
    assert due.workflow_latency_p99_s <= 1.05 * fcfs.workflow_latency_p99_s
    assert due.makespan_s <= 1.01 * plain.makespan_s
    assert due.makespan_s < fcfs.makespan_s


def test_the_due_date_is_the_drain_time_of_the_known_work(monkeypatch):
    kept = _queue(monkeypatch)
    problem = _online(12, 3, 0.5)
    res = run_policy(problem, hybrid_policy(due_factor=2.0))
    q = kept[-1]
    assert q.due_on and np.all(np.isfinite(res.done_s))
    label = problem.workload.precedence.workflows()
    first = np.array([problem.workload.arrival_s[label == k].min() for k in range(label.max() + 1)])
    # each workflow is due after its arrival, and no later than twice the time to serve all of the work
    # (an upper bound of the known work) at the fleet's full rate
    everything = float(np.sum(q.est_steps)) / q.fleet_rate
    assert np.all(q.due_s > first) and np.all(q.due_s <= first + 2.0 * everything + 1e-9)
    # a request's key is never after its planned start, and the earlier of the two
    rows = np.flatnonzero(~np.isinf(q.plan_start))
    assert np.all(np.asarray(q.key)[rows] <= q.plan_start[rows])
    # some by their due date: the latest start for it (the typical step moves as workflows arrive,
    # so the last keys are compared with the step they were keyed with only up to that)
    assert np.any(np.asarray(q.key)[rows] < q.plan_start[rows] - 1.0)


@pytest.mark.parametrize("seed", [21, 22])
def test_the_default_hybrid_serves_overloaded_workflows_by_due_dates(seed, monkeypatch):
    # the default hybrid is the due-date rule: on DAGs overloading the fleet its p99 stays near
    # Sarathi's (the plan alone: 1.8-2.7x), at no more than a point of makespan over the plan alone
    kept = _queue(monkeypatch)
    problem = _online(40, seed, 0.5)
    default = run_policy(problem, "hybrid")
    assert kept[-1].due_factor == DUE_FACTOR and kept[-1].due_on
    explicit = run_policy(problem, hybrid_policy(due_factor=DUE_FACTOR))
    assert np.array_equal(default.done_s, explicit.done_s)
    d = summarize(default)
    plain = summarize(run_policy(problem, hybrid_policy(due_factor=False)))
    fcfs = summarize(run_policy(problem, "sarathi"))
    assert plain.latency_p99_s > 1.5 * fcfs.latency_p99_s
    assert d.latency_p99_s <= 1.1 * fcfs.latency_p99_s
    assert d.makespan_s <= 1.01 * plain.makespan_s and d.makespan_s < fcfs.makespan_s


# -- what they must not change -------------------------------------------------------------------------------
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from(workloads.WORKFLOW_SHAPES), n=st.integers(1, 10), seed=st.integers(0, 1000),
       instances=st.integers(1, 2), factor=st.sampled_from([0.25, 1.0, 4.0]))
def test_workflows_known_at_once_run_exactly_as_without_due_dates(shape, n, seed, instances, factor):
    # every workflow at time 0 is one batch: its latency is the makespan's business, nothing moves
    problem = Problem.single(workloads.workflows(shape, n, seed=seed), "llama-65b", clients=6, instances=instances,
                             kv_capacity_tokens=81_920)
    a = run_policy(problem, hybrid_policy(due_factor=None))
    b = run_policy(problem, hybrid_policy(due_factor=factor))
    assert np.array_equal(a.done_s, b.done_s) and np.array_equal(a.client, b.client)
    assert np.array_equal(a.trace_start_s, b.trace_start_s)


def test_independent_requests_run_exactly_as_without_due_dates():
    problem = Problem.single(workloads.gsm8k("test").subset(np.arange(300)).with_arrivals(
        np.sort(np.random.default_rng(2).uniform(0, 30, 300))), "llama-65b", clients=20)
    a, b = run_policy(problem, hybrid_policy(due_factor=None)), run_policy(problem, hybrid_policy(due_factor=1.0))
    assert np.array_equal(a.done_s, b.done_s) and np.array_equal(a.client, b.client)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from(workloads.WORKFLOW_SHAPES), n=st.integers(2, 14), seed=st.integers(0, 1000),
       rate=st.sampled_from([0.3, 1.0, 4.0]), clients=st.integers(1, 6), instances=st.integers(1, 2),
       factor=st.sampled_from([0.1, 1.0, 3.0]))
def test_due_dates_keep_precedence_and_serve_every_token(shape, n, seed, rate, clients, instances, factor):
    problem = Problem.single(workloads.workflows(shape, n, seed=seed, arrival_rate=rate), "llama-65b",
                             clients=clients, instances=instances, kv_capacity_tokens=81_920)
    wl = problem.workload
    res = run_policy(problem, hybrid_policy(due_factor=factor))
    assert np.all(np.isfinite(res.done_s)) and res.generated_tokens == wl.total_output_tokens
    e = wl.precedence.edges if wl.precedence is not None else np.zeros((0, 2), dtype=np.int64)
    assert np.all(res.assign_s[e[:, 1]] >= res.done_s[e[:, 0]])
    assert np.all(res.assign_s >= wl.arrival_s)
    lb = lower_bound(problem, migration=False)
    assert res.makespan_s >= (lb.fused_s if np.any(res.trace_kind == 2) else lb.total_s) * (1 - 1e-9)


def test_due_dates_read_no_workflow_before_it_arrives():
    # workflows arriving after t redrawn (other lengths, so other work, drain times and due dates):
    # the run up to t is the same
    problem = _online(20, 5, 0.5)
    w = problem.workload
    t = float(np.quantile(w.arrival_s, 0.5))
    later = w.arrival_s > t
    rng = np.random.default_rng(0)
    output = w.output_tokens.copy()
    output[later] = rng.integers(1, 400, int(later.sum()))
    after = [[w.ids[p] for p in preds] for preds in w.precedence.predecessors()]
    other = Problem(Workload.from_arrays(w.prompt_tokens, output, w.arrival_s, ids=list(w.ids), after=after),
                    problem.instances)
    a = run_policy(problem, hybrid_policy(due_factor=1.0))
    b = run_policy(other, hybrid_policy(due_factor=1.0))
    before = a.trace_start_s < t
    assert np.array_equal(a.trace_start_s[before], b.trace_start_s[:int(before.sum())])
    served = np.flatnonzero(a.assign_s < t)
    assert np.array_equal(a.client[served], b.client[served])


# -- bad input -------------------------------------------------------------------------------------------------
def test_false_or_none_turns_the_due_dates_off(monkeypatch):
    kept = _queue(monkeypatch)
    problem = _online(12, 3, 0.5)
    a = run_policy(problem, hybrid_policy(due_factor=False))
    assert kept[-1].due_factor is None and not kept[-1].due_on
    b = run_policy(problem, hybrid_policy(due_factor=None))
    assert np.array_equal(a.done_s, b.done_s)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_a_bad_due_factor_is_a_named_error(bad):
    with pytest.raises(SpecError, match="due_factor") as err:
        hybrid_policy(due_factor=bad)
    assert err.value.field == "policy.hybrid.due_factor"


def test_due_dates_with_the_planned_dispatch_are_refused():
    with pytest.raises(SpecError, match="sorted dispatch"):
        hybrid_policy(dispatch="plan", due_factor=1.0)


def test_cli_due_factor_and_workflow_latency_in_json(tmp_path):
    runner = CliRunner()
    spec = tmp_path / "flows.toml"
    spec.write_text('[workload]\nsource = "workflow"\nshape = "dag"\nworkflows = 12\narrival_rate = 0.5\n'
                    '[[instances]]\nclients = 8\nkv_capacity_tokens = 81920\n')
    res = runner.invoke(app, ["simulate", str(spec), "--policy", "hybrid", "-o", "due_factor=1", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["policy_options"] == {"due_factor": 1} and d["workflows"] == 12
    assert d["latency_p99_s"] <= d["workflow_latency_p99_s"] + 1e-9
    res = runner.invoke(app, ["simulate", str(spec), "--policy", "hybrid", "-o", "due_factor=false", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["policy_options"] == {"due_factor": False}
    res = runner.invoke(app, ["simulate", str(spec), "--policy", "hybrid", "-o", "due_factor=0"])
    assert res.exit_code != 0 and "due_factor" in res.output and "Traceback" not in res.output


# -- the per-workflow latency --------------------------------------------------------------------------------
def test_workflow_latency_by_hand():
    # one client; prefill 1 s, decode 1 s: a -> b arrive at 0, c alone at 0.5
    prof = HardwareProfile("unit", LatencyModel(1.0, 0.0, 1.0, 0.0, 0.0), kv_capacity_tokens=1000, clients=1)
    wl = Workload.from_arrays([5, 5, 5], [1, 1, 1], [0.0, 0.0, 0.5], ids=["a", "b", "c"], after=[[], ["a"], []])
    res = run_policy(Problem.single(wl, prof), "baseline")
    m = summarize(res)
    flows = workflow_latency(res)
    label = wl.precedence.workflows()
    assert label.tolist() == [0, 0, 1] and m.workflows == 2
    assert flows[0] == pytest.approx(max(res.done_s[0], res.done_s[1]) - 0.0)
    assert flows[1] == pytest.approx(res.done_s[2] - 0.5)
    assert m.workflow_latency_mean_s == pytest.approx(flows.mean())
    assert m.workflow_latency_p99_s == pytest.approx(np.percentile(flows, 99))


def test_without_precedence_a_request_is_its_own_workflow():
    wl = workloads.synthetic(30, seed=4).with_arrivals(np.linspace(0, 5, 30))
    m = summarize(run_policy(Problem.single(wl, "llama-65b", clients=4), "hybrid"))
    assert m.workflows == 30
    assert m.workflow_latency_mean_s == m.latency_mean_s and m.workflow_latency_p99_s == m.latency_p99_s


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from(workloads.WORKFLOW_SHAPES), n=st.integers(1, 10), seed=st.integers(0, 1000),
       rate=st.sampled_from([None, 1.0]))
def test_a_workflow_lasts_at_least_as_long_as_each_of_its_requests(shape, n, seed, rate):
    wl = workloads.workflows(shape, n, seed=seed, arrival_rate=rate)
    res = run_policy(Problem.single(wl, "llama-65b", clients=4, kv_capacity_tokens=81_920), "sarathi")
    flows = workflow_latency(res)
    label = wl.precedence.workflows() if wl.precedence is not None else np.arange(len(wl))
    assert flows.size == label.max() + 1
    assert np.all(flows[label] >= res.done_s - wl.arrival_s - 1e-9)
    assert np.all(flows >= 0)


def test_the_latency_benchmark_runs_and_shows_the_rule(tmp_path):
    from bench_loader import load_benchmark

    bench = load_benchmark("workflow_latency")
    out = tmp_path / "rows.csv"
    assert bench.main(["--seeds", "1", "--classes", "gsm8k-dag", "--csv", str(out)]) == 0
    import csv

    rows = list(csv.DictReader(open(out)))
    assert {r["policy"] for r in rows} == set(bench.POLICIES) and len(rows) == 4 * len(bench.POLICIES)
    by = {(r["case"], r["policy"]): r for r in rows}
    for case in {r["case"] for r in rows if "1/s" in r["case"]}:  # overloaded: the plan starves, due dates do not
        assert float(by[case, "hybrid"]["latency_p99_s"]) < 0.7 * float(by[case, "hybrid-plain"]["latency_p99_s"])
