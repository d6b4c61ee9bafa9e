"""Helpers shared by CLI commands: loading the spec, printing JSON, turning errors into messages.

Every command runs its work inside :func:`user_errors`, which

* prints lloptim's own errors (:class:`~lloptim.errors.LloptimError`) as one line, ``error:
  FIELD: PROBLEM (fix: FIX)`` with exit code 2, naming the flag the user typed where an API
  field maps to one (``params.time_limit_s`` -> ``--time-limit``), with rich markup escaped so
  ``[workload]`` and ``[[requests]]`` survive;
* sets the size guards (:mod:`lloptim.guards`) for the command line: the time limit of
  :data:`~lloptim.guards.CLI_MAX_SECONDS`, ``--no-size-guard`` as the override, and the flags
  that set each size;
* turns running out of memory and Ctrl-C into a message instead of a traceback.

Commands validate their options with :mod:`lloptim.validation` (named by flag) *before* any work,
and check output paths with :func:`output_path` before computing what they will write.
"""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape

from lloptim import guards
from lloptim.errors import LloptimError, SpecError
from lloptim.problem import Problem
from lloptim.spec import load_spec
from lloptim.validation import check_output_path

__all__ = ["console", "err_console", "load_problem", "print_json", "user_errors", "warn", "output_path",
           "write_output", "write_reporting", "environment", "error_message", "SIZE_GUARD_HELP", "NO_SIZE_GUARD"]

console = Console()
err_console = Console(stderr=True)

#: The flag that turns the size guards off, as the messages name it.
NO_SIZE_GUARD = "--no-size-guard"
#: Help text of ``--size-guard/--no-size-guard`` (the same on every command that has it).
SIZE_GUARD_HELP = ("refuse, before any work, a run estimated to need more memory than is free or more than an hour "
                   "(see the docs' 'Size guards'); --no-size-guard runs it anyway")


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


def _flag_for(field: str, flags: Mapping[str, str]) -> str | None:
    """The flag an API ``field`` was set by: an exact key, or a key that is a prefix of it."""
    for key, flag in flags.items():
        if field == key or field.startswith(key + ".") or field.startswith(key + "["):
            return flag
    return None


def error_message(exc: LloptimError, flags: Mapping[str, str] | None = None) -> str:
    """The one-line message of ``exc``, with its field renamed to the flag that set it."""
    if isinstance(exc, SpecError) and flags:
        flag = _flag_for(exc.field, flags)
        if flag is not None and flag != exc.field:
            # a fix written for Python ("give e.g. seed=0") reads as the flag ("give e.g. --seed 0")
            name = exc.field.rsplit(".", 1)[-1].split("[")[0]
            fix = exc.fix.replace(f"{name}=", f"{flag} ") if name else exc.fix
            return str(exc.replace(field=flag, fix=fix))
    return str(exc)


def warn(message: str) -> None:
    """Print a warning on stderr (never on stdout, which may carry JSON)."""
    err_console.print(f"[yellow]warning:[/] {escape(message)}")


@contextmanager
def user_errors(flags: Mapping[str, str] | None = None, size_guard: bool = True,
                size_fields: Mapping[str, str] | None = None) -> Iterator[None]:
    """Run a command's work: lloptim's errors become one line on stderr and exit code 2.

    Parameters
    ----------
    flags
        API field (or prefix) -> flag, to name errors raised below the command line by the flag
        that set the value (``{"params.rel_gap": "--gap"}``).
    size_guard
        False turns the size guards off (``--no-size-guard``).
    size_fields
        Size key of :data:`lloptim.guards.DEFAULT_FIELDS` -> the flag or spec key that sets it.
    """
    try:
        with guards.guard_settings(enabled=size_guard, max_seconds=guards.CLI_MAX_SECONDS,
                                   override=f"pass {NO_SIZE_GUARD}", fields=size_fields):
            yield
    except LloptimError as exc:
        err_console.print(f"[bold red]error:[/] {escape(error_message(exc, flags))}")
        raise typer.Exit(2) from None
    except MemoryError:
        err_console.print("[bold red]error:[/] ran out of memory: the run is larger than this machine holds "
                          "(fix: make it smaller; the size guards estimate this before the work, see the docs' "
                          "'Size guards')")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None


def output_path(flag: str, path: Path | None, suffixes: Iterable[str] | None = None) -> Path | None:
    """``path`` checked for writing before any work (see :func:`~lloptim.validation.check_output_path`)."""
    return None if path is None else check_output_path(flag, path, suffixes)


def write_output(flag: str, path: Path, write: Callable[[Path], Any]) -> Any:
    """``write(path)``, an :class:`OSError` (disk full, permissions changed) becoming an error naming ``flag``."""
    try:
        return write(path)
    except OSError as exc:
        raise SpecError(flag, f"could not write {str(path)!r}: {exc.strerror or exc}",
                        "check the folder and the free space, then run again") from None


def write_reporting(flag: str, path: Path, write: Callable[[Path], Any]) -> tuple[Any, typer.Exit | None]:
    """``write(path)`` under :func:`user_errors`; a failure is returned, not raised.

    A command calls this after its work and before printing, prints its results either way,
    then raises the returned exit: a file that cannot be written never costs the user the results.
    """
    try:
        with user_errors():
            return write_output(flag, path, write), None
    except typer.Exit as exc:
        return None, exc


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the block (for child processes), restoring them after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
