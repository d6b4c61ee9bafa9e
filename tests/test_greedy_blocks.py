"""The greedy local search scores swap pairs in bounded blocks, with the same result as all at once."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lloptim import Instance, Problem, Workload, load_profile
from lloptim.formulations.binpacking import binpacking_data, loads
from lloptim.solvers import greedy


@given(m=arrays(np.float64, st.tuples(st.integers(0, 9), st.integers(1, 9)),
                elements=st.sampled_from([0.0, 1.0, 2.0, 3.0, np.inf])), block=st.integers(1, 20))
@settings(max_examples=300, deadline=None)
def test_first_min_is_numpy_argmin_in_any_block_size(m, block):
    old = greedy.PAIR_BLOCK
    greedy.PAIR_BLOCK = block
    try:
        val, flat = greedy._first_min(lambda rows: m[rows], m.shape[0], m.shape[1])
    finally:
        greedy.PAIR_BLOCK = old
    if m.size == 0 or np.isinf(m).all():
        assert val == np.inf
    else:
        assert flat == int(np.argmin(m)) and val == m.flat[flat]


@pytest.mark.parametrize("mixed", [False, True])
def test_local_search_is_the_same_in_small_blocks(monkeypatch, mixed):
    rng = np.random.default_rng(3)
    w = Workload.from_arrays(rng.integers(5, 400, 600), rng.integers(2, 300, 600), name="blocks")
    base = load_profile("llama-65b")
    if mixed:
        slow = base.with_latency(base.latency.scaled(1.5, 1.5))
        problem = Problem(w, (Instance.from_profile(base, 6, name="a"), Instance.from_profile(slow, 6, name="b")))
    else:
        problem = Problem.single(w, base, clients=12)
    data = binpacking_data(problem)
    start = np.arange(600) % 12
    start[:300] = 0  # one client holds half the requests: |J| x R pairs, many blocks
    whole = greedy.local_search(data, start)
    monkeypatch.setattr(greedy, "PAIR_BLOCK", 7)
    blocks = greedy.local_search(data, start)
    assert np.array_equal(whole, blocks)
    assert loads(data, blocks).max() < loads(data, start).max()
