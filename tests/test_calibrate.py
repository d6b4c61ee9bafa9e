"""Calibration: NNLS fits of the latency model, and the simulator predicting real runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lloptim.calibrate import fit_decode, fit_prefill
from lloptim.errors import SpecError


def test_fit_prefill_recovers_coefficients():
    tokens = np.array([4, 16, 64, 128, 512])
    a, b, r2 = fit_prefill(tokens, 2e-3 + 1e-5 * tokens)
    assert a == pytest.approx(2e-3, rel=1e-6) and b == pytest.approx(1e-5, rel=1e-6) and r2 == pytest.approx(1.0)


def test_fit_decode_recovers_coefficients_and_stays_non_negative():
    n = np.array([1, 2, 4, 8, 16, 1, 4, 16])
    kv = np.array([10, 40, 80, 300, 900, 200, 20, 2000])
    a, b, c, r2 = fit_decode(n, kv, 1e-3 + 5e-5 * n + 2e-7 * kv)
    assert (a, b, c) == pytest.approx((1e-3, 5e-5, 2e-7), rel=1e-6) and r2 == pytest.approx(1.0)
    # a negative true slope is clipped at 0, never a negative coefficient
    a, b, c, _ = fit_decode(n, kv, 2e-3 - 1e-7 * kv)
    assert min(a, b, c) >= 0


def test_fit_needs_enough_points():
    with pytest.raises(SpecError, match="calibration"):
        fit_decode([1], [10], [1e-3])


@pytest.fixture(scope="module")
def model():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from lloptim.backends.models import load_model

    torch.set_num_threads(1)
    return load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def calibration(model):
    from lloptim.calibrate import calibrate

    # CPU seconds of the serving thread: the same measurement as wall seconds on an idle machine, but
    # immune to other jobs competing for a shared CI runner's cores
    return calibrate(model, prefill_batches=(1, 4), prefill_lengths=(8, 32, 64), decode_batches=(1, 4, 8),
                     decode_contexts=(8, 48), repeats=3, clock="cpu")


@pytest.mark.torch
def test_calibration_fits_and_saves_a_loadable_profile(calibration, tmp_path):
    from lloptim.hardware import load_profile, save_profile
    from lloptim.simulator import simulate
    from lloptim.spec import load_spec

    assert len(calibration.points) == 6 + 6 + 3 + 3  # prefill, decode, transfer and swap (one per prefill length)
    assert calibration.latency.can_transfer and calibration.latency.transfer_time(64) > 0
    assert calibration.latency.can_swap and calibration.latency.swap_time(64) > 0
    assert calibration.mean_rel_error < 0.5
    prof = calibration.to_profile(kv_capacity_tokens=4096, clients=4)
    path = save_profile(prof, tmp_path / "tiny.toml")
    back = load_profile(path)
    assert back.latency == prof.latency and back.clients == 4 and back.kv_capacity_tokens == 4096
    spec = tmp_path / "spec.toml"
    spec.write_text(f'[workload]\nsource = "synthetic"\nn = 20\nprompt_median = 20\noutput_median = 20\n\n'
                    f'[[instances]]\nprofile = "{path}"\n')
    m = simulate(load_spec(spec), "baseline")
    assert m.requests_completed == 20 and m.makespan_s > 0


@pytest.mark.torch
def test_simulator_predicts_a_real_run(calibration, model):
    """The calibrated simulator predicts the measured makespan (tolerance 50 %; measured 5-25 %)."""
    from lloptim import Problem
    from lloptim.backends.torch_backend import TorchBackend
    from lloptim.cli.serve import default_torch_workload
    from lloptim.simulator import run_policy

    problem = Problem.single(default_torch_workload(24), calibration.to_profile(clients=6), clients=6)
    predicted = run_policy(problem, "baseline").makespan_s
    measured = [run_policy(problem, "baseline", backend=TorchBackend(problem, model, clock="cpu")).makespan_s for _ in range(3)]
    rel = abs(predicted - float(np.median(measured))) / float(np.median(measured))
    assert rel < 0.5, (predicted, measured)


@pytest.mark.torch
def test_cpu_clock_needs_one_thread_on_cpu(model):
    import torch

    from lloptim import Problem, Workload
    from lloptim.backends.torch_backend import TorchBackend
    from lloptim.hardware import HardwareProfile, LatencyModel

    prof = HardwareProfile("t", LatencyModel(1e-3, 1e-5, 1e-3, 1e-5, 1e-7), 1024, 1)
    problem = Problem.single(Workload.from_arrays([4], [2]), prof)
    with pytest.raises(SpecError, match="clock"):
        TorchBackend(problem, model, clock="sundial")
    torch.set_num_threads(2)
    try:
        with pytest.raises(SpecError, match="one torch thread"):
            TorchBackend(problem, model, clock="cpu")
    finally:
        torch.set_num_threads(1)


@pytest.mark.torch
def test_cli_calibrate_json_writes_profile(tmp_path, model):
    from typer.testing import CliRunner

    from lloptim.cli import app
    from lloptim.hardware import load_profile

    out = tmp_path / "cal.toml"
    res = CliRunner().invoke(app, ["calibrate", "--backend", "torch", "--model", "tiny-llama", "--device", "cpu",
                                   "--out", str(out), "--json", "--repeats", "2", "--prefill-batches", "1,2",
                                   "--prefill-lengths", "8,32", "--decode-batches", "1,4", "--decode-contexts",
                                   "8,32", "--clients", "3", "--kv-capacity", "2048"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert set(d["latency"]) == {"prefill_base_s", "prefill_per_token_s", "decode_base_s", "decode_per_seq_s",
                                 "decode_per_kv_token_s", "kv_transfer_base_s", "kv_transfer_per_token_s",
                                 "kv_swap_per_token_s"}
    assert {p["kind"] for p in d["points"]} == {"prefill", "decode", "transfer", "swap"}
    assert "r2_prefill" in d and len(d["points"]) == 8 + 2 + 2 and d["profile_path"] == str(out)
    prof = load_profile(out)
    assert prof.clients == 3 and prof.kv_capacity_tokens == 2048


@pytest.mark.torch
def test_cli_calibrate_bad_grid_is_a_user_error(model):
    from typer.testing import CliRunner

    from lloptim.cli import app

    res = CliRunner().invoke(app, ["calibrate", "--prefill-batches", "a,b"])
    assert res.exit_code == 2 and "--prefill-batches" in res.output
