"""The typer application every CLI module registers its commands on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="lloptim",
    help="LLM-inference serving as an optimization problem (arXiv 2502.15763).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
