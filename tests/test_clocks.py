"""The instances' clock queue and the wake rule shared by the simulator and the real-engine driver."""

from __future__ import annotations

import heapq
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lloptim import Problem, workloads
from lloptim.runtime.clocks import InstanceClocks, wake_time
from lloptim.runtime.engine import Engine
from lloptim.runtime.registry import make_policy

ops = st.lists(st.one_of(st.just(None), st.tuples(st.floats(0, 100, allow_nan=False), st.booleans())),
               max_size=200)


@given(n=st.integers(0, 24), script=ops)
@settings(max_examples=200, deadline=None)
def test_pop_order_and_earliest_busy_match_a_plain_scan(n, script):
    # n up to 24: both the scanned (n <= SCAN_LIMIT) and the two-heap queues
    # the reference: the (clock, idle, index) heap the engine used, and a scan of it for the busy minimum
    clocks, ref = InstanceClocks(n), [(0.0, 0, k) for k in range(n)]
    out: list[int] = []  # instances popped and not yet pushed back
    for op in script:
        busy = [t for t, idle, _ in ref if not idle]
        assert clocks.earliest_busy == (min(busy) if busy else math.inf)
        assert len(clocks) == len(ref)
        if op is None or not out:
            if not ref:
                continue
            entry = heapq.heappop(ref)
            assert clocks.pop() == entry
            out.append(entry[2])
        else:
            t, idle = op
            k = out.pop(0)
            heapq.heappush(ref, (t, int(idle), k))
            clocks.push((t, int(idle), k))


def test_wake_rule():
    inf = math.inf
    assert wake_time(5.0, inf, inf, False) is None  # nothing can come: retire
    assert wake_time(5.0, 7.0, 6.0, False) == 7.0  # the next ready request; nothing pending
    assert wake_time(5.0, 7.0, 6.0, True) == 6.0  # pending work: a busy peer's clock may free a client
    assert wake_time(5.0, 3.0, 9.0, False) == 5.0  # never before its own clock
    assert wake_time(5.0, inf, 8.0, False) == 8.0  # a peer may still finish a predecessor or fail
    assert wake_time(5.0, inf, 8.0, False, next_fault=6.5) == 6.5
    assert wake_time(5.0, inf, 4.0, True, next_fault=6.5) == 5.0


def test_an_engine_runs_twice_the_same():
    problem = Problem.single(workloads.workflows("dag", 12, seed=3, arrival_rate=2.0), clients=4, instances=3)
    engine = Engine(problem, make_policy("hybrid"))
    a, b = engine.run(), engine.run()
    for name in ("ready_s", "assign_s", "done_s", "trace_start_s", "trace_kind"):
        assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True), name
    assert np.all(np.isfinite(a.done_s))
