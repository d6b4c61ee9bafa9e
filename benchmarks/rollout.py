"""Rollout: re-choosing the hybrid's dispatch variant during the run by simulation, what it buys and costs.

``hybrid_policy(rollout_epochs=N, rollout_candidates=K)`` (:class:`lloptim.runtime.order_choice.Rollout`)
re-chooses, when 1/(N+1), ..., N/(N+1) of the requests have been handed out, the dispatch's
variant by simulating the rest of the run (replayed from time 0) under ``K`` candidates: the
current one and the unstarted requests' planned order at ``K - 1`` phases where memory binds, the
chain pacings of :data:`~lloptim.runtime.order_choice.WORKFLOW_VARIANTS` on workflows. With known
lengths the run is the last simulation kept, never longer than without rollout. This script
compares, per workload, the hybrid without any choice, with the start-order choice
(``order_candidates``), with rollout, and with both, by the mean gap to the bound and the
simulations and wall seconds per run (this machine, whatever its load):

* ``memory``: the 1000-request workloads of ``benchmarks/memory.py`` (one llama-65b instance, 40
  clients, paged 16-token blocks, known lengths; ``hybrid-fused``; gap to the memory-aware fused
  bound): rho 1.0, report cases (``--seeds``, sigma 1.0 / 1.2 / 1.5; default seed 0) as in
  ``benchmarks/memory_order_choice.py``, held-out seeds (``--held-out``, sigma 1.1 / 1.3; default
  200-209), and ``--rhos`` for others. About 20 minutes on a loaded 2-core machine.
* ``chains``: the chain study of ``benchmarks/workflow_choice.py`` (``hybrid``; gap to the bound
  without migration), report seeds 1-3 and held-out seeds 200-201. About 5 minutes.

Run: ``python benchmarks/rollout.py memory|chains [--seeds ...] [--held-out ...] [--rhos 1.0]
[--configs all] [--variants default,start4,rollout,both]``; rows in
``benchmarks/results/rollout_<what>.csv`` (only for the default grid).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import int_ranges, write_csv  # noqa: E402
from memory import BLOCK, CLIENTS, capacity_for, memory_workload  # noqa: E402
from workflows import CONFIGS, make_problem  # noqa: E402

from lloptim import Problem, lower_bound, run_policy, summarize, workloads  # noqa: E402
from lloptim.runtime.hybrid import hybrid_policy  # noqa: E402

#: The policies compared: hybrid options (rollout_epochs, rollout_candidates, order_candidates).
VARIANTS = {"default": {}, "start4": {"order_candidates": 4}, "start10": {"order_candidates": 10},
            "rollout": {"rollout_epochs": 3, "rollout_candidates": 4},
            "rollout8": {"rollout_epochs": 3, "rollout_candidates": 8},
            "both": {"order_candidates": 4, "rollout_epochs": 3, "rollout_candidates": 4}}
DEFAULTS = {"memory": {"seeds": "0", "held_out": "200-209", "rhos": "1.0", "configs": "all",
                       "variants": "default,start4,start10,rollout,both"},
            "chains": {"seeds": "1-3", "held_out": "200-201", "rhos": "1.0", "configs": "all",
                       "variants": "default,start4,start10,rollout,rollout8,both"}}


def _run(problem: Problem, opts: dict, bound_s: float | None, **base) -> dict:
    policy = hybrid_policy(**base, **opts)
    t = time.perf_counter()
    res = run_policy(problem, policy)
    wall = time.perf_counter() - t
    makespan = float(np.nanmax(res.done_s))
    gap = summarize(res).gap_to_bound if bound_s is None else makespan / bound_s - 1.0
    rollout = policy.requests.rollout
    start = [getattr(policy.requests.memory.planner, "tried", []), getattr(policy.requests.workflow_choice, "tried", [])]
    sims = (0 if rollout is None else rollout.simulations) + sum(len(t) for t in start)
    return {"gap": gap, "makespan_s": makespan, "simulated": sims, "wall_s": wall,
            "switches": 0 if rollout is None else len(rollout.switches)}


def memory_cases(seeds, held_out, rhos):
    """(set, label, problem, bound None, base options) of the memory workloads."""
    for rho in rhos:
        for name, sigmas, chosen in (("report", (1.0, 1.2, 1.5), seeds), ("held-out", (1.1, 1.3), held_out)):
            for sigma in sigmas:
                for seed in chosen:
                    wl = memory_workload(sigma, seed)
                    problem = Problem.single(wl, "llama-65b", clients=CLIENTS, kv_capacity_tokens=capacity_for(wl, rho),
                                             kv_block_tokens=BLOCK)
                    yield f"rho {rho:g} {name}", f"sigma {sigma} seed {seed}", problem, None, {"fused": True}


def chain_cases(seeds, held_out, configs):
    """(set, label, problem, bound without migration, base options) of the chain study."""
    for case in configs:
        where = f"{case['workflows']} chains{', depth ' + str(case['depth']) if case.get('depth') else ''}, " \
                f"{case['instances']} x {case['clients']}" + (f" ({case['slow']:g}x)" if case.get("slow", 1.0) != 1.0 else "")
        for name, chosen in (("report", seeds), ("held-out", held_out)):
            for seed in chosen:
                wl = workloads.workflows("chain", case["workflows"], seed=seed, depth=case.get("depth"))
                problem = make_problem(wl, case["clients"], case["instances"], case.get("slow", 1.0))
                yield f"chains {name}", f"{where} seed {seed}", problem, lower_bound(problem, migration=False).total_s, {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("memory", "chains"))
    ap.add_argument("--seeds")
    ap.add_argument("--held-out")
    ap.add_argument("--rhos", help="memory: memory steps over client steps of the cache, comma-separated")
    ap.add_argument("--configs", help="chains: indices into the chain study's cases or 'all'")
    ap.add_argument("--variants", help=f"comma-separated among {list(VARIANTS)}")
    args = ap.parse_args()
    given = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in DEFAULTS[args.what].items()}
    names = given["variants"].split(",")
    if args.what == "memory":
        cases = memory_cases(int_ranges(given["seeds"]), int_ranges(given["held_out"]),
                             [float(r) for r in given["rhos"].split(",")])
    else:
        chosen = CONFIGS["chains"] if given["configs"] == "all" else [CONFIGS["chains"][i] for i in int_ranges(given["configs"])]
        cases = chain_cases(int_ranges(given["seeds"]), int_ranges(given["held_out"]), chosen)
    print(f"gap to the bound in % (simulations, wall s) per variant: {names}")
    rows: list[dict] = []
    t0 = time.perf_counter()
    for group, label, problem, bound, base in cases:
        got = {n: _run(problem, VARIANTS[n], bound, **base) for n in names}
        rows += [{"set": group, "case": label, "variant": n, **r} for n, r in got.items()]
        print(f"{group:<18}{label:<38}" + "".join(
            f"{n} {100 * r['gap']:.2f} ({r['simulated']}, {r['wall_s']:.1f})  " for n, r in got.items()), flush=True)
    print()
    for group in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == group]
        cells = []
        for n in names:
            g = 100 * np.array([r["gap"] for r in mine if r["variant"] == n])
            wall = np.mean([r["wall_s"] for r in mine if r["variant"] == n])
            cells.append(f"{n} {g.mean():.2f} / {g.max():.2f} % ({wall:.1f} s)")
        print(f"{group} ({len(mine) // len(names)}): " + ", ".join(cells))
    print(f"{len(rows)} runs in {time.perf_counter() - t0:.0f} s")
    write_csv(f"rollout_{args.what}.csv", rows, partial=given != DEFAULTS[args.what])


if __name__ == "__main__":
    main()
