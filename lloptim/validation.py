"""Checks of user input that raise :class:`~lloptim.errors.SpecError` naming the field and the fix.

One set of checks for the Python API and the command line: ``field`` is whatever the user typed,
a parameter (``"workload.seed"``), a spec key (``"instances[0].clients"``) or a command-line flag
(``"--seed"``), so the message names it as the user knows it. Every check runs in constant time
(or one vectorized pass), so entry points can validate before any work.

>>> check_int("--seed", 3, lo=0)
3
>>> check_int("--seed", -1, lo=0)
Traceback (most recent call last):
...
lloptim.errors.SpecError: --seed: must be an integer >= 0, got -1 (fix: give e.g. --seed 0)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lloptim.errors import SpecError

__all__ = ["check_int", "check_number", "check_seed", "check_choice", "check_output_path", "check_input_file",
           "read_text_file"]

#: Largest seed numpy's generators accept from a single integer (they take any non-negative
#: integer; 2**63 - 1 keeps seeds inside a signed 64-bit field of JSON and TOML).
MAX_SEED = 2**63 - 1


def _example(field: str, value: Any) -> str:
    """``--flag 3`` for a flag, ``name=3`` for a parameter (the fix a user can paste)."""
    return f"{field} {value}" if field.startswith("-") else f"{field.rsplit('.', 1)[-1]}={value}"


def _num(v) -> str:
    """A bound as a user would write it: ``1,000``, ``1e+06``, ``0.5``."""
    if float(v) == int(v) and abs(v) < 1e6:
        return f"{int(v):,}"
    return f"{v:,}" if isinstance(v, int) else f"{v:g}"


def _range_text(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_num(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {_num(hi)}"
    return "any"


def check_int(field: str, value: Any, lo: int | None = None, hi: int | None = None, fix: str = "",
              example: int | None = None) -> int:
    """``value`` as a Python int if it is an integer in ``[lo, hi]``; else a :class:`SpecError`.

    Parameters
    ----------
    field
        Name of the field or flag, as the user typed it.
    value
        The value (``bool`` is refused: ``True`` is not a count).
    lo, hi
        Inclusive bounds (``None``: unbounded).
    fix
        What to do instead; default: "give e.g. FIELD EXAMPLE".
    example
        The value the default fix suggests; default ``lo`` (or 1).

    Returns
    -------
    int
        The value.
    """
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if ok and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        ok = False
    if not ok:
        kind = "an integer" if (lo is None and hi is None) else f"an integer {_range_text(lo, hi)}"
        ex = example if example is not None else (lo if lo is not None else 1)
        raise SpecError(field, f"must be {kind}, got {value!r}", fix or f"give e.g. {_example(field, ex)}")
    return int(value)


def check_number(field: str, value: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False, fix: str = "", example: float | None = None) -> float:
    """``value`` as a float if it is a finite real number in the range; else a :class:`SpecError`.

    Parameters
    ----------
    field
        Name of the field or flag, as the user typed it.
    value
        The value; NaN and infinities are refused (no quantity of lloptim is infinite).
    lo, hi
        Bounds (``None``: unbounded); inclusive unless ``lo_open`` / ``hi_open``.
    lo_open, hi_open
        Exclude the bound itself (``lo=0, lo_open=True``: strictly positive).
    fix
        What to do instead; default: "give e.g. FIELD EXAMPLE".
    example
        The value the default fix suggests.

    Returns
    -------
    float
        The value.
    """
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if ok:
        v = float(value)
        ok = math.isfinite(v)
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
    if not ok:
        what = "a finite number" + ("" if lo is None and hi is None else f" {_range_text(lo, hi, lo_open, hi_open)}")
        ex = example if example is not None else (lo if lo is not None and not lo_open else 1)
        raise SpecError(field, f"must be {what}, got {value!r}", fix or f"give e.g. {_example(field, ex)}")
    return float(value)


def check_seed(field: str, value: Any) -> int:
    """A random seed: an integer in ``[0, 2**63 - 1]`` (what numpy's generators accept).

    Parameters
    ----------
    field
        Name of the field or flag, as the user typed it.
    value
        The seed.

    Returns
    -------
    int
        The seed.
    """
    check_int(field, value, lo=0, example=0)
    return check_int(field, value, lo=0, hi=MAX_SEED, fix=f"give a seed below 2**63, e.g. {_example(field, 0)}")


def check_choice(field: str, value: Any, choices: Iterable[str], what: str = "value") -> str:
    """``value`` if it is one of ``choices``; else a :class:`SpecError` listing them.

    Parameters
    ----------
    field
        Name of the field or flag, as the user typed it.
    value
        The value.
    choices
        The accepted values.
    what
        What the value is, for the message ("unknown policy 'x'").

    Returns
    -------
    str
        The value.
    """
    options = list(choices)
    if value not in options:
        raise SpecError(field, f"unknown {what} {value!r}", f"use one of {options}")
    return value


def check_output_path(field: str, path: str | os.PathLike, suffixes: Iterable[str] | None = None) -> Path:
    """``path`` as a :class:`~pathlib.Path` if a file can be written there; else a :class:`SpecError`.

    Checks, without writing anything: the path is not a folder, the suffix is one of ``suffixes``
    (case-insensitive; with several, the format follows from it), its folder exists and is
    writable, and an existing file there is writable (it will be replaced).

    Parameters
    ----------
    field
        Name of the field or flag, as the user typed it (``"--plot"``).
    path
        Where the file would be written.
    suffixes
        Accepted suffixes with the dot (``(".png", ".pdf")``); ``None``: any.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise SpecError(field, f"{str(path)!r} is a folder", "give a file name inside it")
    if suffixes is not None:
        allowed = [s.lower() for s in suffixes]
        if p.suffix.lower() not in allowed:
            got = f"the suffix {p.suffix!r}" if p.suffix else "no suffix"
            if len(allowed) == 1:  # one format: the suffix only says what the file holds
                raise SpecError(field, f"{str(path)!r} has {got}, but the file written is "
                                f"{allowed[0][1:].upper()}", f"name it with {allowed[0]}, e.g. out{allowed[0]}")
            raise SpecError(field, f"{str(path)!r} has {got}; the format is chosen by the suffix",
                            f"end the file name with one of {', '.join(allowed)}")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise SpecError(field, f"the folder {str(folder)!r} does not exist", "create it first, or write elsewhere")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SpecError(field, f"the folder {str(folder)!r} is not writable", "write to a folder you own")
    if p.exists() and not os.access(p, os.W_OK):
        raise SpecError(field, f"{str(path)!r} exists and is not writable", "remove it or write elsewhere")
    return p


def check_input_file(field: str, path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a :class:`~pathlib.Path` if it is a readable file; else a :class:`SpecError`.

    Parameters
    ----------
    field
        Name of the field or flag that gave the path.
    path
        The file.
    what
        What the file should be, for the messages ("TOML spec").

    Returns
    -------
    pathlib.Path
        ``path``, with ``~`` expanded.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise SpecError(field, f"no file at {str(path)!r}", f"give the path of an existing {what}")
    if p.is_dir():
        raise SpecError(field, f"{str(path)!r} is a folder, not a file", f"give the path of a {what} inside it")
    if not os.access(p, os.R_OK):
        raise SpecError(field, f"{str(path)!r} is not readable", "check the file's permissions")
    return p


def read_text_file(field: str, path: str | os.PathLike, what: str = "file") -> str:
    """The text of the UTF-8 file at ``path``; a :class:`SpecError` if it is missing or not UTF-8.

    Parameters
    ----------
    field
        Name of the field or flag that gave the path.
    path
        The file.
    what
        What the file should be, for the messages ("TOML spec").

    Returns
    -------
    str
        The file's text (a UTF-8 byte-order mark is dropped).
    """
    p = check_input_file(field, path, what)
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise SpecError(field, f"{str(path)!r} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line})",
                        f"save the {what} as UTF-8") from None
