"""``lloptim solve`` and ``lloptim compare``: the offline bin packing with one or several backends.

``compare`` is a list of independent tasks, one per backend, handed to an *executor*: a callable
``executor(tasks) -> list[dict]`` where each task is ``(spec_or_problem, solver, params)`` and
each result is what :func:`run_compare_task` returns. ``--executor local`` (the only one for now)
runs every task in a fresh ``spawn``-ed process, so each row's peak memory is that backend's run
alone; a Ray executor will submit the same function as remote tasks.
"""

from __future__ import annotations

import csv
import multiprocessing as mp
from pathlib import Path
from typing import Callable, Optional, Sequence

import typer
from rich.markup import escape

from lloptim.cli.app import app
from lloptim.cli.common import (NO_SIZE_GUARD, SIZE_GUARD_HELP, console, environment, load_problem, output_path,
                                print_json, user_errors, write_reporting)
from lloptim.cli.tables import Column, print_table
from lloptim.errors import LloptimError, SpecError

__all__ = ["run_compare_task", "local_executor", "EXECUTORS", "print_results", "notes", "SOLVE_FLAGS", "choose_formulation",
           "DEFAULT_MODEL_TIME_LIMIT_S", "makespan_bounds"]

#: API fields of a solve and the flags of ``lloptim solve`` / ``compare`` that set them.
SOLVE_FLAGS = {"params.time_limit_s": "--time-limit", "params.rel_gap": "--gap", "params.threads": "--threads",
               "params.seed": "--seed", "solver": "--solver", "formulation": "--formulation"}
#: Seconds a model search gets by default when the formulation is not the bin packing (their exact
#: models are big-M MIPs that prove optimality slowly; the answer at the limit is the best found).
DEFAULT_MODEL_TIME_LIMIT_S = 10.0
#: Sizes of a solve and what sets them on the command line (for the size guard's messages).
SOLVE_SIZES = {"rel_gap": "--gap", "requests": "SPEC (its requests)", "clients": "SPEC (instances[].clients)"}

COLUMNS = ("backend", "status", "primal_bound", "dual_bound", "gap", "build_s", "solve_s", "peak_mem_mb")


def run_compare_task(spec_or_problem, solver: str, params) -> dict:
    """Solve one bin packing with one backend and return its JSON-ready row.

    Parameters
    ----------
    spec_or_problem
        A spec path (``None``: the embedded default) or a :class:`~lloptim.problem.Problem`.
    solver
        Backend name.
    params
        :class:`~lloptim.solvers.SolveParams`.

    Returns
    -------
    dict
        The keys of :data:`COLUMNS` plus ``limit``, ``error``, ``solver`` (the backend asked for;
        ``backend`` is the one whose answer is returned) and ``skipped`` (why the requested
        backend did not run, or ``""``). ``peak_mem_mb`` is the resident
        memory high-water mark of the process that ran the task, MiB (whole process, loading and
        model building included). A backend that refuses or fails gives ``status="error"`` and
        null bounds instead of raising, so one backend cannot sink a comparison.
    """
    from lloptim.problem import Problem
    from lloptim.solvers import solve
    from lloptim.solvers.limits import peak_rss_mb

    try:
        problem = spec_or_problem if isinstance(spec_or_problem, Problem) else load_problem(spec_or_problem)
        res = solve(problem, solver=solver, params=params)
        row = res.summary()
        row["error"] = res.extra.get("error")
    except LloptimError as exc:
        row = {"backend": solver, "solver": solver, "status": "error", "limit": "none", "primal_bound": None,
               "dual_bound": None, "gap": None, "build_s": None, "solve_s": None, "peak_mem_mb": peak_rss_mb(),
               "error": str(exc), "skipped": ""}
    return row


def _child(conn, task) -> None:
    try:
        conn.send(run_compare_task(*task))
    except BaseException as exc:  # noqa: BLE001 - report anything to the parent rather than hang it
        conn.send({"backend": task[1], "solver": task[1], "status": "error", "error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def local_executor(tasks: Sequence[tuple]) -> list[dict]:
    """Run each task in its own fresh (``spawn``) process, one after another; rows in task order."""
    ctx = mp.get_context("spawn")
    rows = []
    for task in tasks:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(child, task))
        proc.start()
        child.close()
        try:
            row = parent.recv()
        except EOFError:  # the child died (e.g. killed for memory)
            row = {"backend": task[1], "solver": task[1], "status": "error",
                   "error": f"worker exited with code {proc.exitcode}"}
        proc.join()
        rows.append(row)
    return rows


def _run_task(task: tuple) -> dict:
    """One compare task as a one-argument function (what :func:`lloptim.executors.map_tasks` maps)."""
    try:
        return run_compare_task(*task)
    except Exception as exc:  # noqa: BLE001 - one failed backend must not stop the comparison
        return {"backend": task[1], "solver": task[1], "status": "error", "error": f"{type(exc).__name__}: {exc}"}


def ray_executor(tasks: Sequence[tuple], address: str | None = None) -> list[dict]:
    """Run the tasks as Ray tasks (a local Ray, or the cluster at ``address``); rows in task order.

    Ray reuses worker processes, so ``peak_mem_mb`` is the worker's high-water mark so far, an
    upper bound on the task's own peak.
    """
    from lloptim.executors import map_tasks

    return map_tasks(_run_task, list(tasks), executor="ray", progress=False, desc="compare", address=address)


#: Executors of ``lloptim compare``: name -> callable(tasks) -> rows.
EXECUTORS: dict[str, Callable[..., list[dict]]] = {"local": local_executor, "ray": ray_executor}


def _fmt(v, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "gap":
        return f"{100 * v:.4f} %"
    if kind in ("build_s", "solve_s"):
        return f"{v:.3f}"
    if kind == "peak_mem_mb":
        return f"{v:,.0f}"
    if kind in ("primal_bound", "dual_bound"):
        return f"{v:,.4f}"
    return str(v)


def print_results(rows: list[dict], title: str) -> None:
    """Print compare rows within the terminal's width (no number cut)."""
    heads = {"backend": "backend", "status": "status", "primal_bound": "objective s", "dual_bound": "bound s",
             "gap": "gap", "build_s": "build s", "solve_s": "solve s", "peak_mem_mb": "peak MiB"}
    cols = [Column(heads[k], numeric=k not in ("backend", "status")) for k in COLUMNS]
    cells = []
    for row in rows:
        status = row.get("status", "error")
        if row.get("limit") not in (None, "none") and status in ("feasible", "heuristic", "no_solution"):
            status = f"{status} ({row['limit']} limit)"
        # the backend asked for names the row; notes() says when another one's answer came back
        shown = dict(row, backend=row.get("solver") or row.get("backend"))
        cells.append([status if k == "status" else _fmt(shown.get(k), k) for k in COLUMNS])
    print_table(console, title, cols, cells)


def notes(rows: list[dict]) -> list[str]:
    """One line per row whose requested backend did not produce the answer (skipped, or failed).

    Parameters
    ----------
    rows : list of dict
        Compare rows (:func:`run_compare_task`).

    Returns
    -------
    list of str
        Plain-text lines, e.g. ``"highs: skipped, the greedy start is already within rel_gap of
        the bound (...); the answer is the greedy start (--always-run runs highs)"``.
    """
    out = []
    for r in rows:
        solver, ran = r.get("solver") or r.get("backend"), r.get("backend")
        if r.get("skipped"):
            why = r["skipped"].split(": ", 1)[-1].split("; ")[0]
            out.append(f"{solver}: skipped, {why}; the answer is the {ran} start (--always-run runs {solver})")
        elif ran and solver and ran != solver:
            out.append(f"{solver}: did not produce the answer; it is the {ran} start")
    return out


def _params(time_limit: Optional[float], gap: float, threads: Optional[int], seed: int, always_run: bool = False):
    """:class:`~lloptim.solvers.SolveParams` from the flags, each checked and named by its flag first."""
    from lloptim.solvers import SolveParams
    from lloptim.validation import check_int, check_number, check_seed

    if time_limit is not None:
        check_number("--time-limit", time_limit, lo=0, lo_open=True, example=10,
                     fix="give seconds > 0, e.g. --time-limit 10, or leave it out for no limit")
    check_number("--gap", gap, lo=0, hi=1, hi_open=True, fix="give a relative gap in [0, 1), e.g. --gap 1e-4")
    if threads is not None:
        check_int("--threads", threads, lo=1, fix="give a thread count >= 1, e.g. --threads 1")
    check_seed("--seed", seed)
    return SolveParams(time_limit_s=time_limit, rel_gap=gap, threads=threads, seed=seed, always_run=always_run)


def _check_solvers(names: list[str], flag: str) -> None:
    from lloptim.solvers import all_solvers

    if not names:
        raise SpecError(flag, "is empty", "name at least one backend")
    known = all_solvers()
    for n in names:
        if n not in known:
            raise SpecError(flag, f"unknown solver {n!r}", f"use some of {sorted(known)}")


def choose_formulation(problem, formulation: str | None) -> str:
    """The formulation ``lloptim solve`` uses: the one named, else ``precedence`` for a workflow, else the bin packing.

    Parameters
    ----------
    problem : Problem
        The loaded problem.
    formulation : str or None
        The ``--formulation`` flag (a registered name), or None.

    Returns
    -------
    str
        A registered formulation's name.

    Raises
    ------
    SpecError
        An unknown name, or a formulation that ignores precedence on a problem that has some.
    """
    from lloptim.solvers import all_formulations

    known = sorted(all_formulations())
    if formulation is None:
        return "precedence" if problem.workload.precedence is not None else "binpacking"
    if formulation not in known:
        raise SpecError("--formulation", f"unknown formulation {formulation!r}", f"use one of {known}")
    if problem.workload.precedence is not None and formulation not in ("precedence", "weighted_completion"):
        raise SpecError("--formulation", f"{formulation!r} ignores the precedence (after) of the spec's requests",
                        "use --formulation precedence (or weighted_completion), or leave the flag out")
    return formulation


def makespan_bounds(problem) -> tuple[list[str], dict]:
    """The serving makespan's lower bounds, with and without migration: lines to print and ``--json`` fields.

    A plan assigns each request to one client, and every policy without ``--migrate`` runs each
    request on one instance: such runs are bounded by ``lower_bound(problem, migration=False)``,
    which is what :func:`~lloptim.metrics.summarize` (``lloptim simulate``) compares them with. A
    run with ``--migrate`` (:func:`~lloptim.runtime.migration.with_migration`) may move running
    requests between instances, and only ``lower_bound(problem)`` holds for it. On one instance
    nothing can move, so the bound without migration holds for every run. Both are printed where
    they differ, one line where they agree.

    Parameters
    ----------
    problem
        The problem.

    Returns
    -------
    lines, fields
        Lines of at most 80 columns; ``fields``: ``lower_bound`` (every schedule, migration
        included) and ``lower_bound_no_migration`` (schedules in which each request runs on one
        instance), each :meth:`~lloptim.bounds.LowerBound.to_dict` (seconds).
    """
    from lloptim.bounds import lower_bound

    anywhere = lower_bound(problem)
    # on one instance nothing can move; on a fleet chains, KV ramps and release dates
    # (fleet_release_bound) give schedules without migration a stronger bound
    fixed = anywhere if len(problem.instances) == 1 else lower_bound(problem, migration=False)
    fields = {"lower_bound": anywhere.to_dict(), "lower_bound_no_migration": fixed.to_dict()}

    def both(lb) -> str:
        return f"{lb.total_s:,.2f} s ({lb.fused_s:,.2f} s fused)"

    same = all(abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a, b in ((fixed.total_s, anywhere.total_s),
                                                                  (fixed.fused_s, anywhere.fused_s)))
    if len(problem.instances) == 1:
        lines = [f"makespan bound: {both(fixed)}; one instance, nothing migrates"]
    elif same:
        lines = [f"makespan bound: {both(fixed)}, with or without migration"]
    else:
        lines = [f"makespan bound without migration (this plan): {both(fixed)}",
                 f"makespan bound with migration (--migrate):    {both(anywhere)}"]
    return lines, fields


def _report(problem, form: str, res) -> tuple[list[str], dict]:
    """Lines to print after the table and fields for ``--json``: the bounds the formulation answers for."""
    import numpy as np

    lines: list[str] = []
    extra: dict = {}
    sched = res.extra.get("schedule")
    if sched is not None:
        extra["schedule"] = {"start_s": sched["start_s"], "client": sched["client"]}
    bound_lines, fields = makespan_bounds(problem)
    extra.update(fields)
    if form == "binpacking_kv":
        from lloptim.formulations.binpacking_kv import kv_price_weights

        lb = fields["lower_bound_no_migration"]
        beta = kv_price_weights(problem)
        extra["kv_price_weights"] = beta
        binds = "memory" if lb["decode_steps_memory"] > lb["decode_steps_clients"] else "the clients"
        lines += [f"memory-aware bound: decode steps {lb['decode_steps_memory']:,} by KV memory, "
                  f"{lb['decode_steps_clients']:,} by clients ({binds} bind)",
                  "memory share of the decode-step price (dual('kv')) per instance: "
                  + ", ".join(f"{b:.2f}" for b in np.atleast_1d(beta))]
    elif form == "precedence":
        lines.append(f"critical-path-aware bound of the plan: {res.dual_bound:,.2f} work s (critical path "
                     f"{fields['lower_bound_no_migration']['critical_path_s']:,.2f} s)")
    elif form == "weighted_completion" and res.primal_bound is not None:
        n = max(problem.n_requests, 1)
        lines.append(f"mean completion time of the plan: {res.primal_bound / n:,.2f} work s "
                     f"(bound {res.dual_bound / n:,.2f}) with unit weights")
    if sched is not None and problem.workload.precedence is not None:
        lines.append("the schedule starts every request after its predecessors finish")
    return lines + bound_lines, extra


@app.command("solve")
def solve_cmd(
    spec: Optional[Path] = typer.Argument(None, help="TOML spec; default: GSM8K test on llama-65b (1319 x 40)"),
    solver: Optional[str] = typer.Option(None, "--solver", "-s",
                                         help="backend (see `lloptim solvers`); default greedy for the bin "
                                              "packing, highs for the other formulations"),
    formulation: Optional[str] = typer.Option(
        None, "--formulation", "-f",
        help="binpacking, binpacking_kv (KV memory), precedence, weighted_completion, full_mip; default "
             "precedence when the spec's requests have `after`, else binpacking"),
    time_limit: Optional[float] = typer.Option(None, "--time-limit",
                                               help="seconds for the whole solve (start, model, search); default "
                                                    f"none for the bin packing, {DEFAULT_MODEL_TIME_LIMIT_S:g} for "
                                                    "the other formulations"),
    gap: float = typer.Option(1e-4, "--gap", help="relative gap to stop at"),
    threads: Optional[int] = typer.Option(None, "--threads", help="backend threads"),
    seed: int = typer.Option(0, "--seed", help="random seed"),
    always_run: bool = typer.Option(False, "--always-run",
                                    help="run the backend even when the greedy start already meets --gap"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object (with the assignment)"),
    size_guard: bool = typer.Option(True, f"--size-guard/{NO_SIZE_GUARD}", help=SIZE_GUARD_HELP),
) -> None:
    """Assign the requests of SPEC to clients with one backend (makespan bin packing, or --formulation)."""
    from lloptim.solvers import solve

    with user_errors(SOLVE_FLAGS, size_guard, SOLVE_SIZES):
        if solver is not None:
            _check_solvers([solver], "--solver")
        problem = load_problem(spec)
        form = choose_formulation(problem, formulation)
        if solver is None:
            solver = "greedy" if form == "binpacking" else "highs"
        if time_limit is None and form != "binpacking":
            time_limit = DEFAULT_MODEL_TIME_LIMIT_S
        params = _params(time_limit, gap, threads, seed, always_run)
        res = solve(problem, solver=solver, params=params, formulation=form)
        lines, extra = _report(problem, form, res)
    row = res.summary()
    if json_out:
        row["assignment"] = res.assignment
        row["multipliers"] = res.multipliers
        row.update(extra)
        print_json(row)
    else:
        print_results([row], f"{problem.name}: {problem.n_requests} requests, {problem.n_clients} clients, "
                             f"{form}")
        for line in notes([row]) + lines:
            console.print(line, markup=False)


@app.command()
def compare(
    spec: Optional[Path] = typer.Argument(None, help="TOML spec; default: GSM8K test on llama-65b (1319 x 40)"),
    solvers: str = typer.Option("highs,cbc,cvxpy,lagrangian,greedy", "--solvers", show_default=False,
                                help="comma-separated backends; default: highs, cbc, cvxpy, lagrangian, greedy"),
    time_limit: Optional[float] = typer.Option(10.0, "--time-limit", help="seconds per backend solve"),
    gap: float = typer.Option(1e-4, "--gap", help="relative gap to stop at"),
    threads: Optional[int] = typer.Option(None, "--threads", help="backend threads"),
    seed: int = typer.Option(0, "--seed", help="random seed"),
    always_run: bool = typer.Option(True, "--always-run/--skip-proven",
                                    help="run every backend even when the greedy start already meets --gap "
                                         "(default), or skip the ones it makes pointless"),
    executor: str = typer.Option("local", "--executor",
                                 help="how tasks run: local (a fresh process each) or ray (Ray tasks)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (with --executor ray)"),
    json_out: bool = typer.Option(False, "--json", help="print {'results': [...]} as JSON"),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="also write the rows to this CSV file (.csv)"),
    size_guard: bool = typer.Option(True, f"--size-guard/{NO_SIZE_GUARD}", help=SIZE_GUARD_HELP),
) -> None:
    """Solve SPEC's bin packing with several backends and compare bounds, gaps, times and memory.

    Bounds are seconds of bin-packing makespan; peak memory is each run's process high-water mark.
    """
    from lloptim import guards
    from lloptim.validation import check_choice

    with user_errors(SOLVE_FLAGS, size_guard, SOLVE_SIZES):
        names = [s.strip() for s in solvers.split(",") if s.strip()]
        _check_solvers(names, "--solvers")
        check_choice("--executor", executor, sorted(EXECUTORS), "executor")
        if address is not None and executor != "ray":
            raise SpecError("--address", "needs --executor ray", "add --executor ray or drop --address")
        params = _params(time_limit, gap, threads, seed, always_run)
        csv_path = output_path("--csv", csv_out, (".csv",))
        problem = load_problem(spec)
        # every backend starts from the same greedy start: check it once, here, before any process starts
        guards.check_solve(problem, params.rel_gap)
        tasks = [(problem, n, params) for n in names]
        # the workers are other processes: --no-size-guard reaches them through the environment
        with environment(**({} if size_guard else {"LLOPTIM_SIZE_GUARD": "0"})):
            rows = ray_executor(tasks, address) if executor == "ray" else EXECUTORS[executor](tasks)
        bound_lines, fields = makespan_bounds(problem)
    if json_out:
        print_json({"results": [{k: r.get(k) for k in COLUMNS + ("limit", "error", "solver", "skipped")}
                                for r in rows], **fields})
    else:
        print_results(rows, f"{problem.name}: {problem.n_requests} requests, {problem.n_clients} clients")
        for line in notes(rows) + bound_lines:
            console.print(line, markup=False)
        for r in rows:
            if r.get("error"):
                who = r.get("solver") or r["backend"]
                console.print(f"[yellow]{escape(str(who))}[/]: {escape(str(r['error']))}")
    if csv_path is not None:
        def write(path: Path) -> None:
            with open(path, "w", newline="") as fh:
                wr = csv.DictWriter(fh, fieldnames=list(COLUMNS) + ["limit", "error", "solver", "skipped"],
                                    extrasaction="ignore")
                wr.writeheader()
                wr.writerows(rows)

        _, failed = write_reporting("--csv", csv_path, write)
        if failed is not None:
            raise failed


@app.command("solvers")
def solvers_cmd(json_out: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """List the solver backends, whether they are usable here, and what they support."""
    from dataclasses import asdict

    from lloptim.solvers import all_solvers, available_solvers

    ok = set(available_solvers())
    if json_out:
        print_json({"solvers": [{"name": name, "available": name in ok, "description": b.description,
                                 "capabilities": asdict(b.capabilities), "formulations": list(b.formulations)}
                                for name, b in all_solvers().items()]})
        return
    for name, b in all_solvers().items():
        cap = b.capabilities
        flags = [f for f in ("supports_mip", "supports_lp_duals", "supports_mip_start", "supports_relaxation")
                 if getattr(cap, f)]
        state = "[green]available[/]" if name in ok else f"[red]missing {escape(str(cap.needs_package))}[/]"
        console.print(f"[bold]{escape(name)}[/] ({state}): {escape(b.description)}; "
                      f"{escape(', '.join(flags) or 'heuristic')}")
