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
from rich.table import Table

from lloptim.cli.app import app
from lloptim.cli.common import console, load_problem, print_json, user_errors
from lloptim.errors import LloptimError, SpecError

__all__ = ["run_compare_task", "local_executor", "EXECUTORS", "results_table", "notes"]

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


def results_table(rows: list[dict], title: str) -> Table:
    """A rich table of compare rows."""
    heads = {"backend": "backend", "status": "status", "primal_bound": "objective s", "dual_bound": "bound s",
             "gap": "gap", "build_s": "build s", "solve_s": "solve s", "peak_mem_mb": "peak MiB"}
    table = Table(title=title)
    for k in COLUMNS:
        table.add_column(heads[k], justify="left" if k in ("backend", "status") else "right")
    for row in rows:
        status = row.get("status", "error")
        if row.get("limit") not in (None, "none") and status in ("feasible", "heuristic", "no_solution"):
            status = f"{status} ({row['limit']} limit)"
        # the backend asked for names the row; notes() says when another one's answer came back
        shown = dict(row, backend=row.get("solver") or row.get("backend"))
        table.add_row(*[status if k == "status" else _fmt(shown.get(k), k) for k in COLUMNS])
    return table


def notes(rows: list[dict]) -> list[str]:
    """One line per row whose requested backend did not produce the answer (skipped, or failed).

    Parameters
    ----------
    rows : list of dict
        Compare rows (:func:`run_compare_task`).

    Returns
    -------
    list of str
        Plain-text lines, e.g. ``"highs: skipped (the greedy start is already within rel_gap of
        the bound); --always-run runs it"``.
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
    from lloptim.solvers import SolveParams

    return SolveParams(time_limit_s=time_limit, rel_gap=gap, threads=threads, seed=seed, always_run=always_run)


@app.command("solve")
def solve_cmd(
    spec: Optional[Path] = typer.Argument(None, help="TOML spec; default: GSM8K test on llama-65b (1319 x 40)"),
    solver: str = typer.Option("greedy", "--solver", "-s", help="backend (see `lloptim solvers`)"),
    time_limit: Optional[float] = typer.Option(None, "--time-limit",
                                               help="seconds for the whole solve (start, model, search)"),
    gap: float = typer.Option(1e-4, "--gap", help="relative gap to stop at"),
    threads: Optional[int] = typer.Option(None, "--threads", help="backend threads"),
    seed: int = typer.Option(0, "--seed", help="random seed"),
    always_run: bool = typer.Option(False, "--always-run",
                                    help="run the backend even when the greedy start already meets --gap"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object (with the assignment)"),
) -> None:
    """Assign the requests of SPEC to clients (makespan bin packing) with one backend."""
    from lloptim.solvers import solve

    with user_errors():
        problem = load_problem(spec)
        res = solve(problem, solver=solver, params=_params(time_limit, gap, threads, seed, always_run))
    row = res.summary()
    if json_out:
        row["assignment"] = res.assignment
        row["multipliers"] = res.multipliers
        print_json(row)
    else:
        console.print(results_table([row], f"{problem.name}: {problem.n_requests} requests, {problem.n_clients} clients"))
        for line in notes([row]):
            console.print(line, markup=False)


@app.command()
def compare(
    spec: Optional[Path] = typer.Argument(None, help="TOML spec; default: GSM8K test on llama-65b (1319 x 40)"),
    solvers: str = typer.Option("highs,cbc,cvxpy,lagrangian,greedy", "--solvers", help="comma-separated backends"),
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
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="also write the rows to this CSV file"),
) -> None:
    """Solve SPEC's bin packing with several backends and compare bounds, gaps, times and memory.

    Bounds are seconds of bin-packing makespan; peak memory is each run's process high-water mark.
    """
    from lloptim.solvers import all_solvers

    with user_errors():
        names = [s.strip() for s in solvers.split(",") if s.strip()]
        if not names:
            raise SpecError("--solvers", "is empty", "name at least one backend")
        known = all_solvers()
        for n in names:
            if n not in known:
                raise SpecError("--solvers", f"unknown solver {n!r}", f"use some of {sorted(known)}")
        if executor not in EXECUTORS:
            raise SpecError("--executor", f"unknown executor {executor!r}", f"use one of {sorted(EXECUTORS)}")
        if address is not None and executor != "ray":
            raise SpecError("--address", "needs --executor ray", "add --executor ray or drop --address")
        params = _params(time_limit, gap, threads, seed, always_run)
        problem = load_problem(spec)
        tasks = [(problem, n, params) for n in names]
        rows = ray_executor(tasks, address) if executor == "ray" else EXECUTORS[executor](tasks)
    if csv_out is not None:
        with open(csv_out, "w", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=list(COLUMNS) + ["limit", "error", "solver", "skipped"],
                                extrasaction="ignore")
            wr.writeheader()
            wr.writerows(rows)
    if json_out:
        print_json({"results": [{k: r.get(k) for k in COLUMNS + ("limit", "error", "solver", "skipped")}
                                for r in rows]})
    else:
        console.print(results_table(rows, f"{problem.name}: {problem.n_requests} requests, {problem.n_clients} clients"))
        for line in notes(rows):
            console.print(line, markup=False)
        for r in rows:
            if r.get("error"):
                console.print(f"[yellow]{r.get('solver') or r['backend']}[/]: {r['error']}")


@app.command("solvers")
def solvers_cmd() -> None:
    """List the solver backends, whether they are usable here, and what they support."""
    from lloptim.solvers import all_solvers, available_solvers

    ok = set(available_solvers())
    for name, b in all_solvers().items():
        cap = b.capabilities
        flags = [f for f in ("supports_mip", "supports_lp_duals", "supports_mip_start", "supports_relaxation")
                 if getattr(cap, f)]
        state = "[green]available[/]" if name in ok else f"[red]missing {cap.needs_package}[/]"
        console.print(f"[bold]{name}[/] ({state}): {b.description}; {', '.join(flags) or 'heuristic'}")
