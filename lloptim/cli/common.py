"""Helpers shared by CLI commands: loading the spec, printing JSON, turning errors into messages."""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import typer
from rich.console import Console

from lloptim.errors import LloptimError
from lloptim.problem import Problem
from lloptim.spec import load_spec

console = Console()
err_console = Console(stderr=True)


def load_problem(spec: Path | None) -> Problem:
    """The spec at ``spec``, or the embedded default (GSM8K test on llama-65b) when None."""
    return load_spec(spec)


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    return obj


def print_json(obj: Any) -> None:
    """Print ``obj`` as one JSON object on stdout (NaN and inf become null)."""
    sys.stdout.write(json.dumps(_clean(obj), indent=2) + "\n")


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn lloptim's own errors into a one-line message and exit code 2."""
    try:
        yield
    except LloptimError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
