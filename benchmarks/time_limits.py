"""Are time limits honoured? Every backend on the GSM8K bin packing at 1319 x 200, search forced.

For each backend and limit, one solve in a fresh process (``lloptim compare``'s executor, so the
memory figure is that backend's alone) with ``always_run=True`` and ``rel_gap=0`` (the search never
ends early). Prints the wall time of the whole ``solve`` call (start heuristic, model, loading,
search, reading back), whether it is within the promise (``limit * 1.1 + 1 s``), the split, the
status, the gap and the peak memory (CBC's child process included).

Run: ``python benchmarks/time_limits.py [--limits 5,20] [--solvers highs,cbc,cvxpy,lagrangian,greedy]``
(about ``sum(limits) * len(solvers)`` seconds plus start-up).
"""

from __future__ import annotations

import argparse

from lloptim import Problem, workloads
from lloptim.cli.solve import local_executor
from lloptim.solvers import SolveParams, available_solvers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limits", default="5,20", help="comma-separated time limits, seconds")
    ap.add_argument("--solvers", default="highs,cbc,cvxpy,lagrangian,greedy")
    ap.add_argument("--clients", type=int, default=200)
    args = ap.parse_args()
    problem = Problem.single(workloads.gsm8k("test"), clients=args.clients)
    solvers = [s for s in args.solvers.split(",") if s in available_solvers()]
    limits = [float(v) for v in args.limits.split(",")]
    tasks = [(problem, s, SolveParams(time_limit_s=lim, rel_gap=0.0, always_run=True)) for lim in limits for s in solvers]
    rows = local_executor(tasks)
    print(f"{problem.n_requests} requests x {problem.n_clients} clients, always_run, rel_gap 0")
    print(f"{'backend':>10s} {'limit s':>7s} {'wall s':>7s} {'ok':>3s} {'start s':>7s} {'build s':>7s} {'solve s':>7s} "
          f"{'status':>9s} {'limit':>6s} {'gap %':>7s} {'peak MiB':>9s}")
    for (_, s, params), r in zip(tasks, rows):
        lim = params.time_limit_s
        if r.get("status") == "error":
            print(f"{s:>10s} {lim:>7.0f} error: {r.get('error')}")
            continue
        wall = r["total_s"]
        ok = "yes" if wall <= 1.1 * lim + 1.0 else "NO"
        print(f"{s:>10s} {lim:>7.0f} {wall:>7.2f} {ok:>3s} {r['start_s']:>7.2f} {r['build_s']:>7.2f} {r['solve_s']:>7.2f} "
              f"{r['status']:>9s} {r['limit']:>6s} {100 * r['gap']:>7.4f} {r['peak_mem_mb']:>9,.0f}")


if __name__ == "__main__":
    main()
