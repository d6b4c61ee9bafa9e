"""Build speed of the modeling layer: the GSM8K bin packing (1319 requests x 200 clients) and larger.

Times, median of ``--repeat`` runs (seconds):

* ``model``: ``lloptim.Model`` calls (variables, the ``assign`` and ``load`` families, the
  eligibility and per-client cap families, the objective);
* ``compile``: turning it into the matrix form backends consume (``Model.compile``);
* ``reference``: building the same matrix with numpy + ``scipy.sparse.coo_matrix`` directly (the
  floor: what index arithmetic by hand costs), so the ratio is comparable across machines.

Target: model + compile of the 1319 x 200 bin packing well under 0.5 s.

Run: ``python benchmarks/modeling_build.py [--big] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp

import lloptim
from lloptim import Problem, workloads


def build(w: np.ndarray, prompt: np.ndarray, inst: np.ndarray, side: bool) -> lloptim.Model:
    """The bin packing, with the two side constraints of the docs' example when ``side``."""
    R, C = w.size, inst.size
    m = lloptim.Model("binpacking")
    x = m.add_variables("x", coords={"request": R, "client": C}, binary=True)
    T = m.add_variables("T")
    m.add_constraints("assign", x.sum("client") == 1)
    m.add_constraints("load", (w[:, None] * x).sum("request") <= T)
    if side:
        m.add_constraints("eligible", x[prompt > 100][:, inst != 0] == 0)
        m.add_constraints("cap", x[:, inst == 1].sum("request") <= 10)
    m.minimize(T)
    return m


def reference(w: np.ndarray, C: int) -> sp.csr_matrix:
    """The assign + load rows by hand: COO triplets in global column indices."""
    R = w.size
    cols = np.arange(R * C)
    rows = np.r_[np.repeat(np.arange(R), C), R + np.tile(np.arange(C), R), R + np.arange(C)]
    vals = np.r_[np.ones(R * C), np.repeat(w, C), -np.ones(C)]
    return sp.coo_matrix((vals, (rows, np.r_[cols, cols, np.full(C, R * C)])), shape=(R + C, R * C + 1)).tocsr()


def median_time(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", action="store_true", help="also 5000 requests x 500 clients (2.5M binaries)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    cases = [(1319, 200, 2)]
    if args.big:
        cases.append((5000, 500, 5))
    print(f"{'size':>12s} {'side':>5s} {'columns':>10s} {'nnz':>10s} {'model s':>8s} {'compile s':>9s} "
          f"{'total s':>8s} {'reference s':>11s} {'ratio':>6s}")
    for R, C, n_inst in cases:
        wl = workloads.gsm8k("test") if R <= 1319 else workloads.synthetic(R, seed=0)
        problem = Problem.single(wl, clients=C // n_inst, instances=n_inst)
        w = problem.workload.output_tokens.astype(float)
        prompt = problem.workload.prompt_tokens
        inst = problem.client_instance()
        ref_s, _ = median_time(lambda: reference(w, C), args.repeat)
        for side in (False, True):
            model_s, m = median_time(lambda: build(w, prompt, inst, side), args.repeat)
            comp_s, lm = median_time(lambda: (m._changed(), m.compile())[1], args.repeat)
            total = model_s + comp_s
            print(f"{R:>6d} x {C:<4d} {str(side):>5s} {lm.n_cols:>10,d} {lm.nnz:>10,d} {model_s:>8.3f} {comp_s:>9.3f} "
                  f"{total:>8.3f} {ref_s:>11.3f} {total / ref_s:>6.1f}")


if __name__ == "__main__":
    main()
