"""Simulator speed: GSM8K test (1319 requests), synthetic 10k / 100k requests, and fleets.

Prints wall seconds per run and iterations per second for several policies, and the ratio to a
reference measured in the same run (a pure-Python loop of as many heap pushes/pops as the run
has iterations), so the figure is comparable across machines.

The fleet cases (16, 64 and 256 instances of 16 clients, 20k synthetic requests arriving as a
Poisson process at about 60 % of the fleet's decode throughput) exercise the idle instances: every
instance that runs out of work asks when to wake, which must cost O(log m) for m instances, not a
scan of the others (:mod:`lloptim.runtime.clocks`); the iterations per second should not fall much
from 16 to 256 instances.

Run: ``python benchmarks/simulator_speed.py [--big] [--fleet-only]`` (``--big`` adds 100k requests x
1,000 clients).
"""

from __future__ import annotations

import argparse
import heapq
import time

import numpy as np

from lloptim import Problem, run_policy, summarize, workloads


def reference_loop(n: int) -> float:
    """Seconds of ``n`` heap push+pop pairs: the unit the engine's per-iteration cost is compared to."""
    t = time.perf_counter()
    h: list[tuple[int, int]] = []
    for i in range(n):
        heapq.heappush(h, (i * 7919 % 1000, i))
        if len(h) > 64:
            heapq.heappop(h)
    return time.perf_counter() - t


def bench(problem: Problem, policies: list[str]) -> None:
    run_policy(Problem.single(workloads.gsm8k("test", limit=50), clients=4), "hybrid")  # imports, caches
    for name in policies:
        t = time.perf_counter()
        res = run_policy(problem, name)
        wall = time.perf_counter() - t
        m = summarize(res)
        iters = res.trace_kind.size
        ref = reference_loop(iters)
        print(f"{problem.name:28s} {problem.n_requests:>7d} req {problem.n_clients:>5d} cl  {name:9s} "
              f"wall {wall:7.3f} s  iterations {iters:>7d}  {iters / wall:>9.0f} it/s  "
              f"ratio to heap reference {wall / ref:6.1f}x  makespan {m.makespan_s:9.2f} s  util {100 * m.utilization:5.1f} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big", action="store_true", help="also 100k requests x 1,000 clients")
    ap.add_argument("--fleet-only", action="store_true", help="only the fleets of 16 to 256 instances")
    args = ap.parse_args()
    policies = ["baseline", "vllm", "sarathi", "hybrid"]
    if not args.fleet_only:
        bench(Problem.single(workloads.gsm8k("test")), policies)
        bench(Problem.single(workloads.synthetic(10_000, seed=1), clients=100, kv_capacity_tokens=10**6), policies)
    syn = workloads.synthetic(20_000, seed=5)
    for m in (16, 64, 256):
        # Poisson arrivals, mean gap 0.6 / m s: the instances often idle, waiting for the next request
        gaps = np.random.default_rng(0).exponential(0.6 / m, len(syn))
        bench(Problem.single(syn.with_arrivals(gaps.cumsum()), clients=16, instances=m,
                             name=f"poisson-{m}x16"), ["vllm", "hybrid"])
    if args.big:
        bench(Problem.single(workloads.synthetic(100_000, seed=2), clients=1000, kv_capacity_tokens=10**7), policies)


if __name__ == "__main__":
    main()
