"""The fast fleet dispatch decides as the plain one did (issue 12's speed on mixed fleets under arrivals).

:class:`~lloptim.runtime.fleet.FleetPrices` keeps its price LP in one warm-started HiGHS model with
an exact shortcut (``_WarmSplitLP``) and reads the queue and the clients with numpy. The reference
here is the implementation it replaced, written out plainly: the LP rebuilt for ``linprog`` at every
solve (:func:`~lloptim.runtime.fleet.split_lp`), the queue's head from the heap, one request at a
time through the belongs test and the earliest-completion scan, the clients from the holding dict,
and a re-pick after every re-solve of a stuck client. Both must hand out the same requests to the
same clients at the same times.
"""

from __future__ import annotations

import heapq
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lloptim import Instance, Problem, Workload, load_profile, run_policy
from lloptim.arrivals import capacity_rps, poisson_arrivals
from lloptim.runtime import fleet as fleet_module
from lloptim.runtime.engine import FAILED, RUNNING, WAITING
from lloptim.runtime.fleet import SCAN_LIMIT, FleetPrices, _WarmSplitLP, split_lp
from lloptim.runtime.hybrid import hybrid_policy
from lloptim.runtime.request_schedulers import heap_remove
from lloptim.work import instance_seconds, request_instance_seconds

BASE = load_profile("llama-65b")


def _earliest_plain(heaps, hold, allowed, instance):
    best, where = np.inf, -1
    for k in range(len(heaps)):
        if allowed[k] and heaps[k]:
            finish = heaps[k][0] + hold[k]
            if finish < best or (finish == best and k == instance):
                best, where = finish, k
    return best, where


class PlainPrices(FleetPrices):
    """The fleet dispatch before it was made fast (the reference)."""

    def refresh(self, now, stuck=False):
        super().refresh(now, stuck)
        return True  # the dispatch re-picked after every re-solve of a stuck client

    def _solve(self, now):
        old = fleet_module._WARM_LP
        fleet_module._WARM_LP = False
        try:
            super()._solve(now)
        finally:
            fleet_module._WARM_LP = old

    def _committed(self, now):
        b = np.full(self.m, now)
        for c, (r, since) in self.holding.items():
            k = int(self.ctx.client_instance[c])
            v = self.slowness[k] * self.v[r, k]
            b[k] += v * max(0.0, 1.0 - (now - since) / (self.clients[k] * v)) if v > 0 else 0.0
        return b

    def _holds(self, rows, states):
        p = self.ctx.problem.workload.prompt_tokens[rows].astype(np.float64)
        o = np.asarray(self.ctx.estimates, dtype=np.float64)[rows]
        out = np.empty((rows.size, self.m))
        for k, st_ in enumerate(states):
            lat = st_.latency
            busy = min(len(st_.clients), st_.n_running + len(st_.waiting) + 1)
            step = lat.decode_time(busy, st_.kv_tokens + p + o / 2)
            out[:, k] = self.slowness[k] * ((o + 1) * step + lat.prefill_per_token_s * p)
        return out

    def _plain_free_times(self, now, states):
        client_state = self.ctx.extra["client_state"]
        held = list(self.holding.items())
        hold = self._holds(np.array([r for _, (r, _) in held], dtype=np.int64), states) if held else None
        ends = {c: since + hold[i, int(self.ctx.client_instance[c])] for i, (c, (r, since)) in enumerate(held)}
        out = []
        for st_ in states:
            times = []
            for c in st_.clients:
                if client_state[c] in (RUNNING, WAITING):
                    times.append(max(now, ends.get(c, now)))
                elif client_state[c] != FAILED:
                    times.append(max(now, st_.now))
            out.append(sorted(times))
        return out

    def pick(self, queue, instance, now, states, past_horizon=False):
        heaps = self._plain_free_times(now, states)
        if not heaps[instance]:
            return None
        head = heapq.nsmallest(SCAN_LIMIT, queue)
        holds = self._holds(np.array([r for _, r in head], dtype=np.int64), states)
        for pos, item in enumerate(head):
            ok = self.belongs(item[1])
            best, where = _earliest_plain(heaps, holds[pos], ok, instance)
            if past_horizon and best > self.horizon_s:
                tops = [h[0] if h else np.inf for h in heaps]
                best, where = self.place_past_horizon(item[1], tops, instance, now, states)
            if where == instance and heaps[instance][0] <= now:
                return item
            if where >= 0:
                heapq.heapreplace(heaps[where], best)
        if len(queue) <= len(head) or heaps[instance][0] > now:
            return None
        keys = np.array([k for k, _ in queue])
        rows = np.array([r for _, r in queue], dtype=np.int64)
        v = self.v[rows] * self.slowness[None, :]
        priced = (v if self.mode == "lp" else self.v[rows]) * self.prices[None, :]
        ok = priced - priced.min(axis=1, keepdims=True) <= self.tolerance * priced.min(axis=1, keepdims=True)
        if self.mode == "ect":
            ok[:] = True
        ready_at = np.array([h[0] if h else np.inf for h in heaps])
        finish = ready_at[None, :] + self._holds(rows, states)
        finish[~ok] = np.inf
        here = finish[:, instance].copy()
        finish[:, instance] = np.inf
        good = ok[:, instance] & (here <= finish.min(axis=1)) & (keys > head[-1][0])
        if not good.any():
            return None
        return queue[int(np.flatnonzero(good)[np.argmin(keys[good])])]


def _mixed_fleet(speeds, clients, kv=163_840):
    out = []
    for k, (s, c) in enumerate(zip(speeds, clients)):
        prof = BASE if s == (1.0, 1.0) else BASE.with_latency(BASE.latency.scaled(*s))
        out.append(Instance.from_profile(prof, c, kv, name=f"i{k}"))
    return tuple(out)


def _overloaded_three_kinds(n: int, load: float, seed: int) -> Problem:
    """``n`` heavy-tailed requests arriving at ``load`` x the capacity of instances 1, 1.6 and 2.5 times slower."""
    rng = np.random.default_rng(seed)
    prompt = np.clip(np.rint(rng.lognormal(np.log(150), 1.4, n)), 1, 4000).astype(np.int64)
    output = np.clip(np.rint(rng.lognormal(np.log(100), 1.4, n)), 1, 4000).astype(np.int64)
    problem = Problem(Workload.from_arrays(prompt, output),
                      _mixed_fleet([(1.0, 1.0), (1.6, 1.6), (2.5, 2.5)], [16, 12, 8]))
    return Problem(problem.workload.with_arrivals(poisson_arrivals(n, load * capacity_rps(problem), seed)),
                   problem.instances)


@st.composite
def fleets_under_arrivals(draw):
    """Small mixed fleets (2-4 instances, different speeds and clients) with Poisson arrivals at 0.8-2.5x load."""
    seed = draw(st.integers(0, 10_000))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(20, 120))
    m = draw(st.integers(2, 4))
    speeds = draw(st.lists(st.sampled_from([(1.0, 1.0), (1.6, 1.6), (2.5, 2.5), (0.6, 1.6), (1.3, 1.3)]),
                           min_size=m, max_size=m))
    clients = draw(st.lists(st.integers(1, 8), min_size=m, max_size=m))
    prompt = np.clip(np.rint(rng.lognormal(np.log(80), 1.2, n)), 1, 2000).astype(np.int64)
    output = np.clip(np.rint(rng.lognormal(np.log(60), 1.2, n)), 1, 2000).astype(np.int64)
    problem = Problem(Workload.from_arrays(prompt, output), _mixed_fleet(speeds, clients))
    load = draw(st.sampled_from([0.8, 1.5, 2.5]))
    arrivals = poisson_arrivals(n, load * capacity_rps(problem), seed)
    return Problem(problem.workload.with_arrivals(arrivals), problem.instances)


def _run(problem, prices):
    pol = hybrid_policy(prices=prices)
    res = run_policy(problem, pol)
    return res, pol.requests.fleet


def _assert_same(problem, mode="lp"):
    fast, fast_prices = _run(problem, FleetPrices(mode))
    plain, _ = _run(problem, PlainPrices(mode))
    # nothing lost: every request served once, every token generated
    assert np.all(np.isfinite(fast.done_s)) and np.all(fast.client >= 0)
    assert int(fast.generated_tokens) == int(problem.workload.output_tokens.sum())
    np.testing.assert_array_equal(fast.client, plain.client)
    np.testing.assert_array_equal(fast.assign_s, plain.assign_s)
    np.testing.assert_array_equal(fast.done_s, plain.done_s)
    assert fast.makespan_s == plain.makespan_s
    return fast_prices


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets_under_arrivals())
def test_the_fast_dispatch_decides_as_the_plain_one_under_arrivals(problem):
    _assert_same(problem)


@pytest.mark.parametrize("mode", ["lp", "ect", "uniform"])
def test_the_fast_dispatch_decides_as_the_plain_one_with_every_request_at_once(mode):
    rng = np.random.default_rng(7)
    n = 60 if mode == "uniform" else 400  # uniform prices idle the slow instances: a long run
    prompt = np.clip(np.rint(rng.lognormal(np.log(100), 1.2, n)), 1, 1500).astype(np.int64)
    output = np.clip(np.rint(rng.lognormal(np.log(80), 1.2, n)), 1, 1500).astype(np.int64)
    problem = Problem(Workload.from_arrays(prompt, output),
                      _mixed_fleet([(1.0, 1.0), (1.0, 1.0), (0.6, 1.6), (1.5, 1.5)], [10, 10, 10, 6]))
    _assert_same(problem, mode)


def test_a_long_run_under_overload_takes_the_shortcut_and_decides_the_same():
    # 600 requests at twice the capacity of three instances 1, 1.6 and 2.5 times slower: the
    # queue grows, the one-binding-instance shortcut answers most solves, the head comes from numpy
    problem = _overloaded_three_kinds(600, 2.0, 3)
    prices = _assert_same(problem)
    assert prices._lp is not None and prices._lp.shortcuts > prices.solves / 2
    assert prices._lp.restricted > 0   # the LP over the requests near a tie answered some solves


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 5), st.integers(1, 30))
def test_the_warm_lp_solves_the_lp_of_split_lp_through_changes(seed, m, size):
    # a sequence of LPs as a run makes them: requests join and leave, loads and slowness move;
    # the warm model (and its shortcut) must give split_lp's makespan and, where unique, its prices
    rng = np.random.default_rng(seed)
    n = 4 * size + 10
    v = rng.lognormal(0, 1, (n, 1)) * rng.uniform(0.5, 3.0, m)[None, :] * rng.uniform(0.8, 1.25, (n, m))
    lp = _WarmSplitLP(m, n)
    queued = set(rng.choice(n, size, replace=False).tolist())
    b = rng.uniform(0, 20, m)
    s = np.ones(m)
    for step in range(12):
        rows = np.array(sorted(queued), dtype=np.int64)
        got = lp.solve(rows, v, s, b)
        ref = split_lp(v[rows].T * s[:, None], b)
        assert got is not None and ref.status == 0
        lam, T = got
        assert T == pytest.approx(ref.x[-1], rel=1e-7, abs=1e-9)
        lam_ref = -np.asarray(ref.ineqlin.marginals)
        # prices are unique where the LP is not degenerate; both are optimal duals anyway: check
        # the dual objective of ours reaches the makespan
        dual = float(lam @ b + np.min(lam[:, None] * (v[rows].T * s[:, None]), axis=0).sum())
        assert dual == pytest.approx(T, rel=1e-7, abs=1e-9) and lam.sum() == pytest.approx(1.0, rel=1e-7)
        if step % 3 == 0:
            np.testing.assert_allclose(lam, lam_ref, rtol=1e-6, atol=1e-9)
        # a run's changes: a few start, a few arrive, time passes, an instance gets slower or
        # takes on committed work (sometimes a lot: the one-binding-instance vertex)
        for r in rng.choice(sorted(queued), min(len(queued) - 1, int(rng.integers(0, 3))), replace=False):
            queued.discard(int(r))
        free = [r for r in range(n) if r not in queued]
        queued.update(rng.choice(free, min(len(free), int(rng.integers(0, 4))), replace=False).tolist())
        b = b + rng.uniform(0, 2, m)
        if rng.random() < 0.3:
            b[rng.integers(m)] += rng.uniform(0, 50)
        if rng.random() < 0.3:
            s = s * np.exp(rng.normal(0, 0.1, m))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 5), st.integers(100, 400), st.booleans())
def test_the_lp_near_the_ties_answers_as_the_full_lp_on_long_queues(seed, m, size, proportional):
    # queues long enough for the LP over the requests near a tie (pooled by class of proportional
    # instances, some fleets with a copy of an instance and one only slower in proportion): each
    # answer is split_lp's makespan and, where the LP is not degenerate, its prices
    rng = np.random.default_rng(seed)
    n = 2 * size + 50
    v = rng.lognormal(0, 1, (n, 1)) * rng.uniform(0.5, 3.0, m)[None, :] * rng.uniform(0.8, 1.25, (n, m))
    if proportional:
        v[:, -1] = v[:, 0]
        v[:, 1] = 1.7 * v[:, 0]
    lp = _WarmSplitLP(m, n)
    queued = set(rng.choice(n, size, replace=False).tolist())
    b = rng.uniform(0, 5, m)
    s = np.ones(m)
    for step in range(10):
        rows = np.array(sorted(queued), dtype=np.int64)
        before = lp.restricted
        got = lp.solve(rows, v, s, b)
        ref = split_lp(v[rows].T * s[:, None], b)
        assert got is not None and ref.status == 0
        lam, T = got
        assert T == pytest.approx(ref.x[-1], rel=1e-7, abs=1e-9)
        dual = float(lam @ b + np.min(lam[:, None] * (v[rows].T * s[:, None]), axis=0).sum())
        assert dual == pytest.approx(T, rel=1e-7, abs=1e-9)
        if lp.restricted > before:      # answered near the ties: the only optimal prices
            lam_ref = -np.asarray(ref.ineqlin.marginals)
            np.testing.assert_allclose(lam / lam.sum(), lam_ref / lam_ref.sum(), rtol=1e-6, atol=1e-9)
            # the shares it keeps are a feasible assignment of every queued request
            np.testing.assert_allclose(lp.y[rows].sum(axis=1), 1.0, atol=1e-9)
        for r in rng.choice(sorted(queued), int(rng.integers(0, 8)), replace=False):
            queued.discard(int(r))
        free = [r for r in range(n) if r not in queued]
        queued.update(rng.choice(free, min(len(free), int(rng.integers(0, 8))), replace=False).tolist())
        b = b + rng.uniform(0, 0.5, m)
        if rng.random() < 0.3:
            s = s * np.exp(rng.normal(0, 0.05, m))


def test_the_lp_near_the_ties_is_used_on_a_long_queue():
    # a long queue on three kinds of instances: after the first full solve, small changes are
    # answered near the ties (or by the shortcuts), never wrongly
    rng = np.random.default_rng(2)
    m, n = 4, 800
    kinds = rng.uniform(0.7, 1.4, (n, 3))[:, [0, 1, 0, 2]]     # instances 0 and 2 of one kind
    v = rng.lognormal(0, 1, (n, 1)) * np.array([1.0, 1.6, 1.0, 2.5])[None, :] * kinds
    lp = _WarmSplitLP(m, n)
    s = np.ones(m)
    b = np.zeros(m)
    queued = np.arange(600)
    lp.solve(queued, v, s, b)
    for step in range(20):
        queued = np.r_[queued[1:], 600 + step]           # one starts, one arrives
        lam, T = lp.solve(queued, v, s, b + 0.01 * step)
        ref = split_lp(v[queued].T, b + 0.01 * step)
        assert T == pytest.approx(ref.x[-1], rel=1e-9)
    assert lp.restricted > 0


def test_the_shortcuts_answer_only_what_the_lp_answers():
    # one instance committed far ahead with room on the others: lambda = e_j and T = b_j without
    # HiGHS; a queue that no longer fits: HiGHS, and a makespan past b_j
    rng = np.random.default_rng(11)
    m, n = 3, 60
    v = rng.lognormal(0, 0.5, (n, 1)) * np.array([1.0, 1.6, 2.5])[None, :]
    lp = _WarmSplitLP(m, n)
    s = np.ones(m)
    rows = np.arange(10)
    b = np.array([5.0, 4.0, 3.0])
    lp.solve(rows, v, s, b)                      # the first solve builds the model
    before = lp.shortcuts
    b = np.array([100.0, 4.0, 3.0])
    lam, T = lp.solve(rows, v, s, b)
    assert lp.shortcuts == before + 1 and T == 100.0 and list(lam) == [1.0, 0.0, 0.0]
    ref = split_lp(v[rows].T, b)
    assert ref.x[-1] == pytest.approx(100.0) and -ref.ineqlin.marginals[0] == pytest.approx(1.0)
    rows = np.arange(n)                          # 60 requests: about 100 s of work on the other two
    b = np.array([30.0, 4.0, 3.0])
    lam, T = lp.solve(rows, v, s, b)
    ref = split_lp(v[rows].T, b)
    assert T == pytest.approx(ref.x[-1], rel=1e-9) and T > 30.0
    np.testing.assert_allclose(lam / lam.sum(), -ref.ineqlin.marginals / -ref.ineqlin.marginals.sum(), rtol=1e-6)


class _CheckedRefusals(FleetPrices):
    """Every refusal is checked: from memory against a fresh scan, and at other horizons."""

    remembered = 0
    probed = 0

    def _fresh(self, queue, instance, now, states, past_horizon, horizon):
        saved = (self.horizon_s, self.steered, self._picked, self._span, self._refused)
        self.horizon_s = horizon
        try:
            return self._pick(queue, instance, now, states, past_horizon)
        finally:
            self.horizon_s, self.steered, self._picked, self._span, self._refused = saved

    def pick(self, queue, instance, now, states, past_horizon=False):
        refused = self._refused
        item = super().pick(queue, instance, now, states, past_horizon)
        if item is not None:
            return item
        if self._refused is refused:
            self.remembered += 1
            assert self._fresh(queue, instance, now, states, past_horizon, self.horizon_s) is None
        elif past_horizon and np.isfinite(self.horizon_s):
            # a fresh refusal: asked again at another horizon, memory and a scan answer alike
            below, above = self._span
            for horizon in (below, np.nextafter(below, -np.inf), np.nextafter(above, -np.inf), above,
                            0.9 * self.horizon_s, 1.1 * self.horizon_s):
                if not np.isfinite(horizon):
                    continue
                self.probed += 1
                saved = (self.horizon_s, self.steered, self._picked, self._refused)
                self.horizon_s = horizon
                again = super().pick(queue, instance, now, states, past_horizon)
                self.horizon_s, self.steered, self._picked, self._refused = saved
                assert again == self._fresh(queue, instance, now, states, past_horizon, horizon)
        return item


def test_a_remembered_refusal_is_what_a_fresh_scan_answers():
    # overload on three kinds of instances: clients refused, the LP re-solved (its horizon moves),
    # the same client asks again; the answer from memory must be the scan's
    for seed in (3, 4):
        problem = _overloaded_three_kinds(500, 2.5, seed)
        prices = _CheckedRefusals("lp")
        res, _ = _run(problem, prices)
        assert prices.remembered > 0 and prices.probed > 0 and np.all(np.isfinite(res.done_s))


class _Keyless(FleetPrices):
    """The fast dispatch told no keys: it reads the head of the queue from the heap."""

    def on_ready(self, request, key=None):
        super().on_ready(request)

    def on_requeue(self, request, key=None):
        super().on_requeue(request)


def test_without_the_keys_the_dispatch_reads_the_heap_and_decides_the_same():
    rng = np.random.default_rng(5)
    n = 300
    prompt = np.clip(np.rint(rng.lognormal(np.log(100), 1.2, n)), 1, 1500).astype(np.int64)
    output = np.clip(np.rint(rng.lognormal(np.log(80), 1.2, n)), 1, 1500).astype(np.int64)
    problem = Problem(Workload.from_arrays(prompt, output),
                      _mixed_fleet([(1.0, 1.0), (0.6, 1.6), (1.5, 1.5)], [8, 8, 4]))
    problem = Problem(problem.workload.with_arrivals(poisson_arrivals(n, 1.5 * capacity_rps(problem), 5)),
                      problem.instances)
    keyed, _ = _run(problem, FleetPrices("lp"))
    keyless, _ = _run(problem, _Keyless("lp"))
    np.testing.assert_array_equal(keyed.client, keyless.client)
    np.testing.assert_array_equal(keyed.assign_s, keyless.assign_s)


# -- the structures behind the speed (issue 12 item 4: the hybrid's CPU time on fleets under arrivals) --
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 5).map(float), st.integers(0, 10_000)), min_size=1, max_size=60,
                unique_by=lambda t: t[1]),
       st.lists(st.integers(0, 10_000), max_size=60))
def test_heap_remove_keeps_a_heap_of_the_other_entries(entries, picks):
    heap = list(entries)
    heapq.heapify(heap)
    left = sorted(heap)
    for i in picks:
        if not heap:
            break
        item = heap[i % len(heap)]        # any position: the root, a leaf, the middle
        heap_remove(heap, item)
        left.remove(item)
        assert sorted(heap) == left
        assert all(not heap[c] < heap[(c - 1) // 2] for c in range(1, len(heap)))   # the heap invariant
        if heap:
            assert heap[0] == left[0]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4000), st.one_of(st.integers(0, 3000).map(float), st.floats(0.0, 3000.0)), st.integers(0, 3))
def test_one_request_priced_with_floats_is_its_row_of_the_arrays(p, o, k):
    # the fleet prices price an arriving request with floats; the bound and the end game use the
    # arrays: the same numbers to the bit, so decisions do not depend on which was used (``o`` is
    # an estimate: any non-negative number of tokens)
    insts = _mixed_fleet([(1.0, 1.0), (1.6, 1.6), (0.6, 1.6), (2.5, 2.5)], [64, 40, 17, 3])
    problem = Problem(Workload.from_arrays(np.array([p, 7]), np.array([5, 9])), insts)
    row = instance_seconds(problem, [0], np.array([float(o)]))[0]
    assert request_instance_seconds(insts[k], float(p), float(o)) == row[k]
    assert request_instance_seconds(insts[k], np.array([float(p)]), np.array([float(o)]))[0] == row[k]


class _CheckedOrder(FleetPrices):
    """At every pick: the kept order is the queued keyed requests by (key, row); a shared belongs test is the rows'."""

    checked = 0
    shared = 0

    def _pick(self, queue, instance, now, states, past_horizon):
        rows = np.flatnonzero(self.queued)
        keyed = ~np.isnan(self.key[rows])
        assert self._order == sorted(zip(self.key[rows[keyed]].tolist(), rows[keyed].tolist()))
        assert self._unkeyed == int((~keyed).sum())
        everywhere = self._belongs_everywhere()
        if everywhere is not None and rows.size:
            np.testing.assert_array_equal(self.belongs_rows(rows), np.broadcast_to(everywhere, (rows.size, self.m)))
            _CheckedOrder.shared += 1
        _CheckedOrder.checked += 1
        return super()._pick(queue, instance, now, states, past_horizon)


def test_the_kept_order_and_the_shared_belongs_test_are_what_the_queue_says():
    problem = _overloaded_three_kinds(400, 2.0, 11)
    _CheckedOrder.checked = _CheckedOrder.shared = 0
    res, _ = _run(problem, _CheckedOrder("lp"))
    assert np.all(np.isfinite(res.done_s)) and int(res.generated_tokens) == int(problem.workload.output_tokens.sum())
    assert _CheckedOrder.checked > 100 and _CheckedOrder.shared > 0


def test_under_arrivals_the_dispatch_never_rebuilds_the_ready_heap(monkeypatch):
    # a long queue under overload: a pick from its middle removes in O(log n); remove + heapify
    # (O(n) each, about 8 % of the run at 10k requests) is kept only with every request at once
    from lloptim.runtime import dispatch as dispatch_module

    calls = []
    proxy = types.SimpleNamespace(**{k: getattr(heapq, k) for k in dir(heapq) if not k.startswith("__")})
    proxy.heapify = lambda h: (calls.append(len(h)), heapq.heapify(h))
    monkeypatch.setattr(dispatch_module, "heapq", proxy)
    problem = _overloaded_three_kinds(600, 2.0, 3)
    res, prices = _run(problem, FleetPrices("lp"))
    assert prices.steered > 0 and np.all(np.isfinite(res.done_s))   # picks off the head happened
    assert calls == []
