"""Time and memory limits: every backend returns on time with the best answer known; CBC's child is stopped.

Timings use generous margins (the machine is shared); ``benchmarks/time_limits.py`` prints the figures.
"""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest

from lloptim import Problem, workloads
from lloptim.errors import ModelTooLargeError
from lloptim.formulations.binpacking import binpacking_data, loads
from lloptim.solvers import Limit, SolveParams, Termination, available_solvers, get_backend, solve
from lloptim.solvers.isolation import can_isolate, run_isolated
from lloptim.solvers.limits import Deadline

MARGIN_S = 3.0  # on top of the promised 10 % + 1 s, for a loaded CI machine


def _sleep(seconds):
    time.sleep(seconds)
    return "slept"


def _allocate(mib):
    blocks = [np.ones(2**17) for _ in range(mib * 8)]  # 1 MiB each, touched
    time.sleep(5)
    return len(blocks)


def _fail():
    raise ValueError("boom")


@pytest.mark.skipif(not can_isolate(), reason="needs fork")
def test_isolated_runs_return_fail_and_are_stopped():
    assert run_isolated(_sleep, (0.01,), None, None).value == "slept"
    run = run_isolated(_fail, (), None, None)
    assert run.value is None and "ValueError: boom" in run.reason
    t = time.perf_counter()
    run = run_isolated(_sleep, (30,), time.perf_counter() + 0.5, None)
    assert run.reason == "time" and time.perf_counter() - t < 0.5 + 2.0
    run = run_isolated(_allocate, (400,), None, 100)
    assert run.reason == "memory" and run.grown_mb > 100 and run.peak_mb > run.grown_mb


def _collect():
    gc.collect()
    return "collected"


@pytest.mark.skipif(not can_isolate(), reason="needs fork")
def test_the_child_never_finalizes_the_parents_garbage():
    """A finalizer waiting on a lock a thread of the parent holds at the fork (as a Ray actor
    handle's did, and hung a test run) must not run in the child: the search returns."""
    lock, release = threading.Lock(), threading.Event()

    class Holder:
        def __del__(self):
            with lock:
                pass

    def hold():
        with lock:
            release.wait(30)

    enabled = gc.isenabled()
    gc.disable()  # keep the cycle as garbage until the fork
    thread = threading.Thread(target=hold, daemon=True)
    try:
        thread.start()
        while not lock.locked():
            time.sleep(0.001)
        garbage = Holder()
        garbage.cycle = garbage
        del garbage
        run = run_isolated(_collect, (), time.perf_counter() + 2.0, None, grace_s=0.5)
        assert run.reason == "" and run.value == "collected"
    finally:
        release.set()
        thread.join()
        if enabled:
            gc.enable()
        gc.collect()


def test_deadline_shares():
    d = Deadline.starting_now(10.0)
    assert 9.0 < d.remaining() <= 10.0 and not d.expired()
    assert d.share(0.25) == pytest.approx(2.5, abs=0.1)
    assert Deadline.starting_now(None).remaining() is None and Deadline.starting_now(None).share(0.5) is None
    assert Deadline(time.perf_counter() - 5, 1.0).expired()


@pytest.mark.parametrize("solver", [s for s in ("highs", "cbc", "cvxpy", "lagrangian", "greedy")
                                    if s in available_solvers()])
def test_every_backend_honours_the_time_limit(solver):
    p = Problem.single(workloads.gsm8k("test", limit=800), clients=100)
    limit = 2.0
    t = time.perf_counter()
    res = solve(p, solver, SolveParams(time_limit_s=limit, rel_gap=0, always_run=True))
    wall = time.perf_counter() - t
    assert wall <= 1.1 * limit + 1.0 + MARGIN_S, (solver, wall, res.extra)
    assert res.total_s <= wall + 1e-6
    # an answer and a bound, whatever stopped the search
    d = binpacking_data(p)
    assert res.assignment.shape == (800,) and res.primal_bound == pytest.approx(loads(d, res.assignment).max())
    assert res.dual_bound <= res.primal_bound and res.status.has_solution
    if res.status is Termination.FEASIBLE:
        assert res.limit in (Limit.TIME, Limit.MEMORY)


@pytest.mark.skipif("cbc" not in available_solvers() or not can_isolate(), reason="needs cbc and fork")
def test_cbc_past_its_memory_allowance_is_stopped():
    """The estimate guard is conservative; the child's watchdog catches what gets past it."""
    from lloptim.formulations.binpacking import build_binpacking

    from lloptim.solvers.base import run_backend

    lm = build_binpacking(binpacking_data(Problem.single(workloads.gsm8k("test", limit=1319), clients=200)))
    t = time.perf_counter()
    out = run_backend(get_backend("cbc"), lm, None, SolveParams(max_mem_mb=250), Deadline.starting_now(60))
    assert out.limit is Limit.MEMORY and out.x is None and "memory allowance" in out.extra["stopped"]
    assert out.peak_mb > 250 and out.extra["child_grown_mb"] > 250 and time.perf_counter() - t < 30


def test_memory_guard_refuses_before_any_work():
    p = Problem.single(workloads.gsm8k("test", limit=200), clients=8)
    t = time.perf_counter()
    with pytest.raises(ModelTooLargeError, match="GiB"):
        solve(p, "highs", SolveParams(always_run=True, max_mem_mb=1), weights=np.arange(1, 201.0))
    assert time.perf_counter() - t < 5
    from lloptim.formulations.binpacking import build_binpacking

    m = build_binpacking(binpacking_data(Problem.single(workloads.gsm8k("test"), clients=200)))
    for name, lo, hi in (("cbc", 8 * 1024, 12 * 1024), ("highs", 300, 2048)):
        if name in available_solvers():
            assert lo < get_backend(name).estimate_mem_mb(m) < hi, name  # near the measured peaks
