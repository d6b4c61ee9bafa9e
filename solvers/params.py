"""One parameter object for every backend (after OR-Tools MathOpt's ``SolveParameters``).

Backends map the common fields onto their own options and take anything else from
``solver_options``, the escape hatch; an option a backend does not know is an error, not a silent
no-op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lloptim.errors import SpecError

__all__ = ["SolveParams", "PIPELINE_OPTIONS"]

#: ``solver_options`` keys read by :func:`lloptim.solve` itself and never passed to a backend.
PIPELINE_OPTIONS = ("always_run", "max_mem_mb", "horizon", "start_work")


@dataclass
class SolveParams:
    """Parameters of a solve.

    Attributes
    ----------
    time_limit_s
        Wall-clock limit of the whole solve, seconds (``None``: none): the start heuristic and the
        bounds, building the model, loading it into the backend, the search and reading the
        answer back all count. Every backend returns within about 10 % + 1 s of it, with the best
        answer and bound known then.
    rel_gap
        Stop when ``(primal - dual) / primal <= rel_gap`` (relative, e.g. ``1e-4`` = 0.01 %).
    threads
        Threads the backend may use (``None``: backend default).
    seed
        Random seed handed to the backend.
    warm_start
        An assignment (global client per request, int) to start from; the better of it and the
        greedy incumbent is the MIP start.
    verbose
        Let the backend print its log.
    solver_options
        Backend-specific options passed through verbatim (e.g. ``{"presolve": "off"}`` for HiGHS,
        ``{"method": "volume"}`` for the Lagrangian backend).
    max_mem_mb
        Memory the backend may use, MiB (``None``: 80 % of the memory available when the solve
        starts). A model whose estimate exceeds it is refused before any work; a backend that
        grows past it is stopped and the best answer known is returned (``limit="memory"``).
        ``solver_options["max_mem_mb"]`` is read as well.
    always_run
        Run the requested backend even when the start already meets ``rel_gap`` (the default skips
        a search that could only confirm it, and says so in :attr:`SolveResult.skipped`).
        ``solver_options["always_run"]`` is read as well.

    Notes
    -----
    ``solver_options["start_work"]`` (a pipeline option, never passed to a backend) is the work
    budget of the bin-packing start's local search, elements touched
    (:func:`lloptim.solvers.greedy.local_search`'s ``work_limit``): with it the start, and the
    ``greedy`` backend's answer, no longer depend on the machine's load; ``time_limit_s`` then
    only cuts a search that the budget would let run longer.
    """

    time_limit_s: float | None = None
    rel_gap: float = 1e-4
    threads: int | None = None
    seed: int = 0
    warm_start: np.ndarray | None = None
    verbose: bool = False
    solver_options: dict = field(default_factory=dict)
    max_mem_mb: float | None = None
    always_run: bool = False

    def __post_init__(self) -> None:
        tl = self.time_limit_s
        if tl is not None and (isinstance(tl, bool) or not isinstance(tl, (int, float))
                               or not math.isfinite(tl) or tl <= 0):
            raise SpecError("params.time_limit_s", f"must be a positive number of seconds, got {tl!r}",
                            "give e.g. time_limit_s=5, or None for no limit")
        g = self.rel_gap
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (0 <= g < 1):
            raise SpecError("params.rel_gap", f"must be in [0, 1), got {g!r}", "give e.g. rel_gap=1e-4")
        th = self.threads
        if th is not None and (isinstance(th, bool) or not isinstance(th, (int, np.integer)) or th < 1):
            raise SpecError("params.threads", f"must be a positive integer, got {th!r}", "give e.g. threads=1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise SpecError("params.seed", f"must be a non-negative integer, got {self.seed!r}", "give e.g. seed=0")
        if not isinstance(self.solver_options, dict):
            raise SpecError("params.solver_options", "must be a dict", "give e.g. {'presolve': 'off'}")
        mem = self.max_mem_mb if self.max_mem_mb is not None else self.solver_options.get("max_mem_mb")
        if mem is not None and (isinstance(mem, bool) or not isinstance(mem, (int, float)) or not math.isfinite(mem)
                                or mem <= 0):
            raise SpecError("params.max_mem_mb", f"must be a positive number of MiB, got {mem!r}",
                            "give e.g. max_mem_mb=4096, or None for 80 % of the available memory")

    @property
    def memory_limit_mb(self) -> float | None:
        """The memory limit asked for, MiB (the field, else ``solver_options["max_mem_mb"]``)."""
        if self.max_mem_mb is not None:
            return float(self.max_mem_mb)
        v = self.solver_options.get("max_mem_mb")
        return None if v is None else float(v)

    @property
    def run_always(self) -> bool:
        """Whether the requested backend runs even when the start already meets the gap."""
        return bool(self.always_run or self.solver_options.get("always_run", False))

    def backend_options(self) -> dict:
        """``solver_options`` without the keys the pipeline reads itself (``always_run``, ``max_mem_mb`` in MiB...)."""
        return {k: v for k, v in self.solver_options.items() if k not in PIPELINE_OPTIONS}

    def check_warm_start(self, n_requests: int, n_clients: int) -> np.ndarray | None:
        """The warm start as an int64 array, validated against the problem's size.

        Parameters
        ----------
        n_requests : int
            Number of requests ``R`` (count): the length the warm start must have.
        n_clients : int
            Number of clients ``C`` over all instances (count): client indices must be in
            ``[0, C)``.

        Returns
        -------
        numpy.ndarray or None
            :attr:`warm_start` as int64, shape ``(R,)`` (global client of each request); None when
            no warm start was given.

        Raises
        ------
        SpecError
            Wrong length, non-integer entries or a client index out of range.
        """
        if self.warm_start is None:
            return None
        a = np.asarray(self.warm_start)
        if a.shape != (n_requests,):
            raise SpecError("params.warm_start", f"has shape {a.shape} for {n_requests} requests",
                            "give one client index per request")
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise SpecError("params.warm_start", "must hold integer client indices", "pass an int array")
        bad = np.flatnonzero((a < 0) | (a >= n_clients))
        if bad.size:
            raise SpecError(f"params.warm_start[{int(bad[0])}]", f"is client {int(a[bad[0]])}",
                            f"use a client index in [0, {n_clients})")
        return a.astype(np.int64)
