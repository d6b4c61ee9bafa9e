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

__all__ = ["SolveParams"]


@dataclass
class SolveParams:
    """Parameters of a solve.

    Attributes
    ----------
    time_limit_s
        Wall-clock limit of the backend's own search, seconds (``None``: none). Bounds and the greedy
        incumbent are computed before and do not count against it.
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
    """

    time_limit_s: float | None = None
    rel_gap: float = 1e-4
    threads: int | None = None
    seed: int = 0
    warm_start: np.ndarray | None = None
    verbose: bool = False
    solver_options: dict = field(default_factory=dict)

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
