"""One result object for every backend (after MathOpt's ``SolveResult`` and Pyomo's ``Results``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Termination", "Limit", "SolveResult"]


class Termination(str, enum.Enum):
    """How a solve ended.

    ``optimal``: the incumbent is proven within ``rel_gap`` of the bound; ``feasible``: a limit
    stopped the search with an incumbent (see :class:`Limit`); ``infeasible``: no assignment
    exists; ``error``: the backend failed and left no usable answer.
    """

    OPTIMAL = "optimal"
    FEASIBLE = "feasible"
    INFEASIBLE = "infeasible"
    ERROR = "error"


class Limit(str, enum.Enum):
    """What stopped a search that did not prove optimality: ``time``, ``gap``, ``iteration`` or ``none``."""

    NONE = "none"
    TIME = "time"
    GAP = "gap"
    ITERATION = "iteration"


@dataclass
class SolveResult:
    """The outcome of :func:`lloptim.solvers.solve`.

    Attributes
    ----------
    status
        :class:`Termination`.
    limit
        :class:`Limit` that stopped the search (``none`` when it ran to the end).
    primal_bound
        Objective of the returned assignment recomputed from the weights, seconds (bin-packing
        makespan, or the replayed makespan for the full MIP).
    dual_bound
        Best proven lower bound on the optimum, seconds: the backend's own, or the closed-form bound
        every backend receives, whichever is larger.
    gap
        ``(primal_bound - dual_bound) / primal_bound`` (relative, >= 0).
    assignment
        Global client of each request (int64, ``len = n_requests``).
    multipliers
        ``"load"``: per-client prices of client time (>= 0, sum 1; makespan seconds per second of a
        client's capacity lost); ``"assign"``: per-request prices, seconds.
    build_s, solve_s
        Wall time building the model (incl. bounds and the incumbent) and in the backend, seconds.
    peak_mem_mb
        High-water mark of this process's resident memory after the solve, MiB (``ru_maxrss``; run
        each solve in a fresh process to attribute it to one backend, as ``lloptim compare`` does).
    backend, formulation
        Names.
    extra
        Backend-specific details (node counts, iterations, the backend's raw bound, model sizes).
    """

    status: Termination
    limit: Limit
    primal_bound: float | None
    dual_bound: float | None
    gap: float | None
    assignment: np.ndarray | None
    multipliers: dict[str, np.ndarray] = field(default_factory=dict)
    build_s: float = 0.0
    solve_s: float = 0.0
    peak_mem_mb: float = 0.0
    backend: str = ""
    formulation: str = ""
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The JSON-ready row ``lloptim compare`` prints (no arrays)."""
        return {"backend": self.backend, "status": self.status.value, "limit": self.limit.value,
                "primal_bound": self.primal_bound, "dual_bound": self.dual_bound, "gap": self.gap,
                "build_s": self.build_s, "solve_s": self.solve_s, "peak_mem_mb": self.peak_mem_mb,
                "formulation": self.formulation}
