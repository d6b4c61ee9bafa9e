"""
Calibrate and load a hardware profile
=====================================

The simulator prices every iteration with a :class:`~lloptim.hardware.LatencyModel`: five
coefficients of a linear model (:doc:`/concepts`). To simulate *your* hardware, measure iteration
times, fit the coefficients by non-negative least squares, save them as a profile, and load the
profile in a spec or in Python.

We first do the fit by hand on synthetic measurements (to see exactly what is fitted), then let
:func:`lloptim.calibrate.calibrate` measure a real model, the built-in ``tiny-llama``, when torch
is installed.
"""

# %%
# Measurements
# ------------
# Stand-in for a benchmark: a "true" model of some GPU plus 3 % multiplicative noise. Prefills are
# measured over total prompt tokens; decodes over the batch size and the KV tokens held.
import tempfile
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

import lloptim
from lloptim.hardware import ITERATION_COEFFICIENTS, HardwareProfile, LatencyModel, save_profile

rng = np.random.default_rng(0)
truth = LatencyModel(prefill_base_s=0.012, prefill_per_token_s=6e-5, decode_base_s=0.025,
                     decode_per_seq_s=2.5e-4, decode_per_kv_token_s=4e-7)

prefill_tokens = np.array([b * n for b in (1, 2, 4, 8, 16) for n in (16, 64, 256)], dtype=float)
prefill_s = np.array([truth.prefill_time(t) for t in prefill_tokens]) * rng.lognormal(0, 0.03, prefill_tokens.size)

batch = np.array([b for b in (1, 4, 8, 16, 32) for _ in (64, 256, 512)], dtype=float)
kv = np.array([b * c for b in (1, 4, 8, 16, 32) for c in (64, 256, 512)], dtype=float)
decode_s = np.array([truth.decode_time(b, k) for b, k in zip(batch, kv)]) * rng.lognormal(0, 0.03, batch.size)

# %%
# Fit by non-negative least squares
# ---------------------------------
# Coefficients must be non-negative, and short and long iterations should count alike, so each row
# is divided by its measured time (relative residuals), as :mod:`lloptim.calibrate` does.
def fit(columns, seconds):
    a = np.column_stack(columns)
    x, _ = nnls(a / seconds[:, None], np.ones_like(seconds))
    return [float(v) for v in x]  # plain floats: the profile is written to TOML


p_base, p_tok = fit([np.ones_like(prefill_tokens), prefill_tokens], prefill_s)
d_base, d_seq, d_kv = fit([np.ones_like(batch), batch, kv], decode_s)
fitted = LatencyModel(prefill_base_s=p_base, prefill_per_token_s=p_tok, decode_base_s=d_base,
                      decode_per_seq_s=d_seq, decode_per_kv_token_s=d_kv)
for name in ITERATION_COEFFICIENTS:
    print(f"{name:22s} true {getattr(truth, name):.3e}  fitted {getattr(fitted, name):.3e}")

# %%
# Save, load, simulate
# --------------------
# A profile adds the KV-cache capacity (tokens) and the number of clients. It is a small TOML file;
# :func:`~lloptim.hardware.load_profile` reads it back, and a spec names it in ``[[instances]] profile``.
profile = HardwareProfile(name="my-gpu", latency=fitted, kv_capacity_tokens=16384, clients=32,
                          description="NNLS fit of synthetic timings (tutorial)")
folder = Path(tempfile.mkdtemp())
path = save_profile(profile, folder / "my-gpu.profile.toml")
print(path.read_text())

loaded = lloptim.load_profile(path)
assert loaded.latency == profile.latency

problem = lloptim.Problem.single(lloptim.workloads.gsm8k("test"), loaded)
for policy in ("baseline", "hybrid"):
    m = lloptim.simulate(problem, policy)
    print(f"{policy:8s} on my-gpu: makespan {m.makespan_s:7.2f} s, utilization {100 * m.utilization:5.1f} %")

spec = lloptim.load_spec(text=f"""
[workload]
source = "gsm8k"
split = "test"

[[instances]]
profile = "{path.as_posix()}"
count = 2
""")
print(f"two replicas: {spec.n_clients} clients, baseline makespan {lloptim.simulate(spec).makespan_s:.2f} s")

# %%
# How good is the fit?
# --------------------
import matplotlib.pyplot as plt

fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.3), constrained_layout=True)
a1.plot(prefill_tokens, 1e3 * prefill_s, "o", label="measured")
grid = np.linspace(0, prefill_tokens.max(), 50)
a1.plot(grid, [1e3 * fitted.prefill_time(t) for t in grid], "-", label="fitted")
a1.set_xlabel("prompt tokens in the prefill")
a1.set_ylabel("ms")
a1.set_title("prefill")
a1.legend()
pred = np.array([fitted.decode_time(b, k) for b, k in zip(batch, kv)])
a2.plot(1e3 * decode_s, 1e3 * pred, "o")
lim = [0, 1e3 * decode_s.max() * 1.05]
a2.plot(lim, lim, "k--", lw=1)
a2.set_xlabel("measured decode (ms)")
a2.set_ylabel("fitted decode (ms)")
a2.set_title("decode")

# %%
# On a real model
# ---------------
# :func:`lloptim.calibrate.calibrate` times the torch backend's own ``prefill`` and ``decode`` over
# a grid (the code a real run executes), keeps the median of repeated measurements and fits the
# same five coefficients. ``tiny-llama`` is a built-in two-layer LLaMA with random weights that runs
# on a CPU in well under a second per grid. A model this small is dominated by Python overheads, and
# on a shared machine wall-clock times mostly measure the other processes: the fit is then noise
# (R^2 below 0). So this calibration uses the ``"cpu"`` clock, the CPU seconds of the serving thread
# (one torch thread), which other processes do not inflate; calibrate with the clock you will run
# with (``lloptim run --clock cpu``). ``r2_*`` and ``mean_rel_error`` say how far to trust the
# profile. The command-line equivalent is ``lloptim calibrate --backend torch --model tiny-llama
# --clock cpu --threads 1``.
import importlib.util

if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
    print("torch and transformers are not installed here (pip install lloptim[torch]); skipping")
else:
    import torch

    from lloptim.calibrate import calibrate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the cpu clock times one thread
    try:
        cal = calibrate("tiny-llama", device="cpu", prefill_batches=(1, 4), prefill_lengths=(16, 128),
                        decode_batches=(1, 8, 32), decode_contexts=(16, 128), repeats=5, warmup=2, clock="cpu")
    finally:
        torch.set_num_threads(threads)
    print(f"{len(cal.points)} grid points in {cal.wall_s:.1f} s; R^2 prefill {cal.r2_prefill:.3f}, "
          f"decode {cal.r2_decode:.3f}; mean |relative error| {100 * cal.mean_rel_error:.1f} %")
    tiny = cal.to_profile("tiny-llama-cpu")
    print(tiny.latency)
    tiny_path = save_profile(tiny, folder / "tiny-llama-cpu.profile.toml")
    small = lloptim.Problem.single(lloptim.workloads.gsm8k("test", limit=200), lloptim.load_profile(tiny_path))
    print(f"GSM8K test[:200] on tiny-llama (simulated): baseline {lloptim.simulate(small).makespan_s:.2f} s, "
          f"hybrid {lloptim.simulate(small, 'hybrid').makespan_s:.2f} s")
