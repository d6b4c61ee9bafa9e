"""The release-date fleet bound (:func:`lloptim.bounds.fleet_release_bound`): one instance per request, released over time."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lloptim import Problem, lower_bound, run_policy, workloads
from lloptim import bounds as B
from lloptim.bounds import fleet_release_bound, minimal_request_time_s, release_terms
from lloptim.hardware import load_profile
from lloptim.problem import Instance, Workload
from lloptim.runtime.engine import Fault

POLICIES = ["baseline", "offline", "hybrid", "hybrid-fused", "hybrid-plan", "hybrid-fused-plan", "vllm", "sarathi",
            "sorted-f", "lpt", "mcsf", "wait"]


def _fleet(kinds, kv: int = 40_000, kv_mode: str | None = None) -> tuple[Instance, ...]:
    """One llama-65b instance per ``(slowdown, clients)``."""
    base = load_profile("llama-65b")
    return tuple(Instance.from_profile(replace(base, name=f"x{s}", latency=base.latency.scaled(prefill=s, decode=s)),
                                       c, kv_capacity_tokens=kv, name=f"i{k}", kv_mode=kv_mode)
                 for k, (s, c) in enumerate(kinds))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from(("independent", "heavy", "chain", "dag")), n=st.integers(2, 24),
       seed=st.integers(0, 10_000), rate=st.sampled_from([0.5, 2.0, 8.0, 40.0]),
       kinds=st.lists(st.tuples(st.sampled_from([0.6, 1.0, 1.6, 2.5]), st.integers(1, 8)), min_size=2, max_size=3),
       kv=st.sampled_from([(40_000, None), (3_000, "paged"), (3_000, "reserve")]),
       policy=st.sampled_from(POLICIES), fault=st.booleans())
def test_never_above_a_makespan_without_migration(shape, n, seed, rate, kinds, kv, policy, fault):
    # mixed fleets, arrivals from light to heavy overload, heavy tails, DAGs, KV that binds, faults
    if shape == "independent":
        wl = workloads.synthetic(n, seed=seed, arrival_rate=rate)
    elif shape == "heavy":
        wl = workloads.synthetic(n, seed=seed, arrival_rate=rate, sigma=1.4, output_median=60, max_tokens=1500)
    else:
        wl = workloads.workflows(shape, max(1, n // 4), seed=seed, arrival_rate=rate / 4)
    problem = Problem(wl, _fleet(kinds, *kv))
    lb = lower_bound(problem, migration=False)
    assert lb.fleet_release_s <= lb.fused_s <= lb.total_s
    faults = [Fault(0.5, 0, 0)] if fault and kinds[0][1] > 1 else ()  # client 0 of instance 0 fails
    res = run_policy(problem, policy, faults=faults)
    assert not np.any(res.migrations > 0)
    fused_run = bool(np.any(res.trace_kind == 2))
    assert res.makespan_s >= (lb.fused_s if fused_run else lb.total_s) * (1 - 1e-9)
    assert res.makespan_s >= fleet_release_bound(problem) * (1 - 1e-9)


def _optimum_one_client(problem: Problem) -> float:
    """Least makespan on instances of one client each: over every assignment, each instance in release order.

    With one client an instance runs one request at a time (prefill, then its decode steps alone),
    and for ``1 | r_j | Cmax`` the earliest release first is optimal.
    """
    w = problem.workload
    p, o = w.prompt_tokens.astype(float), w.output_tokens.astype(float)
    alone = np.array([inst.profile.latency.prefill_time(0) + inst.profile.latency.prefill_per_token_s * p
                      + (inst.profile.latency.decode_base_s + inst.profile.latency.decode_per_seq_s) * o
                      + inst.profile.latency.decode_per_kv_token_s * (o * p + o * (o - 1) / 2)
                      for inst in problem.instances])
    order = np.argsort(w.arrival_s, kind="stable")
    best = np.inf
    for assign in itertools.product(range(len(problem.instances)), repeat=len(w)):
        clock = np.zeros(len(problem.instances))
        for r in order:
            k = assign[r]
            clock[k] = max(clock[k], w.arrival_s[r]) + alone[k, r]
        best = min(best, clock.max())
    return float(best)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 5), seed=st.integers(0, 10_000), rate=st.sampled_from([0.2, 1.0, 5.0]),
       speeds=st.lists(st.sampled_from([0.6, 1.0, 1.6, 2.5]), min_size=2, max_size=3))
def test_never_above_the_exact_optimum_of_tiny_cases(n, seed, rate, speeds):
    wl = workloads.synthetic(n, seed=seed, arrival_rate=rate, sigma=1.2, output_median=40, max_tokens=400)
    problem = Problem(wl, _fleet([(s, 1) for s in speeds]))
    best = _optimum_one_client(problem)
    # the enumeration is a real optimum: no policy beats it
    for policy in ("lpt", "sarathi", "hybrid"):
        assert run_policy(problem, policy).makespan_s >= best * (1 - 1e-9)
    lb = lower_bound(problem, migration=False)
    assert lb.total_s <= best * (1 + 1e-9) and lb.fleet_release_s <= best * (1 + 1e-9)


def test_two_long_requests_that_only_the_fast_instance_can_finish_in_time():
    # a fast and a 2.5x slower instance of one client each; two 400-token requests 1 s apart: the
    # slow instance would take 2.5x as long, so both run on the fast one, one after the other. The
    # pooled bounds see about 18 s; the optimum is about 25 s.
    wl = Workload.from_arrays(np.array([50, 50]), np.array([400, 400]), np.array([0.0, 1.0]))
    problem = Problem(wl, _fleet([(1.0, 1), (2.5, 1)]))
    best = _optimum_one_client(problem)
    lb = lower_bound(problem, migration=False)
    others = max(lb.window_fused_s, lb.backlog_fused_s, lb.critical_path_fused_s, lb.single_request_s)
    assert others < 0.75 * best
    assert lb.fleet_release_s == lb.fused_s == lb.total_s
    assert 0.97 * best <= lb.fleet_release_s <= best
    # with migration a request may move between instances: the term does not hold and is not counted
    assert lower_bound(problem).fleet_release_s == 0.0


def test_a_late_long_request_on_a_mixed_fleet_lifts_the_bound():
    # the fleet-mixed failure: heavy-tailed requests arriving at twice the fleet's capacity on a fast
    # and two slower instances; the pooled bounds let the slow instances absorb the long requests
    rng = np.random.default_rng(3)
    n = 100
    p = np.clip(rng.lognormal(np.log(150), 1.0, n), 1, 2000).astype(int)
    o = np.clip(rng.lognormal(np.log(80), 1.4, n), 1, 3000).astype(int)
    wl = Workload.from_arrays(p, o)
    problem = Problem(wl, _fleet([(1.0, 16), (1.6, 8), (2.5, 8)], kv=163_840))
    from lloptim.arrivals import at_load

    problem = at_load(problem, 2.0, seed=3)
    lb = lower_bound(problem, migration=False)
    others = max(lb.window_s, lb.backlog_s, lb.critical_path_s, lb.single_request_s)
    assert lb.fleet_release_s > 1.05 * others  # 1.09
    for policy in ("hybrid", "sarathi", "lpt"):
        assert run_policy(problem, policy).makespan_s >= lb.fleet_release_s


def test_the_terms_match_the_cost_model():
    wl = Workload.from_arrays(np.array([30, 200, 10]), np.array([5, 50, 300]), np.array([0.0, 2.0, 3.0]))
    problem = Problem(wl, _fleet([(1.0, 4), (1.6, 2)]))
    terms = release_terms(problem)
    # a request released at or after a threshold needs all its tokens and its prompt after it
    j = int(np.searchsorted(terms["thresholds"], 2.0))
    lat = problem.instances[1].profile.latency
    p, o = 200.0, 50.0
    want = lat.decode_per_seq_s * o + lat.decode_per_kv_token_s * (o * p + o * (o - 1) / 2) + lat.prefill_per_token_s * p
    assert terms["thresholds"][j] == 2.0 and terms["remaining"][1, j, 1] == o
    assert terms["cost"][1, j, 1] == pytest.approx(want, rel=1e-12)
    # the fastest instance's minimal time is the one minimal_request_time_s gives
    assert np.allclose(terms["alone"].min(axis=0), minimal_request_time_s(problem, fused=True))
    # the remainder at a threshold never exceeds the output, and shrinks as time passes
    rem = terms["remaining"]
    assert np.all(np.diff(rem, axis=1) <= 0) and np.all(rem <= np.array([5, 50, 300]))
    # request 0 (released at 0, 5 tokens) has started at most as many steps as fit before 3 s on
    # each instance: its steps there take a + c (p + i), after its prompt
    for k, inst in enumerate(problem.instances):
        lat = inst.profile.latency
        start = min(lat.prefill_base_s, lat.decode_base_s) + lat.prefill_per_token_s * 30
        steps = start + np.cumsum(lat.decode_base_s + lat.decode_per_seq_s + lat.decode_per_kv_token_s
                                  * (30 + np.arange(5)))
        for jj, t in enumerate(terms["thresholds"]):
            begun = int(np.sum(np.r_[start, steps[:-1]] < t)) if t > start else 0
            assert rem[k, jj, 0] == 5 - begun


def test_skipped_where_it_does_not_apply():
    wl = workloads.synthetic(30, seed=1, arrival_rate=4.0)
    one = Problem.single(wl, "llama-65b", clients=8)
    assert fleet_release_bound(one) == 0.0 and lower_bound(one, migration=False).fleet_release_s == 0.0
    at_zero = Problem(workloads.synthetic(30, seed=1), _fleet([(1.0, 4), (2.5, 4)]))
    assert fleet_release_bound(at_zero) == 0.0 and release_terms(at_zero) is None
    fleet = Problem(wl, _fleet([(1.0, 4), (2.5, 4)]))
    assert release_terms(fleet) is not None
    kept = B.FLEET_RELEASE_MAX_COLUMNS
    try:
        B.FLEET_RELEASE_MAX_COLUMNS = 59  # 30 requests x 2 instances = 60 columns
        assert release_terms(fleet) is None and fleet_release_bound(fleet) == 0.0
    finally:
        B.FLEET_RELEASE_MAX_COLUMNS = kept
    # a floor it cannot beat: 0
    assert fleet_release_bound(fleet, floor=1e9) == 0.0


def test_in_the_json_of_solve(tmp_path):
    import json

    from typer.testing import CliRunner

    from lloptim.cli import app

    spec = tmp_path / "spec.toml"
    spec.write_text('[workload]\nsource = "synthetic"\nn = 30\nseed = 2\narrival_rate = 6.0\n\n'
                    '[[instances]]\nprofile = "llama-65b"\nclients = 4\n\n'
                    '[[instances]]\nprofile = "llama-65b"\nclients = 2\n')
    res = CliRunner().invoke(app, ["solve", str(spec), "--json", "--time-limit", "2"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output)
    assert "fleet_release_s" in row["lower_bound_no_migration"] and row["lower_bound"]["fleet_release_s"] == 0.0
