"""Total weighted completion time: list scheduling by Smith's ratio, a closed-form bound, exact when small.

The latency objective of serving: minimize ``sum_r u_r C_r`` where ``C_r`` is the completion
(finish) time of request ``r``, ``u_r >= 0`` its weight (1 each: the mean end-to-end completion,
and with releases = arrivals, the mean latency up to a constant). Requests occupy one client for
their work (:func:`lloptim.work.request_work_s`), start no earlier than their arrival and after
their predecessors (``P|r_j, prec|sum w_j C_j``, NP-hard). The ``"weighted_completion"``
formulation of :func:`lloptim.solve`:

* **answer**: Graham's list scheduling with Smith's rule (WSPT): a free client takes the ready
  request of smallest ``p_r / u_r`` (``p_r`` its work on the fastest instance);
  :func:`wspt_priority` is that key, the one the hybrid's ``objective="weighted-completion"``
  dispatch uses online (:mod:`lloptim.runtime.dispatch`): one rule, offline and online;
* **bound** (:func:`weighted_completion_bound`): the larger of (i) each request alone,
  ``sum_r u_r (h_r + p_r)`` with ``h_r`` its earliest start through releases and the DAG, and
  (ii) Eastman, Even and Isaacs (1964) on ``C`` identical machines, every request at its fastest
  time and no releases: ``(1/C) WSPT_1 + ((C - 1) / (2 C)) sum_r u_r p_r``, where ``WSPT_1`` is the
  single-machine optimum (Smith's order). Both drop constraints of the problem, so both are valid;
* **exact** on at most ``exact_max`` requests (12): the client-chain MIP of
  :mod:`lloptim.formulations.precedence` with the completion objective, started from the list
  schedule; or, when the work is counted in whole slots (option ``slot_s``), the *time-indexed*
  model (:func:`time_indexed_model`), whose LP relaxation is much stronger (Dyer and Wolsey
  1990): one binary per request, instance and start slot, a capacity row per instance and slot.

Units: seconds of (weighted) completion time, in work seconds (the plan's model of time).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lloptim.dag_plan import list_schedule
from lloptim.formulations.precedence import ScheduleData

__all__ = ["wspt_priority", "wspt_schedule", "weighted_completion_bound", "time_indexed_model",
           "decode_time_indexed", "time_indexed_horizon", "time_indexed_values"]


def wspt_priority(work_s: np.ndarray, completion_weights: np.ndarray | float = 1.0) -> np.ndarray:
    """Smith's key ``work / weight`` per request (smaller first; a zero weight goes last), seconds.

    Parameters
    ----------
    work_s : numpy.ndarray
        Work of each request, seconds.
    completion_weights : numpy.ndarray or float
        Weight of each request's completion time (>= 0).

    Returns
    -------
    numpy.ndarray
        The keys (``inf`` for weight 0).
    """
    p = np.asarray(work_s, dtype=np.float64)
    u = np.broadcast_to(np.asarray(completion_weights, dtype=np.float64), p.shape)
    with np.errstate(divide="ignore"):
        return np.where(u > 0, p / np.where(u > 0, u, 1.0), np.inf)


def wspt_schedule(data: ScheduleData) -> tuple[np.ndarray, np.ndarray]:
    """List schedule by Smith's rule with releases and precedence: (starts, seconds; global clients).

    Parameters
    ----------
    data : ScheduleData
        The instance.

    Returns
    -------
    tuple
        Start of each request (seconds) and its global client (int64).
    """
    fastest = data.weights.min(axis=1)
    prio = wspt_priority(fastest, data.completion_weights)
    prio = np.where(np.isfinite(prio), prio, np.finfo(np.float64).max)
    start, client, _ = list_schedule(data.precedence.predecessors(), data.precedence.successors(), data.weights,
                                     data.client_kind, prio, data.release)
    return start, client


def weighted_completion_bound(data: ScheduleData) -> float:
    """Lower bound on ``sum_r u_r C_r`` over every schedule of ``data`` (module docstring), seconds.

    Parameters
    ----------
    data : ScheduleData
        The instance.

    Returns
    -------
    float
        ``max(sum u (h + p), (1/C) WSPT_1 + (C - 1)/(2C) sum u p)``, seconds.
    """
    p = data.weights.min(axis=1)
    u = data.completion_weights
    head = data.precedence.earliest_start(p, data.release)
    alone = float(np.dot(u, head + p))
    C = max(int(data.client_kind.size), 1)
    order = np.argsort(wspt_priority(p, u), kind="stable")
    single = float(np.dot(u[order], np.cumsum(p[order])))
    eei = single / C + (C - 1) / (2.0 * C) * float(np.dot(u, p))
    return max(alone, eei)


def time_indexed_horizon(data: ScheduleData) -> int:
    """Slots by which some optimal schedule has finished (count).

    After the last release an optimal schedule never leaves every client idle while a request
    waits (it could start earlier), so it ends by ``last release + sum of work``; without
    precedence on one kind of client, request ``r`` starts once the others have kept all ``C``
    clients busy: by ``last release + (sum - d_r) / C``, so it ends by ``last release + (sum -
    d_max) / C + d_max``.
    """
    d = np.rint(data.weights / data.slot_s).astype(np.int64)
    rel = int(np.ceil(data.release.max(initial=0.0) / data.slot_s - 1e-9))
    longest = d.max(axis=1)
    if data.precedence.n_edges == 0 and data.weights.shape[1] == 1:
        C = int(data.client_kind.size)
        return rel + int((longest.sum() - longest.max(initial=0)) // C) + int(longest.max(initial=0))
    return rel + int(longest.sum())


def time_indexed_model(data: ScheduleData, objective_upper: float | None = None):
    """The time-indexed model of ``P|r_j, prec|sum u_j C_j`` in slots of ``data.slot_s`` seconds.

    ``s[r, k, t] = 1`` when request ``r`` starts at slot ``t`` on a client of instance ``k``
    (starts before its release or that would end past the horizon are fixed to 0); request ``r``
    runs in slots ``t .. t + d[r, k] - 1``. Clients of an instance are identical, and at most
    ``C_k`` overlapping intervals can always be dealt to ``C_k`` clients, so no client index is
    needed::

        sum_{k, t} s[r, k, t] = 1                                      ("start_once")
        sum_r sum_{t' in (t - d[r, k], t]} s[r, k, t'] <= C_k            ("capacity", per k, t)
        S_v >= S_u + D_u    for u -> v                                  ("precedence")
        min sum_r u_r (S_r + D_r) slot_s

    with ``S_r = sum t s[r, k, t]`` and ``D_r = sum d[r, k] s[r, k, t]`` (slots).

    Parameters
    ----------
    data : ScheduleData
        The instance (``slot_s`` set; every work a whole number of slots).
    objective_upper : float or None
        The objective of a known schedule, seconds (a cutoff row).

    Returns
    -------
    Model
        Variable ``s`` (request, instance, slot); families ``start_once``, ``capacity``,
        ``precedence`` (with a DAG) and ``cutoff`` (with a cutoff).
    """
    from lloptim.formulations.model import Model

    n, K = data.weights.shape
    slot = float(data.slot_s)
    d = np.rint(data.weights / slot).astype(np.int64)                 # (n, K) slots
    H = time_indexed_horizon(data)
    t = np.arange(H)
    rel = np.ceil(data.release / slot - 1e-9).astype(np.int64)
    allowed = (t[None, None, :] >= rel[:, None, None]) & (t[None, None, :] + d[:, :, None] <= H)
    m = Model("weighted_completion")
    s = m.add_variables("s", coords={"request": n, "instance": K, "slot": H}, integer=True, upper=allowed * 1.0)
    m.add_constraints("start_once", s.sum(("instance", "slot")) == 1)
    rows, cols = [], []
    for k in range(K):
        for r in range(n):
            for j in range(int(d[r, k])):      # running in slot u + j after starting in u
                u = np.arange(H - j)
                rows.append(k * H + u + j)
                cols.append((r * K + k) * H + u)
    rows_a, cols_a = np.concatenate(rows), np.concatenate(cols)
    A = sp.csr_matrix((np.ones(cols_a.size), (rows_a, cols_a)), shape=(K * H, n * K * H))
    m.add_constraints("capacity", A @ s.flatten() <= np.repeat(data.clients_per_kind, H))
    start = (t[None, None, :] * s).sum(("instance", "slot"))                 # (n,) slots
    dur = (d[:, :, None] * s).sum(("instance", "slot"))                     # (n,) slots
    e = data.precedence.edges
    if e.shape[0]:
        m.add_constraints("precedence", start[e[:, 1]] - (start + dur)[e[:, 0]] >= 0)
    total = (data.completion_weights * slot * (start + dur)).sum()
    m.minimize(total)
    if objective_upper is not None:
        m.add_constraints("cutoff", total <= objective_upper)
    return m


def decode_time_indexed(data: ScheduleData, model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The schedule (starts, seconds; global clients) in a column vector of :func:`time_indexed_model`.

    Starts are dealt to the instance's clients by interval colouring (earliest start first, to a
    client free by then); None when ``x`` is not a one-hot start per request or the intervals do
    not fit the clients.

    Parameters
    ----------
    data
        The schedule data the model was built from.
    model
        The compiled :func:`time_indexed_model`.
    x
        A column vector of its variables (a solution).
    """
    cols = model.column_of_label()
    S = np.rint(np.asarray(x)[cols[model["s"].labels]])                       # (n, K, H)
    n, K, H = S.shape
    flat = S.reshape(n, K * H)
    if not np.all(flat.sum(axis=1) == 1):
        return None
    kind, slot_t = np.divmod(flat.argmax(axis=1), H)
    start = slot_t * float(data.slot_s)
    dur = data.weights[np.arange(n), kind]
    client = np.full(n, -1, dtype=np.int64)
    free: dict[int, float] = {int(c): 0.0 for c in range(data.client_kind.size)}
    for r in np.argsort(start, kind="stable"):
        pool = [c for c in np.flatnonzero(data.client_kind == kind[r]) if free[int(c)] <= start[r] + 1e-9]
        if not pool:
            return None
        c = int(pool[0])
        client[r], free[c] = c, start[r] + dur[r]
    return start, client


def time_indexed_values(data: ScheduleData, model, start: np.ndarray, client: np.ndarray) -> dict | None:
    """``{"s": ...}`` of a schedule for :func:`time_indexed_model` (a MIP start), or None when it is off the grid.

    Parameters
    ----------
    data : ScheduleData
        The instance (``slot_s`` set).
    model : Model
        The built model (its horizon is read from ``s``).
    start : numpy.ndarray
        Start of each request, seconds (a list schedule of whole-slot work starts on slots).
    client : numpy.ndarray
        Global client of each request.
    """
    H = model["s"].shape[2]
    t = np.rint(np.asarray(start) / data.slot_s).astype(np.int64)
    kind = data.client_kind[np.asarray(client, dtype=np.int64)]
    d = np.rint(data.weights[np.arange(t.size), kind] / data.slot_s).astype(np.int64)
    if np.any(np.abs(t * data.slot_s - start) > 1e-6 * data.slot_s) or np.any(t + d > H):
        return None
    s = np.zeros((t.size, data.weights.shape[1], H))
    s[np.arange(t.size), kind, t] = 1.0
    return {"s": s}
