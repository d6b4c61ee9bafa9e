"""Shipped GSM8K data, case samplers, synthetic generators, profiles, estimators."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lloptim import load_profile, workloads
from lloptim.errors import ProfileError, SpecError
from lloptim.hardware import save_profile
from lloptim.runtime.estimators import estimate, make_estimator


def test_gsm8k_splits_match_the_shared_data():
    test, train = workloads.gsm8k("test"), workloads.gsm8k("train")
    assert len(test) == 1319 and len(train) == 7473
    assert test.total_output_tokens == 132_872
    assert test.prompt_tokens.mean() == pytest.approx(73.4, abs=0.05)
    assert test.prompt_tokens.max() == 196 and test.output_tokens.max() == 310
    assert test.ids[0] == "gsm8k-test-0"


def test_cases_are_seeded_and_disjoint_within_a_case():
    a = workloads.gsm8k_cases(3, 200, seed=7)
    b = workloads.gsm8k_cases(3, 200, seed=7)
    assert [c.ids for c in a] == [c.ids for c in b]
    assert a[0].ids != a[1].ids
    assert all(len(set(c.ids)) == 200 for c in a)
    assert workloads.gsm8k_case(2, 200, seed=7).ids == a[2].ids
    with pytest.raises(SpecError):
        workloads.gsm8k_case(0, 10_000)


def test_synthetic_is_seeded():
    a, b = workloads.synthetic(500, seed=3, arrival_rate=5.0), workloads.synthetic(500, seed=3, arrival_rate=5.0)
    assert np.array_equal(a.output_tokens, b.output_tokens) and np.all(np.diff(a.arrival_s) >= 0)
    assert a.output_tokens.min() >= 1
    with pytest.raises(SpecError):
        workloads.synthetic(0)


def test_profile_roundtrip_and_fit(tmp_path):
    prof = load_profile("llama-65b")
    assert prof.meta["fit_makespan_s"] == pytest.approx(201.0, abs=1e-6)
    path = save_profile(prof, tmp_path / "p.toml")
    again = load_profile(str(path))
    assert again.latency == prof.latency and again.clients == prof.clients
    (tmp_path / "bad.toml").write_text('name = "x"\nkv_capacity_tokens = 10\nclients = 1\n[latency]\nprefill_base_s = -1\n')
    with pytest.raises(ProfileError):
        load_profile(str(tmp_path / "bad.toml"))


def test_estimators_never_see_the_scheduled_requests():
    train, test = workloads.gsm8k("train"), workloads.gsm8k("test")
    for name in ["mean", "regression", "bucket-quantile"]:
        est = estimate(test, name, train=train)
        assert est.shape == (len(test),) and np.all(est >= 1)
    # a case drawn from train: its own rows are dropped from the training data
    case = workloads.gsm8k_case(0, 300)
    fitted_on_all = make_estimator("mean").fit(train).predict(case)
    own = set(case.ids)
    rest = train.subset(np.array([i for i, x in enumerate(train.ids) if x not in own]))
    assert estimate(case, "mean", train=train)[0] == pytest.approx(rest.output_tokens.mean())
    assert estimate(case, "mean", train=train)[0] != pytest.approx(fitted_on_all[0], rel=1e-12)
    noisy = estimate(test, "noisy", sigma=0.0)
    assert np.array_equal(noisy, test.output_tokens)
    with pytest.raises(SpecError):
        estimate(test, "crystal-ball", train=train)


def test_errors_survive_pickling():
    import pickle

    from lloptim.backends.base import InstanceLost

    err = pickle.loads(pickle.dumps(SpecError("a.b", "is wrong", "fix it")))
    assert isinstance(err, SpecError) and err.field == "a.b" and err.fix == "fix it" and "a.b" in str(err)
    lost = pickle.loads(pickle.dumps(InstanceLost(3, "actor died")))
    assert lost.instance == 3 and "actor died" in str(lost)
    perr = pickle.loads(pickle.dumps(ProfileError("profile", "unknown", "use llama-65b")))
    assert type(perr) is ProfileError


# -- how good the estimates were (metrics and ``simulate``) ------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=3, max_size=60, unique=True), st.floats(0.1, 10.0))
def test_estimate_quality_reads_scale_and_order(truth, scale):
    """Scaled estimates: ratio = the scale, correlation 1; reversed order: correlation -1."""
    from lloptim.runtime.estimators import estimate_quality

    t = np.array(truth, dtype=np.float64)
    ratio, rank = estimate_quality(t, t * scale)
    assert ratio == pytest.approx(scale) and rank == pytest.approx(1.0)
    _, rank = estimate_quality(t, t.max() + 1.0 - t)
    assert rank == pytest.approx(-1.0)
    ratio, rank = estimate_quality(t, np.full(t.size, 7.0))
    assert np.isnan(rank) and ratio == pytest.approx(float(np.median(7.0 / t)))
    with pytest.raises(SpecError, match="one estimate per request"):
        estimate_quality(t, t[:-1])


def test_metrics_report_estimate_quality_only_for_estimates():
    from lloptim import Problem, simulate
    from lloptim.runtime.estimators import training_workload

    problem = Problem.single(workloads.gsm8k("test", limit=120), clients=8)
    assert np.isnan(simulate(problem, "hybrid").estimate_rank_correlation)  # the truth: nothing to grade
    est = estimate(problem.workload, "bucket-quantile", training_workload(problem.workload))
    m = simulate(problem, "hybrid", estimates=est)
    # GSM8K prompts predict GSM8K outputs somewhat (0.3-0.6), and the median forecast is about right
    assert 0.2 < m.estimate_rank_correlation < 0.8 and 0.7 < m.estimate_ratio_median < 1.4


def test_simulate_warns_when_estimates_carry_no_information(tmp_path):
    """Synthetic outputs independent of the prompt: GSM8K-trained buckets rank them at random."""
    import json

    from typer.testing import CliRunner

    from lloptim.cli import app

    spec = tmp_path / "synthetic.toml"
    spec.write_text('[workload]\nsource = "synthetic"\nn = 300\nseed = 3\noutput_median = 150.0\nsigma = 1.1\n'
                    'max_tokens = 2000\n[[instances]]\nclients = 16\nkv_capacity_tokens = 200000\n')
    runner = CliRunner()
    res = runner.invoke(app, ["simulate", str(spec), "-p", "hybrid", "--estimator", "bucket-quantile", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert abs(d["estimate_rank_correlation"]) < 0.2 and d["estimator_train"] == {"name": "gsm8k-train",
                                                                                 "requests": 7473}
    assert "barely informative" in res.stderr and "--train" in res.stderr
    res = runner.invoke(app, ["simulate", str(spec), "-p", "hybrid", "--estimator", "noisy"])
    assert res.exit_code == 0 and "estimates: noisy" in res.stdout and "warning" not in res.stderr
    res = runner.invoke(app, ["simulate", str(spec), "-p", "hybrid", "--json"])
    assert "estimator_train" not in json.loads(res.stdout) and "warning" not in res.stderr
