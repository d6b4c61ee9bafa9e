"""The projected-memory fast paths return exactly what the direct formulas return (issue 12, CPU time).

:meth:`lloptim.runtime.kv.ProjectedMemory.held_at` sums the members' blocks through threshold
sums (``_CeilSums``) instead of a (taus x members) matrix; the references below are the direct
formulas it replaced, on random sets and candidates, paged (no floors) and reserve (floors), blocks
of 1, 16 and 32 tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unittest.mock import patch

from lloptim.runtime import kv
from lloptim.runtime.kv import ProjectedMemory

#: HELD_DIRECT_MAX values that send every query through the threshold sums (0) or the direct sum
PATHS = [0, 10**9]


def _held_dense(t, rem, f, B, tau):
    """The direct sum: blocks(max(t_j + tau, f_j)) over the members with rem_j >= tau (the old ``_held``)."""
    tokens = np.maximum(t[None, :] + tau[:, None], f[None, :])
    return (-(-tokens // B) * (rem[None, :] >= tau[:, None])).sum(axis=1)


def _first_fit_dense(t, rem, f, cap, B, t0, r0, f0):
    """The first candidate that fits, each step checked directly (the definition :meth:`first_fit` follows)."""
    for i in range(t0.size):
        taus = np.arange(1, r0[i] + 1)
        own = -(-np.maximum(t0[i] + taus, 0 if f0 is None else f0[i]) // B)
        if np.all(_held_dense(t, rem, f, B, taus) + own <= cap):
            return i
    return -1


@st.composite
def _sets(draw):
    B = draw(st.sampled_from([1, 16, 32]))
    m = draw(st.integers(0, 12))
    reserve = draw(st.booleans())
    t = np.array(draw(st.lists(st.integers(0, 300), min_size=m, max_size=m)), dtype=np.int64)
    rem = np.array(draw(st.lists(st.integers(-2, 120), min_size=m, max_size=m)), dtype=np.int64)
    f = (np.array(draw(st.lists(st.integers(0, 500), min_size=m, max_size=m)), dtype=np.int64)
         if reserve else None)
    n = draw(st.integers(1, 15))
    t0 = np.array(draw(st.lists(st.integers(0, 300), min_size=n, max_size=n)), dtype=np.int64)
    r0 = np.array(draw(st.lists(st.integers(1, 150), min_size=n, max_size=n)), dtype=np.int64)
    f0 = np.array(draw(st.lists(st.integers(0, 500), min_size=n, max_size=n)), dtype=np.int64) if reserve else None
    cap = draw(st.integers(0, 80))
    return B, t, rem, f, cap, t0, r0, f0


@pytest.mark.parametrize("direct_max", PATHS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_sets(), taus=st.lists(st.integers(0, 200), min_size=0, max_size=20))
def test_held_at_equals_the_direct_sum(direct_max, case, taus):
    B, t, rem, f, cap, t0, r0, f0 = case
    with patch.object(kv, "HELD_DIRECT_MAX", direct_max):
        _check_held_at(B, t, rem, f, cap, r0, taus)


def _check_held_at(B, t, rem, f, cap, r0, taus):
    pm = ProjectedMemory(t, rem, cap, B, f)
    rem1 = np.maximum(rem, 1)
    ff = np.zeros_like(t) if f is None else f
    tau = np.array(taus + r0.tolist(), dtype=np.int64)
    got = pm.held_at(tau)
    assert got.dtype == np.int64 and got.shape == tau.shape
    np.testing.assert_array_equal(got, _held_dense(t, rem1, ff, B, tau))
    if t.size:
        np.testing.assert_array_equal(pm.margin, cap - _held_dense(t, rem1, ff, B, pm.taus))


@pytest.mark.parametrize("direct_max", PATHS)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_sets())
def test_first_fit_and_fits_equal_the_step_by_step_check(direct_max, case):
    B, t, rem, f, cap, t0, r0, f0 = case
    with patch.object(kv, "HELD_DIRECT_MAX", direct_max):
        pm = ProjectedMemory(t, rem, cap, B, f)
        got, ok = pm.first_fit(t0, r0, f0), pm.fits(t0, r0, f0)
    ff = np.zeros_like(t) if f is None else f
    ref = _first_fit_dense(t, np.maximum(rem, 1), ff, cap, B, t0, r0, f0)
    assert got == ref
    assert (int(np.flatnonzero(ok)[0]) if ok.any() else -1) == ref


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_sets(), data=st.data())
def test_held_at_stays_exact_as_members_are_added(case, data):
    B, t, rem, f, cap, t0, r0, f0 = case
    with patch.object(kv, "HELD_DIRECT_MAX", 0):
        _check_adds(B, t, rem, f, cap, t0, r0, f0, data)


def _check_adds(B, t, rem, f, cap, t0, r0, f0, data):
    pm = ProjectedMemory(t, rem, cap, B, f)
    tt, rr, fl = t.tolist(), np.maximum(rem, 1).tolist(), (np.zeros_like(t) if f is None else f).tolist()
    for i in range(t0.size):
        floor = 0 if f0 is None else int(f0[i])
        pm.add(int(t0[i]), int(r0[i]), floor)
        tt.append(int(t0[i])), rr.append(int(r0[i])), fl.append(floor)
        tau = np.array(data.draw(st.lists(st.integers(0, 200), min_size=1, max_size=10)), dtype=np.int64)
        ref = _held_dense(np.array(tt), np.array(rr), np.array(fl), B, tau)
        np.testing.assert_array_equal(pm.held_at(tau), ref)


def test_held_at_names_a_negative_step():
    pm = ProjectedMemory([10, 20], [3, 5], 100, 16)
    with pytest.raises(ValueError, match="tau must be >= 0"):
        pm.held_at(np.array([0, -1]))


@pytest.mark.parametrize("gap", [-1, 0, 1, 2])
@pytest.mark.parametrize("B", [1, 16, 32])
def test_held_at_at_the_floor_boundary(gap, B):
    """A reservation just above, at or below the context: the floor binds for tau <= gap only."""
    t = np.array([32, 31, 64, 0], dtype=np.int64)
    rem = np.array([3, 1, 5, 2], dtype=np.int64)
    f = t + gap
    tau = np.arange(0, 7, dtype=np.int64)
    ref = _held_dense(t, rem, np.maximum(f, 0), B, tau)
    with patch.object(kv, "HELD_DIRECT_MAX", 0):
        np.testing.assert_array_equal(ProjectedMemory(t, rem, 100, B, np.maximum(f, 0)).held_at(tau), ref)


def test_held_at_on_many_steps_needs_no_steps_by_members_matrix():
    """100k steps x 200 members: the direct sum would allocate 160 MB per (steps x members) int64
    array; the threshold sums allocate O(steps) (a few MB). Measured with tracemalloc (numpy reports
    its buffers to it)."""
    import tracemalloc

    rng = np.random.default_rng(12)
    pm = ProjectedMemory(rng.integers(0, 4000, 200), rng.integers(1, 5000, 200), 10**6, 16)
    tau = rng.integers(0, 6000, 100_000)
    tracemalloc.start()
    try:
        got = pm.held_at(tau)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20, f"held_at peaked at {peak / 2**20:.0f} MiB"
    sample = rng.choice(tau.size, 500, replace=False)
    np.testing.assert_array_equal(got[sample], _held_dense(pm.t, pm.rem, pm.f, pm.B, tau[sample]))
