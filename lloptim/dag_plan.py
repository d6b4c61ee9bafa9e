"""Offline plans for workflows of dependent requests: ``P|prec|Cmax`` on the clients.

The serving problem seen from the request scheduler is classic parallel-machine scheduling with
precedence: each request occupies one client for about its work (:func:`lloptim.work.request_work_s`:
its decode steps at a full instance's step time plus its prefill), may start only after its
predecessors, and the makespan is the last finish. It is NP-hard; lloptim plans it the way an
operations researcher would:

* **List scheduling** (:func:`list_schedule`): whenever a client is free, it takes the ready request
  of highest priority (Graham). Any priority gives a schedule within ``work / C + critical path``.
* **Critical-path priorities**: the first forward pass uses HEFT's upward rank
  (:meth:`~lloptim.precedence.Precedence.upward_rank`), so chains that decide the makespan start
  first.
* **Forward-backward improvement** (*justification*, Valls, Ballestin and Quintanilla 2005): a
  backward pass schedules the reversed DAG, latest-finishing requests first, so the end of the
  plan is packed as tightly as its start; the next forward pass takes the backward start times as
  priorities. Passes repeat while the makespan improves: the end of the plan is packed as tightly
  as its start (``benchmarks/workflows.py``: 0.2-1.2 points closer to the bound than the rank
  alone).
* **Exact for small cases**: :func:`exact_plan` solves the same problem as a mixed-integer program
  written with the modeling layer (:mod:`lloptim.formulations.precedence`, the ``"precedence"``
  formulation of :func:`lloptim.solve`), and :func:`plan_workflows` uses it below
  :data:`EXACT_MAX_REQUESTS` requests.

**A deterministic budget.** The improvement passes stop on *work*, not on the clock: each pass
costs two list schedules, ``2 n`` job placements, and runs only while the placements spent so far
(the first forward pass's ``n`` included) plus its own fit in ``work_limit``; the exact plan stops
at :data:`EXACT_NODE_LIMIT` branch-and-bound nodes (HiGHS's ``mip_max_nodes``). The same inputs
give the same plan on an idle or a loaded machine. The wall-clock limits (``time_limit_s``) stay
only as a safety net, set far above what the work budgets take (``benchmarks/workflows.py`` on a
loaded machine had moved because a revision's 0.05 s ran out before its passes did).

The plan's bound (:attr:`DagPlan.bound_s`) is the relaxation that drops the client limit or the
precedence: ``max(critical path, total work / C)``, in the same work units.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lloptim.precedence import Precedence

if TYPE_CHECKING:  # pragma: no cover
    from lloptim.problem import Problem

__all__ = ["DagPlan", "list_schedule", "plan_workflows", "plan_problem", "exact_plan", "EXACT_MAX_REQUESTS",
           "EXACT_NODE_LIMIT", "PLAN_WORK", "REVISION_WORK"]

#: Largest workflow (requests) :func:`plan_workflows` solves exactly when the MIP is available.
EXACT_MAX_REQUESTS = 12

#: Branch-and-bound nodes the exact plan may explore (HiGHS ``mip_max_nodes``; count). About 1-2 s
#: of HiGHS on 12 requests over 2-4 clients (it proves most of them optimal in fewer; the rest stop
#: with the best plan found and the proven bound), the same answer on any machine.
EXACT_NODE_LIMIT = 2000

#: Work budget of a first plan, job placements of the list scheduler (count): every pass runs up
#: to about 16,000 requests (one placement costs 2-9 microseconds, so about 0.5-1.8 s at the most),
#: fewer passes beyond, none at 100,000.
PLAN_WORK = 200_000

#: Work budget of a revision of the plan (count of placements): every pass up to about 1,600
#: requests, a few milliseconds to 0.2 s.
REVISION_WORK = 20_000


@dataclass(frozen=True)
class DagPlan:
    """A schedule of requests on clients that respects precedence, in work seconds.

    Attributes
    ----------
    start_s
        Planned start of each request, seconds after the plan's origin (float64).
    client
        Planned client of each request (index into the plan's clients, int64).
    makespan_s
        Planned makespan, seconds.
    bound_s
        Lower bound of the planning problem, seconds: ``max(critical path, work / clients)``
        (or the MIP's dual bound).
    method
        ``"list"`` (list scheduling with forward-backward improvement) or ``"mip"``.
    passes
        Forward-backward passes run (count).
    """

    start_s: np.ndarray
    client: np.ndarray
    makespan_s: float
    bound_s: float
    method: str
    passes: int = 0


def _durations(weights: np.ndarray, machine_kind: np.ndarray) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w[:, None] if w.ndim == 1 else w


def list_schedule(predecessors: list[list[int]], successors: list[list[int]], weights: np.ndarray,
                  machine_kind: np.ndarray, priority: np.ndarray, release: np.ndarray | None = None,
                  machine_free: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Graham's list scheduling with precedence: a free machine takes the ready job of lowest priority value.

    Parameters
    ----------
    predecessors, successors
        Lists of job indices per job (the DAG and its reverse).
    weights
        ``(n,)`` processing time of each job, or ``(n, kinds)`` per kind of machine, seconds.
    machine_kind
        Kind (column of ``weights``) of each machine (int; its length is the number of machines).
    priority
        Key per job; lower goes first, ties by job index.
    release
        Earliest start of each job, seconds; default 0.
    machine_free
        When each machine becomes free, seconds (busy with work outside the plan until then);
        default 0.

    Returns
    -------
    start, machine, makespan
        Start of each job (seconds), its machine, and the last finish (seconds).
    """
    n = len(predecessors)
    w = _durations(weights, machine_kind)
    kinds = np.asarray(machine_kind, dtype=np.int64).tolist()
    prio = np.asarray(priority, dtype=np.float64).tolist()
    ready_at = [0.0] * n if release is None else np.asarray(release, dtype=np.float64).tolist()
    wl = w.tolist()
    waiting_for = [len(p) for p in predecessors]
    start = [0.0] * n
    machine = [0] * n
    future = [(ready_at[j], j) for j in range(n) if waiting_for[j] == 0]
    heapq.heapify(future)
    ready: list[tuple[float, int]] = []
    running: list[tuple[float, int]] = []
    free = [(0.0, m) for m in range(len(kinds))] if machine_free is None else \
        [(float(t), m) for m, t in enumerate(np.asarray(machine_free, dtype=np.float64))]
    heapq.heapify(free)
    # machines that found nothing ready: all wait for the next event, as if each were in ``free`` at
    # (wake, m); kept apart so that an event that readies nothing costs O(log M), not a pass over them
    idle: list[int] = []
    wake = 0.0
    placed = 0
    makespan = 0.0
    while placed < n:
        if idle and (not free or (wake, idle[0]) < free[0]):
            t, m = wake, heapq.heappop(idle)
        else:
            t, m = heapq.heappop(free)
        while running and running[0][0] <= t:
            f, j = heapq.heappop(running)
            for s in successors[j]:
                waiting_for[s] -= 1
                if f > ready_at[s]:
                    ready_at[s] = f
                if waiting_for[s] == 0:
                    heapq.heappush(future, (ready_at[s], s))
        while future and future[0][0] <= t:
            j = heapq.heappop(future)[1]
            heapq.heappush(ready, (prio[j], j))
        if not ready:
            # idle until something becomes ready (a release, or a finish that unblocks a successor)
            # every idle machine waits for it too: nothing changes before it
            wake = min(future[0][0] if future else np.inf, running[0][0] if running else np.inf)
            heapq.heappush(idle, m)
            if wake == np.inf and not free:
                # every machine idle and nothing left to happen: the rest wait on each other
                raise ValueError(f"list_schedule: {n - placed} jobs wait on predecessors that never run (a cycle)")
            continue
        j = heapq.heappop(ready)[1]
        f = t + wl[j][kinds[m] if len(wl[j]) > 1 else 0]
        start[j] = t
        machine[j] = m
        heapq.heappush(running, (f, j))
        heapq.heappush(free, (f, m))
        makespan = max(makespan, f)
        placed += 1
    return np.asarray(start), np.asarray(machine, dtype=np.int64), makespan


def plan_workflows(precedence: Precedence | None, weights: np.ndarray, machine_kind: np.ndarray,
                   release: np.ndarray | None = None, max_passes: int = 6, exact: bool = True,
                   time_limit_s: float | None = None, machine_free: np.ndarray | None = None,
                   work_limit: int | None = None, node_limit: int | None = EXACT_NODE_LIMIT) -> DagPlan:
    """Plan requests with precedence on machines: list scheduling by rank, improved forward and backward.

    Parameters
    ----------
    precedence
        The DAG (None: independent requests).
    weights
        ``(n,)`` work of each request, or ``(n, kinds)`` per kind of machine, seconds.
    machine_kind
        Kind of each machine (client), int; one entry per client.
    release
        Earliest start of each request, seconds; default 0.
    max_passes
        Most forward-backward passes after the first forward pass (count).
    exact
        Solve workflows of at most :data:`EXACT_MAX_REQUESTS` requests exactly with the MIP of
        :func:`exact_plan`.
    time_limit_s
        Wall-clock safety net of the improvement passes (or of the exact solve), seconds (None: no
        limit; the exact solve then gets 60 s). Not what normally stops them: set it far above
        what ``work_limit`` and ``node_limit`` take, so that the plan does not depend on the
        machine's load. The first forward pass always runs.
    machine_free
        When each machine becomes free of work outside the plan, seconds; default 0 (a plan
        revised mid-run passes the expected finishes of the running requests).
    work_limit
        Work budget of the improvement passes, job placements of the list scheduler (count; None:
        only ``max_passes``). The first forward pass counts ``n`` and each pass ``2 n``; a pass runs
        only if it fits (:data:`PLAN_WORK`, :data:`REVISION_WORK`).
    node_limit
        Branch-and-bound nodes of the exact solve (count; None: only the time limit).

    Returns
    -------
    DagPlan
        The best forward schedule found (a valid schedule: releases and precedence hold).
    """
    w = _durations(weights, machine_kind)
    n = w.shape[0]
    kinds = np.asarray(machine_kind, dtype=np.int64)
    dag = precedence if precedence is not None else Precedence(n, np.zeros((0, 2), dtype=np.int64),
                                                              np.zeros(n, dtype=np.int64))
    preds, succs = dag.predecessors(), dag.successors()
    fastest = w.min(axis=1)
    rel = np.zeros(n) if release is None else np.asarray(release, dtype=np.float64)
    bound = max(dag.longest_path(fastest, rel),
                float(np.sum(fastest) / max(len(kinds), 1)) + float(rel.min(initial=0.0)))
    if exact and n <= EXACT_MAX_REQUESTS and machine_free is None:
        plan = exact_plan(dag, w, kinds, rel, bound, 60.0 if time_limit_s is None else time_limit_s,
                          node_limit=node_limit)
        if plan is not None:
            return plan
    t0 = time.perf_counter()
    rank = dag.upward_rank(fastest)
    start, machine, best_t = list_schedule(preds, succs, w, kinds, -rank, rel, machine_free)
    best = (start, machine)
    passes = 0
    zeros = np.zeros(n)
    spent = n  # job placements so far: the work budget, which decides when to stop
    for _ in range(max_passes):
        if work_limit is not None and spent + 2 * n > work_limit:
            break
        # the clock is only a safety net, far above the work budget's time (module docstring)
        if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
            break
        spent += 2 * n
        passes += 1
        finish = start + w[np.arange(n), kinds[machine] if w.shape[1] > 1 else 0]
        # backward: the reversed DAG, latest-finishing first; read back as forward times
        b_start, b_machine, b_t = list_schedule(succs, preds, w, kinds, -finish, zeros)
        b_finish = b_start + w[np.arange(n), kinds[b_machine] if w.shape[1] > 1 else 0]
        forward_start = b_t - b_finish
        start, machine, t = list_schedule(preds, succs, w, kinds, forward_start, rel, machine_free)
        if t < best_t - 1e-12 * max(1.0, best_t):
            best_t, best = t, (start, machine)
        else:
            break
    return DagPlan(best[0], best[1], float(best_t), float(min(bound, best_t)), "list", passes)


def plan_problem(problem: "Problem", estimates: np.ndarray | None = None, time_limit_s: float | None = 20.0,
                 exact: bool = True, work_limit: int | None = PLAN_WORK) -> DagPlan:
    """The offline plan of a whole problem: every request, its arrival as release, on every client.

    Parameters
    ----------
    problem
        The problem (with or without precedence).
    estimates
        Output lengths the work is priced with, tokens; default: the true lengths.
    time_limit_s
        Wall-clock safety net of the improvement passes (or of the exact solve), seconds.
    exact
        Solve small problems exactly (see :func:`plan_workflows`), within :data:`EXACT_NODE_LIMIT`
        nodes.
    work_limit
        Work budget of the improvement passes, job placements (:func:`plan_workflows`).

    Returns
    -------
    DagPlan
        Planned start (seconds) and global client of each request.
    """
    from lloptim.work import request_work_s

    weights = np.column_stack([request_work_s(problem, estimates, instance=i) for i in range(len(problem.instances))])
    return plan_workflows(problem.workload.precedence, weights, problem.client_instance(),
                          release=problem.workload.arrival_s, time_limit_s=time_limit_s, exact=exact,
                          work_limit=work_limit)


def exact_plan(precedence: Precedence, weights: np.ndarray, machine_kind: np.ndarray,
               release: np.ndarray, bound: float, time_limit_s: float = 60.0,
               node_limit: int | None = EXACT_NODE_LIMIT) -> DagPlan | None:
    """The optimal plan of a small workflow by a mixed-integer program, or None when no answer came back.

    Solves the client-chain model of :mod:`lloptim.formulations.precedence` (registered for
    :func:`lloptim.solve` as the ``"precedence"`` formulation) with HiGHS, started from a list
    schedule.

    Parameters
    ----------
    precedence
        The DAG.
    weights
        ``(n, kinds)`` work of each request per kind of machine, seconds.
    machine_kind
        Kind of each machine (client).
    release
        Earliest start of each request, seconds.
    bound
        A valid lower bound on the makespan, seconds.
    time_limit_s
        Wall-clock safety net of the solve, seconds (at the limit, the best plan found).
    node_limit
        Branch-and-bound nodes of the solve (count; None: only the time limit): what normally
        stops a solve that has not proven optimality, the same on any machine.
    """
    from lloptim.formulations.precedence import solve_precedence_mip

    return solve_precedence_mip(precedence, weights, machine_kind, release, bound, time_limit_s,
                                node_limit=node_limit)
