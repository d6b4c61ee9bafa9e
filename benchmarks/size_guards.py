"""Calibration of the size guards (``lloptim.guards``): measured vs estimated time and memory.

Runs each case of a grid in a fresh process (``spawn``), measures the wall time of the run and the
peak resident memory it adds (``ru_maxrss`` after the run minus the resident memory before the
workload is built), and prints them beside what ``lloptim.guards`` estimates from the sizes. Then
it fits the engine's coefficients by non-negative least squares on relative error
(``scipy.optimize.nnls`` with every row divided by the measurement) and prints the fit next to
the coefficients in ``lloptim/guards.py``, which were set from this output as an envelope (at or
above every measured run for memory; the fit is a mean). The last run is kept in
``benchmarks/results/size_guards.txt``.

The grid covers the workload classes the guards must handle: GSM8K, light- and heavy-tailed
synthetic workloads, Poisson arrivals below and above capacity, many clients (up to 10^6), many
instances (up to 128) and a mixed fleet; the greedy start of a solve with ``--gap 0``; and the
price LP of a mixed fleet.

Run: ``python benchmarks/size_guards.py [--quick]`` (about 2 minutes on 2 cores; ``--quick``: a
third of the grid). The ratio columns are estimate / measurement: the guards need them within a
factor of a few, and above 1 rather than below for memory.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import numpy as np

CASES = [
    # (label, workload kwargs, clients per instance, instances, policies)
    ("gsm8k-test", {"gsm8k": "test"}, 40, 1, ("baseline", "hybrid", "vllm", "sarathi")),
    ("synthetic 10k", {"n": 10_000}, 100, 1, ("baseline", "hybrid", "vllm", "sarathi")),
    ("heavy tail 10k", {"n": 10_000, "sigma": 1.5, "max_tokens": 4096}, 100, 1, ("baseline", "hybrid", "sarathi")),
    ("synthetic 100k", {"n": 100_000}, 1000, 1, ("baseline", "hybrid")),
    ("poisson 20k, 20/s", {"n": 20_000, "arrival_rate": 20.0}, 40, 1, ("baseline", "hybrid", "vllm")),
    ("poisson 20k, 500/s", {"n": 20_000, "arrival_rate": 500.0}, 40, 1, ("baseline", "hybrid")),
    ("gsm8k, 100k clients", {"gsm8k": "test"}, 100_000, 1, ("baseline", "hybrid")),
    ("gsm8k, 1M clients", {"gsm8k": "test"}, 1_000_000, 1, ("baseline", "hybrid")),
    ("gsm8k, 16 instances", {"gsm8k": "test"}, 40, 16, ("baseline", "hybrid")),
    ("gsm8k, 64 instances", {"gsm8k": "test"}, 40, 64, ("baseline", "hybrid")),
    ("gsm8k, 128 instances", {"gsm8k": "test"}, 40, 128, ("baseline", "hybrid")),
    ("mixed fleet 10k", {"n": 10_000, "mixed": True}, 50, 4, ("baseline", "hybrid")),
]
QUICK = ("gsm8k-test", "synthetic 100k", "poisson 20k, 20/s", "gsm8k, 1M clients", "gsm8k, 64 instances")
SOLVES = [(20_000, 40), (50_000, 40), (100_000, 40), (20_000, 8)]
PRICE_LPS = [(500, 80), (1000, 80), (2000, 80)]


def _rss_now() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _problem(wl: dict, clients: int, instances: int):
    from dataclasses import replace

    from lloptim import Problem, workloads
    from lloptim.problem import Instance

    if "gsm8k" in wl:
        w = workloads.gsm8k(wl["gsm8k"])
    else:
        w = workloads.synthetic(wl["n"], seed=1, sigma=wl.get("sigma", 0.5), max_tokens=wl.get("max_tokens", 1024),
                                arrival_rate=wl.get("arrival_rate"))
    base = Instance.from_profile("llama-65b", clients, 10**9)
    insts = []
    for k in range(instances):
        prof = base.profile
        if wl.get("mixed") and k % 2:
            prof = replace(prof, latency=prof.latency.scaled(1.5, 1.5))
        insts.append(Instance(prof, clients, 10**9, f"i{k}"))
    return Problem(w, tuple(insts))


def _measure_run(args) -> dict:
    wl, clients, instances, policy = args
    from lloptim import Problem, run_policy, workloads

    run_policy(Problem.single(workloads.gsm8k("test", limit=64), clients=8), policy)  # imports and caches
    before = _rss_now()
    problem = _problem(wl, clients, instances)
    t = time.perf_counter()
    res = run_policy(problem, policy)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"wall_s": wall, "peak_bytes": max(peak, 0.0), "iterations": int(res.trace_kind.size)}


def _measure_solve(args) -> dict:
    n, clients = args
    from lloptim import Problem, workloads
    from lloptim.solvers import SolveParams, solve

    problem = Problem.single(workloads.synthetic(n, seed=1), clients=clients, kv_capacity_tokens=10**9)
    before = _rss_now()
    t = time.perf_counter()
    solve(problem, "greedy", SolveParams(rel_gap=0.0, time_limit_s=20))
    return {"wall_s": time.perf_counter() - t,
            "peak_bytes": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, 0.0)}


def _in_fresh_process(fn, args, timeout_s: float = 300.0) -> dict | None:
    """``fn(args)`` in a new process; None when it takes longer than ``timeout_s`` (then it is killed)."""
    with mp.get_context("spawn").Pool(1) as pool:
        try:
            return pool.apply_async(fn, (args,)).get(timeout=timeout_s)
        except mp.TimeoutError:
            return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a third of the grid")
    args = ap.parse_args()
    from scipy.optimize import nnls

    from lloptim import guards

    rows = []
    print(f"{'case':22s} {'policy':9s} {'iters':>8s} {'est':>8s}  {'wall s':>8s} {'est s':>8s} {'ratio':>6s}"
          f"  {'MiB':>8s} {'est MiB':>8s} {'ratio':>6s}")
    for label, wl, clients, instances, policies in CASES:
        if args.quick and label not in QUICK:
            continue
        size = guards.RunSize.of(_problem(wl, clients, instances))
        est = guards.simulation_cost(size)
        for policy in policies:
            m = _in_fresh_process(_measure_run, (wl, clients, instances, policy))
            if m is None:
                print(f"{label:22s} {policy:9s} timed out (300 s); estimated {est.seconds:.1f} s", flush=True)
                continue
            rows.append((size, m))
            print(f"{label:22s} {policy:9s} {m['iterations']:>8,d} {size.iterations():>8,.0f}  {m['wall_s']:>8.3f} "
                  f"{est.seconds:>8.3f} {est.seconds / m['wall_s']:>6.2f}  {m['peak_bytes'] / 2**20:>8.1f} "
                  f"{est.memory_bytes / 2**20:>8.1f} {est.memory_bytes / max(m['peak_bytes'], 1):>6.2f}", flush=True)
    # fit: time = a it + b R + c C + d m + e it m (m - 1); memory = alpha it + beta R + gamma C + delta m
    feats = np.array([[s.iterations(), s.requests, s.clients, s.instances,
                       s.iterations() * s.instances * (s.instances - 1)] for s, _ in rows], dtype=float)
    wall = np.array([m["wall_s"] for _, m in rows])
    peak = np.array([max(m["peak_bytes"], 2**20) for _, m in rows])
    coef_t, _ = nnls(feats / wall[:, None], np.ones(len(rows)))
    mfeats = np.column_stack([np.ones(len(rows)), feats[:, :4]])
    coef_m, _ = nnls(mfeats / peak[:, None], np.ones(len(rows)))
    names = ("iteration", "request", "client", "instance", "idle_scan")
    print("\nengine time, seconds per unit:   fit " + ", ".join(f"{n} {c:.2e}" for n, c in zip(names, coef_t)))
    print("                             guards " + ", ".join(f"{n} {guards.ENGINE_TIME_S[n]:.2e}" for n in names))
    mnames = ("base",) + names[:4]
    print("engine memory, bytes per unit:   fit " + ", ".join(f"{n} {c:,.0f}" for n, c in zip(mnames, coef_m)))
    print("                             guards " + ", ".join(f"{n} {guards.ENGINE_BYTES[n]:,}" for n in mnames))
    print("(the fit is a mean; the guards' memory coefficients are an envelope: at or above every measured run)")
    # the case study: seconds per case against the estimate
    t = time.perf_counter()
    from lloptim.experiments import case_study

    case_study(6, progress=False)
    per_case = (time.perf_counter() - t) / 6
    print(f"\ncase study: {per_case:.3f} s per case measured, {guards.case_study_cost(1).seconds:.3f} s estimated")
    # the greedy start of a solve with --gap 0
    from lloptim import Problem, workloads

    print(f"\n{'greedy start, gap 0':22s} {'MiB':>8s} {'est MiB':>8s} {'ratio':>6s}")
    for n, clients in SOLVES[:2] if args.quick else SOLVES:
        m = _in_fresh_process(_measure_solve, (n, clients))
        if m is None:
            print(f"{n:>9,d} requests x {clients:<4d} timed out", flush=True)
            continue
        est = guards.solve_cost(Problem.single(workloads.synthetic(n, seed=1), clients=clients,
                                               kv_capacity_tokens=10**9), rel_gap=0.0)
        print(f"{n:>9,d} requests x {clients:<4d} {m['peak_bytes'] / 2**20:>8.1f} {est.memory_bytes / 2**20:>8.1f} "
              f"{est.memory_bytes / max(m['peak_bytes'], 1):>6.2f}", flush=True)
    # the price LP of a mixed fleet (HiGHS, requests x clients columns)
    print(f"\n{'price LP, mixed fleet':22s} {'wall s':>8s} {'est s':>8s} {'ratio':>6s}")
    for n, clients in PRICE_LPS[:1] if args.quick else PRICE_LPS:
        m = _in_fresh_process(_measure_price_lp, (n, clients))
        if m is None:
            print(f"{n:>9,d} requests x {clients:<4d} timed out", flush=True)
            continue
        est = guards.solve_cost(_problem({"n": n, "mixed": True}, clients // 2, 2)).seconds
        print(f"{n:>9,d} requests x {clients:<4d} {m['wall_s']:>8.2f} {est:>8.2f} {est / m['wall_s']:>6.2f}",
              flush=True)


def _measure_price_lp(args) -> dict:
    n, clients = args
    from lloptim.formulations.binpacking import binpacking_data
    from lloptim.formulations.lp_bound import lp_prices

    problem = _problem({"n": n, "mixed": True}, clients // 2, 2)
    data = binpacking_data(problem)
    t = time.perf_counter()
    lp_prices(data)
    return {"wall_s": time.perf_counter() - t}


if __name__ == "__main__":
    main()
