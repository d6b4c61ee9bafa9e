"""Run a backend's search in a child process that is stopped at the deadline or past its memory.

Solvers cannot be interrupted from Python once they run, and none checks its time limit in every
phase: CBC ran 25 s for a 20 s limit on the 1319 x 200 bin packing (stuck in its root cut loop,
growing to 6 GiB), HiGHS 69 s for a 30 s limit on the same packing with side constraints on a
loaded machine. :func:`run_isolated` forks a child that inherits the loaded
model (copy-on-write, nothing is serialized on the way in), runs the search there, and sends back
a small picklable answer. The parent polls the child every 50 ms and kills it when

* the deadline plus a grace period has passed (``reason="time"``), or
* its resident memory has grown more than the allowance above what it started with
  (``reason="memory"``).

The caller then keeps its own incumbent and bound, so a stopped search still returns on time.
Where ``fork`` is not available (Windows, macOS' default), the function runs in-process without
the hard stop.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import psutil

from lloptim.errors import LloptimError
from lloptim.solvers.limits import GRACE_S

__all__ = ["IsolatedRun", "run_isolated", "can_isolate"]

POLL_S = 0.05  # seconds between two looks at the child


@dataclass
class IsolatedRun:
    """What came back from :func:`run_isolated`.

    Attributes
    ----------
    value
        The function's return value (None when it did not return).
    reason
        ``""`` when it returned; ``"time"`` or ``"memory"`` when it was stopped; otherwise the
        error it raised or how the child died.
    peak_mb
        The child's resident-memory high-water mark, MiB (as polled every 50 ms; it starts with
        the parent's pages, shared copy-on-write).
    grown_mb
        How much of it the child added above what it started with, MiB: the backend's own memory.
    wall_s
        Seconds from start to result or stop.
    """

    value: Any
    reason: str
    peak_mb: float
    grown_mb: float
    wall_s: float


def can_isolate() -> bool:
    """Whether :func:`run_isolated` can stop a child here (Linux ``fork``, not inside a daemon process)."""
    return sys.platform.startswith("linux") and not mp.current_process().daemon


def _child(conn, fn: Callable, args: tuple) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except LloptimError as exc:  # a user error (a bad option): the parent raises it again
        conn.send(("raise", exc))
    except BaseException as exc:  # noqa: BLE001 - report anything to the parent rather than die silently
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except Exception:  # noqa: BLE001
            pass
    finally:
        conn.close()


def run_isolated(fn: Callable, args: tuple, deadline_at: float | None, max_mem_mb: float | None,
                 grace_s: float = GRACE_S) -> IsolatedRun:
    """Run ``fn(*args)`` in a forked child, stopping it at ``deadline_at`` or past ``max_mem_mb``.

    Parameters
    ----------
    fn : callable
        The work; its return value must be picklable (numpy arrays, floats, strings).
    args : tuple
        Its arguments (inherited by the child, not serialized).
    deadline_at : float or None
        ``time.perf_counter()`` time after which (plus ``grace_s``) the child is killed, seconds;
        ``None``: never.
    max_mem_mb : float or None
        Growth of the child's resident memory, MiB, past which it is killed; ``None``: no limit.
    grace_s : float
        Seconds past ``deadline_at`` before the kill (default
        :data:`~lloptim.solvers.limits.GRACE_S`).

    Returns
    -------
    IsolatedRun
        The value or why there is none, the child's memory peak and the wall time.

    Raises
    ------
    LloptimError
        Whatever lloptim error ``fn`` raised in the child (a bad option, say), raised again here.
    """
    t0 = time.perf_counter()
    if not can_isolate():
        try:
            return IsolatedRun(fn(*args), "", 0.0, 0.0, time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - same contract as the child: report, do not raise
            return IsolatedRun(None, f"{type(exc).__name__}: {exc}", 0.0, 0.0, time.perf_counter() - t0)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args), daemon=True)
    # The child's collector must never finalize the parent's garbage: a finalizer of another
    # library (a Ray actor handle's, measured) can wait forever on a lock that one of the parent's
    # threads held at the fork, and the child would hang until the deadline, or forever without one.
    # Objects frozen before the fork are left alone by the child's collector (gc.freeze).
    gc.freeze()
    try:
        proc.start()
    finally:
        gc.unfreeze()
    child.close()
    base = peak = 0.0
    value, reason = None, ""
    try:
        ps = psutil.Process(proc.pid)
        base = ps.memory_info().rss / 2**20
    except psutil.Error:
        ps = None
    try:
        while True:
            if parent.poll(POLL_S):
                try:
                    kind, payload = parent.recv()
                except EOFError:
                    reason = f"the child exited with code {proc.exitcode}"
                    break
                if kind == "raise":
                    raise payload
                if kind == "ok":
                    value = payload
                else:
                    reason = payload
                break
            if not proc.is_alive():
                proc.join()
                reason = f"the child exited with code {proc.exitcode}"
                break
            if ps is not None:
                try:
                    grown = ps.memory_info().rss / 2**20 - base
                except psutil.Error:
                    grown = 0.0
                peak = max(peak, grown)
                if max_mem_mb is not None and grown > max_mem_mb:
                    reason = "memory"
                    break
            if deadline_at is not None and time.perf_counter() > deadline_at + grace_s:
                reason = "time"
                break
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        parent.close()
    return IsolatedRun(value, reason, base + peak, peak, time.perf_counter() - t0)
