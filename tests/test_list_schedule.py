"""``dag_plan.list_schedule`` keeps idle machines in one group: the same schedule as a pass over them per event.

The reference below is the loop before that change (an idle machine went back into the heap at
the next event, so every event cost a pass over the idle machines); the property test checks that
both give the same starts, machines and makespan on random DAGs, releases, busy machines and
machine kinds, ties included (integer times and priorities).
"""

from __future__ import annotations

import heapq

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lloptim.dag_plan import list_schedule


def _reference(predecessors, successors, weights, machine_kind, priority, release=None, machine_free=None):
    n = len(predecessors)
    w = np.asarray(weights, dtype=np.float64)
    w = w[:, None] if w.ndim == 1 else w
    kinds = np.asarray(machine_kind, dtype=np.int64).tolist()
    prio = np.asarray(priority, dtype=np.float64).tolist()
    ready_at = [0.0] * n if release is None else np.asarray(release, dtype=np.float64).tolist()
    wl = w.tolist()
    waiting_for = [len(p) for p in predecessors]
    start, machine = [0.0] * n, [0] * n
    future = [(ready_at[j], j) for j in range(n) if waiting_for[j] == 0]
    heapq.heapify(future)
    ready, running = [], []
    free = [(0.0, m) for m in range(len(kinds))] if machine_free is None else \
        [(float(t), m) for m, t in enumerate(np.asarray(machine_free, dtype=np.float64))]
    heapq.heapify(free)
    placed, makespan = 0, 0.0
    while placed < n:
        t, m = heapq.heappop(free)
        while running and running[0][0] <= t:
            f, j = heapq.heappop(running)
            for s in successors[j]:
                waiting_for[s] -= 1
                ready_at[s] = max(ready_at[s], f)
                if waiting_for[s] == 0:
                    heapq.heappush(future, (ready_at[s], s))
        while future and future[0][0] <= t:
            j = heapq.heappop(future)[1]
            heapq.heappush(ready, (prio[j], j))
        if not ready:
            nxt = min(future[0][0] if future else np.inf, running[0][0] if running else np.inf)
            heapq.heappush(free, (nxt, m))
            continue
        j = heapq.heappop(ready)[1]
        f = t + wl[j][kinds[m] if len(wl[j]) > 1 else 0]
        start[j], machine[j] = t, m
        heapq.heappush(running, (f, j))
        heapq.heappush(free, (f, m))
        makespan = max(makespan, f)
        placed += 1
    return np.asarray(start), np.asarray(machine, dtype=np.int64), makespan


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 40), machines=st.integers(1, 9), kinds=st.integers(1, 3), edge_p=st.sampled_from([0.0, 0.05, 0.2]),
       integer=st.booleans(), with_release=st.booleans(), with_free=st.booleans(), seed=st.integers(0, 10_000))
def test_grouped_idle_machines_give_the_same_schedule(n, machines, kinds, edge_p, integer, with_release, with_free,
                                                      seed):
    rng = np.random.default_rng(seed)
    preds = [[] for _ in range(n)]
    succs = [[] for _ in range(n)]
    for j in range(n):
        for i in range(j):
            if rng.random() < edge_p:
                preds[j].append(i)
                succs[i].append(j)
    w = rng.integers(1, 5, (n, kinds)).astype(float) if integer else rng.uniform(0.1, 3.0, (n, kinds))
    kind = rng.integers(0, kinds, machines)
    prio = rng.integers(0, 5, n).astype(float)
    release = rng.integers(0, 6, n).astype(float) if with_release else None
    free = rng.integers(0, 4, machines).astype(float) if with_free else None
    got = list_schedule(preds, succs, w, kind, prio, release, free)
    want = _reference(preds, succs, w, kind, prio, release, free)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


def test_a_cycle_is_an_error_not_a_hang():
    with pytest.raises(ValueError, match="cycle"):
        list_schedule([[], [2], [1]], [[], [2], [1]], np.ones(3), np.zeros(2, dtype=np.int64), np.zeros(3))
