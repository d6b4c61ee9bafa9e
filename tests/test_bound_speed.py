"""The fast paths of ``lower_bound`` on mixed fleets give the bound of the paths before them, exactly.

``lower_bound`` with precedence or arrivals solves a fractional assignment LP per window on a
fleet of several kinds; the fast path keeps one HiGHS master across the cutting-plane rounds and
skips the LPs of windows that cannot beat the best window (``lloptim.bounds._WINDOW_FAST``).
Without migration it also solves the chain-coupling LP over instance kinds, by column generation
(``lloptim.bounds._CHAIN_LP_FAST``) where the path before built the whole LP for ``linprog``.
Speed itself is measured by ``benchmarks/bound_speed.py``, not here.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lloptim import Problem, workloads
from lloptim import bounds as bounds_module
from lloptim.bounds import fractional_assignment_bound, lower_bound
from lloptim.hardware import load_profile
from lloptim.problem import Instance
from lloptim.simulator import run_policy

FIELDS = ("total_s", "fused_s", "window_s", "window_fused_s", "backlog_s", "backlog_fused_s", "critical_path_s",
          "critical_path_fused_s")


def _fleet(kinds: list[tuple[float, float, int, int]]) -> tuple[Instance, ...]:
    """Instances of LLaMA-65B scaled ``(prefill, decode)`` with ``clients`` and KV tokens, one per tuple."""
    base = load_profile("llama-65b")
    return tuple(Instance.from_profile(base.with_latency(base.latency.scaled(pf, dc)), clients=c,
                                       kv_capacity_tokens=kv, name=f"i{k}")
                 for k, (pf, dc, c, kv) in enumerate(kinds))


@contextmanager
def _reference(window: bool = True):
    """Run the paths before the speed-ups inside the block (the window bound's too unless ``window`` is False)."""
    bounds_module._WINDOW_FAST = not window
    bounds_module._CHAIN_LP_FAST = False
    try:
        yield
    finally:
        bounds_module._WINDOW_FAST = bounds_module._CHAIN_LP_FAST = True


def _both(problem: Problem, migration: bool) -> tuple:
    """``lower_bound`` on the fast path and on the path before it."""
    fast = lower_bound(problem, migration=migration)
    with _reference():
        slow = lower_bound(problem, migration=migration)
    return fast, slow


def _assert_same(fast, slow) -> None:
    for field in FIELDS:
        a, b = getattr(fast, field), getattr(slow, field)
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), field


kind = st.tuples(st.sampled_from([0.6, 1.0, 1.5, 2.0]), st.sampled_from([0.8, 1.0, 1.2, 1.6]),
                 st.sampled_from([10, 20, 40]), st.sampled_from([8_192, 40_960, 81_920]))


@settings(max_examples=10, deadline=None)
@given(shape=st.sampled_from(["chain", "fan-in", "dag", "requests"]), n=st.integers(2, 6),
       seed=st.integers(0, 10_000), rate=st.sampled_from([None, 0.5, 2.0]),
       kinds=st.lists(kind, min_size=2, max_size=4), migration=st.booleans())
def test_fast_window_bound_equals_the_reference(shape, n, seed, rate, kinds, migration):
    if shape == "requests":
        wl = workloads.synthetic(8 * n, seed=seed)
        rng = np.random.default_rng(seed)
        wl = wl.with_arrivals(np.cumsum(rng.exponential(1.0 / (rate or 4.0), len(wl))))
    else:
        wl = workloads.workflows(shape, n, seed=seed, arrival_rate=rate)
    problem = Problem(wl, _fleet(kinds))
    fast, slow = _both(problem, migration)
    _assert_same(fast, slow)


def test_fast_path_skips_fleet_lps_and_keeps_the_bound(monkeypatch):
    """On a 3-kind fleet with DAGs most windows cannot beat the best one: their LPs are skipped."""
    problem = Problem(workloads.workflows("dag", 12, seed=5),
                      _fleet([(1.0, 1.0, 40, 81_920), (1.5, 1.5, 30, 65_536), (0.6, 1.6, 40, 81_920)]))
    calls = []
    real = bounds_module.fractional_assignment_bound

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bounds_module, "fractional_assignment_bound", counted)
    fast = lower_bound(problem, migration=False)
    n_fast = len(calls)
    calls.clear()
    monkeypatch.setattr(bounds_module, "_WINDOW_FAST", False)
    slow = lower_bound(problem, migration=False)
    n_slow = len(calls)
    _assert_same(fast, slow)
    assert fast.window_s > 0
    assert n_fast * 3 <= n_slow, (n_fast, n_slow)


@settings(max_examples=40, deadline=None)
@given(J=st.integers(2, 5), R=st.integers(0, 40), seed=st.integers(0, 10_000))
def test_assignment_upper_estimate_is_above_the_lp(J, R, seed):
    rng = np.random.default_rng(seed)
    work = rng.uniform(0.0, 10.0, (J, R)) * rng.uniform(0.3, 3.0, (J, 1))
    count = rng.integers(1, 5, J).astype(float)
    upper = bounds_module._assignment_upper(work, count)
    assert upper >= fractional_assignment_bound(work, count) * (1 - 1e-12)
    # a feasible assignment: no better than the work spread over the whole fleet at its fastest
    assert upper >= work.min(axis=0).sum() / count.sum() * (1 - 1e-12)


@settings(max_examples=30, deadline=None)
@given(J=st.integers(3, 5), R=st.integers(1, 60), seed=st.integers(0, 10_000))
def test_one_highs_master_matches_a_fresh_linprog_per_round(J, R, seed):
    rng = np.random.default_rng(seed)
    work = rng.uniform(0.1, 10.0, (J, R)) * rng.uniform(0.3, 3.0, (J, 1))
    count = rng.integers(1, 5, J).astype(float)
    fast = fractional_assignment_bound(work, count)
    with _reference():
        slow = fractional_assignment_bound(work, count)
    assert fast == pytest.approx(slow, rel=1e-9)


@pytest.mark.parametrize("shape,rate", [("dag", None), ("fan-in", 1.0), ("chain", 0.5)])
def test_fast_bound_is_below_every_policy_on_mixed_fleets(shape, rate):
    wl = workloads.workflows(shape, 10, seed=7, arrival_rate=rate)
    problem = Problem(wl, _fleet([(1.0, 1.0, 20, 81_920), (1.5, 1.5, 10, 40_960), (0.6, 1.6, 20, 81_920)]))
    lb = lower_bound(problem, migration=False)
    for policy in ("baseline", "hybrid", "hybrid-fused"):
        res = run_policy(problem, policy)
        bound = lb.fused_s if np.any(res.trace_kind == 2) else lb.total_s
        assert bound <= res.makespan_s * (1 + 1e-9), policy


# -- the chain-coupling LP by column generation ------------------------------------------------
def _chain_lp_case(problem: Problem, fused: bool):
    """Arguments of ``_chain_coupling_lp`` for the chain of longest minimal time, as ``_chain_coupling_bound`` builds them."""
    w = problem.workload
    o = w.output_tokens.astype(np.float64)
    t = bounds_module.minimal_request_time_s(problem, o, fused)
    chain = w.precedence.critical_path(t, w.arrival_s)[1]
    lats = [inst.profile.latency for inst in problem.instances]
    entry = min(l.prefill_per_token_s for l in lats) * w.prompt_tokens.astype(np.float64)
    curves = bounds_module._token_curves(w.prompt_tokens, w.output_tokens, chain,
                                         min(l.decode_per_seq_s for l in lats),
                                         min(l.decode_per_kv_token_s for l in lats), entry, 3)
    return o, chain, curves, float(w.arrival_s[chain[0]])


@settings(max_examples=25, deadline=None)
@given(shape=st.sampled_from(["chain", "fan-in", "dag"]), n=st.integers(1, 40), seed=st.integers(0, 10_000),
       rate=st.sampled_from([None, 0.2, 1.0, 5.0]), kinds=st.lists(kind, min_size=2, max_size=4),
       fused=st.booleans())
def test_chain_lp_by_column_generation_equals_the_whole_lp(shape, n, seed, rate, kinds, fused):
    problem = Problem(workloads.workflows(shape, n, seed=seed, arrival_rate=rate), _fleet(kinds))
    o, chain, curves, head = _chain_lp_case(problem, fused)
    fast = bounds_module._chain_coupling_lp(problem, o, chain, fused, curves, head)
    with _reference():
        slow = bounds_module._chain_coupling_lp(problem, o, chain, fused, curves, head)
    assert fast == pytest.approx(slow, rel=1e-9, abs=1e-12)


def test_chain_lp_stops_when_it_cannot_lift_the_floor():
    """With a floor at or above the LP, the rounds stop early and the value stays at or below the floor."""
    problem = Problem(workloads.workflows("dag", 60, seed=3),
                      _fleet([(1.0, 1.0, 40, 81_920), (1.5, 1.5, 30, 65_536), (0.6, 1.6, 40, 81_920)]))
    o, chain, curves, head = _chain_lp_case(problem, False)
    full = bounds_module._chain_coupling_lp(problem, o, chain, False, curves, head)
    assert full > 0
    above = bounds_module._chain_coupling_lp(problem, o, chain, False, curves, head, floor=2 * full)
    assert 0 <= above <= full * (1 + 1e-12)
    below = bounds_module._chain_coupling_lp(problem, o, chain, False, curves, head, floor=0.5 * full)
    assert below == pytest.approx(full, rel=1e-9)


@pytest.mark.parametrize("shape,rate", [("dag", None), ("fan-in", 1.0), ("chain", None), ("chain", 2.0)])
def test_fast_chain_lp_gives_the_reference_bound_on_a_thousand_requests(shape, rate):
    """Where the whole LP has thousands of columns; the LP stops early where it cannot lift the bound."""
    wl = workloads.workflows(shape, {"dag": 100, "fan-in": 200, "chain": 330}[shape], seed=11, arrival_rate=rate)
    problem = Problem(wl, _fleet([(1.0, 1.0, 40, 81_920), (1.5, 1.5, 30, 65_536), (0.6, 1.6, 40, 81_920),
                                  (2.0, 1.2, 20, 40_960)]))
    fast = lower_bound(problem, migration=False)
    with _reference(window=False):
        slow = lower_bound(problem, migration=False)
    _assert_same(fast, slow)


@settings(max_examples=60, deadline=None)
@given(J=st.integers(1, 6), R=st.integers(0, 6), seed=st.integers(0, 10_000))
def test_unique_rows_is_numpys_unique(J, R, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3, (J, R)).astype(np.float64)
    if J > 1:
        a[rng.integers(1, J)] = a[0]
    rows, inverse = bounds_module._unique_rows(a)
    want_rows, want_inverse = np.unique(a, axis=0, return_inverse=True)
    assert np.array_equal(rows, want_rows) and np.array_equal(inverse, np.asarray(want_inverse).reshape(-1))
