"""Offline planning of requests with precedence, exactly: ``P|prec|Cmax`` as a mixed-integer program.

The planning problem of :mod:`lloptim.dag_plan`: request ``r`` occupies one client for
``w[r, k]`` seconds of work on a client of instance kind ``k``, starts no earlier than its release
``a_r`` and after its predecessors finish; minimize the makespan. Written with the modeling layer
(:class:`lloptim.Model`) as a *client-chain flow*: the clients of a kind are anonymous, so a
schedule is a set of at most ``C_k`` chains per kind, request ``s`` following request ``r``
directly on the same client (``f[k, r, s] = 1``) or opening a chain (``g[k, s] = 1``)::

    min T
    s.t.  sum_k g[k, s] + sum_{k, r} f[k, r, s] = 1               every request has one place   ("place")
          sum_t f[k, s, t] <= g[k, s] + sum_r f[k, r, s]           a chain goes on on its kind   ("chain")
          sum_s g[k, s] <= C_k                                     clients of kind k             ("clients")
          d_r = sum_k w[r, k] (g[k, r] + sum_q f[k, q, r])          r's duration on its kind
          S_s >= S_r + d_r - M (1 - sum_k f[k, r, s])               one after another on a client ("sequence")
          S_s >= S_r + d_r                      for each r -> s     precedence                    ("precedence")
          T >= S_r + d_r,  S_r >= a_r,  T >= T_LB                                                  ("makespan")

with ``M`` the horizon of a feasible plan (a list schedule), which also starts the search. There
are no client indices, so none of the ``C!`` symmetric relabellings of an assignment model: the
model has ``K n^2`` binaries and solves small workflows (a dozen requests) to optimality in
seconds. :func:`solve_precedence_mip` returns a :class:`~lloptim.dag_plan.DagPlan` (starts and
clients, the proven bound).
"""

from __future__ import annotations

import numpy as np

from lloptim.dag_plan import DagPlan, list_schedule
from lloptim.precedence import Precedence

__all__ = ["build_precedence_mip", "solve_precedence_mip"]


def build_precedence_mip(precedence: Precedence, weights: np.ndarray, clients_per_kind: np.ndarray,
                         release: np.ndarray, horizon: float, makespan_lower: float = 0.0):
    """The client-chain MIP of the module docstring as a :class:`lloptim.Model`.

    Parameters
    ----------
    precedence
        The DAG over the ``n`` requests.
    weights
        ``(n, K)`` work of each request on a client of each kind, seconds.
    clients_per_kind
        ``(K,)`` clients of each kind (count).
    release
        ``(n,)`` earliest start of each request, seconds.
    horizon
        Makespan of a feasible plan, seconds: the big-M of the sequencing rows.
    makespan_lower
        A valid lower bound on the makespan, seconds (a column bound on ``T``).

    Returns
    -------
    Model
        Variables ``S`` (starts, s), ``T`` (makespan, s), ``f`` (``(K, n, n)`` follows) and ``g``
        (``(K, n)`` opens a chain).
    """
    from lloptim.formulations.model import Model

    w = np.asarray(weights, dtype=np.float64)
    n, K = w.shape
    rel = np.asarray(release, dtype=np.float64)
    m = Model("precedence")
    start = m.add_variables("S", shape=n, lower=rel, upper=max(horizon, float(rel.max(initial=0.0))))
    makespan = m.add_variables("T", lower=makespan_lower)
    no_self = np.ones((K, n, n))
    no_self[:, np.arange(n), np.arange(n)] = 0.0
    follows = m.add_variables("f", shape=(K, n, n), integer=True, upper=no_self)    # kind, before, after
    opens = m.add_variables("g", shape=(K, n), binary=True)                         # kind, request
    inflow = opens + follows.sum(axis=1)                                     # (K, n): r runs on kind k
    m.add_constraints("place", inflow.sum(axis=0) == 1)
    m.add_constraints("chain", follows.sum(axis=2) <= inflow)
    m.add_constraints("clients", opens.sum(axis=1) <= np.asarray(clients_per_kind, dtype=np.float64))
    duration = (w.T * inflow).sum(axis=0)                                    # (n,) seconds
    big_m = float(horizon) + float(w.max(initial=0.0))
    after = start.reshape(1, n)
    before = (start + duration).reshape(n, 1)
    m.add_constraints("sequence", after - before + big_m * (1 - follows.sum(axis=0)) >= 0)
    edges = precedence.edges
    if edges.shape[0]:
        m.add_constraints("precedence", start[edges[:, 1]] - (start + duration)[edges[:, 0]] >= 0)
    m.add_constraints("makespan", makespan - (start + duration) >= 0)
    m.minimize(makespan)
    return m


def solve_precedence_mip(precedence: Precedence, weights: np.ndarray, machine_kind: np.ndarray,
                         release: np.ndarray, bound: float, time_limit_s: float = 5.0,
                         solver: str = "highs") -> DagPlan | None:
    """Solve the client-chain MIP, started from a list schedule; None if no answer came back.

    Parameters
    ----------
    precedence
        The DAG over the ``n`` requests.
    weights
        ``(n, K)`` work per kind of machine, seconds.
    machine_kind
        Kind of each machine (client), int.
    release
        Earliest start of each request, seconds.
    bound
        A valid lower bound on the makespan, seconds.
    time_limit_s
        Wall-clock limit of the solve, seconds; at the limit the best plan found and the proven
        bound are returned.
    solver
        Backend of :func:`lloptim.solve` (``highs``, ``cbc`` or ``cvxpy``).

    Returns
    -------
    DagPlan or None
        Method ``"mip"``: the best plan (never worse than the list schedule it starts from) and
        the solver's bound.
    """
    from lloptim.solvers import SolveParams, solve

    w = np.asarray(weights, dtype=np.float64)
    w = w[:, None] if w.ndim == 1 else w
    n = w.shape[0]
    kinds = np.asarray(machine_kind, dtype=np.int64)
    counts = np.bincount(kinds, minlength=w.shape[1]).astype(np.float64)
    preds, succs = precedence.predecessors(), precedence.successors()
    rank = precedence.upward_rank(w.min(axis=1))
    st, machine, horizon = list_schedule(preds, succs, w, kinds, -rank, release)
    model = build_precedence_mip(precedence, w, counts, release, horizon, bound)
    res = solve(model, solver=solver, params=SolveParams(time_limit_s=time_limit_s, rel_gap=1e-6),
                start=_start_values(st, machine, kinds, w, n, horizon))
    if not res.status.has_solution:
        return None
    starts = np.asarray(res.value(model["S"]), dtype=np.float64)
    follow = np.rint(np.asarray(res.value(model["f"]))).astype(bool)
    opened = np.rint(np.asarray(res.value(model["g"]))).astype(bool)
    client = _clients_of_chains(follow, opened, kinds)
    dur = w[np.arange(n), np.argmax(opened | follow.any(axis=1), axis=0)]
    makespan = float(np.max(starts + dur))
    return DagPlan(starts, client, makespan, float(min(res.dual_bound or bound, makespan)), "mip")


def _start_values(start: np.ndarray, machine: np.ndarray, kinds: np.ndarray, w: np.ndarray, n: int,
                  horizon: float) -> dict:
    """The list schedule as values of the MIP's variables (a feasible start)."""
    K = w.shape[1]
    f = np.zeros((K, n, n))
    g = np.zeros((K, n))
    for m in np.unique(machine):
        rows = np.flatnonzero(machine == m)
        rows = rows[np.argsort(start[rows], kind="stable")]
        k = int(kinds[m]) if K > 1 else 0
        g[k, rows[0]] = 1.0
        f[k, rows[:-1], rows[1:]] = 1.0
    return {"S": start, "T": horizon, "f": f, "g": g}


def _clients_of_chains(follow: np.ndarray, opened: np.ndarray, kinds: np.ndarray) -> np.ndarray:
    """Deal the chains of each kind to that kind's clients; the client of each request."""
    K, n = opened.shape
    client = np.full(n, -1, dtype=np.int64)
    for k in range(K):
        pool = list(np.flatnonzero(kinds == k)) if K > 1 else list(range(kinds.size))
        for head in np.flatnonzero(opened[k]):
            c = pool.pop(0)
            r = int(head)
            while r >= 0:
                client[r] = c
                nxt = np.flatnonzero(follow[k, r])
                r = int(nxt[0]) if nxt.size else -1
    return client
