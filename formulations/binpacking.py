"""Offline makespan bin packing (paper.md formulation 2): requests onto clients, minimize the largest load.

Variables ``x[r, c] in {0, 1}`` (request ``r`` runs on global client ``c``) and the makespan ``T``::

    min T
    s.t.  sum_c x[r, c] = 1                    for every request r   (group "assign")
          sum_r w[r, c] x[r, c] - T <= 0        for every client c    (group "load")
          T >= T_LB                             (column bound, see :func:`binpacking_lower_bound`)

``w[r, c]`` is the client-time of request ``r`` on client ``c``, seconds; it depends on ``c`` only
through the client's instance, so identical instances give one weight per request. Global client
indices are instance-major (:meth:`lloptim.problem.Problem.client_instance`).

Written with the modeling layer (:func:`binpacking_model`), in a few lines::

    m = Model("binpacking")
    x = m.add_variables("x", coords={"request": R, "client": C}, binary=True)
    T = m.add_variables("T", lower=t_lower, upper=t_upper)
    m.add_constraints("assign", x.sum("client") == 1)
    m.add_constraints("load", (w * x).sum("request") <= T)
    m.minimize(T)

Compiled, column ``r * C + c`` is ``x[r, c]`` and the last column is ``T``.

**The bound.** :func:`binpacking_lower_bound` is the best of the closed-form bounds and, when
instances differ, the LP relaxation solved exactly over instances
(:func:`lloptim.bounds.fractional_assignment_bound`: clients of one instance are identical, so the
LP pools them); its optimal duals are the prices of client time (:func:`binpacking_prices`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from lloptim.bounds import fractional_assignment_bound
from lloptim.errors import SpecError
from lloptim.formulations.compiled import LinearModel
from lloptim.formulations.model import Model
from lloptim.problem import Problem
from lloptim.work import request_work_s

__all__ = ["BinPackingData", "binpacking_data", "binpacking_lower_bound", "binpacking_prices", "binpacking_model",
           "build_binpacking", "loads", "assignment_to_x", "x_to_assignment", "assignment_values"]


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

    @cached_property
    def fleet_lp(self) -> tuple[float, np.ndarray]:
        """The LP relaxation over instances: ``(bound, mu)``, seconds and per-instance prices.

        Solved once per instance by :func:`lloptim.bounds.fractional_assignment_bound` (clients
        of one instance are identical, so the LP over clients equals the LP over instances with
        each instance's client count as its capacity). ``mu[i]`` is the share of the makespan
        price on instance ``i``'s clients (sums to 1). For identical clients it is
        ``(mean weight, [1])`` without a solve.
        """
        return self.solve_fleet_lp()

    def solve_fleet_lp(self, time_limit_s: float | None = None) -> tuple[float, np.ndarray]:
        """:attr:`fleet_lp` within a wall-clock limit: ``(bound, mu)``, seconds and per-instance prices.

        Parameters
        ----------
        time_limit_s
            Seconds the cutting planes of :func:`~lloptim.bounds.fractional_assignment_bound` may
            take (None: until they converge). A bound cut short is still valid, only weaker, and
            is not cached; a converged one is cached as :attr:`fleet_lp`.
        """
        if "fleet_lp" in self.__dict__:
            return self.__dict__["fleet_lp"]
        if self.uniform:
            out = float(self.inst_weights[:, 0].sum()) / max(self.n_clients, 1), np.ones(1)
        else:
            counts = np.bincount(self.client_instance, minlength=self.inst_weights.shape[1]).astype(np.float64)
            t0 = time.perf_counter()
            out = fractional_assignment_bound(self.inst_weights.T, counts, return_prices=True,
                                              time_limit_s=time_limit_s)
            if time_limit_s is not None and time.perf_counter() - t0 >= time_limit_s:
                return out  # possibly cut short: not cached
        self.__dict__["fleet_lp"] = out
        return out


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
    rounded up. When instances differ, the LP relaxation over instances (:attr:`BinPackingData.fleet_lp`,
    exact) is a bound too, usually far stronger than the average. Every feasible assignment's
    makespan is >= it.

    Parameters
    ----------
    data : BinPackingData
        The instance (weights in seconds).

    Returns
    -------
    float
        The bound, seconds.
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
    if not data.uniform:
        bound = max(bound, data.fleet_lp[0])
    return bound


def binpacking_prices(data: BinPackingData, time_limit_s: float | None = None) -> dict[str, np.ndarray]:
    """Optimal LP prices of client time: ``{"load": (C,), "assign": (R,)}``.

    ``load[c]`` is the makespan seconds per second of client ``c``'s capacity lost (>= 0, summing
    to 1; the same for every client of an instance); ``assign[r] = min_c load[c] w[r, c]`` is the
    makespan seconds request ``r`` costs, and ``assign.sum()`` is the LP bound. From
    :attr:`BinPackingData.fleet_lp` (uniform ``1/C`` for identical clients).

    Parameters
    ----------
    data : BinPackingData
        The instance (weights in seconds).
    time_limit_s : float, optional
        Wall-clock limit of the fleet LP, seconds (:meth:`BinPackingData.solve_fleet_lp`); prices
        cut short by it are the best found, and ``assign.sum()`` still a valid bound.

    Returns
    -------
    dict[str, numpy.ndarray]
        The prices.
    """
    C = data.n_clients
    if data.uniform:
        return {"load": np.full(C, 1.0 / C), "assign": data.w / C}
    mu = data.solve_fleet_lp(time_limit_s)[1]
    counts = np.bincount(data.client_instance, minlength=mu.size).astype(np.float64)
    per_inst = mu / np.maximum(counts, 1)
    return {"load": per_inst[data.client_instance], "assign": (data.inst_weights * per_inst[None, :]).min(axis=1)}


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


def assignment_values(data: BinPackingData, assignment: np.ndarray) -> dict[str, np.ndarray]:
    """Values of the variables of :func:`binpacking_model` that encode ``assignment`` (a MIP start).

    Parameters
    ----------
    data : BinPackingData
        The instance.
    assignment : numpy.ndarray
        Global client index of each request, int, shape ``(R,)``.

    Returns
    -------
    dict[str, numpy.ndarray]
        ``"x"``: the one-hot ``(R, C)`` matrix; ``"T"``: the assignment's makespan, seconds.
    """
    x = np.zeros((data.n_requests, data.n_clients))
    x[np.arange(data.n_requests), assignment] = 1.0
    return {"x": x, "T": float(loads(data, assignment).max(initial=0.0))}


def binpacking_model(data: BinPackingData, t_lower: float | None = None, t_upper: float | None = None,
                     integer: bool = True) -> Model:
    """The bin-packing MIP (or its LP relaxation when ``integer=False``) as a :class:`~lloptim.Model`.

    Parameters
    ----------
    data : BinPackingData
        The instance.
    t_lower : float or None
        Lower bound on ``T``, seconds (default: none; pass :func:`binpacking_lower_bound` to tighten).
    t_upper : float or None
        Upper bound on ``T``, seconds (e.g. an incumbent's makespan).
    integer : bool
        Binary ``x`` (default) or continuous ``x`` in ``[0, 1]``.

    Returns
    -------
    Model
        Variables ``x`` (request, client) and ``T``; families ``assign`` (one row per request) and
        ``load`` (one row per client); objective ``min T`` (seconds).
    """
    R, C = data.n_requests, data.n_clients
    w = data.inst_weights[:, data.client_instance] if not data.uniform else data.inst_weights  # (R, C) or (R, 1)
    m = Model("binpacking")
    x = m.add_variables("x", coords={"request": R, "client": C}, binary=integer, upper=np.inf if integer else 1.0)
    T = m.add_variables("T", lower=-np.inf if t_lower is None else t_lower,
                        upper=np.inf if t_upper is None else t_upper)
    m.add_constraints("assign", x.sum("client") == 1)
    m.add_constraints("load", (w * x).sum("request") <= T)
    m.minimize(T)
    m.meta.update(R=R, C=C)
    return m


def build_binpacking(data: BinPackingData, t_lower: float | None = None, t_upper: float | None = None,
                     integer: bool = True) -> LinearModel:
    """The compiled form of :func:`binpacking_model` (same arguments): what a backend consumes.

    Parameters
    ----------
    data : BinPackingData
        The instance.
    t_lower, t_upper : float or None
        Bounds on ``T``, seconds.
    integer : bool
        Binary ``x`` (default) or continuous ``x`` in ``[0, 1]``.

    Returns
    -------
    LinearModel
        Column ``r * C + c`` is ``x[r, c]``, the last column ``T``; groups ``assign`` then ``load``.
    """
    return binpacking_model(data, t_lower, t_upper, integer).compile()
