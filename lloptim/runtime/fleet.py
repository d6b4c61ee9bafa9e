"""Prices of instance time on a heterogeneous fleet, and the dispatch rule they steer.

On a fleet whose instances differ (profiles or client counts), the dispatch must also decide
*where* a request runs. :class:`FleetPrices` prices each instance's time with the duals of the
fractional assignment LP (the LP behind the fleet bound of :mod:`lloptim.bounds`) over the queued
requests (ready, not started), with the work each instance has already committed::

    min T   s.t.  b_k + sum_r v[k, r] y[k, r] <= T    for every instance k   (dual lambda_k >= 0)
                  sum_k y[k, r] = 1                     for every queued r     (dual mu_r)

``v[k, r]`` is the instance-seconds request ``r`` takes on a full instance ``k``
(:func:`~lloptim.work.instance_seconds`, the bound's weights, plus the iteration in which its prompt
is prefilled), ``b_k`` when ``k`` is done with the requests it holds (absolute seconds: now plus
their remaining instance-seconds). The duals sum to one: ``lambda_k`` is
the makespan seconds one more second of ``k``'s time costs, ``mu_r = min_k lambda_k v[k, r]`` what
``r`` costs where it is cheapest, and ``lambda_k v[k, r] - mu_r >= 0`` its *reduced cost* on ``k``:
zero where the LP puts it, positive where it does not belong; an instance with room to spare (its
row not binding) has price 0 and every request belongs there.

The prices are updated online from the observed load: the committed loads ``b_k`` follow what each
instance actually holds, and every finished request compares the time it held its client with the
model's prediction of it, whose ratio summed per instance (its *observed slowness*, 1 when the model
is exact) scales that instance's weights. The LP (HiGHS, milliseconds) is re-solved when the queue
has changed (arrivals and starts) by :data:`RESOLVE_SHARE` of its size, when an instance's slowness
has moved by :data:`SLOWNESS_SHIFT`, and when an idle client finds nothing it may take after the
queue changed. Re-solving, rather than stepping the prices by a subgradient, keeps them consistent
with the LP's optimality conditions: on a fleet whose instances are only slower in proportion every
reduced cost stays zero (a drifted price would make one kind lose every request at once), while an
instance that is overbooked, or slower than modelled, gets a higher price and keeps only the
requests it is clearly good at, and one that runs out of work gets price 0.

**Speed.** Under arrivals the LP is due about once per request (most often for a stuck client) and
every decision list-schedules up to :data:`SCAN_LIMIT` queued requests, so this is the hybrid's
cost on a fleet. The LP lives in one HiGHS model warm-started from the last basis
(``_WarmSplitLP``), which first tries two exact shortcuts that answer most solves without
HiGHS (the one binding instance of an overloaded fleet; the last prices while the last optimal
vertex stays feasible), then the LP over the few requests near a tie between two kinds of
instances with the others pooled by kind (tens of rows instead of thousands; its answer is kept
only when it is provably the full LP's), and hands a degenerate optimum, where another solver
path may stop at another optimal vertex, to :func:`split_lp`; prices below :data:`PRICE_FLOOR`
are read as 0 (the solver's round-off of 0 decided where requests belonged). The dispatch reads
the clients and the holds with numpy once per decision; the head of the queue is a slice of the
queued ``(key, row)`` pairs kept in order as requests join and leave (bisect); when some
instance's price is 0 (under overload most often all the price is on the one binding instance)
the belongs test is the same for every request and reads none of them, and an instance where
nothing belongs skips the deep queue; the scan of the head is scalar Python over lists, with a
hold read as inf where the request does not belong. A stuck client re-picks only when the
re-solve changed the prices or the horizon, and then, if only the horizon moved and stayed on the
same side of every completion its last scan compared with it, gets the same refusal without a
scan. It decides as the plain implementation did (``tests/test_fleet_speed.py``);
``benchmarks/scale.py --tools fleet-arrivals`` measures it against Sarathi.

The dispatch rule (:meth:`FleetPrices.pick`) for an idle client of instance ``k0`` is list
scheduling by *earliest completion* over the queue in its priority order: each request in turn
goes to the instance where it would finish first (the instance's earliest free client plus the
client-seconds it takes there, ``C_k v[k, r]``), among the instances where it *belongs* (reduced
cost at most :data:`REDUCED_COST_TOLERANCE` of its price); the asking client takes the first request
that lands on it. On identical instances this is the head of the queue; on a fleet with slower
instances, a slow client leaves a long request to a fast client that will free up soon enough to
finish it earlier (the end game on a slow instance), and with instances whose strengths differ
(e.g. fast prefill and slow decode) the prices keep each request where the LP wants it.

**Requests past the horizon.** The LP splits work, not requests: under it a request long enough to
end after the LP's makespan ``T`` wherever it goes still belongs on an instance with room, the
slowest one included, where its completion alone can set the makespan (on Poisson arrivals at 200 %
load to three instances 1, 1.6 and 2.5 times slower, heavy-tailed outputs up to 4,000 tokens, the
longest request went to the slowest instance and ended 495.6 s against 348.1 s on the fastest).
Once requests arrive during the run (:meth:`FleetPrices.pick`'s ``past_horizon``, which the
hybrid's dispatch sets), such a request goes where it completes first, priced or not. With every
request present from the start the end game (:mod:`lloptim.runtime.endgame`) places the last
requests, and the rule did not pay there (``benchmarks/fleet.py --quick`` on mixed fleets: 0.78 %
above the bound on average against 0.76 %, 10 of 12 cases within 1 % against 11), so it is off.

Where such a request completes first is *forecast* (:meth:`FleetPrices.place_past_horizon`): on
each instance, the requests it holds decode beside it until their estimates run out, every
context one token longer per step, and the request's own context grows from its prompt
(:func:`_forecast_hold`); while the known queue lasts (its estimated decode steps per live
client) each held request that finishes is replaced by one of the held mean context, and after
that nothing replaces it (a policy does not know what will arrive). The forecast on an instance
starts where the request would start there (after the requests ahead of it in the list schedule
take its clients): the held requests and the queue have gone on that many of its current steps
(at 4,000 requests, ``scale``, seeds 0-2: 817.6 / 868.7 / 839.6 -> 794.8 / 852.1 / 810.1 s;
``fleet-mixed`` seeds 0-17 and 410-415, 48 cases: 23.35 -> 23.07 % mean, but seeds 0-9 24.91 ->
26.03 %, one case; docs: arrivals, *The forecast from the request's start*). Reading the step an instance
runs *now* for all the request's steps, as before, missed the growth and the thinning: on
``fleet-mixed`` of ``benchmarks/stress_flow.py`` (seed 0, 150 % load, 4 instances 1, 1.6, 2.5
and 1.3 times slower) every 4,000-token request went to the fastest instance, which the prices
kept light, and a dozen long contexts then decoded side by side at 50-60 ms a step, twice the
step of one alone: 35.1 % above the bound against the rolling offline plan's 32.6 %; now 26.1 %
(seeds 0-9, 20 cases: mean 28.1 -> 24.9 %, behind the best other policy on none, was 4, by up
to 13 %; held-out seeds 400-402: 29.1 -> 22.4 %). The trade: where arrivals go on long after
the decision, an instance they keep full is read as thinning out (seed 2 at 200 %: 26.0 -> 38.0
%, still ahead of every other policy; at 4,000 requests, ``scale``, 1.1-2.2 % longer on seeds
0-2). Docs: arrivals, *Long requests on a mixed fleet*.

Modes (the ablation of ``benchmarks/fleet.py``): ``"lp"`` (LP prices with online updates, and
earliest completion), ``"uniform"`` (``1/m`` for ever, so every request belongs only where it is
cheapest), ``"ect"`` (earliest completion without prices), ``"none"`` (any idle client takes the
head of the queue).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from operator import add

import numpy as np

from lloptim.runtime.engine import FAILED, RUNNING, WAITING
from lloptim.runtime.policy import RunContext
from lloptim.work import request_instance_seconds

__all__ = ["FleetPrices", "split_lp", "PRICE_MODES", "REDUCED_COST_TOLERANCE", "RESOLVE_SHARE", "SLOWNESS_SHIFT", "SCAN_LIMIT",
           "PRICE_FLOOR", "FORECAST_STRIDE"]

#: Price modes of :class:`FleetPrices`.
PRICE_MODES = ("lp", "uniform", "ect", "none")
#: Reduced cost, as a share of the request's price, up to which a request belongs on an instance.
#: Chosen on the training workloads of ``benchmarks/fleet.py`` (GSM8K-train case 1, heavy seed 1, on
#: every mixed fleet): 0.05 let requests drift to instances up to 5 % dearer (1.0-1.2 % above the
#: bound on fleets whose kinds differ, 0.6-0.95 % at 0.01); 0 makes round-off decide (17 % once).
REDUCED_COST_TOLERANCE = 0.01
#: Re-solve the LP once the queue has changed (arrivals and starts) by this share of its size.
RESOLVE_SHARE = 0.25
#: Re-solve the LP once an instance's observed slowness has moved by this log-factor.
SLOWNESS_SHIFT = 0.05
#: Prices (shares of their sum) below this are read as 0: round-off of the LP solver's duals.
PRICE_FLOOR = 1e-9
#: Most queued requests the earliest-completion list schedule looks at per decision.
SCAN_LIMIT = 256
#: Decode steps between two evaluations of the step time in the forecast of a request past the
#: horizon (:meth:`FleetPrices.place_past_horizon`): the contexts grow by this many tokens between
#: two evaluations (a speed knob; at 16 a 4,000-step request costs 250 evaluations per instance).
FORECAST_STRIDE = 16


def split_lp(v: np.ndarray, committed: np.ndarray, time_limit_s: float | None = None,
             max_iter: int | None = None):
    """Solve the fractional assignment LP of the module docstring with HiGHS.

    Parameters
    ----------
    v : numpy.ndarray
        ``(m, R)`` instance-seconds of each request on each instance.
    committed : numpy.ndarray
        ``(m,)`` seconds at which each instance is done with what it already holds (``b_k``).
    time_limit_s : float, optional
        HiGHS time limit, seconds (``None``: none).
    max_iter : int, optional
        HiGHS iteration limit (count; ``None``: none): a limit that stops the solve at the same
        point on any machine, unlike ``time_limit_s``.

    Returns
    -------
    scipy.optimize.OptimizeResult
        ``linprog``'s result: ``x`` holds ``y[k, r]`` (k-major) then ``T`` seconds,
        ``ineqlin.marginals`` the capacity rows' duals (``-lambda_k``); ``status != 0`` on failure.
    """
    import scipy.sparse as sp
    from scipy.optimize import linprog

    m, R = v.shape
    n = m * R
    # columns y[k, r] (k-major), then T; capacity rows b_k + sum_r v y - T <= 0
    cap = sp.csr_matrix((np.r_[v.ravel(), -np.ones(m)],
                         (np.r_[np.repeat(np.arange(m), R), np.arange(m)], np.r_[np.arange(n), np.full(m, n)])),
                        shape=(m, n + 1))
    assign = sp.csr_matrix((np.ones(n), (np.tile(np.arange(R), m), np.arange(n))), shape=(R, n + 1))
    cost = np.zeros(n + 1)
    cost[-1] = 1.0
    options = {} if time_limit_s is None else {"time_limit": max(time_limit_s, 1e-3)}
    if max_iter is not None:
        options["maxiter"] = int(max_iter)
    return linprog(cost, A_ub=cap, b_ub=-np.asarray(committed, dtype=np.float64), A_eq=assign, b_eq=np.ones(R),
                   bounds=[(0, None)] * n + [(None, None)], method="highs", options=options)


#: Use the warm-started LP (``_WarmSplitLP``) for the prices; False re-solves the LP from
#: scratch with :func:`split_lp` each time (the reference the tests and ``benchmarks/scale.py
#: --tools fleet-arrivals`` compare against).
_WARM_LP = True
#: Rebuild the warm LP from scratch once it holds more rows of started requests than this many
#: plus its live ones (rows of started requests are kept at zero, not deleted, so the basis stays valid).
REBUILD_SLACK = 64
#: Requests nearest to a tie between two classes of instances that the LP over the requests near
#: a tie (``_WarmSplitLP._near_ties``) leaves free; the others are pooled by class. A speed knob
#: only: the answer is the full LP's or none.
NEAR_TIES = 48
#: Most solves of the LP over the requests near a tie per re-solve of the prices (count).
NEAR_TIE_ROUNDS = 3


class _WarmSplitLP:
    """The LP of :func:`split_lp` kept in one HiGHS model across solves, re-solved from the last basis.

    Between two solves of a run the LP changes by a few requests (arrivals, starts), the
    committed loads ``b_k`` and the observed slowness; rebuilding it for ``linprog`` each time
    cost milliseconds of set-up and a solve from scratch, about once per request on a fleet under
    arrivals. Here a request's row ``sum_k y[k, r] = 1`` and its ``m`` columns are added once; a
    started request's row is set to ``= 0`` (its columns are then zero; a requeued one back to
    ``= 1``); ``b_k`` and the slowness ``s_k`` change only the capacity rows, written divided by
    ``s_k`` (``sum_r v[k, r] y[k, r] - T / s_k <= -b_k / s_k``, whose dual is ``s_k lambda_k``),
    so the request columns never change. HiGHS then starts its dual simplex from the last optimal
    basis, which after a small change is optimal or a few pivots away. The model is rebuilt once
    it holds more rows of started requests than :data:`REBUILD_SLACK` plus its live ones.

    **One binding instance.** Under overload the LP is most often at a vertex where one instance
    ``j``, the one committed furthest (``b_j = max_k b_k``), is the only binding row: the queue fits
    on the others before ``b_j`` (on ``scale`` of ``benchmarks/stress_flow.py``, 1,491 of 1,498
    solves). Then ``T = b_j`` and ``lambda = e_j``: the dual objective at ``e_j`` is ``b_j``, which no
    primal beats since ``T >= b_j``; and when some assignment leaves every other row strictly below
    ``T``, strict complementarity makes ``e_j`` the only optimal dual. Before calling HiGHS,
    :meth:`solve` tries such an assignment: the last solve's for the requests it placed, the
    others each where it takes the least share of the room ``T - b_k`` left; if every other
    instance stays below ``T`` (by more than ``1e-9`` of it) the answer is ``(e_j, b_j)`` without a
    solve. It is an exact shortcut, not an approximation: it answers only when the LP's answer is
    that one, and otherwise HiGHS solves.

    **Few requests near a tie.** When the optimal basis does change (a request split between two
    kinds of instances leaves its bounds), only the requests whose cheapest kind is nearly tied
    with another under the last prices can move: ``_near_ties`` solves the LP over those alone,
    the rest pooled into one row per kind, and keeps the answer only when it is the full LP's
    (every pooled request still cheapest on its kind at the new prices; not degenerate), so it
    replaces a warm HiGHS solve over thousands of rows (about 25 ms at 3,000 queued requests)
    by one over tens (about 1 ms).

    It solves the same LP as :func:`split_lp`: its makespan ``T`` and, where they are unique
    (where the LP's optimal assignment is not degenerate), its prices agree to round-off
    (``tests/test_fleet_speed.py`` checks that the dispatch decides the same).

    Parameters
    ----------
    m
        Instances.
    n
        Requests of the run (rows of ``v``).
    """

    def __init__(self, m: int, n: int) -> None:
        import highspy

        self.m = m
        self.n = n
        self._highspy = highspy
        self.h = None
        self.w: np.ndarray | None = None   # the last solve's prices times the slowness (sum 1)
        self.guess: np.ndarray | None = None   # the last prices (observed scale) that were all positive
        self.y = np.zeros((n, m))          # the last solve's y[k, r] of each request it held
        self.shortcuts = 0   # answers without a solve (count)
        self.restricted = 0  # answers by the LP over the requests near a tie (count)
        self.degenerate = 0  # solves whose prices were not unique, answered by split_lp (count)

    def _build(self, rows: np.ndarray, v: np.ndarray, slowness: np.ndarray, b: np.ndarray) -> None:
        """A fresh model over the queued ``rows`` (the cold start)."""
        hs = self._highspy
        h = hs.Highs()
        h.setOptionValue("output_flag", False)
        m = self.m
        h.addCol(1.0, -hs.kHighsInf, hs.kHighsInf, 0, np.empty(0, np.int32), np.empty(0))  # T
        s = np.asarray(slowness, dtype=np.float64)
        h.addRows(m, np.full(m, -hs.kHighsInf), -b / s, m, np.arange(m, dtype=np.int32),
                  np.zeros(m, dtype=np.int32), -1.0 / s)
        self.h = h
        self.slot_of = np.full(self.n, -1, dtype=np.int64)   # request -> its slot (its row is m + slot)
        self.live = np.zeros(0, dtype=bool)
        self.request = np.zeros(0, dtype=np.int64)            # request of each slot
        self.slowness = s.copy()
        self._add(rows, v[rows])

    def _add(self, rows: np.ndarray, v: np.ndarray) -> None:
        """Add the rows and columns of requests ``rows`` (``v``: their ``(len(rows), m)`` instance-seconds)."""
        if rows.size == 0:
            return
        h, m = self.h, self.m
        first = self.live.size
        n = rows.size
        h.addRows(n, np.ones(n), np.ones(n), 0, np.zeros(n, dtype=np.int32), np.empty(0, np.int32), np.empty(0))
        # column y[k, r] (column 1 + slot m + k): v[r, k] in capacity row k, 1 in r's row
        idx = np.empty((n, m, 2), dtype=np.int32)
        idx[:, :, 0] = np.arange(m, dtype=np.int32)[None, :]
        idx[:, :, 1] = (m + first + np.arange(n, dtype=np.int32))[:, None]
        val = np.empty((n, m, 2))
        val[:, :, 0] = v
        val[:, :, 1] = 1.0
        k = n * m
        h.addCols(k, np.zeros(k), np.zeros(k), np.full(k, self._highspy.kHighsInf), 2 * k,
                  np.arange(0, 2 * k, 2, dtype=np.int32), idx.ravel(), val.ravel())
        self.slot_of[rows] = first + np.arange(n)
        self.live = np.r_[self.live, np.ones(n, dtype=bool)]
        self.request = np.r_[self.request, rows]

    def _one_binding(self, queued: np.ndarray, v: np.ndarray, s: np.ndarray, b: np.ndarray):
        """``(e_j, b_j)`` when only the furthest-committed instance ``j`` binds (class docstring), else None."""
        m = self.m
        j = int(np.argmax(b))
        T = float(b[j])
        room = T - b
        others = np.arange(m) != j
        if m < 2 or not (room[others] > 0).all():
            return None
        margin = 1e-9 * abs(T)
        limit = T - margin
        y = self.y[queued]
        fresh = (y.sum(axis=1) < 0.5) | (y[:, j] > 0)         # not placed by the last solve, or on j
        kept_rows = np.flatnonzero(~fresh)
        # observed instance-seconds of the kept requests (their share on j is 0, so j's column,
        # finite, adds 0 and the sum is j's b); only the rows used are read (the queue is long)
        kept = b + (y[kept_rows] * (v[queued[kept_rows]] * s[None, :])).sum(axis=0)
        # the last solve's shares for the others and, for the rest, (a) each where it takes the
        # least share of the room left, or (b) a share of each instance in proportion to the room
        # left over its time there, which fills every instance to the same share of its room
        # (fits if the requests' 1 / sum_k room_k / v[k, r] sum below 1); (c) (b) for every request
        if (kept[others] < limit).all():
            if kept_rows.size == queued.size:
                return self._e(j, T)
            vf = v[queued[fresh]] * s[None, :]
            vf[:, j] = np.inf                                 # nothing may go to j
            left = np.where(others, T - kept, 1.0)
            share = vf / left[None, :]
            pick = np.argmin(share, axis=1)
            if (kept + np.bincount(pick, weights=vf[np.arange(vf.shape[0]), pick], minlength=m))[others].max() < limit:
                return self._e(j, T)
            if (left[others] * (1.0 - (1.0 / (left[None, :] / vf).sum(axis=1)).sum())).min() > margin:
                return self._e(j, T)
        # (room on j is 0: its term is 0 whatever j's column holds)
        if (room[others] * (1.0 - (1.0 / (room[None, :] / (v[queued] * s[None, :])).sum(axis=1)).sum())).min() > margin:
            return self._e(j, T)
        return None

    def _e(self, j: int, T: float):
        """``(e_j, T)``: all the price on instance ``j``."""
        lam = np.zeros(self.m)
        lam[j] = 1.0
        return lam, T

    def _same_vertex(self, queued: np.ndarray, v: np.ndarray, s: np.ndarray, b: np.ndarray):
        """``(lambda, T)`` when the last solve's prices are still the LP's only optimal ones (class docstring), else None."""
        w = self.w
        m = self.m
        if w is None or not (w > 0).all():
            return None
        vq = v[queued]
        # classes of instances whose columns are proportional on these requests (the same kind, or
        # one only slower in proportion): every request ties within a class, so it is solved as one
        label, rho, reps = _proportional_classes(vq)
        n_g = len(reps)
        if queued.size < n_g - 1:
            return None
        wr = w * rho                         # price of a reference second of the class on each instance
        cw = wr[reps]
        if np.abs(wr - cw[label]).max() > 1e-9 * cw.max():
            return None                      # a class priced unevenly: not every instance of it binds
        u = vq[:, reps]                      # reference seconds of each request on each class
        c = u * cw[None, :]
        mu = c.min(axis=1)
        tie = c <= mu[:, None] * (1.0 + 1e-9)
        split = np.flatnonzero(tie.sum(axis=1) > 1)
        if split.size != n_g - 1:
            return None
        pair = np.argwhere(tie[split])       # (i, g), by i then g
        if pair.shape[0] != 2 * split.size:
            return None                      # a request tied on three classes
        ga, gb = pair[0::2, 1], pair[1::2, 1]
        owner = np.argmin(c, axis=1)
        whole = np.ones(queued.size, dtype=bool)
        whole[split] = False
        work = np.bincount(owner[whole], weights=u[whole, owner[whole]], minlength=n_g)
        # class G with all its instances binding: instance k does (T - b_k) / (s_k rho_k) reference
        # seconds, so T sum_k 1 / (s_k rho_k) - sum_k b_k / (s_k rho_k) = the class's work; the
        # unknowns are T and t_i (share of split request i on its first class, 1 - t_i on the other)
        rate = 1.0 / (s * rho)
        A = np.zeros((n_g, n_g))
        rhs = -work - np.bincount(label, weights=b * rate, minlength=n_g)
        i = np.arange(split.size)
        A[ga, i] += u[split, ga]
        A[gb, i] -= u[split, gb]
        np.subtract.at(rhs, gb, u[split, gb])
        A[:, n_g - 1] = -np.bincount(label, weights=rate, minlength=n_g)
        try:
            x = np.linalg.solve(A, rhs)
        except np.linalg.LinAlgError:
            return None
        t, T = x[:n_g - 1], float(x[n_g - 1])
        if not (np.all(np.isfinite(x)) and (t > 1e-9).all() and (t < 1 - 1e-9).all()
                and (T - b > 1e-9 * abs(T)).all()):
            return None                      # degenerate, or the basis changed: HiGHS decides
        lam = w / s
        return lam / lam.sum(), T

    def solve(self, queued: np.ndarray, v: np.ndarray, slowness: np.ndarray, b: np.ndarray):
        """``(lambda, T)`` of the LP over the ``queued`` requests, or None when HiGHS does not reach an optimum.

        Parameters
        ----------
        queued
            Rows of the queued requests.
        v
            ``(n, m)`` modelled instance-seconds of every request (rows by request).
        slowness
            ``(m,)`` observed slowness (the capacity rows use ``slowness * v``).
        b
            ``(m,)`` committed seconds of each instance.
        """
        m = self.m
        s = np.asarray(slowness, dtype=np.float64)
        if self.h is not None:
            out = self._one_binding(queued, v, s, b)
            if out is None:
                out = self._same_vertex(queued, v, s, b)
            if out is not None:
                self.shortcuts += 1
                return out
            out = self._near_ties(queued, v, s, b)
            if out is not None:
                self.restricted += 1
                return out
        dead = 0 if self.h is None else self.live.size - int((self.slot_of[queued] >= 0).sum())
        if self.h is None or dead > REBUILD_SLACK + queued.size:
            self._build(queued, v, s, b)
        else:
            h = self.h
            slots = self.slot_of[queued]
            known = slots >= 0
            want = np.zeros(self.live.size, dtype=bool)
            want[slots[known]] = True
            flip = np.flatnonzero(want != self.live)
            if flip.size:
                on = want[flip].astype(np.float64)
                h.changeRowsBounds(flip.size, (m + flip).astype(np.int32), on, on)
                self.live = want
            self._add(queued[~known], v[queued[~known]])
            for k in np.flatnonzero(s != self.slowness).tolist():
                h.changeCoeff(k, 0, -1.0 / s[k])
            self.slowness = s.copy()
            h.changeRowsBounds(m, np.arange(m, dtype=np.int32), np.full(m, -self._highspy.kHighsInf), -b / s)
        h = self.h
        h.run()
        if h.getModelStatus() != self._highspy.HighsModelStatus.kOptimal:
            self.h = None  # start afresh next time; this time the plain solve answers
            return self._plain(queued, v, s, b)
        sol = h.getSolution()
        x = np.asarray(sol.col_value, dtype=np.float64)
        y = x[1:].reshape(-1, m)[self.live]
        T = float(x[0])
        lam = -np.asarray(sol.row_dual[:m], dtype=np.float64) / self.slowness
        live = self.request[self.live]
        if not self._accept(lam, T, s, b, y, live, v[live] * s[None, :]):
            self.degenerate += 1
            return self._plain(queued, v, s, b)
        return lam, T

    def _near_ties(self, queued: np.ndarray, v: np.ndarray, s: np.ndarray, b: np.ndarray):
        """``(lambda, T)`` from the LP over the requests near a tie under the last prices, when that is the LP's answer.

        Under overload the queue holds thousands of requests, and between two solves only those
        whose cheapest class of instances is nearly tied with another can move. Requests are
        grouped by the classes of proportional instances (:func:`_proportional_classes`); the
        :data:`NEAR_TIES` whose cheapest class under the last positive prices is nearest to a
        tie stay free, and the others are fixed to their cheapest class, pooled into one row per
        class (its columns on that class's instances only). The small LP (HiGHS, from scratch)
        is a restriction of the full one, so its makespan is at least the full one's; its
        solution, with the fixed requests split over their class's instances as their pool is,
        is optimal for the full LP when every fixed request is still cheapest on its class at the
        new prices (it then satisfies the full LP's optimality conditions), and its prices are
        the only optimal ones when its vertex is not degenerate (every optimal dual of the full
        LP is one of the small LP's). Otherwise it is solved again, :data:`NEAR_TIE_ROUNDS` times
        at most, with the requests nearest a tie at the new prices and, when they are few (up to
        four times :data:`NEAR_TIES`), those that were no longer cheapest on their class; after
        that, or when degenerate, None (the full LP answers).
        """
        guess = self.guess
        R = queued.size
        if guess is None or R <= 2 * NEAR_TIES:
            return None
        m = self.m
        V = v[queued] * s[None, :]                       # observed instance-seconds
        label, rho, reps = _proportional_classes(V)
        n_g = len(reps)
        U = V[:, reps]                                   # seconds on each class's first instance
        members = [np.flatnonzero(label == g) for g in range(n_g)]
        every = np.arange(R)

        def cheapest(price: np.ndarray) -> np.ndarray:
            """``(R, n_g)``: each request's price on the cheapest instance of each class."""
            priced = V * price[None, :]
            return np.stack([_row_min(priced[:, mem]) for mem in members], axis=1)

        price = guess
        moved = np.zeros(R, dtype=bool)
        for _ in range(NEAR_TIE_ROUNDS):
            # free: the requests nearest to a tie at the guessed prices, and those that were not
            # cheapest on their class at the last round's prices when they are few (when many,
            # the guess was far off: the last round's prices guess better)
            cost = cheapest(price)
            owner = np.argmin(cost, axis=1)
            free = moved if moved.sum() <= 4 * NEAR_TIES else np.zeros(R, dtype=bool)
            if n_g > 1:
                two = np.partition(cost, 1, axis=1)
                gap = two[:, 1] / np.maximum(two[:, 0], 1e-300)
                free[np.argpartition(gap, NEAR_TIES)[:NEAR_TIES]] = True
            fixed = ~free
            pool = np.bincount(owner[fixed], weights=U[fixed, owner[fixed]], minlength=n_g)
            pools = [g for g in range(n_g) if pool[g] > 0]
            # the pooled row of class g: rho_k pool_g seconds on each of its instances k
            vp = np.zeros((len(pools), m))
            for i, g in enumerate(pools):
                vp[i, members[g]] = rho[members[g]] * pool[g]
            vf = V[free]
            out = _small_split(np.r_[vf, vp], b, np.r_[np.ones(vf.shape, dtype=bool), vp > 0], self._highspy)
            if out is None:
                return None
            lam, T, y = out
            best = cheapest(lam)
            mine = best[every, owner]
            best[every, owner] = np.inf
            moved = fixed & (mine > _row_min(best) * (1.0 - 1e-9))
            if not moved.any():
                break
            price = lam
        else:
            return None
        rows = queued[free]
        nf = rows.size
        ys = np.zeros((R, m))
        ys[free] = y[:nf]
        for i, g in enumerate(pools):
            ys[fixed & (owner == g)] = y[nf + i]
        if not self._accept(lam, T, s, b, y, rows, np.r_[vf, vp]):
            return None
        self.y[queued[fixed]] = ys[fixed]
        return lam, T

    def _accept(self, lam: np.ndarray, T: float, s: np.ndarray, b: np.ndarray, y: np.ndarray,
                rows: np.ndarray, vy: np.ndarray) -> bool:
        """Keep an optimal solution's prices and shares; whether its prices are the LP's only optimal ones.

        ``y`` are the shares ``(k, m)`` of the LP's rows, the first ``len(rows)`` those of the
        requests ``rows``, and ``vy`` their observed instance-seconds. The prices are unique when
        the optimal vertex is not degenerate: as many positive basic values (the y's, T, the
        capacity rows' slacks) as rows; otherwise another solver path may stop at another optimal
        vertex, so the reference solve must answer.
        """
        m = self.m
        self.y[rows] = y[:rows.size]
        w = np.clip(lam, 0.0, None) * s
        self.w = None
        if w.sum() > 0 and np.all(np.isfinite(w)):
            w = w / w.sum()
            w[w < PRICE_FLOOR] = 0.0
            self.w = w / w.sum()
        slack = T - b - (y * vy).sum(axis=0)
        if int((y > 1e-9).sum()) + 1 + int((slack > 1e-9 * max(1.0, abs(T))).sum()) != m + y.shape[0]:
            self.w = None
            return False
        if self.w is not None and (self.w > 0).all():
            self.guess = lam
        return True

    @staticmethod
    def _plain(queued: np.ndarray, v: np.ndarray, s: np.ndarray, b: np.ndarray):
        """``(lambda, T)`` from :func:`split_lp` (the reference solve), or None when it fails."""
        res = split_lp(v[queued].T * s[:, None], b)
        if res.status != 0:
            return None
        return -np.asarray(res.ineqlin.marginals, dtype=np.float64), float(res.x[-1])


def _small_split(v: np.ndarray, committed: np.ndarray, allowed: np.ndarray, highspy):
    """The LP of :func:`split_lp` over rows ``v`` (``(k, m)`` seconds) where ``allowed``, solved by HiGHS.

    Returns ``(lambda, T, y)`` (the capacity rows' duals, the makespan, s, and the ``(k, m)``
    shares), or None when HiGHS does not reach an optimum.
    """
    k, m = v.shape
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("presolve", "off")          # tens of rows: presolve costs more than it saves
    inf = highspy.kHighsInf
    h.addCol(1.0, -inf, inf, 0, np.empty(0, np.int32), np.empty(0))  # T
    b = np.asarray(committed, dtype=np.float64)
    h.addRows(m, np.full(m, -inf), -b, m, np.arange(m, dtype=np.int32), np.zeros(m, dtype=np.int32), -np.ones(m))
    h.addRows(k, np.ones(k), np.ones(k), 0, np.zeros(k, dtype=np.int32), np.empty(0, np.int32), np.empty(0))
    r, c = np.nonzero(allowed)                       # columns y[r, c], row-major
    n = r.size
    idx = np.empty((n, 2), dtype=np.int32)
    idx[:, 0] = c
    idx[:, 1] = m + r
    val = np.empty((n, 2))
    val[:, 0] = v[r, c]
    val[:, 1] = 1.0
    h.addCols(n, np.zeros(n), np.zeros(n), np.full(n, inf), 2 * n, np.arange(0, 2 * n, 2, dtype=np.int32),
              idx.ravel(), val.ravel())
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    sol = h.getSolution()
    x = np.asarray(sol.col_value, dtype=np.float64)
    y = np.zeros((k, m))
    y[r, c] = x[1:]
    return -np.asarray(sol.row_dual[:m], dtype=np.float64), float(x[0]), y


def _proportional_classes(vq: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Classes of instances whose columns of ``vq`` (``(R, m)`` seconds) are proportional.

    Returns ``(label, rho, reps)``: the class of each instance, its column over its class's first
    instance (``vq[:, k] = rho[k] vq[:, reps[label[k]]]`` to ``1e-12``), and that first instance
    of each class.
    """
    m = vq.shape[1]
    label = np.full(m, -1)
    rho = np.ones(m)
    reps: list[int] = []
    for k in range(m):
        for g, rep in enumerate(reps):
            ratio = vq[:, k] / vq[:, rep]
            if ratio.max() - ratio.min() <= 1e-12 * ratio.max():
                label[k], rho[k] = g, ratio[0]
                break
        else:
            label[k] = len(reps)
            reps.append(k)
    return label, rho, reps


def _row_min(a: np.ndarray) -> np.ndarray:
    """``a.min(axis=1)`` of a ``(n, m)`` array with few columns, a column at a time (the same values, faster)."""
    out = a[:, 0].copy()
    for k in range(1, a.shape[1]):
        np.minimum(out, a[:, k], out=out)
    return out


def _earliest(tops: list, hold: list, allowed: list, instance: int) -> tuple[float, int]:
    """``(finish, instance)`` of the earliest completion over the ``allowed`` instances with a free client slot.

    ``tops[k]`` is when instance ``k``'s next client frees up (inf: it has no live client) and
    ``hold[k]`` how long the request holds it there, seconds; ties go to the asking ``instance``
    (the others ask at their own turn); ``(inf, -1)`` when none is allowed.
    """
    best, where = np.inf, -1
    k = 0
    for top, h, ok in zip(tops, hold, allowed):
        if ok:
            finish = top + h
            if finish < best or (finish == best and k == instance):
                best, where = finish, k
        k += 1
    return best, where


def _forecast_hold(ctx: np.ndarray, left: np.ndarray, prompt: float, steps: float, lat,
                   refill_steps: float = 0.0, delay_steps: float = 0.0) -> float:
    """Modelled seconds a request of ``prompt`` tokens and ``steps`` decode steps holds a client beside others.

    Its prefill plus its decode steps at the step time of
    :meth:`~lloptim.hardware.LatencyModel.decode_time` over what runs beside it: the requests the
    instance holds (``ctx`` context tokens, ``left`` estimated decode steps left; each one token
    longer per step until it finishes) and the request itself, its context growing from its
    prompt. During its first ``refill_steps`` steps each held request that finishes is replaced by
    one of the held requests' mean context (the known queue is still being served); after them
    nothing replaces it (module docstring, *Requests past the horizon*). A request that starts
    ``delay_steps`` of the instance's steps from now meets the held requests that far on: those
    that finish before it starts are gone (or replaced while the queue lasts; the queue is served
    from now), the others' contexts have grown by that much. The step time is
    evaluated every :data:`FORECAST_STRIDE` steps, at the first step of each stride. The caller
    multiplies by the instance's observed slowness.

    Parameters
    ----------
    ctx, left : numpy.ndarray
        Context tokens and estimated decode steps left of each request the instance holds.
    prompt
        Prompt tokens of the request.
    steps
        Its estimated decode steps.
    lat
        The instance's :class:`~lloptim.hardware.LatencyModel`.
    refill_steps
        Decode steps from now during which a finished request is replaced (0: never).
    delay_steps
        Steps the instance runs before the request starts (0: it starts now).

    Returns
    -------
    float
        Seconds.
    """
    return _forecast_sorted(*_by_steps_left(ctx, left), prompt, steps, lat, refill_steps, delay_steps)


def _by_steps_left(ctx: np.ndarray, left: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``left`` ascending, and the sums of ``ctx`` over each suffix of that order (one more: 0)."""
    order = np.argsort(left, kind="stable")
    return left[order], np.r_[np.cumsum(ctx[order][::-1])[::-1], 0.0]


def _forecast_sorted(left_sorted: np.ndarray, ctx_suffix: np.ndarray, prompt: float, steps: float, lat,
                     refill_steps: float = 0.0, delay_steps: float = 0.0) -> float:
    """:func:`_forecast_hold` from :func:`_by_steps_left`'s arrays (read once per state of an instance)."""
    j = np.arange(0.0, max(steps, 1.0), FORECAST_STRIDE)
    t = j + delay_steps                                           # the instance's steps from now
    first_alive = np.searchsorted(left_sorted, t, side="right")   # those alive then: a suffix
    n_alive = left_sorted.size - first_alive
    kv = ctx_suffix[first_alive] + n_alive * t + prompt + j
    if refill_steps > 0 and left_sorted.size:
        # the finished ones replaced while the queue lasts, by requests of the held mean context
        gone = np.where(t < refill_steps, left_sorted.size - n_alive, 0)
        n_alive = n_alive + gone
        kv = kv + gone * (ctx_suffix[0] / left_sorted.size)
    per_step = lat.decode_base_s + lat.decode_per_seq_s * (n_alive + 1.0) + lat.decode_per_kv_token_s * kv
    widths = np.minimum(FORECAST_STRIDE, max(steps, 1.0) - j)          # the last stride: what is left
    return float(per_step @ widths + lat.prefill_per_token_s * prompt)


class FleetPrices:
    """Instance prices from the fractional assignment LP, updated online, and the priced dispatch.

    Parameters
    ----------
    mode
        One of :data:`PRICE_MODES` (module docstring).
    tolerance
        Reduced-cost tolerance of the *belongs* test, share of the request's price.

    Attributes
    ----------
    active
        Whether the fleet has instances that differ and the mode steers (otherwise nothing is solved
        and the dispatch takes the head of the queue).
    prices
        ``(m,)`` current price of each instance's time (sum 1).
    slowness
        ``(m,)`` observed client-seconds per modelled client-second of each instance (1 until a
        request finishes there).
    solves
        LP solves so far (count).
    steered
        Decisions where the idle client did not take the head of the queue (count).
    version
        Changes of the queue or of what the clients hold (count).
    """

    def __init__(self, mode: str = "lp", tolerance: float = REDUCED_COST_TOLERANCE) -> None:
        if mode not in PRICE_MODES:
            from lloptim.errors import SpecError

            raise SpecError("policy.prices", f"unknown price mode {mode!r}", f"use one of {list(PRICE_MODES)}")
        self.mode = mode
        self.tolerance = tolerance

    def setup(self, ctx: RunContext) -> None:
        """Start a run: active only on a fleet whose instances differ.

        Parameters
        ----------
        ctx
            The run.
        """
        self.ctx = ctx
        insts = ctx.problem.instances
        m = len(insts)
        self.active = self.mode != "none" and len({(i.profile.latency, i.clients) for i in insts}) > 1
        self.m = m
        self.clients = np.array([i.clients for i in insts], dtype=np.float64)
        self._client_instance = np.asarray(ctx.client_instance, dtype=np.int64)
        self._instance_clients = [np.flatnonzero(self._client_instance == k) for k in range(m)]
        # each instance's clients as one block of global indices, in instance order (the engine
        # numbers them so): ``(start, stop)`` of each block, or None when they are not
        ci = self._client_instance
        sizes = [c.size for c in self._instance_clients]
        starts = np.cumsum([0] + sizes).tolist()
        self._blocks = (list(zip(starts[:-1], starts[1:]))
                        if ci.size == 0 or np.array_equal(ci, np.repeat(np.arange(m), sizes)) else None)
        self._estimates = np.asarray(ctx.estimates, dtype=np.float64)
        self._instances = insts              # on_ready prices each arriving request on each of them
        self._prompts = ctx.problem.workload.prompt_tokens.astype(np.float64)
        self._step_share = np.array([i.profile.latency.decode_base_s for i in insts]) / self.clients
        self.prices = np.full(m, 1.0 / m)
        #: The LP's makespan ``T`` at the last solve, absolute seconds (inf before one): a request
        #: whose completion on its priced instances would end after it goes where it completes first.
        self.horizon_s = np.inf
        self.held_s = np.zeros(m)               # observed client-seconds of finished requests
        self.model_s = np.zeros(m)              # the model's client-seconds of the same requests
        self.slowness = np.ones(m)
        self.slowness_at_solve = np.ones(m)
        self.solves = 0
        self.steered = 0
        self._lp: _WarmSplitLP | None = None   # the LP kept across solves (None: not built)
        n = ctx.problem.n_requests
        self.v = np.zeros((n, m))              # instance-seconds of each known request on each instance
        self.queued = np.zeros(n, dtype=bool)
        self.n_queued = 0
        self._edits = 0                        # changes of the queue or its keys (count)
        # the queued requests whose key is known as (key, row) pairs in ascending order, kept as
        # requests join and leave (bisect: O(log n) to find, a memmove to insert or delete), so the
        # head of the queue is a slice; and how many queued requests have no key (then the heap
        # answers, :meth:`_head`)
        self._order: list[tuple[float, int]] = []
        self._unkeyed = 0
        # every priced request's instance-seconds positive and finite (a latency model with zero
        # terms could give 0): what lets :meth:`_belongs_everywhere` read the prices alone
        self._v_positive = True
        self._refused: tuple | None = None     # (signature, horizon span) of the last refusal
        self._span = (-np.inf, np.inf)
        self.changes = 0                       # queue changes since the last solve
        self.version = 0
        self.holding: dict[int, tuple[int, float]] = {}   # client -> (request, start)
        self.predicted: dict[int, float] = {}               # client -> model's hold of its request, s
        # the same holdings as arrays by client (the dispatch reads them with numpy): request (-1:
        # none), start, seconds, and the order of the dict's entries (sums keep the dict's order)
        c = self._client_instance.size
        self._hold_req = np.full(c, -1, dtype=np.int64)
        self._hold_since = np.zeros(c)
        self._hold_seq = np.zeros(c, dtype=np.int64)
        self._seq = 0
        self.key = np.full(n, np.nan)          # the queue's key of each request (nan: not told)
        self._picked: tuple | None = None      # (request, now, its holds) of the last pick
        self._lat_terms: tuple | None = None   # (latency models, their step terms by instance)
        self._held_at: tuple | None = None     # (engine state, _corunners()) of the last read

    # -- bookkeeping -----------------------------------------------------------------------------
    def on_ready(self, request: int, key: float | None = None) -> None:
        """``request`` joined the queue: price it on every instance (from its prompt and estimate).

        Parameters
        ----------
        request
            Row of the request.
        key
            Its key in the queue that :meth:`pick` is given (then :meth:`pick` finds the head of
            the queue with numpy rather than from the heap); None: not told.
        """
        if not self.active:
            return
        self._edits += 1
        if self.queued[request]:
            self._leave_order(request)
        self.key[request] = np.nan if key is None else key
        self._join_order(request)
        # the bound's weights plus the iteration in which the prompt is prefilled: a client holds a
        # request for o + 1 iterations, which matters for short outputs
        p, o = float(self._prompts[request]), float(self.ctx.estimates[request])
        v = np.array([request_instance_seconds(inst, p, o) for inst in self._instances]) + self._step_share
        self.v[request] = v
        self._v_positive = self._v_positive and bool(0.0 < v.min() and v.max() < np.inf)
        self.queued[request] = True
        self.n_queued += 1
        self.changes += 1
        self.version += 1

    def on_start(self, request: int, client: int, now: float, states=None) -> None:
        """``request`` left the queue for ``client`` at ``now`` seconds.

        Parameters
        ----------
        request
            Row of the request.
        client
            Global index of the client that took it.
        now
            Time it was handed out, seconds.
        states
            The engine's instance states: the model predicts from them how long the request will
            hold the client, to learn the instance's slowness when it finishes (None: not learned).
        """
        if self.active:
            self._hold(client, request, now)
            if states is not None:
                k = int(self.ctx.client_instance[client])
                picked = self._picked
                if picked is not None and picked[0] == request and picked[1] == now:
                    hold = picked[2][k]  # pick computed it from the same states
                else:
                    hold = self._holds(np.array([request]), states)[0, k]
                self.predicted[client] = float(hold / self.slowness[k])
            self._edits += 1
            if self.queued[request]:
                self._leave_order(request)
            self.queued[request] = False
            self.n_queued -= 1
            self.changes += 1

    def on_finish(self, request: int, client: int, now: float) -> None:
        """``request`` finished on ``client`` at ``now`` seconds: observe its instance's slowness.

        Parameters
        ----------
        request
            Row of the request.
        client
            Global index of the client that served it.
        now
            Its finish time, seconds.
        """
        if not self.active or self.holding.get(client, (-1, 0.0))[0] != request:
            return
        _, since = self.holding.pop(client)
        self._hold_req[client] = -1
        self.version += 1
        predicted = self.predicted.pop(client, None)
        if predicted is None:
            return
        k = int(self.ctx.client_instance[client])
        self.held_s[k] += now - since
        self.model_s[k] += predicted
        if self.model_s[k] > 0 and self.held_s[k] > 0:
            self.slowness[k] = self.held_s[k] / self.model_s[k]

    def on_requeue(self, request: int, key: float | None = None) -> None:
        """A fault put ``request`` back in the queue.

        Parameters
        ----------
        request
            Row of the request.
        key
            Its key in the queue, as in :meth:`on_ready` (None: keep the one it had).
        """
        if not self.active:
            return
        self.version += 1
        self._edits += 1
        if self.queued[request]:
            self._leave_order(request)
        if key is not None:
            self.key[request] = key
        self._join_order(request)
        for c, (r, _) in list(self.holding.items()):
            if r == request:
                del self.holding[c]
                self._hold_req[c] = -1
        if not self.queued[request]:
            self.queued[request] = True
            self.n_queued += 1
            self.changes += 1

    def _join_order(self, request: int) -> None:
        """File a request joining the queue under its key in :attr:`_order` (or count it keyless)."""
        key = float(self.key[request])
        if key != key:
            self._unkeyed += 1
        else:
            insort(self._order, (key, request))

    def _leave_order(self, request: int) -> None:
        """Take a request leaving the queue out of :attr:`_order` (filed under its current key)."""
        key = float(self.key[request])
        if key != key:
            self._unkeyed -= 1
        else:
            del self._order[bisect_left(self._order, (key, request))]

    def _hold(self, client: int, request: int, now: float) -> None:
        """``client`` holds ``request`` from ``now`` seconds (the dict and its arrays)."""
        if client not in self.holding:
            self._seq += 1
            self._hold_seq[client] = self._seq
        self.holding[client] = (request, now)
        self._hold_req[client] = request
        self._hold_since[client] = now

    def _held(self) -> np.ndarray:
        """Clients that hold a request, in the order of :attr:`holding`'s entries."""
        c = np.flatnonzero(self._hold_req >= 0)
        return c[np.argsort(self._hold_seq[c], kind="stable")]

    # -- prices ---------------------------------------------------------------------------------
    def refresh(self, now: float, stuck: bool = False) -> bool:
        """Re-solve the LP when it is due (module docstring).

        Parameters
        ----------
        now
            Current time, seconds.
        stuck
            An idle client found nothing it may take: re-solve if the queue changed since.

        Returns
        -------
        bool
            Whether the prices or the horizon changed (if not, :meth:`pick` answers as before).
        """
        if not self.active or self.mode != "lp":
            return False
        if (self.solves == 0 or self.changes >= RESOLVE_SHARE * max(1, self.n_queued) or (stuck and self.changes)
                or np.abs(np.log(self.slowness / self.slowness_at_solve)).max() > SLOWNESS_SHIFT):
            prices, horizon = self.prices, self.horizon_s
            self._solve(now)
            return not (np.array_equal(prices, self.prices) and horizon == self.horizon_s)
        return False

    def _committed(self, now: float) -> np.ndarray:
        """``b_k``: now plus the remaining instance-seconds of the requests each instance holds, s."""
        b = np.full(self.m, now)
        c = self._held()
        k = self._client_instance[c]
        v = self.slowness[k] * self.v[self._hold_req[c], k]
        safe = np.where(v > 0, v, 1.0)
        left = np.where(v > 0, v * np.maximum(0.0, 1.0 - (now - self._hold_since[c]) / (self.clients[k] * safe)), 0.0)
        np.add.at(b, k, left)  # one by one, in the order the clients took their requests
        return b

    def _solve(self, now: float) -> None:
        """The LP of the module docstring over the queued requests; sets the prices (HiGHS)."""
        self.solves += 1
        self.changes = 0
        self.slowness_at_solve = self.slowness.copy()
        rows = np.flatnonzero(self.queued)
        if rows.size == 0:
            return
        if _WARM_LP:
            if self._lp is None:
                self._lp = _WarmSplitLP(self.m, self.ctx.problem.n_requests)
            out = self._lp.solve(rows, self.v, self.slowness, self._committed(now))
            if out is None:
                return  # keep the previous prices: a failed solve never stops the dispatch
            lam, horizon = out
        else:
            res = split_lp(self.v[rows].T * self.slowness[:, None], self._committed(now))  # observed scale
            if res.status != 0:
                return  # keep the previous prices: a failed solve never stops the dispatch
            lam, horizon = -np.asarray(res.ineqlin.marginals, dtype=np.float64), float(res.x[-1])
        lam = np.clip(lam, 0.0, None)
        if lam.sum() > 0 and np.all(np.isfinite(lam)):
            lam = lam / lam.sum()
            # a price of 1e-13 is a solver's round-off of 0, but it decides where requests belong
            # (every request belongs only where its price is least, and 0 beats 1e-13): read it as 0
            lam[lam < PRICE_FLOOR] = 0.0
            self.prices = lam / lam.sum()
        self.horizon_s = horizon

    # -- the dispatch -------------------------------------------------------------------------------
    def _holds(self, rows: np.ndarray, states) -> np.ndarray:
        """``(len(rows), m)`` seconds each request would hold a client of each instance if it started now.

        Its estimated decode steps plus the iteration of its prompt, at the step time the instance
        would run with it added to what it holds now (the latency model of the instance; a nearly
        empty instance steps faster than a full one), times the instance's observed slowness, plus
        the per-token cost of its prompt. (One broadcast over the instances; the terms are added
        in the order of :meth:`~lloptim.hardware.LatencyModel.decode_time`.)
        """
        p = self._prompts[rows][:, None]
        o = self._estimates[rows][:, None]
        lats = [st.latency for st in states]
        if self._lat_terms is None or any(a is not b for a, b in zip(lats, self._lat_terms[0])):
            self._lat_terms = (lats, np.array([[lat.decode_base_s, lat.decode_per_seq_s, lat.decode_per_kv_token_s,
                                                 lat.prefill_per_token_s] for lat in lats]).T.copy())
        base, per_seq, per_kv, per_prompt = self._lat_terms[1]
        busy = np.array([min(len(st.clients), st.n_running + len(st.waiting) + 1) for st in states], dtype=np.float64)
        kv = np.array([st.kv_tokens for st in states], dtype=np.float64)
        step = (base + per_seq * busy) + per_kv * ((kv + p) + o / 2)
        return self.slowness * ((o + 1) * step + per_prompt * p)

    def _free_times(self, now: float, states, held: np.ndarray, hold: np.ndarray) -> list[list[float]]:
        """Expected free time of every live client, per instance, ascending (``now`` or its clock when idle), s.

        ``held`` are the clients that hold a request and ``hold`` the ``(len(held), m)`` holds of
        their requests (:meth:`_holds`).
        """
        ci = self._client_instance
        ends = np.full(ci.size, now)
        if held.size:
            ends[held] = np.maximum(now, self._hold_since[held] + hold[np.arange(held.size), ci[held]])
        client_state = self.ctx.extra["client_state"]
        cs = np.array(client_state)
        idle = np.array([max(now, st.now) for st in states])[ci]
        t = np.where((cs == RUNNING) | (cs == WAITING), ends, idle)
        if self._blocks is not None and FAILED not in client_state:
            # every client live and each instance's a block: sort each block (the same lists as below)
            t = t.tolist()
            return [sorted(t[a:z]) for a, z in self._blocks]
        live = cs != FAILED
        k = ci[live]
        t = t[live]
        t = t[np.lexsort((t, k))].tolist()              # by instance, then time: one sort, one list
        cut = np.cumsum(np.bincount(k, minlength=self.m)).tolist()
        return [t[a:z] for a, z in zip([0] + cut[:-1], cut)]

    def _head(self, queue: list[tuple[float, int]]) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """Rows and keys of the first :data:`SCAN_LIMIT` requests of ``queue`` in its order (key, then row).

        A slice of :attr:`_order` when every queued request's key is known and the queue's first
        item agrees; from the heap otherwise.
        """
        order = self._order
        if not self._unkeyed and queue and len(order) == len(queue) and order[0] == queue[0]:
            head = order[:SCAN_LIMIT]
        else:
            head = heapq.nsmallest(SCAN_LIMIT, queue)
        keys, rows = zip(*head) if head else ((), ())
        return rows, keys

    def belongs(self, request: int) -> np.ndarray:
        """``(m,)`` whether ``request``'s reduced cost on each instance is within the tolerance."""
        return self.belongs_rows(np.array([request]))[0]

    def _belongs_everywhere(self) -> np.ndarray | None:
        """``(m,)`` the belongs test when it is the same for every request, else None.

        With ``"ect"`` every request belongs everywhere. With a price of 0 somewhere (an instance
        with room to spare; under overload all the price is most often on the one binding
        instance) every request's least priced cost is 0, its instance-seconds being positive and
        finite (checked as each request is priced; if not, None), so it belongs exactly where the
        price is 0: :meth:`belongs_rows` would answer this for every row, and the dispatch need
        not read the requests for it.
        """
        if self.mode == "ect":
            return np.ones(self.m, dtype=bool)
        free = self.prices == 0.0
        return free if self._v_positive and free.any() else None

    def belongs_rows(self, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), m)`` whether each request's reduced cost on each instance is within the tolerance."""
        if self.mode == "ect":
            return np.ones((len(rows), self.m), dtype=bool)
        # the LP prices the observed scale (it is solved on it); fixed uniform prices the model's
        scale = self.slowness if self.mode == "lp" else 1.0
        priced = (self.prices * scale)[None, :] * self.v[rows]
        mu = _row_min(priced)[:, None]
        return priced - mu <= self.tolerance * mu

    def pick(self, queue: list[tuple[float, int]], instance: int, now: float, states,
             past_horizon: bool = False) -> tuple[float, int] | None:
        """The ``(key, request)`` of ``queue`` that the idle client of ``instance`` takes, or None.

        The first :data:`SCAN_LIMIT` requests in priority order are list-scheduled by earliest
        completion (module docstring); if none lands on ``instance``, the best request further
        down the queue that belongs there and would finish there no later than anywhere else
        after that list schedule is taken (so an instance that the head of the queue does not
        suit still finds its work deep in the queue).

        Parameters
        ----------
        queue
            ``(key, request)`` pairs of the ready requests (a heap; smaller key = higher priority).
        instance
            The asking client's instance.
        now
            Current time, seconds.
        states
            The engine's :class:`~lloptim.runtime.engine.InstanceState` of every instance (read only).
        past_horizon
            Send a request whose earliest completion where it belongs is after the LP's makespan
            ``T`` (:attr:`horizon_s`) where it completes first, priced or not (module docstring,
            *Requests past the horizon*). The hybrid asks for it once requests arrive during the
            run.

        Returns
        -------
        tuple or None
            The chosen pair, or None to stay idle for now.
        """
        # a refused client asks again after a re-solve that moved only the horizon: the same
        # answer when nothing else changed and the horizon is on the same side of every
        # completion the scan compared with it (the scan is then the same step by step)
        sig = self._signature(queue, instance, now, states, past_horizon)
        refused = self._refused
        if refused is not None and refused[0] == sig and refused[1] <= self.horizon_s < refused[2]:
            return None
        self._span = (-np.inf, np.inf)
        item = self._pick(queue, instance, now, states, past_horizon)
        self._refused = (sig, *self._span) if item is None else None
        return item

    def place_past_horizon(self, request: int, tops: list, instance: int, now: float, states) -> tuple[float, int]:
        """``(finish, instance)`` of a request past the LP's horizon: where it completes first, by the forecast.

        Its hold on each instance is forecast from what that instance holds now
        (:func:`_forecast_hold`: the held requests finish at their estimates, their contexts
        growing, each replaced while the known queue lasts, its estimated decode steps per live
        client), times the instance's observed slowness (module docstring, *Requests past the
        horizon*). Where it would start later (``tops[k]`` after ``now``: the requests ahead of it
        in the list schedule take the instance's clients first), the forecast starts that many of
        the instance's current steps on: the held requests have gone on meanwhile and the queue
        has been served, rather than the request meeting the instance as it is now.

        Parameters
        ----------
        request
            Row of the request.
        tops
            ``(m,)`` when each instance's next client frees up, seconds (inf: no live client).
        instance
            The asking client's instance (ties go to it).
        now
            Current time, seconds.
        states
            The engine's instance states (read only).

        Returns
        -------
        tuple
            Its expected finish, seconds, and the instance it goes to.
        """
        held, queue_steps = self._corunners(now, states)
        p, o = float(self._prompts[request]), float(self._estimates[request])
        fore = [self.slowness[k] * _forecast_sorted(*held[k], p, o, states[k].latency, queue_steps,
                                                    self._steps_until(tops[k] - now, held[k], states[k].latency, k))
                if np.isfinite(tops[k]) else np.inf for k in range(self.m)]
        return _earliest(tops, fore, [True] * self.m, instance)

    def _steps_until(self, delay_s: float, held: tuple[np.ndarray, np.ndarray], lat, k: int) -> float:
        """Steps instance ``k`` runs in ``delay_s`` seconds at the step it runs now (its held requests).

        ``held`` is :func:`_by_steps_left` of what it holds; the step is
        :meth:`~lloptim.hardware.LatencyModel.decode_time` of them times the observed slowness.
        0 when ``delay_s`` is not positive.
        """
        if delay_s <= 0:
            return 0.0
        step = self.slowness[k] * lat.decode_time(held[0].size, float(held[1][0]))
        return delay_s / step if step > 0 else 0.0

    def _corunners(self, now: float, states) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
        """Per instance, :func:`_by_steps_left` of what it holds; and the queue's estimated steps per live client.

        A request holds its prompt plus what it has generated (for one not yet prefilled, what it
        generated before a preemption) and has its estimate less that left, at least 1 step.
        Read once per state of the engine (the idle clients of one step and the requests of one
        scan ask in turn).
        """
        stamp = (now, self.version, self._edits,
                 tuple((st.decode_steps, st.n_running, len(st.waiting)) for st in states))
        if self._held_at is not None and self._held_at[0] == stamp:
            return self._held_at[1]
        engine = states[0].engine
        cs = np.asarray(engine.client_state)
        req = np.asarray(engine.client_request)
        ci = self._client_instance
        steps = np.array([st.decode_steps for st in states], dtype=np.float64)
        holding = np.flatnonzero((cs == RUNNING) | (cs == WAITING))
        r = req[holding]
        # generated so far: by the decode steps since it started; before its prefill, what it had
        # generated before a preemption (it is prefilled again with them)
        g = np.where(cs[holding] == RUNNING, steps[ci[holding]] - np.asarray(engine.client_start_step)[holding],
                     np.array([engine.generated_before[x] for x in r.tolist()], dtype=np.float64))
        ctx = self._prompts[r] + g
        left = np.maximum(self._estimates[r] - g, 1.0)
        k = ci[holding]
        out = [_by_steps_left(ctx[k == i], left[k == i]) for i in range(self.m)]
        live = max(int(np.count_nonzero(cs != FAILED)), 1)
        queue_steps = float(self._estimates[self.queued].sum()) / live
        self._held_at = (stamp, (out, queue_steps))
        return out, queue_steps

    def _signature(self, queue: list, instance: int, now: float, states, past_horizon: bool) -> tuple:
        """Everything :meth:`pick` reads but the horizon, prices and queue by their change counts."""
        return (instance, now, past_horizon, id(queue), len(queue), queue[0] if queue else None, self._edits,
                self.version, self.prices.tobytes(), tuple(self.ctx.extra["client_state"]),
                tuple((id(st.latency), st.now, st.n_running, len(st.waiting), st.kv_tokens, len(st.clients))
                      for st in states))

    def _pick(self, queue: list[tuple[float, int]], instance: int, now: float, states,
              past_horizon: bool) -> tuple[float, int] | None:
        """:meth:`pick` without the memory of the last refusal; sets ``_span`` when it refuses."""
        if not self._instance_clients[instance].size:
            return None
        held = np.flatnonzero(self._hold_req >= 0)
        rows_list, keys_list = self._head(queue)
        head_rows = np.array(rows_list, dtype=np.int64)
        holds_all = self._holds(np.concatenate((self._hold_req[held], head_rows)), states)  # one pass over the states
        heaps = self._free_times(now, states, held, holds_all[:held.size])
        if not heaps[instance] or heaps[instance][0] > now:
            return None  # no client of it is free now (its heap never changes below: a landing returns)
        head_holds = holds_all[held.size:]
        # lists: the scan below is scalar Python. A hold where the request does not belong is read
        # as inf, so its finish there (inf) never wins: the earliest completion over the instances
        # where it belongs is then a min over all of them
        everywhere = self._belongs_everywhere()
        ok = self.belongs_rows(head_rows) if everywhere is None else everywhere[None, :]
        masked = np.where(ok, head_holds, np.inf).tolist()
        horizon = self.horizon_s if past_horizon else np.inf
        tops = [h[0] if h else np.inf for h in heaps]   # an empty heap never wins: its finish is inf
        inf = np.inf
        below, above = -np.inf, np.inf                 # completions compared with the horizon: the
        # largest not past it, the least past it
        for pos, row in enumerate(masked):
            # earliest completion over the instances where it belongs: the first instance with the
            # least finish, ties to the asking one (as _earliest; written out, with map rather than
            # a comprehension: this loop is the dispatch's cost on a long queue, all of it when the
            # asking client is refused)
            finish = [*map(add, tops, row)]
            best = min(finish)
            where = -1 if best == inf else instance if finish[instance] == best else finish.index(best)
            if best > horizon:
                # it would end after the LP's makespan where it is priced: a request that long sets
                # the makespan by itself (the LP splits work, not requests), so it goes where it
                # completes first, priced or not
                if best < above:
                    above = best
                best, where = self.place_past_horizon(rows_list[pos], tops, instance, now, states)
            elif best > below:
                below = best
            if where == instance:
                if pos:
                    self.steered += 1
                self._picked = (rows_list[pos], now, head_holds[pos].tolist())
                return keys_list[pos], rows_list[pos]
            if where >= 0:
                heap = heaps[where]
                heapq.heapreplace(heap, best)
                tops[where] = heap[0]
        if past_horizon:
            self._span = (below, above)
        if len(queue) <= len(rows_list):
            return None
        # deeper in the queue: after the list schedule above, the best request that belongs here
        # and finishes here no later than on any other instance where it belongs
        if everywhere is not None and not everywhere[instance]:
            return None  # nothing belongs here
        rows = np.flatnonzero(self.queued)
        keys = self.key[rows]
        if rows.size != len(queue) or self._unkeyed:
            keys = np.array([k for k, _ in queue])
            rows = np.array([r for _, r in queue], dtype=np.int64)
        # only requests not in the head that belong here can be taken: the belongs test of this
        # instance first, the others' and the holds (the costly part) for those alone
        after = keys > keys_list[-1]
        rows, keys = rows[after], keys[after]
        if everywhere is not None:
            cand = np.arange(rows.size)                     # all belong here; elsewhere alike
            ok = np.broadcast_to(everywhere, (rows.size, self.m))
        else:
            v = self.v[rows] * self.slowness[None, :]       # (n, m), observed scale
            priced = (v if self.mode == "lp" else self.v[rows]) * self.prices[None, :]
            mu = _row_min(priced)
            cand = np.flatnonzero(priced[:, instance] - mu <= self.tolerance * mu)
            mu = mu[cand, None]
            ok = priced[cand] - mu <= self.tolerance * mu
        if not cand.size:
            return None
        rows, keys = rows[cand], keys[cand]
        ready_at = np.array([h[0] if h else np.inf for h in heaps])
        holds_q = self._holds(rows, states)
        finish = ready_at[None, :] + holds_q
        finish[~ok] = np.inf
        here = finish[:, instance].copy()
        finish[:, instance] = np.inf
        good = here <= _row_min(finish)
        if not good.any():
            return None
        best_key = keys[good].min()
        tied = np.flatnonzero(good & (keys == best_key))
        if tied.size == 1:
            i = int(tied[0])
            item = (float(keys[i]), int(rows[i]))
        else:  # equal keys: the first of them in the queue's list, as a scan of the list finds it
            first = {int(r) for r in rows[tied]}
            item = next(it for it in queue if it[0] == best_key and it[1] in first)
            i = int(tied[np.flatnonzero(rows[tied] == item[1])[0]])
        self.steered += 1
        self._picked = (item[1], now, holds_q[i].tolist())
        return item
