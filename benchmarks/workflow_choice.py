"""The opt-in choice of the workflow dispatch's chain pacing by simulation: what ``K`` candidates buy and cost.

``hybrid_policy(order_candidates=K)`` on workflows present at time 0 with known lengths
(:class:`lloptim.runtime.order_choice.SimulatedWorkflowChoice`) simulates the hybrid with the
first ``K`` variants of :data:`~lloptim.runtime.order_choice.WORKFLOW_VARIANTS` (scales of the
chain pacing's batch limits; with ``plan_paced`` off after the eighth) at set-up and runs the one
of the shortest simulated makespan: with known lengths the run *is* that simulation, never longer
than the default's. This script measures, on the chain study of ``benchmarks/workflows.py``
(``--configs chains``: 60, 100 and 200 three-step chains and 60 five-step chains on 2 x 20
clients, 100 on 4 x 10, 150 on 3 x 20, 100 on a fleet with one instance 1.5 times slower; the
KV cache out of the way), the mean and worst gap to the bound without migration for each ``K``,
how often the default was kept, and the wall time of a run including its simulations (on this
machine, under whatever load it has).

Seeds: report 1-10 (those of the chain study) and, held out, 120-124 (never iterated on).

Run: ``python benchmarks/workflow_choice.py [--candidates 1,4,8] [--seeds 1-10] [--held-out 120-124]
[--configs 0,1,...]`` (about 15 minutes on a quiet 2-core machine); rows in
``benchmarks/results/workflow_choice.csv`` (only for the default grid).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import int_ranges, write_csv  # noqa: E402
from workflows import CONFIGS, make_problem  # noqa: E402

from lloptim import lower_bound, run_policy, workloads  # noqa: E402
from lloptim.runtime.hybrid import hybrid_policy  # noqa: E402

DEFAULTS = {"candidates": "1,4,8", "seeds": "1-10", "held_out": "120-124", "configs": "all"}


def _label(case: dict) -> str:
    where = f"{case['workflows']} chains{', depth ' + str(case['depth']) if case.get('depth') else ''}, " \
            f"{case['instances']} x {case['clients']}"
    return where + (f" (one {case['slow']:g}x slower)" if case.get("slow", 1.0) != 1.0 else "")


def run(case: dict, seed: int, ks: list[int]) -> list[dict]:
    """The hybrid with each ``K`` on one chain case: gap, variant kept, simulations, wall time."""
    wl = workloads.workflows("chain", case["workflows"], seed=seed, depth=case.get("depth"))
    problem = make_problem(wl, case["clients"], case["instances"], case.get("slow", 1.0))
    bound = lower_bound(problem, migration=False).total_s
    rows = []
    for k in ks:
        policy = hybrid_policy(order_candidates=k)
        t = time.perf_counter()
        res = run_policy(problem, policy)
        wall = time.perf_counter() - t
        choice = policy.requests.workflow_choice
        makespan = float(np.nanmax(res.done_s))
        rows.append({"case": _label(case), "seed": seed, "candidates": k, "gap": makespan / bound - 1.0,
                     "makespan_s": makespan, "bound_s": bound,
                     "variant_kept": 0 if choice is None or choice.chosen is None else choice.chosen,
                     "simulated": 0 if choice is None else len(choice.tried), "wall_s": wall})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", default=DEFAULTS["candidates"], help="values of K, comma-separated")
    ap.add_argument("--seeds", default=DEFAULTS["seeds"], help="report seeds, e.g. 1-10 or 1,4,7")
    ap.add_argument("--held-out", default=DEFAULTS["held_out"], help="held-out seeds ('' for none)")
    ap.add_argument("--configs", default=DEFAULTS["configs"],
                    help="indices into the chain study's cases (0-6, comma-separated) or 'all'")
    args = ap.parse_args()
    ks = [int(k) for k in args.candidates.split(",")]
    cases = CONFIGS["chains"] if args.configs == "all" else [CONFIGS["chains"][i] for i in int_ranges(args.configs)]
    sets = {"report": int_ranges(args.seeds), "held-out": int_ranges(args.held_out)}
    print("hybrid on chains at time 0, known lengths: gap to the bound without migration (mean / worst), "
          "cases where the default was kept, wall seconds per run (mean)")
    print(f"{'case':<38}{'seeds':<10}" + "".join(f"{'K = ' + str(k):>28}" for k in ks))
    rows: list[dict] = []
    t0 = time.perf_counter()
    for case in cases:
        for name, seeds in sets.items():
            if not seeds:
                continue
            got = [r for seed in seeds for r in run(case, seed, ks)]
            rows += [{"seeds": name, **r} for r in got]
            cells = []
            for k in ks:
                mine = [r for r in got if r["candidates"] == k]
                g = 100 * np.array([r["gap"] for r in mine])
                kept = sum(r["variant_kept"] == 0 for r in mine)
                cells.append(f"{g.mean():.2f} / {g.max():.2f} %, {kept}/{len(g)}, "
                             f"{np.mean([r['wall_s'] for r in mine]):.1f} s")
            print(f"{_label(case):<38}{name:<10}" + "".join(f"{c:>28}" for c in cells), flush=True)
    for name in sets:
        mine = [r for r in rows if r["seeds"] == name]
        if mine:
            print(f"all cases, {name}: " + ", ".join(
                f"K = {k} {100 * np.mean([r['gap'] for r in mine if r['candidates'] == k]):.2f} %" for k in ks))
    print(f"{len(rows)} runs in {time.perf_counter() - t0:.0f} s")
    given = {"candidates": args.candidates, "seeds": args.seeds, "held_out": args.held_out, "configs": args.configs}
    write_csv("workflow_choice.csv", rows, partial=given != DEFAULTS)


if __name__ == "__main__":
    main()
