"""The instances' clocks: which instance steps next, and when an idle one should look again.

Both the simulator (:mod:`lloptim.runtime.engine`) and the real-engine driver
(:mod:`lloptim.engines.common`) step instances in order of their clocks, an instance that ran an
iteration before an idle one at the same time. :class:`InstanceClocks` keeps that order and, beside
it, the earliest clock of a busy instance, which :func:`wake_time` needs whenever an instance runs
out of work: both cost O(log m) for ``m`` instances (a scan of the queue for the earliest busy clock
made every idle instance cost O(m), so O(m^2) per event on a fleet that waits for arrivals). Up to
:data:`SCAN_LIMIT` instances a scan is cheaper than a second heap, and the queue alone is kept.
"""

from __future__ import annotations

import math
from functools import partial
from heapq import heapify, heappop, heappush

__all__ = ["InstanceClocks", "wake_time", "SCAN_LIMIT"]

#: Most instances whose earliest busy clock is found by scanning the queue (O(m), cheaper than
#: keeping a second heap on every step when m is small).
SCAN_LIMIT = 8


class InstanceClocks:
    """The instances waiting to step, as entries ``(clock, idle, index)`` in that order.

    ``idle`` is 0 for a busy instance (one that has just run an iteration, or has work) and 1 for
    one waiting for work: a busy instance goes before an idle one at the same clock, and a lower
    index before a higher one, so runs are deterministic.

    Parameters
    ----------
    n
        Number of instances; all start busy at clock 0.

    Notes
    -----
    Beyond :data:`SCAN_LIMIT` instances, a second heap holds the ``(clock, index)`` of the busy
    entries. The queue's minimum, when busy, is also the minimum of that heap (same entries, same
    order), so :meth:`pop` removes it there in O(log m) and :attr:`earliest_busy` is O(1).
    """

    def __init__(self, n: int) -> None:
        self.queue: list[tuple[float, int, int]] = [(0.0, 0, k) for k in range(n)]
        heapify(self.queue)
        self.busy: list[tuple[float, int]] | None = None
        if n > SCAN_LIMIT:
            self.busy = [(0.0, k) for k in range(n)]
            heapify(self.busy)
        else:  # the queue alone: plain heap operations (no Python frame), a scan for the earliest busy clock
            self.push = partial(heappush, self.queue)  # type: ignore[method-assign]
            self.pop = partial(heappop, self.queue)  # type: ignore[method-assign]

    def __len__(self) -> int:
        return len(self.queue)

    def push(self, entry: tuple[float, int, int]) -> None:
        """Queue an instance to step again.

        Parameters
        ----------
        entry
            ``(clock in seconds, idle, instance index)``; ``idle`` is 1 if it has nothing to run (it
            waits for work, after the busy ones at the same clock), else 0.
        """
        heappush(self.queue, entry)
        if not entry[1]:
            heappush(self.busy, (entry[0], entry[2]))

    def pop(self) -> tuple[float, int, int]:
        """Take the instance to step next (lowest clock, busy first, lowest index).

        Returns
        -------
        tuple
            Its entry ``(clock in seconds, idle, instance index)``.
        """
        entry = heappop(self.queue)
        if not entry[1]:
            heappop(self.busy)
        return entry

    @property
    def earliest_busy(self) -> float:
        """The lowest clock of a queued busy instance, seconds (``inf`` when none is busy)."""
        if self.busy is None:
            return min((t for t, idle, _ in self.queue if not idle), default=math.inf)
        return self.busy[0][0] if self.busy else math.inf


def wake_time(now: float, next_ready: float, earliest_busy: float, pending: bool,
              next_fault: float | None = None) -> float | None:
    """When an instance with nothing to run should look again; ``None`` if nothing can come its way.

    It wakes at the earliest of: the next request to become ready; the next busy instance's clock
    if requests are pending (a client of that instance may free up and take one, and this one may
    then take another); its own next fault; and, when none of these is known, the next busy
    instance's clock anyway (that instance may finish a predecessor, or fail and requeue work).

    Parameters
    ----------
    now
        The idle instance's clock, seconds.
    next_ready
        The earliest ready time not yet announced, seconds (``inf``: none known).
    earliest_busy
        The lowest clock of a busy instance, seconds (``inf``: none is busy).
    pending
        Whether ready requests wait for a client.
    next_fault
        Time of this instance's next fault, seconds (``None``: none).

    Returns
    -------
    float or None
        The time to wake at, seconds (never before ``now`` except a fault time, which is always
        later); ``None`` when the instance can retire.
    """
    candidates = []
    if next_ready < math.inf:
        candidates.append(max(next_ready, now))
    if next_fault is not None:
        candidates.append(next_fault)
    if earliest_busy < math.inf and (pending or not candidates):
        candidates.append(max(earliest_busy, now))
    return min(candidates) if candidates else None
