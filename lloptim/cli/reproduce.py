"""``lloptim reproduce``: the main job, the paper's experiment on the embedded default."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lloptim.cli.app import app
from lloptim.cli.common import console, load_problem, print_json, user_errors


@app.command()
def reproduce(
    spec: Optional[Path] = typer.Argument(None, help="TOML spec; default: GSM8K test on llama-65b"),
    cases: int = typer.Option(100, "--cases", min=0, help="case studies drawn from GSM8K train (0: skip)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a figure (PNG/PDF/SVG) to this file"),
    estimator: str = typer.Option("bucket-quantile", "--estimator",
                                  help="output-length estimator of the unknown-lengths run: mean, regression, bucket-quantile"),
    executor: str = typer.Option("local", "--executor", help="where the cases run: local or ray"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (with --executor ray)"),
    seed: int = typer.Option(0, "--seed", help="seed of the case draws and noisy forecasts"),
) -> None:
    """Baseline vs offline vs hybrid (and peers) next to the paper's numbers, then the case study."""
    from lloptim.experiments import PAPER
    from lloptim.experiments import reproduce as run

    with user_errors():
        problem = load_problem(spec)
        report, results = run(problem, cases=cases, executor=executor, address=address, estimator=estimator,
                              progress=not json_out, seed=seed)
        if plot is not None:
            from lloptim.plots import plot_reproduction

            report["plot"] = str(plot_reproduction(report, results, plot))
    if json_out:
        print_json(report)
        return
    lb = report["lower_bound_s"]
    table = Table(title=f"{problem.name}: {problem.n_requests} requests, {problem.n_clients} clients, "
                        f"lower bound T^LB = {lb:.2f} s (paper: about {PAPER['lower_bound_s']:.0f} s)")
    for col in ("policy", "makespan s", "utilization", "gap to bound", "paper makespan s", "paper utilization"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for name, row in report["policies"].items():
        paper = PAPER.get(name, {})
        table.add_row(name, f"{row['makespan_s']:.2f}", f"{100 * row['utilization']:.1f} %",
                      f"{100 * row['gap_to_bound']:.2f} %",
                      f"{paper['makespan_s']:.2f}" if paper else "", f"{100 * paper['utilization']:.1f} %" if paper else "")
    console.print(table)
    d = report["decision_latency_us"]
    console.print(f"hybrid decision latency: p50 {d['p50']:.1f} us, p99 {d['p99']:.1f} us (paper's bound: 5000 us)")
    for name in dict.fromkeys(n["policy"] for n in report["noise"]):
        noise = ", ".join(f"sigma {n['sigma']:.1f}: {100 * n['gap_to_bound']:.2f} %"
                          for n in report["noise"] if n["policy"] == name)
        console.print(f"{name} gap to bound with noisy forecasts: {noise}")
    c = report["cases"]
    if c["n"]:
        console.print(f"case study: hybrid wins {c['hybrid_wins']}/{c['n']} cases; mean utilization gain "
                      f"{100 * c['mean_utilization_gain']:.1f} points (paper: {100 * PAPER['cases_mean_utilization_gain']:.1f}); "
                      f"mean gap to bound: baseline {100 * c['mean_gap_baseline']:.2f} %, hybrid {100 * c['mean_gap_hybrid']:.2f} %")
    if plot is not None:
        console.print(f"figure written to {report['plot']}")
