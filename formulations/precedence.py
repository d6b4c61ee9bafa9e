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

The same model with the objective ``min sum_r u_r (S_r + d_r)`` (``objective="completion"``,
weights ``u_r >= 0``) is the exact total weighted completion time of small cases, the
``"weighted_completion"`` formulation (:mod:`lloptim.formulations.weighted_completion`).

Both are registered for :func:`lloptim.solve` (``formulation="precedence"`` and
``"weighted_completion"``) on a :class:`ScheduleData` (:func:`schedule_data`): the work of each
request per instance (:func:`lloptim.work.request_work_s`), its release (arrival) and the DAG.
Small cases (at most ``exact_max`` requests) are searched exactly, started from the list
schedule; larger ones are answered by the list schedule (:mod:`lloptim.dag_plan`), with the
relaxation's bound.
"""

from __future__ import annotations

import numpy as np

from dataclasses import dataclass

from lloptim.dag_plan import EXACT_MAX_REQUESTS, DagPlan, list_schedule
from lloptim.errors import SpecError
from lloptim.precedence import Precedence

__all__ = ["build_precedence_mip", "solve_precedence_mip", "ScheduleData", "schedule_data", "schedule_values",
           "decode_schedule_x", "check_schedule", "OBJECTIVES"]

#: Objectives of the client-chain model: the makespan, or the weighted sum of completion times.
OBJECTIVES = ("makespan", "completion")


@dataclass(frozen=True, eq=False)
class ScheduleData:
    """A scheduling instance of the client-chain model: requests, their work, releases and DAG.

    Attributes
    ----------
    precedence
        The DAG over the ``n`` requests (an empty one without precedence).
    weights
        ``(n, K)`` work of each request on a client of each instance, seconds.
    client_kind
        ``(C,)`` instance of each global client.
    release
        ``(n,)`` earliest start of each request (its arrival), seconds.
    completion_weights
        ``(n,)`` weight of each request's completion time (``"completion"`` objective), >= 0.
    objective
        ``"makespan"`` or ``"completion"``.
    exact_max
        Largest number of requests the model is searched on; larger: the list schedule.
    slot_s
        ``"completion"`` only: search the time-indexed model in slots of this many seconds
        (:func:`lloptim.formulations.weighted_completion.time_indexed_model`; every work is a
        whole number of slots); None: the client-chain model.
    """

    precedence: Precedence
    weights: np.ndarray
    client_kind: np.ndarray
    release: np.ndarray
    completion_weights: np.ndarray
    objective: str
    exact_max: int
    slot_s: float | None = None

    @property
    def n_requests(self) -> int:
        """Number of requests ``n``."""
        return int(self.weights.shape[0])

    @property
    def clients_per_kind(self) -> np.ndarray:
        """``(K,)`` clients of each instance (count, float64)."""
        return np.bincount(self.client_kind, minlength=self.weights.shape[1]).astype(np.float64)

    def durations(self, client: np.ndarray) -> np.ndarray:
        """Work of each request on the client it is given, seconds."""
        return self.weights[np.arange(self.n_requests), self.client_kind[np.asarray(client, dtype=np.int64)]]

    def value(self, start: np.ndarray, client: np.ndarray) -> float:
        """The objective of a schedule, seconds (makespan, or weighted sum of completions).

        Parameters
        ----------
        start
            Start of each request, seconds.
        client
            Global client index of each request.
        """
        finish = np.asarray(start, dtype=np.float64) + self.durations(client)
        if self.objective == "makespan":
            return float(finish.max(initial=0.0))
        return float(np.dot(self.completion_weights, finish))


def schedule_data(problem, estimates: np.ndarray | None = None, objective: str = "makespan",
                  completion_weights: np.ndarray | None = None, exact_max: int = EXACT_MAX_REQUESTS,
                  weights: np.ndarray | None = None, slot_s: float | None = None) -> ScheduleData:
    """The :class:`ScheduleData` of ``problem`` (the ``prepare`` hook of both formulations).

    Parameters
    ----------
    problem : Problem
        The problem (its arrivals are the releases, its ``after`` lists the DAG).
    estimates : numpy.ndarray or None
        Output lengths the work is priced with, tokens; default: the true lengths.
    objective : str
        ``"makespan"`` or ``"completion"``.
    completion_weights : numpy.ndarray or None
        ``(n,)`` weights of the completion times (>= 0); default 1 each (the mean completion).
    exact_max : int
        Search the model only up to this many requests.
    weights : numpy.ndarray or None
        Override of the work, ``(n,)`` or ``(n, instances)`` seconds; default
        :func:`lloptim.work.request_work_s` on each instance.
    slot_s : float or None
        ``"completion"`` only: the slot of the time-indexed exact model, seconds; every work and
        arrival must be a whole number of slots (then the model is exact; give the work in slots
        with ``weights`` and ``slot_s=1``).

    Raises
    ------
    SpecError
        A bad objective, weights, completion weights or ``exact_max``, naming the option.
    """
    from lloptim.work import request_work_s

    n, m = problem.n_requests, len(problem.instances)
    if objective not in OBJECTIVES:
        raise SpecError("options.objective", f"unknown objective {objective!r}", f"use one of {list(OBJECTIVES)}")
    if isinstance(exact_max, bool) or not isinstance(exact_max, (int, np.integer)) or exact_max < 0:
        raise SpecError("options.exact_max", f"must be an integer >= 0, got {exact_max!r}",
                        f"e.g. {EXACT_MAX_REQUESTS} (0: never search the model)")
    if weights is None:
        W = np.column_stack([request_work_s(problem, estimates, instance=i) for i in range(m)])
    else:
        W = np.asarray(weights, dtype=np.float64)
        W = W[:, None] if W.ndim == 1 else W
        if W.ndim != 2 or W.shape[0] != n or W.shape[1] not in (1, m) or not np.all(np.isfinite(W)) or np.any(W < 0):
            raise SpecError("weights", f"must be finite seconds >= 0 of shape ({n},) or ({n}, {m})",
                            "give the work of each request (per instance)")
        W = np.repeat(W, m, axis=1) if W.shape[1] == 1 and m > 1 else W
    if completion_weights is None:
        u = np.ones(n)
    else:
        u = np.asarray(completion_weights, dtype=np.float64)
        if u.shape != (n,) or not np.all(np.isfinite(u)) or np.any(u < 0):
            raise SpecError("completion_weights", f"must be {n} finite weights >= 0",
                            "give one weight per request (1 each: the mean completion time)")
    if slot_s is not None:
        if objective != "completion":
            raise SpecError("options.slot_s", "applies to the weighted_completion formulation only",
                            "leave it out")
        if not isinstance(slot_s, (int, float)) or isinstance(slot_s, bool) or not np.isfinite(slot_s) or slot_s <= 0:
            raise SpecError("options.slot_s", f"must be seconds > 0, got {slot_s!r}", "e.g. slot_s=1.0")
        slots = np.concatenate([W.ravel(), problem.workload.arrival_s]) / slot_s
        if np.any(np.abs(slots - np.rint(slots)) > 1e-9 * np.maximum(1.0, slots)):
            raise SpecError("options.slot_s", f"does not divide every request's work and arrival ({slot_s!r} s)",
                            "give the work in whole slots (weights=..., slot_s=1), or leave slot_s out for the "
                            "client-chain model")
    dag = problem.workload.precedence
    if dag is None:
        dag = Precedence(n, np.zeros((0, 2), dtype=np.int64), np.zeros(n, dtype=np.int64))
    return ScheduleData(dag, np.ascontiguousarray(W), problem.client_instance().astype(np.int64),
                        problem.workload.arrival_s.astype(np.float64), u, objective, int(exact_max),
                        None if slot_s is None else float(slot_s))


def check_schedule(data: ScheduleData, start: np.ndarray, client: np.ndarray, tol: float = 1e-6) -> str:
    """Why a schedule is infeasible (releases, precedence, one request at a time per client), or ``""``.

    Parameters
    ----------
    data : ScheduleData
        The instance.
    start : numpy.ndarray
        Start of each request, seconds.
    client : numpy.ndarray
        Global client of each request.
    tol : float
        Tolerance, seconds (relative to the horizon).
    """
    start = np.asarray(start, dtype=np.float64)
    client = np.asarray(client, dtype=np.int64)
    finish = start + data.durations(client)
    eps = tol * max(1.0, float(finish.max(initial=0.0)))
    if np.any(start < data.release - eps):
        return f"request {int(np.argmax(data.release - start))} starts before its release"
    e = data.precedence.edges
    if e.shape[0]:
        late = finish[e[:, 0]] - start[e[:, 1]]
        if np.any(late > eps):
            k = int(np.argmax(late))
            return f"request {int(e[k, 1])} starts before its predecessor {int(e[k, 0])} finishes"
    order = np.lexsort((start, client))
    same = client[order[1:]] == client[order[:-1]]
    overlap = finish[order[:-1]] - start[order[1:]]
    if np.any(same & (overlap > eps)):
        return "two requests overlap on one client"
    return ""


def build_precedence_mip(precedence: Precedence, weights: np.ndarray, clients_per_kind: np.ndarray,
                         release: np.ndarray, horizon: float, makespan_lower: float = 0.0,
                         objective: str = "makespan", completion_weights: np.ndarray | None = None,
                         objective_upper: float | None = None):
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
        A valid lower bound on the makespan, seconds (a column bound on ``T``; ``"makespan"``
        objective only).
    objective
        ``"makespan"`` (``min T``) or ``"completion"`` (``min sum_r u_r (S_r + d_r)``).
    completion_weights
        ``(n,)`` the weights ``u_r`` of the completion objective (default 1 each).
    objective_upper
        The objective of a known schedule (a cutoff; rows ``T <= it`` or ``sum u C <= it``).

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
    makespan = m.add_variables("T", lower=makespan_lower if objective == "makespan" else 0.0)
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
    if objective == "makespan":
        m.minimize(makespan)
        if objective_upper is not None:
            m.add_constraints("cutoff", makespan <= objective_upper)
    else:
        u = np.ones(n) if completion_weights is None else np.asarray(completion_weights, dtype=np.float64)
        total = (u * (start + duration)).sum()
        m.minimize(total)
        if objective_upper is not None:
            m.add_constraints("cutoff", total <= objective_upper)
    return m


def solve_precedence_mip(precedence: Precedence, weights: np.ndarray, machine_kind: np.ndarray,
                         release: np.ndarray, bound: float, time_limit_s: float = 5.0,
                         solver: str = "highs", node_limit: int | None = None) -> DagPlan | None:
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
    node_limit
        Branch-and-bound nodes (HiGHS ``mip_max_nodes``, count; None: none): a limit that stops
        the same way on any machine, unlike the time limit. Read by the ``highs`` backend only.

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
    options = {"mip_max_nodes": int(node_limit)} if node_limit is not None and solver == "highs" else {}
    res = solve(model, solver=solver, params=SolveParams(time_limit_s=time_limit_s, rel_gap=1e-6,
                                                         solver_options=options),
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


def schedule_values(data: ScheduleData, start: np.ndarray, client: np.ndarray) -> dict:
    """Values of the client-chain model's variables for a schedule (a MIP start).

    Parameters
    ----------
    data : ScheduleData
        The instance.
    start : numpy.ndarray
        Start of each request, seconds.
    client : numpy.ndarray
        Global client of each request.

    Returns
    -------
    dict
        ``S``, ``T``, ``f`` and ``g`` by name.
    """
    finish = np.asarray(start) + data.durations(client)
    return _start_values(np.asarray(start, dtype=np.float64), np.asarray(client, dtype=np.int64), data.client_kind,
                         data.weights, data.n_requests, float(finish.max(initial=0.0)))


def decode_schedule_x(data: ScheduleData, model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The schedule (starts, seconds; global clients) in a column vector of the model, or None.

    Parameters
    ----------
    data : ScheduleData
        The instance.
    model : Model
        The built client-chain model.
    x : numpy.ndarray
        A column vector of it.
    """
    cols = model.column_of_label()
    starts = np.asarray(x)[cols[model["S"].labels]].astype(np.float64)
    follow = np.rint(np.asarray(x)[cols[model["f"].labels]]).astype(bool)
    opened = np.rint(np.asarray(x)[cols[model["g"].labels]]).astype(bool)
    if not np.all((opened | follow.any(axis=1)).sum(axis=0) == 1):
        return None
    client = _clients_of_chains(follow, opened, data.client_kind)
    if np.any(client < 0):
        return None
    return np.maximum(starts, data.release), client


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
