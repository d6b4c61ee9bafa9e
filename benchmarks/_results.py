"""Writing ``benchmarks/results/``: only when asked, or when the numbers changed.

A benchmark rerun that reproduces the committed numbers must not dirty the git tree with new
timings (wall seconds, decision latencies) or a redrawn figure. :func:`numbers_changed` compares a
new JSON payload with the file on disk, leaving out the keys that are measurements of time.
:func:`write_csv` writes a table of rows, and leaves the committed table alone when the run covers
only part of the benchmark's grid (a few seeds while iterating).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

#: Where the benchmarks keep their results.
RESULTS = Path(__file__).resolve().parent / "results"

#: Keys whose values are timings of this run, not results (compared by :func:`numbers_changed` as equal).
VOLATILE = re.compile(r"(^|_)wall(_s)?$|latency_us$|_ns$|^calibration_s$")


def _stable(x):
    if isinstance(x, dict):
        return {k: _stable(v) for k, v in x.items() if not VOLATILE.search(str(k))}
    if isinstance(x, list):
        return [_stable(v) for v in x]
    return x


def numbers_changed(path: Path, payload: dict) -> bool:
    """Whether ``payload`` differs from the JSON at ``path`` other than in timings (or ``path`` is missing).

    Parameters
    ----------
    path
        The results file.
    payload
        What the benchmark would write (JSON-ready once floats are plain).

    Returns
    -------
    bool
        True when the file is missing or unreadable, or any non-timing value differs (exactly, after a
        JSON round trip).
    """
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return True
    new = json.loads(json.dumps(payload, default=float))
    return _stable(old) != _stable(new)


def write_csv(name: str, rows: list[dict], partial: bool = False) -> Path | None:
    """Write ``rows`` to ``benchmarks/results/<name>`` (a header from the first row's keys).

    Parameters
    ----------
    name
        File name inside ``benchmarks/results/``.
    rows
        The table, one dict per row (every row with the first row's keys).
    partial
        The run covers only part of the benchmark's default grid: nothing is written, so that a
        quick check never replaces the committed table (a note says so).

    Returns
    -------
    pathlib.Path or None
        The file written, or None when nothing was (``partial``, or no rows).
    """
    if partial or not rows:
        print(f"(a partial run: benchmarks/results/{name} left as it is)")
        return None
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def int_ranges(text: str) -> list[int]:
    """Integers of a command-line list of numbers and ranges, ``"1-3,7"`` -> ``[1, 2, 3, 7]`` ("" -> [])."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out
