"""``lloptim reproduce``: the main job, the paper's experiment on the embedded default."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lloptim.cli.app import app
from lloptim.cli.common import (NO_SIZE_GUARD, SIZE_GUARD_HELP, console, load_problem, print_json, user_errors,
                                write_reporting)
from lloptim.cli.tables import Column, print_table

#: API fields of :func:`lloptim.experiments.reproduce` and the flags that set them.
REPRODUCE_FLAGS = {"cases": "--cases", "n_cases": "--cases", "seed": "--seed", "executor": "--executor",
                   "address": "--address", "estimator": "--estimator"}


def policy_label(key: str) -> str:
    """A report key as a table label: ``hybrid_fused_unknown_lengths`` -> ``hybrid-fused (lengths unknown)``."""
    from lloptim.experiments import MAIN_POLICIES, UNKNOWN_LENGTH_POLICIES, unknown_lengths_key

    for name in UNKNOWN_LENGTH_POLICIES:
        if key == unknown_lengths_key(name):
            return f"{name} (lengths unknown)"
    return key if key in MAIN_POLICIES else key.replace("_", " ")


@app.command()
def reproduce(
    spec: Optional[Path] = typer.Argument(None, help="TOML spec; default: GSM8K test on llama-65b"),
    cases: int = typer.Option(100, "--cases", help="case studies drawn from GSM8K train (0: skip)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a figure to this file (the suffix names the "
                                        "format: .png, .pdf, .svg ...)"),
    estimator: str = typer.Option("bucket-quantile", "--estimator",
                                  help="output-length estimator of the unknown-lengths run: mean, regression, bucket-quantile"),
    executor: str = typer.Option("local", "--executor", help="where the cases run: local or ray"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (with --executor ray)"),
    seed: int = typer.Option(0, "--seed", help="seed of the case draws and noisy forecasts"),
    size_guard: bool = typer.Option(True, f"--size-guard/{NO_SIZE_GUARD}", help=SIZE_GUARD_HELP),
) -> None:
    """Baseline vs offline vs hybrid (and peers) next to the paper's numbers, then the case study."""
    from lloptim.experiments import PAPER
    from lloptim.experiments import reproduce as run

    from lloptim.experiments import ESTIMATOR_NAMES
    from lloptim.executors import EXECUTORS
    from lloptim.validation import check_choice, check_int, check_seed

    with user_errors(REPRODUCE_FLAGS, size_guard, {"cases": "--cases"}):
        check_int("--cases", cases, lo=0, fix="give a number of cases >= 0 (0 skips the case study), e.g. --cases 100")
        check_seed("--seed", seed)
        check_choice("--executor", executor, EXECUTORS, "executor")
        check_choice("--estimator", estimator, ESTIMATOR_NAMES, "estimator")
        plot_path = None
        if plot is not None:
            from lloptim.plots import check_figure_path

            plot_path = check_figure_path(plot, "--plot")
        problem = load_problem(spec)
        report, results = run(problem, cases=cases, executor=executor, address=address, estimator=estimator,
                              progress=not json_out, seed=seed)
    failed = None
    if plot_path is not None:
        from lloptim.plots import plot_reproduction

        written, failed = write_reporting("--plot", plot_path, lambda p: plot_reproduction(report, results, p))
        if failed is None:
            report["plot"] = str(written)
    if json_out:
        print_json(report)
    else:
        _print_report(report, problem, PAPER)
    if failed is not None:
        raise failed


def _print_report(report: dict, problem, paper: dict) -> None:
    lb = report["lower_bound_s"]
    cols = [Column("policy", numeric=False), Column("makespan s"), Column("utilization"), Column("gap to bound"),
            Column("paper makespan s"), Column("paper utilization")]
    rows = []
    for name, row in report["policies"].items():
        p = paper.get(name, {})
        rows.append([policy_label(name), f"{row['makespan_s']:.2f}", f"{100 * row['utilization']:.1f} %",
                     f"{100 * row['gap_to_bound']:.2f} %", f"{p['makespan_s']:.2f}" if p else "",
                     f"{100 * p['utilization']:.1f} %" if p else ""])
    print_table(console, f"{problem.name}: {problem.n_requests} requests, {problem.n_clients} clients, lower bound "
                         f"T^LB = {lb:.2f} s (paper: about {paper['lower_bound_s']:.0f} s)", cols, rows)
    d = report["decision_latency_us"]
    console.print(f"hybrid decision latency: p50 {d['p50']:.1f} us, p99 {d['p99']:.1f} us (paper's bound: 5000 us)")
    noise = report["noise"]
    if noise:
        names = list(dict.fromkeys(n["policy"] for n in noise))
        sigmas = list(dict.fromkeys(n["sigma"] for n in noise))
        gap = {(n["policy"], n["sigma"]): n["gap_to_bound"] for n in noise}
        console.print()
        print_table(console, "gap to bound with noisy forecasts (estimate = truth x exp(N(0, sigma)))",
                    [Column("sigma")] + [Column(f"{n} gap") for n in names],
                    [[f"{s:.1f}"] + [f"{100 * gap[(n, s)]:.2f} %" if (n, s) in gap else "" for n in names]
                     for s in sigmas])
    c = report["cases"]
    if c["n"]:
        console.print(f"case study: hybrid wins {c['hybrid_wins']}/{c['n']} cases; mean utilization gain "
                      f"{100 * c['mean_utilization_gain']:.1f} points (paper: "
                      f"{100 * paper['cases_mean_utilization_gain']:.1f}); mean gap to bound: baseline "
                      f"{100 * c['mean_gap_baseline']:.2f} %, hybrid {100 * c['mean_gap_hybrid']:.2f} %")
    if report.get("plot"):
        console.print(f"figure written to {report['plot']}", markup=False)
