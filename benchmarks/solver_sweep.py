"""Sweep bin-packing sizes across the solver backends; write a CSV and a PNG to benchmarks/results/.

Sizes go from 200 requests x 8 clients to 10,000 x 1,000 (GSM8K train samples up to 7,473 requests,
``lloptim.workloads.synthetic`` beyond). Weights are :func:`lloptim.work.request_work_s` (seconds).
Every backend runs with a time limit and ``always_run`` (so the MIP backends search even when the
greedy incumbent is already proven within the gap) in a fresh process (``lloptim compare``'s local
executor, so peak memory is per run). CBC is skipped where the memory guard refuses the model; the
refusal is recorded. Whole sweep: about 8 minutes on 2 cores.

Run::

    python benchmarks/solver_sweep.py [--time-limit 10] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from lloptim import Problem, workloads
from lloptim.cli.solve import local_executor
from lloptim.solvers import SolveParams, available_solvers

RESULTS = Path(__file__).parent / "results"
SIZES = [(200, 8), (1319, 40), (1319, 200), (5000, 500), (10_000, 1000)]
SOLVERS = ["greedy", "lagrangian", "highs", "cbc", "cvxpy"]


def make_problem(n: int, clients: int) -> Problem:
    """``n`` requests (GSM8K test/train, synthetic beyond 7,473) on one llama-65b instance of ``clients``."""
    if n == 1319:
        wl = workloads.gsm8k("test")
    elif n <= 7473:
        wl = workloads.gsm8k_cases(1, n, seed=0, split="train")[0]
    else:
        wl = workloads.synthetic(n, seed=0)
    # the sweep is about the bin packing: give the KV cache room for any number of clients
    return Problem.single(wl, clients=clients, kv_capacity_tokens=10**8, name=f"{n}x{clients}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=10.0, help="seconds per backend run")
    ap.add_argument("--quick", action="store_true", help="two smallest sizes only")
    args = ap.parse_args()
    sizes = SIZES[:2] if args.quick else SIZES
    solvers = [s for s in SOLVERS if s in available_solvers()]
    params = SolveParams(time_limit_s=args.time_limit, solver_options={"always_run": True})
    rows = []
    t0 = time.perf_counter()
    for n, c in sizes:
        problem = make_problem(n, c)
        tasks = [(problem, s, params) for s in solvers]
        for row in local_executor(tasks):
            row.update(requests=n, clients=c)
            rows.append(row)
            gap = "-" if row.get("gap") is None else f"{100 * row['gap']:.4f} %"
            tot = "-" if row.get("solve_s") is None else f"{row['build_s'] + row['solve_s']:.2f}"
            print(f"{n:>6} x {c:<5} {row['backend']:<11} {row['status']:<9} gap {gap:>11}  "
                  f"obj {row.get('primal_bound') or float('nan'):10.4f}  bound {row.get('dual_bound') or float('nan'):10.4f}  "
                  f"time {tot:>7} s  peak {row.get('peak_mem_mb') or 0:7.0f} MiB  {row.get('error') or ''}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    keys = ["requests", "clients", "backend", "status", "limit", "primal_bound", "dual_bound", "gap", "build_s",
            "solve_s", "peak_mem_mb", "error"]
    with open(RESULTS / "solver_sweep.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    plot(rows, RESULTS / "solver_sweep.png", args.time_limit)
    print(f"sweep took {time.perf_counter() - t0:.0f} s; wrote {RESULTS / 'solver_sweep.csv'} and .png")


def plot(rows: list[dict], path: Path, time_limit: float) -> None:
    """Gap and wall time per backend against the number of binaries (requests x clients)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in sorted({r["backend"] for r in rows}):
        rs = [r for r in rows if r["backend"] == name and r.get("gap") is not None]
        if not rs:
            continue
        x = [r["requests"] * r["clients"] for r in rs]
        ax1.plot(x, [max(r["gap"], 1e-7) * 100 for r in rs], "o-", label=name)
        ax2.plot(x, [r["build_s"] + r["solve_s"] for r in rs], "o-", label=name)
        ax3.plot(x, [r["peak_mem_mb"] for r in rs], "o-", label=name)
    for ax, title in ((ax1, "gap to bound, % (floor 1e-5 %)"), (ax2, f"wall time, s (limit {time_limit:g} s)"),
                      (ax3, "peak RSS of the run, MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("binaries (requests x clients)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend()
    fig.suptitle("lloptim bin packing: backends across sizes (GSM8K / synthetic, llama-65b weights)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
