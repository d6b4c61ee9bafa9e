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
  schedule.

Units: seconds of (weighted) completion time, in work seconds (the plan's model of time).
"""

from __future__ import annotations

import numpy as np

from lloptim.dag_plan import list_schedule
from lloptim.formulations.precedence import ScheduleData

__all__ = ["wspt_priority", "wspt_schedule", "weighted_completion_bound"]


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
