"""Writing ``benchmarks/results/``: only when asked, or when the numbers changed.

A benchmark rerun that reproduces the committed numbers must not dirty the git tree with new
timings (wall seconds, decision latencies) or a redrawn figure. :func:`numbers_changed` compares a
new JSON payload with the file on disk, leaving out the keys that are measurements of time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

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
