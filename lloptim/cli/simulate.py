"""``lloptim simulate``: run one policy in the discrete-event simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lloptim.cli.app import app
from lloptim.cli.common import console, load_problem, print_json, user_errors


def metrics_table(rows: list[dict], title: str) -> Table:
    """A rich table of run metrics, one row per policy."""
    table = Table(title=title)
    cols = [("policy", "policy"), ("makespan s", "makespan_s"), ("utilization", "utilization"),
            ("lower bound s", "lower_bound_s"), ("gap to bound", "gap_to_bound"),
            ("tokens/s", "throughput_tokens_per_s"), ("p99 latency s", "latency_p99_s"),
            ("decision p99 us", "decision_latency_us_p99")]
    for head, _ in cols:
        table.add_column(head, justify="right" if head != "policy" else "left")
    for row in rows:
        cells = []
        for _, key in cols:
            v = row.get(key)
            if key == "policy":
                cells.append(str(v))
            elif key in ("utilization", "gap_to_bound"):
                cells.append(f"{100 * v:.2f} %")
            else:
                cells.append(f"{v:,.2f}")
        table.add_row(*cells)
    return table


def parse_fault(text: str):
    """``"TIME:INSTANCE[:CLIENT]"`` -> :class:`~lloptim.runtime.engine.Fault`."""
    from lloptim.errors import SpecError
    from lloptim.runtime.engine import Fault

    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        return Fault(float(parts[0]), int(parts[1]), int(parts[2]) if len(parts) == 3 else None)
    except ValueError:
        raise SpecError("--fault", f"cannot read {text!r}", "write TIME:INSTANCE or TIME:INSTANCE:CLIENT, "
                        "e.g. 30:0:5") from None


@app.command()
def simulate(
    spec: Optional[Path] = typer.Argument(None, help="TOML spec; default: GSM8K test on llama-65b"),
    policy: str = typer.Option("baseline", "--policy", "-p", help="policy name (see `lloptim policies`)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    fault: list[str] = typer.Option([], "--fault",
                                    help="inject a failure TIME:INSTANCE[:CLIENT] (seconds; global client index); repeatable"),
    migrate: bool = typer.Option(False, "--migrate",
                                 help="let idle instances take over running requests with their KV caches in the "
                                      "end game (costed by the profiles' kv_transfer_*; several instances only)"),
    trace: Optional[Path] = typer.Option(None, "--trace",
                                         help="write one CSV row per request: id, instance, client, arrival_s, "
                                              "ready_s, start_s, finish_s"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="draw the per-client timeline (and the critical path "
                                                              "of a workflow) to this image file"),
    estimator: str = typer.Option("oracle", "--estimator",
                                  help="output lengths the policy sees: oracle (the truth), mean, regression, "
                                       "bucket-quantile (fitted on --train), or noisy (the truth x exp(N(0, 0.5)))"),
    train: Optional[Path] = typer.Option(None, "--train",
                                         help="TOML spec whose workload trains the estimator; default: the rest of "
                                              "the trace for an Azure trace, else GSM8K train"),
) -> None:
    """Simulate SPEC under one policy and report makespan, utilization and the lower bound."""
    from lloptim.metrics import summarize
    from lloptim.runtime.migration import with_migration
    from lloptim.simulator import run_policy
    from lloptim.trace import check_output_path, write_trace_csv

    with user_errors():
        if trace is not None:
            check_output_path(trace, "--trace")
        if plot is not None:
            from lloptim.plots import check_figure_path

            check_figure_path(plot, "--plot")
        faults = [parse_fault(f) for f in fault]
        from lloptim.runtime.estimators import ESTIMATOR_NAMES, estimate, training_workload

        if estimator not in ESTIMATOR_NAMES:
            from lloptim.errors import SpecError

            raise SpecError("--estimator", f"unknown estimator {estimator!r}", f"use one of {list(ESTIMATOR_NAMES)}")
        if train is not None and estimator in ("oracle", "noisy"):
            from lloptim.errors import SpecError

            raise SpecError("--train", f"the {estimator} estimator learns nothing", "drop --train or pick a fitted "
                            "estimator (mean, regression, bucket-quantile)")
        train_problem = load_problem(train) if train is not None else None
        problem = load_problem(spec)
        estimates = None
        if estimator != "oracle":
            data = None
            if estimator not in ("noisy",):
                data = train_problem.workload if train_problem is not None else training_workload(problem.workload)
            estimates = estimate(problem.workload, estimator, data, sigma=0.5)
        result = run_policy(problem, with_migration(policy) if migrate else policy, estimates=estimates,
                            faults=faults)
        metrics = summarize(result)
        if trace is not None:
            write_trace_csv(result, trace)
        if plot is not None:
            from lloptim.plots import plot_run

            plot_run(result, plot)
    d = metrics.to_dict()
    d["estimator"] = estimator
    if json_out:
        print_json(d)
    else:
        console.print(metrics_table([d], f"{problem.name}: {problem.n_requests} requests, {problem.n_clients} clients"))


@app.command()
def policies() -> None:
    """List the named policies."""
    from lloptim.runtime.registry import policy_names

    for name, desc in policy_names().items():
        console.print(f"[bold]{name}[/]: {desc}")
