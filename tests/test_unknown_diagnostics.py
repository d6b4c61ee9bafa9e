"""``benchmarks/unknown_diagnostics.py``: its estimate models, its revising queue and its hindsight area.

The script's numbers are in the docs (*Workflows* and *KV memory*, unknown lengths); these tests
check that what it measures is what it says: the posterior mean, the online follow-up model, the
truth revealed at readiness (and only then), a revising run that still serves every request and
token, and the rescaled areas (their total is the true one, the original is restored).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lloptim import Problem, Workload, run_policy, workloads
from lloptim.memory import decode_area_tokens
from lloptim.runtime import memory_schedulers
from lloptim.runtime.estimators import BucketQuantileEstimator
from bench_loader import load_benchmark

ud = load_benchmark("unknown_diagnostics")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 1.0))
def test_posterior_mean_shrinks_toward_the_centre_and_keeps_the_order(seed, noise):
    rng = np.random.default_rng(seed)
    est = np.exp(rng.normal(np.log(100.0), 1.2, 200))
    post = ud.posterior_mean(est, noise)
    y, mu = np.log(est), np.log(est).mean()
    assert np.all(post >= 1.0) and np.all(np.isfinite(post))
    # monotone in the estimate, and each log posterior mean between mu and log e (plus at most the variance term)
    order = np.argsort(est)
    assert np.all(np.diff(post[order]) >= -1e-9)
    lo, hi = np.minimum(y, mu), np.maximum(y, mu)
    var_term = 0.5 * noise ** 2  # the largest the posterior variance term can be
    assert np.all(np.log(post) >= lo - 1e-9) and np.all(np.log(post) <= hi + var_term + 1e-9)


def test_posterior_mean_without_noise_is_the_estimate():
    est = np.array([3.0, 50.0, 400.0, 2000.0])
    assert np.allclose(ud.posterior_mean(est, 1e-6), est, rtol=1e-6)


def _chains(n: int, seed: int) -> Workload:
    return workloads.workflows("chain", n, seed=seed)


def test_learned_follow_ups_learn_the_level_line():
    """Level-1 steps exactly 0.5 x their predecessor: after a few finishes the model predicts that line."""
    p = np.full(20, 30)
    o = np.array([100, 50, 60, 30, 80, 40, 120, 60, 90, 45, 70, 35, 110, 55, 130, 65, 150, 75, 140, 70])
    after = [None if k % 2 == 0 else str(k - 1) for k in range(20)]
    wl = Workload.from_arrays(p, o, ids=[str(k) for k in range(20)], after=after)
    model = ud._LearnedFollowUps(wl.precedence, np.full(20, 138.0))
    assert np.allclose(model.revise(), 138.0)  # nothing finished: the prior
    for k in range(0, 12):
        model.observe(k, o[k])
    est = model.revise()
    # finished requests carry their truth; unfinished level-1 steps of finished roots are near o
    assert np.array_equal(est[:12], o[:12].astype(float))
    for r in (13, 15, 17, 19):
        model.observe(r - 1, o[r - 1])
    est = model.revise()
    for r in (13, 15, 17, 19):
        blend = 2.0 / (6 + 2.0)  # six level-1 steps finished: the prior's weight
        assert est[r] == pytest.approx(blend * 138.0 + (1 - blend) * o[r], rel=1e-6)


def test_truth_at_ready_reveals_only_ready_steps():
    wl = _chains(6, seed=3)
    truth = wl.output_tokens.astype(float)
    prior = np.full(len(wl), 77.0)
    model = ud._TruthAtReady(wl.precedence, prior, truth, noise=0.0)
    model.observe(0, truth[0])  # chain 0's solve ends: its verify is ready, its revise is not
    est = model.revise()
    assert est[0] == truth[0] and est[1] == truth[1] and est[2] == 77.0
    assert np.all(est[3:] == 77.0)


@pytest.mark.parametrize("model, noise", [("learned", 0.0), ("truth", 0.25)])
def test_revising_hybrid_serves_every_request_in_dag_order(model, noise):
    wl = _chains(25, seed=5)
    problem = Problem.single(wl, "llama-65b", clients=8)
    est = BucketQuantileEstimator().fit(workloads.gsm8k("train")).predict(wl)
    policy = ud._revising_hybrid(model, noise)
    res = run_policy(problem, policy, estimates=est)
    assert np.all(np.isfinite(res.done_s))
    assert res.generated_tokens == wl.total_output_tokens
    e = wl.precedence.edges
    assert np.all(res.prefill_start_s[e[:, 1]] >= res.done_s[e[:, 0]] - 1e-9)
    # the estimates were revised during the run: the queue's work estimates moved off the prior
    assert not np.allclose(policy.requests.work_est, est)


def test_true_total_area_rescales_and_restores():
    rng = np.random.default_rng(0)
    p, o = rng.integers(20, 200, 60), rng.integers(1, 400, 60)
    wl = Workload.from_arrays(p, o)
    problem = Problem.single(wl, "llama-65b", clients=8, kv_capacity_tokens=8192, kv_block_tokens=16)
    original = memory_schedulers.estimated_kv_areas
    from lloptim.runtime.policy import RunContext
    ctx = RunContext(problem, o * 2.0, False, np.zeros(8, dtype=np.int64))
    with ud.true_total_area():
        assert memory_schedulers.estimated_kv_areas is not original
        areas = memory_schedulers.estimated_kv_areas(ctx, 0)
    assert memory_schedulers.estimated_kv_areas is original
    assert areas.sum() == pytest.approx(float(decode_area_tokens(p, o, 16).sum()))
    # proportional to the estimated areas (only the total is corrected)
    est_areas = original(ctx, 0)
    assert np.allclose(areas / est_areas, areas[0] / est_areas[0])
