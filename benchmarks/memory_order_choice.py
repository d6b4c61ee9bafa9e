"""The opt-in choice among start orders by simulation: what ``K`` candidate orders buy and cost.

``hybrid_policy(order_candidates=K)`` (:class:`lloptim.runtime.order_choice.SimulatedOrderChoice`)
simulates the hybrid with ``K`` start orders before its first dispatch (the default golden-ratio
spread and ``K - 1`` phase shifts of it) and runs the one of the shortest simulated makespan. With
known lengths the run *is* that simulation, so it is never longer than the default order's. This
script measures, on the 1000-request workloads of ``benchmarks/memory.py`` (one llama-65b instance,
40 clients, paged 16-token blocks, known lengths; ``hybrid-fused``), the mean and worst gap to the
memory-aware (fused) bound for each ``K``, how often the default order was kept, and the wall
time of a run including its simulations (on this machine, under whatever load it has).

Workloads: rho 1.0 (where clients and memory bind together and orders differ most), report seeds
0-2 at sigma 1.0 / 1.2 / 1.5 and, held out, seeds 7-12 at sigma 1.1 / 1.3; ``--rhos`` adds others.

Run: ``python benchmarks/memory_order_choice.py [--candidates 1,2,4,8] [--rhos 1.0] [--quick]``
(about 10 minutes; ``--quick``: sigma 1.2, seed 0); rows in
``benchmarks/results/memory_order_choice.csv``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_csv  # noqa: E402
from memory import BLOCK, CLIENTS, capacity_for, memory_workload  # noqa: E402

from lloptim import Problem, run_policy, summarize  # noqa: E402
from lloptim.runtime.hybrid import hybrid_policy  # noqa: E402

REPORT = [(s, seed) for s in (1.0, 1.2, 1.5) for seed in (0, 1, 2)]
HELD_OUT = [(s, seed) for s in (1.1, 1.3) for seed in range(7, 13)]


def case(sigma: float, seed: int, rho: float, k: int) -> dict:
    """One run of ``hybrid-fused`` with ``k`` candidate orders: its gap, the phase kept, its wall time."""
    wl = memory_workload(sigma, seed)
    problem = Problem.single(wl, "llama-65b", clients=CLIENTS, kv_capacity_tokens=capacity_for(wl, rho),
                             kv_block_tokens=BLOCK)
    policy = hybrid_policy(fused=True, order_candidates=k)
    t = time.perf_counter()
    res = run_policy(problem, policy)
    wall = time.perf_counter() - t
    planner = policy.requests.memory.planner
    chosen = getattr(planner, "chosen", None)
    return {"sigma": sigma, "seed": seed, "rho": rho, "candidates": k, "gap": summarize(res).gap_to_bound,
            "makespan_s": float(np.nanmax(res.done_s)), "phase_kept": 0.0 if chosen is None else chosen,
            "simulated": len(getattr(planner, "tried", [])), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", default="1,2,4,8", help="values of K, comma-separated")
    ap.add_argument("--rhos", default="1.0", help="memory steps over client steps of the cache, comma-separated")
    ap.add_argument("--quick", action="store_true", help="sigma 1.2, seed 0 only")
    args = ap.parse_args()
    ks = [int(k) for k in args.candidates.split(",")]
    sets = {"report": REPORT[3:4] if args.quick else REPORT, "held-out": [] if args.quick else HELD_OUT}
    rows = []
    for rho in (float(r) for r in args.rhos.split(",")):
        print(f"\nrho {rho}: hybrid-fused, known lengths, gap to the fused bound (mean / worst), "
              "workloads where the default order was kept, wall seconds per run (mean)")
        print(f"{'workloads':<16}" + "".join(f"{'K = ' + str(k):>30}" for k in ks))
        for name, cases in sets.items():
            if not cases:
                continue
            got = {k: [case(s, seed, rho, k) for s, seed in cases] for k in ks}
            for k in ks:
                rows += [{"workloads": name, **r} for r in got[k]]
            cells = []
            for k in ks:
                g = 100 * np.array([r["gap"] for r in got[k]])
                kept = sum(r["phase_kept"] == 0.0 for r in got[k])
                wall = np.mean([r["wall_s"] for r in got[k]])
                cells.append(f"{g.mean():.2f} / {g.max():.2f} %, {kept}/{len(g)}, {wall:.1f} s")
            print(f"{name + ' (' + str(len(cases)) + ')':<16}" + "".join(f"{c:>30}" for c in cells), flush=True)
    default = (args.candidates, args.rhos, args.quick) == ("1,2,4,8", "1.0", False)
    write_csv("memory_order_choice.csv", rows, partial=not default)


if __name__ == "__main__":
    main()
