"""Request schedulers: which client serves which request.

* :class:`RoundRobinQueues`: the paper's baseline; request ``i`` (in arrival order) is dealt to
  client ``i mod C`` and never moves.
* :class:`GlobalQueue`: one shared queue, the first idle client takes the head (vLLM-style FCFS,
  or shortest/longest estimated output first).
* :class:`AssignedQueues`: per-client queues from an offline assignment, each sorted longest
  first; with ``steal=True`` an idle client with an empty queue takes work from the client with
  the most queued work (the paper's Algorithm 1). Only requests that have not started move.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections import deque

import numpy as np

from lloptim.runtime.policy import RequestScheduler, RunContext

__all__ = ["RoundRobinQueues", "GlobalQueue", "AssignedQueues"]


class _PerClientQueues(RequestScheduler):
    """Shared mechanics of schedulers with one FIFO queue per client."""

    def _init_queues(self, ctx: RunContext, owner: np.ndarray, order: np.ndarray) -> None:
        self.arrival = ctx.problem.workload.arrival_s
        self.queues: list[deque[int]] = [deque() for _ in range(ctx.problem.n_clients)]
        for r in order:
            self.queues[owner[r]].append(int(r))
        self.n_pending = int(len(order))

    def pending(self) -> int:
        return self.n_pending

    def _pop_own(self, state, client: int) -> int | None:
        q = self.queues[client]
        if q and self.arrival[q[0]] <= state.now:
            self.n_pending -= 1
            return q.popleft()
        return None

    def next_request(self, state, client: int) -> int | None:
        return self._pop_own(state, client)

    def _least_loaded_alive(self) -> int:
        state = self.ctx.extra["client_state"]
        alive = [c for c in range(len(self.queues)) if state[c] != 3]
        return min(alive, key=lambda c: len(self.queues[c])) if alive else 0

    def _enqueue(self, client: int, request: int) -> None:
        """Put ``request`` at the head of ``client``'s queue (it was due first)."""
        self.queues[client].appendleft(request)

    def requeue(self, request: int, now: float) -> None:
        self._enqueue(self._least_loaded_alive(), request)
        self.n_pending += 1

    def on_client_failed(self, client: int, now: float) -> None:
        orphans = self.queues[client]
        self.queues[client] = deque()
        while orphans:
            self._enqueue(self._least_loaded_alive(), orphans.pop())


class RoundRobinQueues(_PerClientQueues):
    """Deal requests in arrival order to clients ``0, 1, ..., C-1, 0, ...``; no re-assignment."""

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        order = np.argsort(ctx.problem.workload.arrival_s, kind="stable")
        owner = np.empty(order.size, dtype=np.int64)
        owner[order] = np.arange(order.size) % ctx.problem.n_clients
        self._init_queues(ctx, owner, order)


class GlobalQueue(RequestScheduler):
    """One queue for all clients; the first idle client takes the best arrived request.

    Parameters
    ----------
    order
        ``"fcfs"`` (arrival order), ``"shortest"`` or ``"longest"`` (by estimated output length).
    plan
        Optional offline assignment (global client per request, or a callable of the run context):
        a request served by another client than planned counts as a preemptive re-assignment
        (:attr:`steals`).
    """

    def __init__(self, order: str = "fcfs", plan=None) -> None:
        if order not in ("fcfs", "shortest", "longest"):
            raise ValueError(f"order must be 'fcfs', 'shortest' or 'longest', not {order!r}")
        self.order = order
        self.plan = plan
        self.steals = 0

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        w = ctx.problem.workload
        self.arrival = w.arrival_s
        self.by_arrival = np.argsort(w.arrival_s, kind="stable").tolist()
        self.next_arrival = 0
        if self.order == "fcfs":
            key = w.arrival_s
        elif self.order == "shortest":
            key = ctx.estimates
        else:
            key = -ctx.estimates
        self.key = np.asarray(key, dtype=np.float64).tolist()
        self.ready: list[tuple[float, int]] = []
        self.n_pending = len(w)
        owner = self.plan(ctx) if callable(self.plan) else self.plan
        self.owner = None if owner is None else np.asarray(owner, dtype=np.int64).tolist()
        self.steals = 0

    def pending(self) -> int:
        return self.n_pending

    def next_request(self, state, client: int) -> int | None:
        arr, order = self.arrival, self.by_arrival
        while self.next_arrival < len(order) and arr[order[self.next_arrival]] <= state.now:
            r = order[self.next_arrival]
            heapq.heappush(self.ready, (self.key[r], r))
            self.next_arrival += 1
        if not self.ready:
            return None
        self.n_pending -= 1
        r = heapq.heappop(self.ready)[1]
        if self.owner is not None and self.owner[r] != client:
            self.steals += 1
        return r

    def requeue(self, request: int, now: float) -> None:
        heapq.heappush(self.ready, (self.key[request], request))
        self.n_pending += 1


class AssignedQueues(_PerClientQueues):
    """Per-client queues from an offline assignment, sorted longest first, with optional stealing.

    Parameters
    ----------
    assignment
        Global client index of each request (from an offline solve), or a callable
        ``assignment(ctx) -> array`` evaluated at setup (so the solve sees the run's estimates).
    steal
        Let an idle client with an empty queue take a waiting request from the client with the
        most queued estimated work: the one whose size is closest to half that work, which
        balances the two (the paper's Algorithm 1, preemptive re-assignment of unstarted requests).
    """

    def __init__(self, assignment, steal: bool = True) -> None:
        self.assignment = assignment
        self.steal = steal
        self.steals = 0

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        owner = self.assignment(ctx) if callable(self.assignment) else self.assignment
        owner = np.asarray(owner, dtype=np.int64)
        n = ctx.problem.n_requests
        if owner.shape != (n,) or owner.min() < 0 or owner.max() >= ctx.problem.n_clients:
            raise ValueError(f"assignment must give a client in [0, {ctx.problem.n_clients}) for each of {n} requests")
        self.size = ctx.estimates.tolist()
        # longest first within a client: the sort of the paper's "sorting and preemptive scheduling"
        order = np.lexsort((-ctx.estimates, ctx.problem.workload.arrival_s))
        self._init_queues(ctx, owner, order)
        self.queued_work = np.zeros(ctx.problem.n_clients)
        np.add.at(self.queued_work, owner, ctx.estimates)
        self.steals = 0

    def next_request(self, state, client: int) -> int | None:
        r = self._pop_own(state, client)
        if r is not None:
            self.queued_work[client] -= self.size[r]
            return r
        if not self.steal or self.queues[client]:
            return None
        victim = int(np.argmax(self.queued_work))
        q = self.queues[victim]
        if not q:
            return None
        half = self.queued_work[victim] / 2.0
        # the queue is sorted longest first: find the arrived request whose size is nearest half the work
        sizes_desc = [-self.size[x] for x in q]
        i = min(bisect_left(sizes_desc, -half), len(q) - 1)
        best = None
        for j in (i - 1, i, i + 1):
            if 0 <= j < len(q) and self.arrival[q[j]] <= state.now:
                if best is None or abs(self.size[q[j]] - half) < abs(self.size[q[best]] - half):
                    best = j
        if best is None:
            return None
        r = q[best]
        del q[best]
        self.queued_work[victim] -= self.size[r]
        self.n_pending -= 1
        self.steals += 1
        return r

    def _enqueue(self, client: int, request: int) -> None:
        super()._enqueue(client, request)
        self.queued_work[client] += self.size[request]

    def on_client_failed(self, client: int, now: float) -> None:
        self.queued_work[client] = 0.0
        super().on_client_failed(client, now)
