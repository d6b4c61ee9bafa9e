"""When requests become schedulable: their arrival, or their last predecessor's finish if later.

:class:`ReadyTimes` keeps the coming ready times of a workload and hands them out in time order, as
the runtime engine's readiness contract states (:mod:`lloptim.runtime.engine`): a request is ready
at its arrival, or, with predecessors (:attr:`~lloptim.problem.Workload.precedence`), once the last
of them has finished, at the latest of their finishes. The caller announces what :meth:`pop`
returns to its request scheduler (:meth:`~lloptim.runtime.policy.RequestScheduler.on_ready`) and
reports finishes (:meth:`finished`); the engines of :mod:`lloptim.engines` drive it.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from lloptim.problem import Workload

__all__ = ["ReadyTimes"]


class ReadyTimes:
    """The ready times of a workload's requests, released in time order.

    Parameters
    ----------
    workload
        The requests (arrivals, and the workflow DAG if any).

    Attributes
    ----------
    ready
        Ready time of each request once released, seconds (NaN before).
    next_ready
        The earliest ready time not yet released, seconds (``inf`` when none is known: everything
        released, or the rest waits on unfinished predecessors).
    """

    def __init__(self, workload: Workload) -> None:
        n = len(workload)
        prec = workload.precedence
        arrival = np.array(workload.arrival_s, dtype=np.float64)
        self.successors = prec.successors() if prec is not None else None
        self._in_degree = prec.in_degree().tolist() if prec is not None else [0] * n
        self._arrival = arrival.tolist()
        roots = np.flatnonzero(np.asarray(self._in_degree) == 0)
        roots = roots[np.argsort(arrival[roots], kind="stable")]
        self.roots = list(zip(arrival[roots].tolist(), roots.tolist()))
        self.restart()

    def restart(self) -> None:
        """Forget every release and finish: the state of a new run of the same workload.

        It reads nothing of the workload again (the arrivals were read once, when built).
        """
        self.waiting_on = list(self._in_degree)
        self.latest = list(self._arrival)  # max(arrival, predecessor finishes) so far
        self.next_root = 0
        self.events: list[tuple[float, int]] = []
        self.ready = [math.nan] * len(self._arrival)
        self._update()

    def _update(self) -> None:
        nxt = self.roots[self.next_root][0] if self.next_root < len(self.roots) else math.inf
        self.next_ready = min(nxt, self.events[0][0]) if self.events else nxt

    def pop(self, now: float) -> list[tuple[float, int]]:
        """Every request that became ready by ``now``, as ``(ready time, request)`` in time order.

        Parameters
        ----------
        now
            The clock of the instance about to ask for work, seconds.

        Returns
        -------
        list of tuple
            ``(ready time in seconds, request row)``, earliest first (ties by row).
        """
        out = []
        roots, events = self.roots, self.events
        i = self.next_root
        while True:
            if i < len(roots) and (not events or roots[i] < events[0]):
                if roots[i][0] > now:
                    break
                t, r = roots[i]
                i += 1
            elif events and events[0][0] <= now:
                t, r = heapq.heappop(events)
            else:
                break
            self.ready[r] = t
            out.append((t, r))
        self.next_root = i
        self._update()
        return out

    def finished(self, request: int, now: float) -> None:
        """``request`` finished at ``now`` seconds: successors whose predecessors are all done become due.

        A successor's ready time is the latest finish among its predecessors (or its arrival):
        instances step in order of start, so an earlier step of a slower instance may finish later.

        Parameters
        ----------
        request
            Row index of the finished request.
        now
            Its finish time, seconds.
        """
        if self.successors is None:
            return
        for q in self.successors[request]:
            self.waiting_on[q] -= 1
            if now > self.latest[q]:
                self.latest[q] = now
            if self.waiting_on[q] == 0:
                heapq.heappush(self.events, (self.latest[q], q))
                if self.latest[q] < self.next_ready:
                    self.next_ready = self.latest[q]
