"""The torch backend calibrated from its own serving steps (the engines' fit, shared)."""

from __future__ import annotations

import numpy as np
import pytest

from lloptim.calibrate import fit_steps
from lloptim.errors import SpecError
from lloptim.hardware import LatencyModel


def _steps(lat: LatencyModel, seed: int = 0, noise: float = 0.0):
    """Prefill, decode and mixed steps of many shapes priced by ``lat`` as the simulator prices them."""
    rng = np.random.default_rng(seed)
    kind = np.repeat([0, 1, 2], 60)
    tok = np.where(kind == 1, 0, rng.integers(8, 600, kind.size))
    dec = np.where(kind == 0, 0, rng.integers(1, 40, kind.size))
    kv = np.where(kind == 0, 0, dec * rng.integers(20, 400, kind.size))
    t = np.where(kind == 0, lat.prefill_base_s + lat.prefill_per_token_s * tok,
                 lat.decode_base_s + lat.decode_per_seq_s * dec + lat.decode_per_kv_token_s * kv
                 + lat.prefill_per_token_s * tok)
    return kind, t * rng.lognormal(0, noise, t.size), tok, dec, kv


def test_fit_steps_recovers_the_model_that_priced_them():
    lat = LatencyModel(2e-3, 4e-5, 5e-3, 3e-4, 2e-7)
    cal = fit_steps(*_steps(lat), clock="cpu")
    for name in ("prefill_base_s", "prefill_per_token_s", "decode_base_s", "decode_per_seq_s", "decode_per_kv_token_s"):
        assert getattr(cal.latency, name) == pytest.approx(getattr(lat, name), rel=0.05), name
    assert cal.clock == "cpu" and cal.r2_prefill > 0.99 and cal.r2_decode > 0.99
    noisy = fit_steps(*_steps(lat, seed=1, noise=0.05))
    assert noisy.extra["step_median_rel_error"] < 0.1


def test_fit_steps_refuses_too_little():
    with pytest.raises(SpecError, match="no engine steps"):
        fit_steps([], [], [], [], [])
    kind, t, tok, dec, kv = _steps(LatencyModel(2e-3, 4e-5, 5e-3, 3e-4, 2e-7))
    with pytest.raises(SpecError, match="cannot pin"):
        fit_steps(kind[kind == 1], t[kind == 1], tok[kind == 1], dec[kind == 1], kv[kind == 1])


@pytest.mark.torch
def test_calibrate_serving_fits_the_steps_the_backend_ran():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from lloptim.backends.models import load_model
    from lloptim.calibrate import calibrate_serving, calibration_workload

    torch.set_num_threads(1)
    model = load_model("tiny-llama", device="cpu")
    cal, runs = calibrate_serving(model, clients=4, workload=calibration_workload(16), clock="cpu", warmup=False)
    assert len(runs) == 3 and all(np.all(np.isfinite(r.done_s)) for r in runs)
    # every iteration the runs traced was fitted (none of zero time on the cpu clock is likely)
    assert cal.extra["steps"] <= sum(len(r.trace_kind) for r in runs)
    assert cal.extra["steps"] >= 0.9 * sum(len(r.trace_kind) for r in runs)
    assert {p.kind for p in cal.points} >= {"prefill", "decode", "mixed"}
    lat = cal.latency
    assert lat.prefill_time(64) > 0 and lat.decode_time(4, 256) > 0 and cal.clock == "cpu"
