"""Scale benchmark: simulator and offline solves up to 100k requests x 1,000 clients, and the case study on Ray.

For each size (requests x clients: 1k x 10, 10k x 100, 50k x 500, 100k x 1000; synthetic lognormal
workloads, ``Problem.single(wl, "llama-65b", clients=C, kv_capacity_tokens=10**7)``) and each tool

* ``simulate``: ``run_policy(problem, "baseline")`` (the discrete-event simulator, no solver),
* ``greedy``: ``solve(problem, "greedy")`` (LPT + local search, with its lower bound),
* ``lagrangian``: ``solve(problem, "lagrangian")``,
* ``workflows`` (only with ``--tools``): ``run_policy(problem, "hybrid")`` on random layered DAG
  workflows (``workloads.workflows("dag", requests / 10)``, about ten requests each) arriving as a
  Poisson process at about the fleet's capacity (``clients / 110`` workflows per second), on a
  mixed fleet of four instances of ``clients / 4`` clients each: two LLaMA-65B, one 1.5 times
  slower, one with a 0.6x prefill and a 1.6x decode (the workflow plan, its revisions as
  workflows arrive and the chain pacing are what it times),

* ``fleet-arrivals`` (only with ``--tools``; its own sizes, :data:`FLEET_SIZES`, and table): the
  ``scale`` case of ``benchmarks/stress_flow.py`` (heavy-tailed requests arriving as a Poisson
  process at 150 % of the capacity of four instances 1, 1.6, 1 and 2.5 times slower with 64, 40,
  64 and 40 clients), ``run_policy(problem, "sarathi")`` and ``run_policy(problem, "hybrid")`` in
  the same process one after the other; the figures are the hybrid's wall time over Sarathi's and
  the same of their CPU seconds (steadier when other jobs share the machine; the fleet prices' LP,
  its re-solves as requests arrive and start, and the priced dispatch are what it times;
  ``benchmarks/results/scale_fleet_arrivals.csv``),

it measures, in a **fresh subprocess per measurement** (so one run's heap cannot flatter the next;
points under 20 s keep the fastest of ``--repeat`` runs, since load from other processes only adds time):

* wall time of the call, seconds (``time.perf_counter``; the problem is built before the clock starts);
* peak memory of the call, MiB: the process's resident-set high-water mark after the call
  (``getrusage(RUSAGE_SELF).ru_maxrss``) minus its current RSS just before it (``psutil``). This
  counts numpy and C-extension allocations too (tracemalloc would miss solver internals and slow
  the Python loops several-fold); it is a lower bound of the call's own peak if building the
  problem peaked higher, which the ``rss_slack_mb`` column shows (0 or small means exact).

It fits ``log(y) = a + b log(requests)`` for each tool (the log-log slope ``b``: 1 is linear
growth, 2 quadratic), writes ``benchmarks/results/scale.csv`` and ``scale.png`` and prints a table.

Finally it runs the 100-case study (``lloptim.experiments.case_study``, GSM8K-train cases of 1319
requests, baseline vs hybrid) through the local executor and through a local Ray, prints both wall
times, and checks the two give identical results.

Run: ``python benchmarks/scale.py [--quick] [--cases N] [--tools simulate,greedy,lagrangian,workflows,fleet-arrivals]``
(about 4 minutes on 2 cores; ``--quick`` stops at 10k requests and runs 10 cases; ``--tools
fleet-arrivals`` alone about 1 minute, 1k/4k/10k requests, no case study unless ``--cases`` asks).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZES = [(1_000, 10), (10_000, 100), (50_000, 500), (100_000, 1_000)]
TOOLS = ("simulate", "greedy", "lagrangian", "workflows", "fleet-arrivals")
#: Requests of the ``fleet-arrivals`` points (``--quick``: the first two).
FLEET_SIZES = (1_000, 4_000, 10_000)
#: Tools run without ``--tools``.
DEFAULT_TOOLS = ("simulate", "greedy", "lagrangian")
RESULTS = Path(__file__).resolve().parent / "results"

# The measurement, run by `python scale.py --one TOOL N C` in a fresh interpreter.
def measure_one(tool: str, n: int, clients: int, seed: int = 0, time_limit_s: float = 120.0) -> dict:
    """Wall time (s) and peak-RSS increase (MiB) of one tool on one size, in this process."""
    import resource

    import psutil

    from lloptim import Problem, run_policy, workloads

    if tool == "fleet-arrivals":
        return measure_fleet_arrivals(n, seed)
    if tool == "workflows":
        problem = workflow_problem(n, clients, seed)
    else:
        wl = workloads.synthetic(n, seed)
        problem = Problem.single(wl, "llama-65b", clients=clients, kv_capacity_tokens=10**7)
    if tool not in ("simulate", "workflows"):
        from lloptim.solvers import SolveParams, solve  # imported before the clock: not part of the call
    proc = psutil.Process()
    rss_before = proc.memory_info().rss / 2**20
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    t = time.perf_counter()
    if tool in ("simulate", "workflows"):
        res = run_policy(problem, "baseline" if tool == "simulate" else "hybrid", seed=seed)
        detail = {"makespan_s": res.makespan_s, "iterations": int(res.trace_kind.size)}
    else:
        res = solve(problem, tool, params=SolveParams(time_limit_s=time_limit_s))
        detail = {"primal_bound_s": res.primal_bound, "gap": res.gap, "build_s": res.build_s, "solve_s": res.solve_s}
    wall = time.perf_counter() - t
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tool": tool, "requests": n, "clients": clients, "wall_s": wall,
            "peak_delta_mb": max(0.0, maxrss_after - rss_before), "peak_rss_mb": maxrss_after,
            "rss_slack_mb": max(0.0, maxrss_before - rss_before), "status": "ok", **detail}


def fleet_arrivals_problem(n: int, seed: int = 0):
    """The ``scale`` case of ``benchmarks/stress_flow.py`` with ``n`` requests (mixed fleet, 150 % load)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import stress_flow

    stress_flow.SCALE_REQUESTS = n
    (_, problem, _), = stress_flow.arrival_cases("scale", seed, False)
    return problem


def measure_fleet_arrivals(n: int, seed: int = 0) -> dict:
    """Wall times (s) of Sarathi and the hybrid on :func:`fleet_arrivals_problem`, one after the other."""
    from lloptim import run_policy
    from lloptim.runtime.hybrid import hybrid_policy

    problem = fleet_arrivals_problem(n, seed)
    # CPU seconds too: on a machine shared with other jobs the wall times of two runs a few
    # seconds apart see different loads, their CPU times much less so
    c, t = time.process_time(), time.perf_counter()
    sarathi = run_policy(problem, "sarathi")
    sarathi_s, sarathi_cpu_s = time.perf_counter() - t, time.process_time() - c
    pol = hybrid_policy()
    c, t = time.process_time(), time.perf_counter()
    hybrid = run_policy(problem, pol)
    hybrid_s, hybrid_cpu_s = time.perf_counter() - t, time.process_time() - c
    prices = pol.requests.fleet
    lp = getattr(prices, "_lp", None)
    return {"tool": "fleet-arrivals", "requests": n, "clients": problem.n_clients, "status": "ok",
            "sarathi_s": sarathi_s, "hybrid_s": hybrid_s, "ratio": hybrid_s / sarathi_s,
            "sarathi_cpu_s": sarathi_cpu_s, "hybrid_cpu_s": hybrid_cpu_s, "cpu_ratio": hybrid_cpu_s / sarathi_cpu_s,
            "sarathi_makespan_s": sarathi.makespan_s, "hybrid_makespan_s": hybrid.makespan_s,
            "solves": prices.solves, "shortcuts": getattr(lp, "shortcuts", 0),
            "near_ties": getattr(lp, "restricted", 0)}


def fleet_arrivals(sizes, timeout_s: float, repeat: int) -> None:
    """The ``fleet-arrivals`` table: hybrid vs Sarathi wall time on a mixed fleet under arrivals."""
    print("\nfleet-arrivals: the hybrid against Sarathi on a mixed fleet under arrivals (150 % load);\n"
          "one process per point, both policies in it; ratio = hybrid wall time / Sarathi's,\n"
          "cpu = the same of CPU seconds (steadier on a shared machine)")
    print(f"{'requests':>8s} {'sarathi s':>9s} {'hybrid s':>8s} {'ratio':>5s} {'cpu':>5s} {'solves':>6s} "
          f"{'shortcut':>8s} {'near tie':>8s} {'makespan h/s':>12s}")
    rows = []
    for n in sizes:
        # best CPU ratio of --repeat (load only adds time)
        r = best_of(repeat, lambda: run_isolated("fleet-arrivals", n, 0, timeout_s), "cpu_ratio", "hybrid_s")
        rows.append(r)
        if r["status"] != "ok":
            print(f"{n:>9d}  {r['status']}", flush=True)
            continue
        print(f"{n:>8d} {r['sarathi_s']:>9.2f} {r['hybrid_s']:>8.2f} {r['ratio']:>5.1f} {r['cpu_ratio']:>5.1f} "
              f"{r['solves']:>6d} {r['shortcuts']:>8d} {r['near_ties']:>8d} "
              f"{r['hybrid_makespan_s']:>5.0f}/{r['sarathi_makespan_s']:<6.0f}", flush=True)
    fields = ["requests", "clients", "status", "sarathi_s", "hybrid_s", "ratio", "sarathi_cpu_s", "hybrid_cpu_s",
              "cpu_ratio", "solves", "shortcuts", "near_ties", "sarathi_makespan_s", "hybrid_makespan_s"]
    with open(RESULTS / "scale_fleet_arrivals.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {RESULTS / 'scale_fleet_arrivals.csv'}")


def workflow_problem(n: int, clients: int, seed: int = 0):
    """About ``n`` requests of DAG workflows arriving at about capacity on a mixed fleet of ``clients`` clients."""
    from lloptim import Instance, Problem, load_profile, workloads

    wl = workloads.workflows("dag", max(1, n // 10), seed=seed, arrival_rate=max(clients, 4) / 110.0)
    base = load_profile("llama-65b")
    kinds = [(1.0, 1.0), (1.0, 1.0), (1.5, 1.5), (0.6, 1.6)]
    per = max(1, clients // 4)
    insts = tuple(Instance.from_profile(base.with_latency(base.latency.scaled(pf, dc)), clients=per,
                                        kv_capacity_tokens=10**7, name=f"i{k}") for k, (pf, dc) in enumerate(kinds))
    return Problem(wl, insts, name=f"workflows-{len(wl)}")


def best_of(repeat: int, run, better: str, cost: str) -> dict:
    """The run with the lowest ``better`` of up to ``repeat`` runs (a shared machine's load only adds time).

    Only points that are cheap to redo are repeated: a failed run or one whose ``cost`` exceeds
    20 seconds is kept as it is.
    """
    r = run()
    for _ in range(repeat - 1):
        if r["status"] != "ok" or r[cost] > 20:
            break
        again = run()
        if again["status"] == "ok" and again[better] < r[better]:
            r = again
    return r


def run_isolated(tool: str, n: int, clients: int, timeout_s: float) -> dict:
    """:func:`measure_one` in a fresh interpreter; a failure or timeout becomes a row with its status."""
    cmd = [sys.executable, __file__, "--one", tool, str(n), str(clients)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"tool": tool, "requests": n, "clients": clients, "status": f"timeout>{timeout_s:.0f}s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        err = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"tool": tool, "requests": n, "clients": clients, "status": f"error: {err[:120]}"}
    return json.loads(lines[-1])


def loglog_slope(x, y) -> float:
    """Least-squares slope of log(y) on log(x); nan with fewer than two positive points."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(x, y) if a > 0 and b and b > 0]
    if len(pts) < 2:
        return float("nan")
    lx, ly = np.array(pts).T
    return float(np.polyfit(lx, ly, 1)[0])


def plot(rows: list[dict], slopes: dict, path: Path) -> None:
    """Log-log wall time and peak memory against requests, one line per tool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for tool in TOOLS:
        ok = [r for r in rows if r["tool"] == tool and r["status"] == "ok"]
        if not ok:
            continue
        x = [r["requests"] for r in ok]
        axes[0].plot(x, [r["wall_s"] for r in ok], "o-", label=f"{tool} (slope {slopes[tool]['time']:.2f})")
        axes[1].plot(x, [max(r["peak_delta_mb"], 0.1) for r in ok], "o-",
                     label=f"{tool} (slope {slopes[tool]['mem']:.2f})")
    for ax, ylab in zip(axes, ("wall time of the call, s", "peak RSS increase, MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("requests (clients = requests / 100)")
        ax.set_ylabel(ylab)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("lloptim scale: synthetic workloads on llama-65b, one process per point")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def case_study_timing(cases: int) -> dict:
    """Wall times of the ``cases``-case study locally and on a local Ray (same results required)."""
    import ray

    from lloptim.distributed import ensure_ray
    from lloptim.experiments import case_study

    t = time.perf_counter()
    local = case_study(cases, executor="local", progress=False)
    t_local = time.perf_counter() - t
    t = time.perf_counter()
    ensure_ray()  # a local Ray with every core; started here so its start-up is timed apart
    t_start = time.perf_counter() - t
    t = time.perf_counter()
    remote = case_study(cases, executor="ray", progress=False)
    t_ray = time.perf_counter() - t
    cpus = int(ray.cluster_resources().get("CPU", 0))
    ray.shutdown()
    return {"cases": cases, "local_s": t_local, "ray_start_s": t_start, "ray_s": t_ray, "ray_cpus": cpus,
            "identical": remote == local, "hybrid_wins": local["hybrid_wins"],
            "mean_utilization_gain": local["mean_utilization_gain"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=3, metavar=("TOOL", "N", "C"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="sizes up to 10k requests, 10 cases")
    ap.add_argument("--cases", type=int, default=None, help="cases of the Ray vs local study (default 100; 0 skips)")
    ap.add_argument("--tools", default=",".join(DEFAULT_TOOLS),
                    help="comma-separated subset of " + ",".join(TOOLS)
                    + " (default: all but workflows and fleet-arrivals)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds allowed per measurement")
    ap.add_argument("--repeat", type=int, default=3,
                    help="keep the fastest of this many fresh-process runs of each point under 20 s (default 3)")
    args = ap.parse_args()
    if args.one:
        tool, n, c = args.one
        print(json.dumps(measure_one(tool, int(n), int(c))))
        return
    tools = [t for t in args.tools.split(",") if t]
    bad = [t for t in tools if t not in TOOLS]
    if bad:
        ap.error(f"unknown tool(s) {bad}; use {list(TOOLS)}")
    sizes = SIZES[:2] if args.quick else SIZES
    only_fleet = tools == ["fleet-arrivals"]
    cases = args.cases if args.cases is not None else (0 if only_fleet else 10 if args.quick else 100)
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    print(f"machine: {os.cpu_count()} cores; one fresh process per point; memory = RSS high-water minus RSS before")
    if "fleet-arrivals" in tools:
        fleet_arrivals(FLEET_SIZES[:2] if args.quick else FLEET_SIZES, args.timeout, args.repeat)
        tools = [t for t in tools if t != "fleet-arrivals"]
    if tools:
        print(f"{'tool':11s} {'requests':>9s} {'clients':>8s} {'wall s':>9s} {'peak +MiB':>10s} {'peak RSS':>9s}  detail")
        rows = []
        for n, c in sizes:
            for tool in tools:
                r = best_of(args.repeat, lambda: run_isolated(tool, n, c, args.timeout), "wall_s", "wall_s")
                rows.append(r)
                if r["status"] != "ok":
                    print(f"{tool:11s} {n:>9d} {c:>8d}  {r['status']}", flush=True)
                    continue
                detail = (f"makespan {r['makespan_s']:.1f} s, {r['iterations']} iterations"
                          if tool in ("simulate", "workflows")
                          else f"gap {r['gap']:.2e}, build {r['build_s']:.2f} s + solve {r['solve_s']:.2f} s")
                print(f"{tool:11s} {n:>9d} {c:>8d} {r['wall_s']:>9.3f} {r['peak_delta_mb']:>10.1f} "
                      f"{r['peak_rss_mb']:>9.1f}  {detail}", flush=True)
        slopes = {}
        for tool in tools:
            ok = [r for r in rows if r["tool"] == tool and r["status"] == "ok"]
            slopes[tool] = {"time": loglog_slope([r["requests"] for r in ok], [r["wall_s"] for r in ok]),
                            "mem": loglog_slope([r["requests"] for r in ok], [r["peak_delta_mb"] for r in ok])}
        print("\nlog-log slopes against requests (clients grow in proportion; 1 = linear):")
        for tool, s in slopes.items():
            print(f"  {tool:11s} time {s['time']:.2f}   memory {s['mem']:.2f}")
        fields = ["tool", "requests", "clients", "wall_s", "peak_delta_mb", "peak_rss_mb", "rss_slack_mb", "status",
                  "makespan_s", "iterations", "primal_bound_s", "gap", "build_s", "solve_s"]
        with open(RESULTS / "scale.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        plot(rows, slopes, RESULTS / "scale.png")
        print(f"wrote {RESULTS / 'scale.csv'} and {RESULTS / 'scale.png'}")
    if cases > 0:
        try:
            cs = case_study_timing(cases)
        except ImportError as exc:
            print(f"\ncase study on Ray skipped: {exc}")
        else:
            print(f"\n{cs['cases']}-case study (1319 requests per case, baseline vs hybrid):")
            print(f"  local executor : {cs['local_s']:.1f} s")
            print(f"  ray executor   : {cs['ray_s']:.1f} s on {cs['ray_cpus']} CPUs "
                  f"(+ {cs['ray_start_s']:.1f} s to start Ray); speed-up {cs['local_s'] / cs['ray_s']:.2f}x")
            print(f"  identical results: {cs['identical']}; hybrid wins {cs['hybrid_wins']}/{cs['cases']}, "
                  f"mean utilization gain {100 * cs['mean_utilization_gain']:.1f} points")
            with open(RESULTS / "scale_cases.json", "w") as f:
                json.dump(cs, f, indent=2)
    print(f"\ntotal benchmark time {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
