"""Swap against recompute preemption on the memory-bound workloads with unknown output lengths.

The workloads of ``benchmarks/memory.py`` (1000 requests, prompts uniform in [20, 200], outputs
lognormal with median 100 and ``sigma`` in {1.0, 1.2, 1.5}; one llama-65b instance, 40 clients, a
paged cache of 16-token blocks sized so that memory binds at ``rho`` in {1.0, 1.4, 2.0}); the
policies see the true lengths times lognormal noise of sigma 0.5, so they admit too much and the
engine preempts. Each workload runs under the hybrid and the vLLM / Sarathi peers with
``preemption="recompute"`` (vLLM's default) and ``"swap"`` (the victims' caches go to a host swap
space as large as the KV cache and come back at 13.1 us per token each way, the llama-65b
profile's stated ``kv_swap_per_token_s``; recompute when the space is full).

Seeds 0-2 (the report seeds of ``memory.py``) and 7-9 (held out: never looked at while building
swap) are reported apart. Per rho and policy: the mean and worst gap to the memory-aware bound
under each mode, the tokens recomputed (percent of all output tokens) under recompute, and under
swap the tokens swapped out and the copies' share of the makespan. ``--swap-space TOKENS`` bounds
the host space instead (victims beyond it are recomputed). Writes
``benchmarks/results/memory_swap.csv`` (``memory_swap_<TOKENS>.csv`` with ``--swap-space``).

Run: ``python benchmarks/memory_swap.py [--jobs 2] [--sigmas 1.2] [--seeds 0 1 2 7 8 9] [--swap-space 2048]
[--policies hybrid vllm]`` (all of it: 324 runs, 5.6 minutes on 2 workers of a loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_csv  # noqa: E402
from memory import BLOCK, CLIENTS, NOISE, RHOS, SIGMAS, _Inline, capacity_for, memory_workload  # noqa: E402

from lloptim import Problem, run_policy, summarize  # noqa: E402
from lloptim.runtime.estimators import noisy_estimates  # noqa: E402

POLICIES = ("hybrid", "vllm", "sarathi")  # hybrid-fused runs as the hybrid here (fused once memory binds)
MODES = ("recompute", "swap")
REPORT_SEEDS = (0, 1, 2)
HELD_OUT_SEEDS = (7, 8, 9)


def run_case(task: tuple) -> list[dict]:
    """Every policy under both preemption modes on one workload."""
    sigma, rho, seed, space, policies = task
    wl = memory_workload(sigma, seed)
    cap = capacity_for(wl, rho)
    problem = Problem.single(wl, "llama-65b", clients=CLIENTS, kv_capacity_tokens=cap, kv_block_tokens=BLOCK)
    est = noisy_estimates(wl, NOISE, seed=seed)
    rows = []
    for name in policies:
        for mode in MODES:
            t = time.perf_counter()
            res = run_policy(problem, name, estimates=est, preemption=mode,
                             swap_space_tokens=space if mode == "swap" else None)
            m = summarize(res)
            rows.append({"sigma": sigma, "rho": rho, "seed": seed, "kv_capacity": cap, "policy": name,
                         "preemption": mode, "makespan_s": m.makespan_s, "bound_s": m.lower_bound_s,
                         "gap": m.gap_to_bound, "preemptions": m.preemptions,
                         "swap_space_tokens": space if mode == "swap" else "",
                         "recomputed_tokens": m.recomputed_tokens, "swapped_out_tokens": m.swapped_out_tokens,
                         "swap_s": m.swap_s, "output_tokens": m.output_tokens, "wall_s": time.perf_counter() - t})
    return rows


def _report(rows: list[dict], seeds: tuple, label: str, policies) -> None:
    print(f"\n{label} (seeds {', '.join(map(str, seeds))}; {len({r['sigma'] for r in rows})} sigma(s) each)")
    print("| rho | policy | recompute gap mean / worst | swap gap mean / worst | recomputed % of output "
          "| swapped % of output | swap time % of makespan |")
    print("|---|---|---|---|---|---|---|")
    for rho in RHOS:
        for p in policies:
            sel = {m: [r for r in rows if r["rho"] == rho and r["policy"] == p and r["seed"] in seeds
                       and r["preemption"] == m] for m in MODES}
            if not sel["recompute"]:
                continue
            g = {m: [100 * r["gap"] for r in sel[m]] for m in MODES}
            rec = np.mean([100 * r["recomputed_tokens"] / r["output_tokens"] for r in sel["recompute"]])
            swp = np.mean([100 * r["swapped_out_tokens"] / r["output_tokens"] for r in sel["swap"]])
            share = np.mean([100 * r["swap_s"] / r["makespan_s"] for r in sel["swap"]])
            print(f"| {rho} | {p} | {np.mean(g['recompute']):.2f} % / {max(g['recompute']):.2f} % "
                  f"| {np.mean(g['swap']):.2f} % / {max(g['swap']):.2f} % | {rec:.0f} % | {swp:.0f} % | {share:.2f} % |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS), help="output sigmas (default: all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(REPORT_SEEDS + HELD_OUT_SEEDS))
    ap.add_argument("--swap-space", type=int, default=None,
                    help="host swap space per instance, KV tokens (default: the size of the KV cache)")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), help="policies to run")
    args = ap.parse_args()
    t0 = time.perf_counter()
    tasks = [(s, rho, seed, args.swap_space, args.policies) for s in args.sigmas for rho in RHOS for seed in args.seeds]
    with ProcessPoolExecutor(args.jobs) if args.jobs > 1 else _Inline() as pool:
        rows = [r for rs in pool.map(run_case, tasks) for r in rs]
    name = "memory_swap.csv" if args.swap_space is None else f"memory_swap_{args.swap_space}.csv"
    full = set(args.sigmas) >= set(SIGMAS) and set(args.seeds) >= set(REPORT_SEEDS + HELD_OUT_SEEDS)
    write_csv(name, rows, partial=not full)
    report = tuple(s for s in args.seeds if s in REPORT_SEEDS)
    held = tuple(s for s in args.seeds if s not in REPORT_SEEDS)
    if report:
        _report(rows, report, "report seeds", args.policies)
    if held:
        _report(rows, held, "held-out seeds", args.policies)
    print(f"\n{len(rows)} runs, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
