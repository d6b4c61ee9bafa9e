"""The per-request trace of a run: a CSV row per request.

``lloptim simulate SPEC --trace FILE.csv`` writes :func:`write_trace_csv`: one row per request, in
row order, with the columns of :data:`TRACE_COLUMNS`::

    id,instance,client,arrival_s,ready_s,start_s,finish_s
    chain-0-solve,0,12,0,0,0,4.118
    chain-0-verify,0,12,0,4.118,4.133,5.402

``ready_s`` is when the request could start (its arrival, or its last predecessor's finish if
later), ``start_s`` the start of its prefill (its first chunk under chunked prefill), ``finish_s``
its last decode step. A request that never ran has empty cells.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from lloptim.runtime.engine import RunResult
from lloptim.validation import check_output_path as _check_output_path

__all__ = ["TRACE_COLUMNS", "trace_rows", "write_trace_csv", "check_output_path"]

#: Columns of the trace CSV, in order.
TRACE_COLUMNS = ("id", "instance", "client", "arrival_s", "ready_s", "start_s", "finish_s")


def check_output_path(path: str | Path, flag: str) -> Path:
    """Check that a file can be written at ``path`` (before any work); return it.

    Parameters
    ----------
    path
        The file to write; it is replaced if it exists.
    flag
        Name of the option it came from, for the message (e.g. ``"--trace"``).

    Raises
    ------
    SpecError
        ``path`` is a folder, its folder does not exist, or that folder is not writable.
    """
    return _check_output_path(flag, path)  # the one check every command's output files go through


def trace_rows(result: RunResult) -> list[dict]:
    """One dictionary per request (row order) with the :data:`TRACE_COLUMNS`; times in seconds.

    Parameters
    ----------
    result
        The run.

    Returns
    -------
    list of dict
        ``instance`` and ``client`` are None, and times NaN, for a request that never ran.
    """
    w = result.problem.workload
    inst_of = result.problem.client_instance()
    rows = []
    client = result.client.tolist()
    for r in range(len(w)):
        c = client[r]
        rows.append({"id": w.ids[r], "instance": int(inst_of[c]) if c >= 0 else None, "client": c if c >= 0 else None,
                     "arrival_s": float(w.arrival_s[r]), "ready_s": float(result.ready_s[r]),
                     "start_s": float(result.prefill_start_s[r]), "finish_s": float(result.done_s[r])})
    return rows


def write_trace_csv(result: RunResult, path: str | Path) -> Path:
    """Write the per-request trace of ``result`` to ``path`` as CSV (:data:`TRACE_COLUMNS`); return the path.

    Parameters
    ----------
    result
        The run.
    path
        The CSV file to write (replaced if it exists).
    """
    p = Path(path)
    with p.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(TRACE_COLUMNS)
        for row in trace_rows(result):
            out.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else
                          (repr(v) if isinstance(v, float) else v) for v in (row[k] for k in TRACE_COLUMNS)])
    return p

