"""The same model in lloptim, linopy and OR-Tools MathOpt: build time, solve time, gap.

The model is the docs' example: the GSM8K bin packing (1319 requests, weights = seconds of client
time on llama-65b) on two instances of ``clients/2`` clients each, with two side constraints:
requests with a prompt over 100 tokens only on instance 0 (``eligible``), at most 10 requests per
client of instance 1 (``cap``). Each tool builds it its own idiomatic way and solves it with HiGHS
(no MIP start, the same time limit and relative gap), in a fresh process (OR-Tools and highspy
each bring their own HiGHS and cannot share a process in this order). The code is the docs'
side-by-side page's, ``docs/snippets/side_by_side/<tool>_model.py``. A tool that is not installed
is skipped (``pip install linopy ortools pyomo`` into a virtual environment to compare; they are
not lloptim dependencies).

Columns: ``build s`` (from data to a complete model object), ``solve s`` (the solve call, handing
the model to HiGHS included), ``objective``/``bound`` (seconds of makespan) and ``gap``, and the
peak memory of the process or of a child it ran the solver in (lloptim's HiGHS, for a time-limited
model of this size).

Run: ``python benchmarks/modeling_side_by_side.py [--clients 200] [--time-limit 20] [--tools lloptim,linopy]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import resource
import time
from pathlib import Path

import numpy as np

TOOLS = ("lloptim", "linopy", "mathopt", "cvxpy", "pyomo")
SNIPPETS = Path(__file__).resolve().parents[1] / "docs" / "snippets" / "side_by_side"
RESULTS = Path(__file__).resolve().parent / "results" / "modeling_side_by_side.csv"


def data(clients: int):
    from lloptim import Problem, workloads
    from lloptim.formulations.binpacking import binpacking_data

    problem = Problem.single(workloads.gsm8k("test"), clients=clients // 2, instances=2)
    w = binpacking_data(problem).w
    return w, problem.workload.prompt_tokens, problem.client_instance()


def load_snippet(tool: str):
    """The module ``docs/snippets/side_by_side/<tool>_model.py`` (``build``, ``solve``, ``load_duals``)."""
    path = SNIPPETS / f"{tool}_model.py"
    spec = importlib.util.spec_from_file_location(f"side_by_side_{tool}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _child(tool, args, conn):
    w, prompt, inst = data(args.clients)
    mod = load_snippet(tool)
    t0 = time.perf_counter()
    model = mod.build(w, prompt, inst, cap=10)
    t1 = time.perf_counter()
    out = mod.solve(model, args.time_limit)
    t2 = time.perf_counter()
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    conn.send((t1 - t0, t2 - t1, out["objective"], out["bound"], out["status"], peak / 1024))
    conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--time-limit", type=float, default=20.0)
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, from " + ", ".join(TOOLS))
    ap.add_argument("--csv", type=Path, default=RESULTS, help="write the rows here (the docs page reads them)")
    args = ap.parse_args()
    rows = []
    need = {"lloptim": "lloptim", "linopy": "linopy", "mathopt": "ortools", "cvxpy": "cvxpy", "pyomo": "pyomo"}
    print(f"bin packing + eligibility + caps: 1319 requests x {args.clients} clients, HiGHS, "
          f"time limit {args.time_limit:g} s, rel gap 1e-4")
    print(f"{'tool':>8s} {'build s':>8s} {'solve s':>8s} {'objective':>10s} {'bound':>10s} {'gap %':>7s} "
          f"{'peak MiB':>9s}  status")
    ctx = mp.get_context("spawn")
    for tool in args.tools.split(","):
        if importlib.util.find_spec(need[tool]) is None:
            print(f"{tool:>8s} skipped: {need[tool]} is not installed")
            continue
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(tool, args, child))
        proc.start()
        child.close()  # only the child writes: recv() raises EOFError if it dies
        try:
            build, solve, obj, bound, status, peak = parent.recv()
        except EOFError:
            print(f"{tool:>8s} failed (exit code {proc.exitcode})")
            continue
        finally:
            proc.join()
        if obj is None or bound is None or not np.isfinite(obj):
            print(f"{tool:>8s} {build:>8.2f} {solve:>8.2f} {'none':>10s} {'-':>10s} {'-':>7s} {peak:>9,.0f}  {status}")
            rows.append([tool, build, solve, "", "", "", peak, status])
            continue
        gap = abs(obj - bound) / abs(obj) if obj else float("nan")
        print(f"{tool:>8s} {build:>8.2f} {solve:>8.2f} {obj:>10.4f} {bound:>10.4f} {100 * gap:>7.4f} "
              f"{peak:>9,.0f}  {status}")
        rows.append([tool, build, solve, obj, bound, gap, peak, status])
    if args.csv:
        import csv
        import os

        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["tool", "build_s", "solve_s", "objective_s", "bound_s", "gap", "peak_mib", "status",
                         "requests", "clients", "time_limit_s", "load_average"])
            load = f"{os.getloadavg()[0]:.1f}"
            for r in rows:
                wr.writerow(r + [1319, args.clients, args.time_limit, load])
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
