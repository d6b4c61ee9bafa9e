"""Offline makespan bin packing (paper.md formulation 2): requests onto clients, minimize the largest load.

Variables ``x[r, c] in {0, 1}`` (request ``r`` runs on global client ``c``) and the makespan ``T``::

    min T
    s.t.  sum_c x[r, c] = 1                    for every request r   (group "assign")
          sum_r w[r, c] x[r, c] - T <= 0        for every client c    (group "load")
          T >= T_LB                             (column bound, see :func:`binpacking_lower_bound`)

``w[r, c]`` is the client-time of request ``r`` on client ``c``, seconds; it depends on ``c`` only
through the client's instance, so identical instances give one weight per request. Global client
indices are instance-major (:meth:`lloptim.problem.Problem.client_instance`). Column ``r * C + c``
is ``x[r, c]``; the last column is ``T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lloptim.formulations.model import LinearModel, ModelBuilder
from lloptim.errors import SpecError
from lloptim.problem import Problem
from lloptim.work import request_work_s

__all__ = ["BinPackingData", "binpacking_data", "binpacking_lower_bound", "build_binpacking", "loads",
           "assignment_to_x", "x_to_assignment"]


@dataclass(frozen=True, eq=False)
class BinPackingData:
    """The numbers of one bin-packing instance.

    Attributes
    ----------
    inst_weights
        ``(R, m)`` array: seconds of client-time of request ``r`` on a client of instance ``i``.
    client_instance
        ``(C,)`` int64: instance of each global client.
    uniform
        True when every instance prices every request the same (then ``w`` is one column).
    """

    inst_weights: np.ndarray
    client_instance: np.ndarray
    uniform: bool

    @property
    def n_requests(self) -> int:
        """Number of requests ``R``."""
        return int(self.inst_weights.shape[0])

    @property
    def n_clients(self) -> int:
        """Number of clients ``C`` over all instances."""
        return int(self.client_instance.size)

    @property
    def w(self) -> np.ndarray:
        """Per-request weight when :attr:`uniform`, else the cheapest instance's, seconds (``(R,)``)."""
        return self.inst_weights[:, 0] if self.uniform else self.inst_weights.min(axis=1)

    def weight_matrix(self) -> np.ndarray:
        """The full ``(R, C)`` matrix ``w[r, c]``, seconds (memory ``8 R C`` bytes: build only when needed)."""
        return self.inst_weights[:, self.client_instance]

    def request_weights_on(self, assignment: np.ndarray) -> np.ndarray:
        """Weight of each request on the client ``assignment`` gives it, seconds."""
        if self.uniform:
            return self.inst_weights[:, 0]
        return self.inst_weights[np.arange(self.n_requests), self.client_instance[assignment]]


def binpacking_data(problem: Problem, weights: np.ndarray | None = None,
                    estimates: np.ndarray | None = None) -> BinPackingData:
    """The bin-packing numbers of ``problem``.

    Parameters
    ----------
    problem
        The problem (clients of all instances are the bins).
    weights
        Override: seconds per request, ``(R,)`` (same on every client) or ``(R, m)`` (per instance).
        Default: :func:`lloptim.work.request_work_s` on each instance.
    estimates
        Output-length estimates, tokens, used for the default weights; default: true lengths.

    Raises
    ------
    SpecError
        ``weights`` of the wrong shape, negative or not finite.
    """
    R, m = problem.n_requests, len(problem.instances)
    if weights is None:
        W = np.column_stack([request_work_s(problem, estimates, instance=i) for i in range(m)])
    else:
        W = np.asarray(weights, dtype=np.float64)
        if W.ndim == 1:
            W = W[:, None]
        if W.shape[0] != R or W.shape[1] not in (1, m) or W.ndim != 2:
            raise SpecError("weights", f"has shape {np.shape(weights)} for {R} requests and {m} instances",
                            f"give {R} seconds per request, or an array of shape ({R}, {m})")
        bad = np.flatnonzero(~np.isfinite(W).all(axis=1) | (W < 0).any(axis=1))
        if bad.size:
            raise SpecError(f"weights[{int(bad[0])}]", f"is {W[bad[0]].tolist()}",
                            "give finite, non-negative seconds")
    uniform = bool(np.all(W == W[:, :1]))
    if uniform:
        W = W[:, :1]
    W = np.ascontiguousarray(W)
    W.setflags(write=False)
    return BinPackingData(W, problem.client_instance().astype(np.int64), uniform)


def binpacking_lower_bound(data: BinPackingData) -> float:
    """Closed-form lower bound on the bin-packing makespan, seconds.

    ``max(sum(w) / C, max(w), w_(C) + w_(C+1))`` where ``w`` is each request's cheapest weight and
    ``w_(k)`` the ``k``-th largest: the average load, the largest job, and (identical clients only)
    two of the ``C + 1`` largest jobs sharing a client. When every weight is a whole number (e.g.
    ``P||Cmax`` in decode steps, weights = output tokens) every load is too, so the average is
    rounded up. Every feasible assignment's makespan is >= it.
    """
    w = data.w
    C = data.n_clients
    avg = float(w.sum()) / C
    if np.all(w == np.round(w)):
        avg = float(np.ceil(avg - 1e-9 * max(1.0, avg)))
    bound = max(avg, float(w.max()))
    if data.uniform and w.size > C:
        top = np.partition(w, w.size - C - 1)[w.size - C - 1:]
        top.sort()
        bound = max(bound, float(top[0] + top[1]))
    return bound


def loads(data: BinPackingData, assignment: np.ndarray) -> np.ndarray:
    """Load of every client under ``assignment`` (global client per request), seconds.

    Parameters
    ----------
    data : BinPackingData
        The instance.
    assignment : numpy.ndarray
        Global client index of each request, int, shape ``(R,)``.

    Returns
    -------
    numpy.ndarray
        Shape ``(C,)``, float64: the sum of the weights of the requests on each client, seconds of
        client time (0 for an idle client).
    """
    return np.bincount(assignment, weights=data.request_weights_on(assignment), minlength=data.n_clients)


def assignment_to_x(data: BinPackingData, assignment: np.ndarray) -> np.ndarray:
    """The column vector ``[x (r-major), T]`` of ``assignment`` (a MIP start).

    Parameters
    ----------
    data : BinPackingData
        The instance.
    assignment : numpy.ndarray
        Global client index of each request, int, shape ``(R,)``.

    Returns
    -------
    numpy.ndarray
        Shape ``(R * C + 1,)``, float64, the column layout of :func:`build_binpacking`:
        ``x[r * C + assignment[r]] = 1`` (other ``x`` entries 0) and the last entry ``T`` = the
        assignment's makespan (largest client load), seconds.
    """
    R, C = data.n_requests, data.n_clients
    x = np.zeros(R * C + 1)
    x[np.arange(R) * C + assignment] = 1.0
    x[-1] = float(loads(data, assignment).max())
    return x


def x_to_assignment(data: BinPackingData, x: np.ndarray) -> np.ndarray | None:
    """The assignment encoded by the column vector ``x``, or None when ``x`` is not integral one-hot.

    Parameters
    ----------
    data : BinPackingData
        The instance.
    x : numpy.ndarray
        A column vector of :func:`build_binpacking` (length ``R * C + 1``; only the first
        ``R * C`` entries, the ``x[r, c]`` in r-major order, are read; the makespan ``T`` is ignored).

    Returns
    -------
    numpy.ndarray or None
        Global client index of each request (the column of the largest entry of its row of ``x``),
        int64, shape ``(R,)``; None unless, for every request, that entry is within ``1e-5`` of 1
        and the row sums to 1 within ``1e-5``.
    """
    R, C = data.n_requests, data.n_clients
    X = np.asarray(x, dtype=np.float64)[: R * C].reshape(R, C)
    a = X.argmax(axis=1)
    ok = (np.abs(X[np.arange(R), a] - 1.0) < 1e-5) & (np.abs(X.sum(axis=1) - 1.0) < 1e-5)
    return a.astype(np.int64) if bool(ok.all()) else None


def build_binpacking(data: BinPackingData, t_lower: float | None = None, t_upper: float | None = None,
                     integer: bool = True) -> LinearModel:
    """The bin-packing MIP (or its LP relaxation when ``integer=False``) as a :class:`LinearModel`.

    Parameters
    ----------
    data
        The instance.
    t_lower
        Lower bound on ``T``, seconds (default: none; pass :func:`binpacking_lower_bound` to tighten).
    t_upper
        Upper bound on ``T``, seconds (e.g. an incumbent's makespan).
    integer
        Binary ``x`` (default) or continuous ``x`` in ``[0, 1]``.
    """
    R, C = data.n_requests, data.n_clients
    b = ModelBuilder("binpacking")
    b.add_block("x", R * C, lo=0.0, hi=1.0, integer=integer)
    b.add_block("T", 1, lo=-np.inf if t_lower is None else t_lower, hi=np.inf if t_upper is None else t_upper)
    r = np.repeat(np.arange(R), C)
    c = np.tile(np.arange(C), R)
    cols = np.arange(R * C)
    b.add_group("assign", R, {"x": (r, cols, 1.0)}, lo=1.0, hi=1.0)
    wvals = np.broadcast_to(data.inst_weights[:, data.client_instance] if not data.uniform
                            else data.inst_weights, (R, C)).ravel()
    b.add_group("load", C, {"x": (c, cols, wvals), "T": (np.arange(C), np.zeros(C, np.int64), -1.0)}, hi=0.0)
    cost = np.zeros(R * C + 1)
    cost[-1] = 1.0
    return b.build(cost, meta={"R": R, "C": C})
