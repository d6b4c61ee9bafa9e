"""Prices of instance time on a heterogeneous fleet, and the dispatch tests they imply.

On a fleet whose instances differ (profiles or client counts), the dispatch must also decide
*where* a request runs. :class:`FleetPrices` prices each instance's time with the duals of the
fractional assignment LP (the LP behind the fleet bound of :mod:`lloptim.bounds`), solved over
the requests known and not yet started, with the work each instance has already committed::

    min T   s.t.  b_k + sum_r v[k, r] y[k, r] <= T    for every instance k   (dual lambda_k >= 0)
                  sum_k y[k, r] = 1                     for every queued r     (dual mu_r)

``v[k, r]`` is the instance-seconds request ``r`` takes on a full instance ``k`` (its per-token
terms plus its share ``o / C_k`` of the decode steps and ``1 / C_k`` of a prefill, at ``k``'s
coefficients; the bound's weights), ``b_k`` the time at which ``k`` will be done with the requests
it holds (absolute seconds). The duals sum to one: ``lambda_k`` is the makespan seconds one more
second of ``k``'s time costs, ``mu_r = min_k lambda_k v[k, r]`` what request ``r`` costs where it is
cheapest, and ``lambda_k v[k, r] - mu_r >= 0`` its *reduced cost* on ``k``: zero where the LP would
put it, positive where it does not belong. The optimum ``T`` is the *projected makespan*.

Two dispatch tests follow (:meth:`FleetPrices.admits`), for an idle client of instance ``k`` at
time ``t`` considering request ``r``:

1. **belongs**: its reduced cost on ``k`` is at most :data:`REDUCED_COST_TOLERANCE` of its price
   (an instance that is only slower in proportion gets everything it has room for; one whose
   strengths differ, e.g. fast prefill and slow decode, takes the requests it is good at);
2. **end game**: it would finish on ``k`` (``t + C_k v[k, r]``, the client-seconds it takes there)
   by the projected makespan, or no later than on the instance where it would finish first (which
   may still be busy). A slow instance then leaves the long requests of the end game to the fast
   ones instead of finishing last.

Between LP solves (batched: when the queue has changed by :data:`RESOLVE_SHARE` since the last,
or when an idle client finds nothing it may take), the prices follow the observed load by an
exponentiated subgradient step: the dual's subgradient for instance ``k`` is its projected finish
``b_k + sum of v[k, r]`` over the queued requests that are cheapest on ``k`` at the current prices,
and ``lambda_k`` grows where that is late (the instance is overbooked) and shrinks where it is
early. Modes (the ablation of ``benchmarks/fleet.py``): ``"lp"`` (LP duals + online updates),
``"online"`` (uniform start, online updates only), ``"uniform"`` (``1/m`` for ever), ``"none"`` (no
tests: any idle client takes the head of the queue).
"""

from __future__ import annotations

import numpy as np

from lloptim.runtime.policy import RunContext

__all__ = ["FleetPrices", "PRICE_MODES", "REDUCED_COST_TOLERANCE", "RESOLVE_SHARE", "STEP_SIZE"]

#: Price modes of :class:`FleetPrices`.
PRICE_MODES = ("lp", "online", "uniform", "none")
#: Reduced cost, as a share of the request's price, below which a request belongs on an instance.
REDUCED_COST_TOLERANCE = 0.05
#: Re-solve the LP once the queue has changed (arrivals and dispatches) by this share of its size.
RESOLVE_SHARE = 0.25
#: Step of the exponentiated subgradient update, per unit relative lateness (dimensionless).
STEP_SIZE = 0.5


class FleetPrices:
    """Instance prices from the fractional assignment LP, updated online; dispatch tests.

    Parameters
    ----------
    mode
        One of :data:`PRICE_MODES` (module docstring).
    tolerance
        Reduced-cost tolerance of the *belongs* test, share of the request's price.
    step_size
        Step of the online update.

    Attributes
    ----------
    active
        Whether the fleet has instances that differ (otherwise every test passes and nothing is
        solved).
    prices
        ``(m,)`` current price of each instance's time (sum 1).
    projected_makespan_s
        The LP's (or, without LP, the price-induced) projected makespan, absolute seconds.
    solves
        LP solves so far (count).
    refusals
        Requests an idle client was refused by a test (count): decisions the prices changed.
    """

    def __init__(self, mode: str = "lp", tolerance: float = REDUCED_COST_TOLERANCE,
                 step_size: float = STEP_SIZE) -> None:
        if mode not in PRICE_MODES:
            from lloptim.errors import SpecError

            raise SpecError("policy.prices", f"unknown price mode {mode!r}", f"use one of {list(PRICE_MODES)}")
        self.mode = mode
        self.tolerance = tolerance
        self.step_size = step_size

    def setup(self, ctx: RunContext) -> None:
        """Start a run: per-instance coefficients; active only on a fleet whose instances differ.

        Parameters
        ----------
        ctx
            The run.
        """
        self.ctx = ctx
        insts = ctx.problem.instances
        m = len(insts)
        kinds = {(i.profile.latency, i.clients) for i in insts}
        self.active = self.mode != "none" and len(kinds) > 1
        self.m = m
        self.clients = np.array([i.clients for i in insts], dtype=np.float64)
        self.prices = np.full(m, 1.0 / m)
        self.projected_makespan_s = 0.0
        self.solves = 0
        self.refusals = 0
        n = ctx.problem.n_requests
        self.v = np.zeros((n, m))            # instance-seconds of each known request on each instance
        self.queued = np.zeros(n, dtype=bool)
        self.n_queued = 0
        self.changes = 0                      # queue changes since the last LP solve
        self.holding: dict[int, tuple[int, float]] = {}   # client -> (request, start)
        lats = [i.profile.latency for i in insts]
        self._coef = np.array([[l.prefill_per_token_s, l.decode_per_seq_s, l.decode_per_kv_token_s,
                                l.decode_base_s, l.prefill_base_s] for l in lats])

    # -- bookkeeping -----------------------------------------------------------------------------
    def on_ready(self, request: int) -> None:
        """``request`` joined the queue: price it on every instance (from its prompt and estimate)."""
        if not self.active:
            return
        w = self.ctx.problem.workload
        p = float(w.prompt_tokens[request])
        o = float(self.ctx.estimates[request])
        per_token = self._coef[:, 0] * p + self._coef[:, 1] * o + self._coef[:, 2] * (o * p + o * (o - 1) / 2)
        self.v[request] = per_token + (self._coef[:, 3] * o + self._coef[:, 4]) / self.clients
        self.queued[request] = True
        self.n_queued += 1
        self.changes += 1

    def on_start(self, request: int, client: int, now: float) -> None:
        """``request`` left the queue for ``client`` at ``now`` seconds."""
        if not self.active:
            return
        if self.queued[request]:
            self.queued[request] = False
            self.n_queued -= 1
        self.changes += 1
        self.holding[client] = (request, now)

    def on_finish(self, request: int, client: int) -> None:
        """``request`` finished on ``client``."""
        if self.active and self.holding.get(client, (-1, 0.0))[0] == request:
            del self.holding[client]

    def on_requeue(self, request: int) -> None:
        """A fault put ``request`` back in the queue."""
        if not self.active:
            return
        for c, (r, _) in list(self.holding.items()):
            if r == request:
                del self.holding[c]
        if not self.queued[request]:
            self.queued[request] = True
            self.n_queued += 1
        self.changes += 1

    def _committed(self, now: float, clocks: np.ndarray) -> np.ndarray:
        """``b_k``: when each instance is done with the requests its clients hold, absolute seconds."""
        b = np.maximum(clocks, now)
        ci = self.ctx.client_instance
        for c, (r, since) in self.holding.items():
            k = int(ci[c])
            v = self.v[r, k]
            elapsed = max(0.0, now - since)
            # the instance works through v instance-seconds of r while holding it for C_k v seconds
            b[k] += v * max(0.0, 1.0 - elapsed / (self.clients[k] * v)) if v > 0 else 0.0
        return b

    # -- prices ---------------------------------------------------------------------------------
    def refresh(self, now: float, clocks: np.ndarray, force: bool = False) -> None:
        """Update the prices: an LP solve when due (mode ``"lp"``), else one online step.

        Parameters
        ----------
        now
            Current time, seconds.
        clocks
            ``(m,)`` instance clocks, seconds.
        force
            Solve the LP now (an idle client found nothing it may take).
        """
        if not self.active or self.mode == "uniform":
            if self.active:
                self.projected_makespan_s = float(self._subgradient(self._committed(now, clocks)).max())
            return
        b = self._committed(now, clocks)
        due = force or self.solves == 0 or self.changes >= RESOLVE_SHARE * max(1, self.n_queued)
        if self.mode == "lp" and due:
            self._solve(b)
            return
        g = self._subgradient(b)
        mean = float(g.mean())
        if mean > 0:
            lam = self.prices * np.exp(self.step_size * (g - mean) / mean)
            self.prices = lam / lam.sum()
        self.projected_makespan_s = float(g.max())

    def _subgradient(self, b: np.ndarray) -> np.ndarray:
        """Projected finish of each instance if every queued request goes where it is cheapest, s."""
        rows = np.flatnonzero(self.queued)
        g = b.copy()
        if rows.size:
            v = self.v[rows]
            where = np.argmin(self.prices[None, :] * v, axis=1)
            g += np.bincount(where, weights=v[np.arange(rows.size), where], minlength=self.m)
        return g

    def _solve(self, b: np.ndarray) -> None:
        """The LP of the module docstring over the queued requests; sets prices and projected makespan."""
        import scipy.sparse as sp
        from scipy.optimize import linprog

        self.solves += 1
        self.changes = 0
        rows = np.flatnonzero(self.queued)
        m, R = self.m, rows.size
        if R == 0:
            self.projected_makespan_s = float(b.max())
            return
        v = self.v[rows].T                                     # (m, R)
        n = m * R
        # columns: y[k, r] (k-major), then T; capacity rows b_k + sum_r v y - T <= 0
        cap = sp.csr_matrix((np.r_[v.ravel(), -np.ones(m)],
                             (np.r_[np.repeat(np.arange(m), R), np.arange(m)], np.r_[np.arange(n), np.full(m, n)])),
                            shape=(m, n + 1))
        assign = sp.csr_matrix((np.ones(n), (np.tile(np.arange(R), m), np.arange(n))), shape=(R, n + 1))
        cost = np.zeros(n + 1)
        cost[-1] = 1.0
        res = linprog(cost, A_ub=cap, b_ub=-b, A_eq=assign, b_eq=np.ones(R),
                      bounds=[(0, None)] * n + [(None, None)], method="highs")
        if res.status != 0:
            return  # keep the previous prices: a failed solve never stops the dispatch
        lam = np.clip(-np.asarray(res.ineqlin.marginals, dtype=np.float64), 0.0, None)
        if lam.sum() > 0 and np.all(np.isfinite(lam)):
            self.prices = lam / lam.sum()
        self.projected_makespan_s = float(res.fun)

    # -- the tests --------------------------------------------------------------------------------
    def admits(self, request: int, instance: int, now: float, free_at: np.ndarray) -> bool:
        """Whether an idle client of ``instance`` may take ``request`` at ``now`` (module docstring).

        Parameters
        ----------
        request
            Row of a queued request.
        instance
            Index of the asking client's instance.
        now
            Current time, seconds.
        free_at
            ``(m,)`` earliest time a client of each instance is free, absolute seconds.

        Returns
        -------
        bool
            True when both the *belongs* and the *end game* tests pass (always without prices).
        """
        if not self.active:
            return True
        v = self.v[request]
        priced = self.prices * v
        mu = float(priced.min())
        if priced[instance] - mu > self.tolerance * mu:
            self.refusals += 1
            return False
        hold = self.clients * v                              # client-seconds on each instance
        here = now + hold[instance]
        if here <= self.projected_makespan_s:
            return True
        elsewhere = np.delete(free_at + hold, instance)
        if elsewhere.size and here > float(elsewhere.min()):
            self.refusals += 1
            return False
        return True
