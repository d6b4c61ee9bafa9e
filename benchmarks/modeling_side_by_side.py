"""The same model in lloptim, linopy and OR-Tools MathOpt: build time, solve time, gap.

The model is the docs' example: the GSM8K bin packing (1319 requests, weights = seconds of client
time on llama-65b) on two instances of ``clients/2`` clients each, with two side constraints:
requests with a prompt over 100 tokens only on instance 0 (``eligible``), at most 10 requests per
client of instance 1 (``cap``). Each tool builds it its own idiomatic way and solves it with HiGHS
(no MIP start, the same time limit and relative gap), in a fresh process. A tool that is not
installed is skipped (``pip install linopy ortools`` into a virtual environment to compare; they
are not lloptim dependencies).

Columns: ``build s`` (from data to a complete model object), ``solve s`` (the solve call, handing
the model to HiGHS included), ``objective``/``bound`` (seconds of makespan) and ``gap``, and the
process's peak memory.

Run: ``python benchmarks/modeling_side_by_side.py [--clients 200] [--time-limit 20] [--gap 1e-4]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import resource
import time

import numpy as np

TOOLS = ("lloptim", "linopy", "mathopt")


def data(clients: int):
    from lloptim import Problem, workloads
    from lloptim.formulations.binpacking import binpacking_data

    problem = Problem.single(workloads.gsm8k("test"), clients=clients // 2, instances=2)
    w = binpacking_data(problem).w
    return w, problem.workload.prompt_tokens, problem.client_instance()


def run_lloptim(w, prompt, inst, time_limit, gap):
    import lloptim

    t0 = time.perf_counter()
    m = lloptim.Model("side")
    x = m.add_variables("x", coords={"request": w.size, "client": inst.size}, binary=True)
    T = m.add_variables("T")
    m.add_constraints("assign", x.sum("client") == 1)
    m.add_constraints("load", (w[:, None] * x).sum("request") <= T)
    m.add_constraints("eligible", x[prompt > 100][:, inst != 0] == 0)
    m.add_constraints("cap", x[:, inst == 1].sum("request") <= 10)
    m.minimize(T)
    t1 = time.perf_counter()
    res = lloptim.solve(m, "highs", lloptim.SolveParams(time_limit_s=time_limit, rel_gap=gap))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, res.primal_bound, res.dual_bound, res.status.value


def run_linopy(w, prompt, inst, time_limit, gap):
    import linopy
    import pandas as pd
    import xarray as xr

    t0 = time.perf_counter()
    req = pd.RangeIndex(w.size, name="request")
    cli = pd.RangeIndex(inst.size, name="client")
    m = linopy.Model()
    x = m.add_variables(coords=[req, cli], name="x", binary=True)
    T = m.add_variables(name="T")
    m.add_constraints(x.sum("client") == 1, name="assign")
    m.add_constraints((xr.DataArray(w, coords=[req]) * x).sum("request") <= T, name="load")
    m.add_constraints(x.sel(request=np.flatnonzero(prompt > 100), client=np.flatnonzero(inst != 0)) == 0,
                      name="eligible")
    m.add_constraints(x.sel(client=np.flatnonzero(inst == 1)).sum("request") <= 10, name="cap")
    m.add_objective(1 * T)
    t1 = time.perf_counter()
    status, cond = m.solve(solver_name="highs", io_api="direct", time_limit=time_limit, mip_rel_gap=gap,
                           output_flag=False)
    t2 = time.perf_counter()
    bound = float(m.solver_model.getInfo().mip_dual_bound)
    return t1 - t0, t2 - t1, float(m.objective.value), bound, f"{status}/{cond}"


def run_mathopt(w, prompt, inst, time_limit, gap):
    from datetime import timedelta

    from ortools.math_opt.python import mathopt

    t0 = time.perf_counter()
    R, C = w.size, inst.size
    m = mathopt.Model(name="side")
    x = [[m.add_binary_variable(name=f"x_{r}_{c}") for c in range(C)] for r in range(R)]
    T = m.add_variable(lb=-np.inf, name="T")
    for r in range(R):
        m.add_linear_constraint(mathopt.fast_sum(x[r]) == 1, name=f"assign_{r}")
    wl = w.tolist()
    for c in range(C):
        m.add_linear_constraint(mathopt.fast_sum(wl[r] * x[r][c] for r in range(R)) - T <= 0, name=f"load_{c}")
    others = np.flatnonzero(inst != 0).tolist()
    for r in np.flatnonzero(prompt > 100).tolist():
        for c in others:
            m.add_linear_constraint(x[r][c] == 0, name=f"eligible_{r}_{c}")
    for c in np.flatnonzero(inst == 1).tolist():
        m.add_linear_constraint(mathopt.fast_sum(x[r][c] for r in range(R)) <= 10, name=f"cap_{c}")
    m.minimize(T)
    t1 = time.perf_counter()
    params = mathopt.SolveParameters(time_limit=timedelta(seconds=time_limit), relative_gap_tolerance=gap)
    res = mathopt.solve(m, mathopt.SolverType.HIGHS, params=params)
    t2 = time.perf_counter()
    b = res.termination.objective_bounds
    return t1 - t0, t2 - t1, float(b.primal_bound), float(b.dual_bound), res.termination.reason.name.lower()


def _child(tool, args, conn):
    w, prompt, inst = data(args.clients)
    out = {"lloptim": run_lloptim, "linopy": run_linopy, "mathopt": run_mathopt}[tool](
        w, prompt, inst, args.time_limit, args.gap)
    conn.send(out + (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,))
    conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--time-limit", type=float, default=20.0)
    ap.add_argument("--gap", type=float, default=1e-4)
    args = ap.parse_args()
    need = {"lloptim": "lloptim", "linopy": "linopy", "mathopt": "ortools"}
    print(f"bin packing + eligibility + caps: 1319 requests x {args.clients} clients, HiGHS, "
          f"time limit {args.time_limit:g} s, rel gap {args.gap:g}")
    print(f"{'tool':>8s} {'build s':>8s} {'solve s':>8s} {'objective':>10s} {'bound':>10s} {'gap %':>7s} "
          f"{'peak MiB':>9s}  status")
    ctx = mp.get_context("spawn")
    for tool in TOOLS:
        if importlib.util.find_spec(need[tool]) is None:
            print(f"{tool:>8s} skipped: {need[tool]} is not installed")
            continue
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(tool, args, child))
        proc.start()
        try:
            build, solve, obj, bound, status, peak = parent.recv()
        except EOFError:
            print(f"{tool:>8s} failed (exit code {proc.exitcode})")
            continue
        finally:
            proc.join()
        gap = abs(obj - bound) / abs(obj) if obj else float("nan")
        print(f"{tool:>8s} {build:>8.2f} {solve:>8.2f} {obj:>10.4f} {bound:>10.4f} {100 * gap:>7.4f} "
              f"{peak:>9,.0f}  {status}")


if __name__ == "__main__":
    main()
