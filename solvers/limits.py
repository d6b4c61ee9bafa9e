"""Time and memory limits shared by every backend: one deadline per solve, one memory allowance.

:class:`Deadline` is fixed when :func:`lloptim.solve` starts; every stage (start heuristic,
build, loading the model into the backend, the search, reading the answer) draws on what is left
of it, so ``time_limit_s`` bounds the whole call, not just the backend's search. A backend whose
search cannot be interrupted in-process (CBC) runs in a child process that is stopped at the
deadline (:mod:`lloptim.solvers.isolation`).

Memory: :func:`memory_guard` refuses a model whose estimate exceeds the allowance before any work;
:func:`memory_limit_mb` is that allowance (``SolveParams.max_mem_mb``, else 80 % of the memory
available when the solve starts), which the child-process runner also enforces while the search
runs.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

import psutil

from lloptim.errors import ModelTooLargeError

__all__ = ["Deadline", "memory_limit_mb", "memory_guard", "peak_rss_mb", "rss_mb", "MEM_FRACTION", "GRACE_S",
           "GRACE_SHARE"]

#: Share of the memory available when a solve starts that a backend may use (no unit: a fraction).
MEM_FRACTION = 0.8
#: Seconds a backend in a child process may overrun the deadline (reading its answer back) before
#: it is stopped, on top of :data:`GRACE_SHARE` of the time limit.
GRACE_S = 0.5
#: Share of the time limit a backend in a child process may overrun the deadline by (dimensionless);
#: it is also told to stop this much before the deadline, so that it normally stops by itself.
GRACE_SHARE = 0.04


@dataclass(frozen=True)
class Deadline:
    """The wall-clock deadline of one solve.

    Attributes
    ----------
    start
        ``time.perf_counter()`` when the solve started, seconds.
    limit_s
        The time limit, seconds (``None``: none).
    """

    start: float
    limit_s: float | None

    @classmethod
    def starting_now(cls, limit_s: float | None) -> "Deadline":
        """A deadline ``limit_s`` seconds from now (``None``: none).

        Parameters
        ----------
        limit_s : float or None
            Seconds.

        Returns
        -------
        Deadline
            The deadline.
        """
        return cls(time.perf_counter(), limit_s)

    @property
    def at(self) -> float | None:
        """The deadline on the ``perf_counter`` clock, seconds (``None``: none)."""
        return None if self.limit_s is None else self.start + self.limit_s

    def elapsed(self) -> float:
        """Seconds since the solve started."""
        return time.perf_counter() - self.start

    def remaining(self) -> float | None:
        """Seconds left (never negative; ``None`` without a limit)."""
        return None if self.limit_s is None else max(0.0, self.start + self.limit_s - time.perf_counter())

    def expired(self) -> bool:
        """Whether no time is left (0 seconds remaining)."""
        left = self.remaining()
        return left is not None and left <= 0.0

    def grace_s(self) -> float:
        """Seconds a child-process backend may run past the deadline before it is stopped.

        ``GRACE_SHARE * limit_s + GRACE_S`` (0 without a limit): within the promise of 10 % of the
        limit plus 1 s.
        """
        return 0.0 if self.limit_s is None else GRACE_SHARE * self.limit_s + GRACE_S

    def share(self, fraction: float, floor_s: float = 0.0) -> float | None:
        """A part of the time left: ``max(floor_s, fraction * remaining)``, capped at the remaining time.

        Parameters
        ----------
        fraction : float
            Share of the remaining time (dimensionless, in ``(0, 1]``).
        floor_s : float
            Seconds granted even when the share is smaller (still capped at the remaining time).

        Returns
        -------
        float or None
            Seconds (``None`` without a limit).
        """
        left = self.remaining()
        return None if left is None else min(left, max(floor_s, fraction * left))


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process now, MiB (this process by default).

    Parameters
    ----------
    pid : int or None
        Process id (``None``: this process).

    Returns
    -------
    float
        MiB.
    """
    return psutil.Process(pid or os.getpid()).memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """High-water mark of this process's resident memory, MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory_limit_mb(params) -> float:
    """The memory a backend may use in this solve, MiB.

    Parameters
    ----------
    params : SolveParams
        ``max_mem_mb`` (or ``solver_options["max_mem_mb"]``), MiB, when given.

    Returns
    -------
    float
        The limit given, else :data:`MEM_FRACTION` of the memory available now, MiB.
    """
    limit = params.memory_limit_mb
    return float(limit) if limit is not None else MEM_FRACTION * psutil.virtual_memory().available / 2**20


def memory_guard(backend, model, params) -> float:
    """Refuse a model the backend cannot hold; return its estimate, MiB.

    Parameters
    ----------
    backend : ~lloptim.solvers.registry.Backend
        The backend that would solve the model (its
        :meth:`~lloptim.solvers.registry.Backend.estimate_mem_mb` is asked).
    model : LinearModel
        The compiled model about to be handed to it.
    params : SolveParams
        The solve's parameters (the limit, :func:`memory_limit_mb`, MiB).

    Returns
    -------
    float
        The backend's memory estimate for ``model``, MiB.

    Raises
    ------
    ModelTooLargeError
        When the estimate exceeds the limit; the message names the sizes and the fixes.
    """
    est = backend.estimate_mem_mb(model)
    limit = memory_limit_mb(params)
    if est > limit:
        raise ModelTooLargeError(
            f"{backend.name}: the {model.name} model ({model.n_integer:,} integer columns, {model.nnz:,} non-zeros) "
            f"needs about {est / 1024:.1f} GiB, more than the {limit / 1024:.1f} GiB allowed "
            f"(fix: use solver='highs' or 'greedy', fewer requests/clients, or raise max_mem_mb)")
    return est
