"""The Lagrangian iteration scheduler: prefill or decode, priced with the offline dual prices.

Makespan of an instance = the sum of its iteration times = per-token costs (paid by every
schedule) + ``decode_base_s`` x decode steps + ``prefill_base_s`` x prefill iterations
(:mod:`lloptim.bounds`). Only the fixed costs depend on scheduling, so the decision weighs two
prices:

* ``C_p``, the cost of inserting a prefill now: one more prefill iteration, ``prefill_base_s``
  seconds of instance time (makespan seconds per instance second: 1);
* ``C_d``, the waiting cost of the decodes that run instead: every decode step a waiting client
  ``c`` sits idle wastes its slot, which the instance must make up later at ``decode_base_s / C``
  per slot-step; priced with ``mu_c`` (the dual price of client ``c``'s time from the offline
  bin packing, normalized to sum to 1, so ``mu_c = 1/C`` when the packing is balanced) it is
  ``mu_c * decode_base_s`` per step.

``C_d`` accumulates over the steps the current waiting clients have waited (the economic-order-
quantity rule: batch a setup when the holding cost it saves equals the setup cost), and the
prefill is inserted when ``C_d >= C_p``. The prices are updated as the run goes: a lost slot-step
can only be made up by clients that still have unstarted work to take over, so once fewer than
``C`` requests are pending the price of a waiting client's step is scaled by
``C / (pending + 1)``; in the end game, when the request scheduler holds no more requests, a
waiting client is on the critical path (nothing else can fill the time it loses) and the prefill
goes in at once.

Where the backend can fuse prompt chunks into a decode iteration (``fused=True``; Sarathi-Serve's
chunked prefill, priced by the latency model as the decode plus ``prefill_per_token_s`` per chunk
token), inserting the prompts that way shares the decode's fixed cost: ``C_p = 0`` fixed seconds
(their per-token cost is paid by every schedule), so ``C_d >= C_p`` always holds and the waiting
clients join the next iteration. The fixed-cost trade-off that makes the separate-iteration rule
wait, and that costs most when output lengths are unknown (finishes cannot be forecast, so they
cannot be batched), then disappears; the bound such schedules are measured against is
:attr:`~lloptim.bounds.LowerBound.fused_s`.

**KV memory.** When an instance's cache can fill up, a waiting request that would fit also wastes
the memory its prefill would take: the decode steps an instance needs are at least its KV area over
its capacity (:mod:`lloptim.bounds`), so one token-step of idle memory costs ``decode_base_s / M``
seconds, as one idle slot-step costs ``decode_base_s / C``. The rule prices both, with a weight
``beta`` in [0, 1] on memory: a waiting request that fits adds ``(1 - beta) mu_c decode_base_s +
beta decode_base_s (context + 1) / M`` per decode step it waits (requests that do not fit add
nothing: they cannot run anyway). ``beta`` is the dual weight of the two resources on the
instance's decode steps: with ``memory_prices="lp"`` it is the memory share of the decode-step
price in the LP relaxation of the offline ``binpacking_kv`` formulation, solved through
:func:`lloptim.solve` from the estimates (what the policy knows), ``beta = M kappa /
(decode_base_s nu)`` with ``kappa = -dual("kv")`` (seconds per token-step) and ``nu = -dual("time")``
(:func:`lloptim.formulations.binpacking_kv.kv_price_weights`): 1 where memory sets the steps, 0
where the clients do, in between where both bind. It is updated online by
projected subgradient steps on the observed utilizations, ``beta += eta (kv_used / M - running /
C)`` per decode step. ``"uniform"`` starts from 1/2, ``"none"`` keeps 0 (memory unpriced).

**The memory price in fused admission (priced headroom).** With fused prompts there is no
prefill-or-decode choice left for the price to enter: every waiting prompt that fits joins the
next iteration. What the price still decides is *admission*: the dispatch hands an idle client a
request only if the instance's projected KV memory stays within the cache
(:class:`~lloptim.runtime.memory_schedulers.MemoryAwareQueue`), and with unknown lengths that
projection must guess how long each admitted request will run. Projecting long keeps memory free
that the requests never fill, idle token-steps that cost ``beta decode_base_s / M`` each (the
memory price above); projecting short fills it, and the requests that outrun the projection are
preempted and recomputed (``prefill_per_token_s`` per context token), a cost that does not depend
on ``beta``. It is a newsvendor choice whose underage cost is the memory price, so the projection
counts each request at a quantile of its output under the lognormal forecast error the rule
learns as requests finish (``sigma``): ``estimate x exp(sigma z(beta))``
(:meth:`LagrangianIterations.projection_scale`), ``z`` linear in ``beta`` from the median where
memory costs nothing (``beta = 0``: clients set the decode steps, idle memory is free, so nothing
is risked) to the 24 % quantile where memory sets them (``beta = 1``; :data:`HEADROOM_Z`, chosen
on training seeds). The LP's weight starts it, and the online subgradient moves it with the
observed utilizations, so the headroom narrows while the cache runs emptier than the clients
and widens while it runs fuller. On a fleet the underage cost is not the instance's own memory
price alone: a request its projection refuses goes to another instance's client where it fits, so
refusing it idles memory at no more than the cheapest other cache's price. Compared across
instances in makespan seconds per token-step, ``kappa_i = beta_i nu_i decode_base_s_i / M_i``
(``nu_i`` the LP's time dual, :func:`memory_lp_prices`), the headroom's weight is ``beta_k min(1,
min_{j != k} kappa_j / kappa_k)`` (:meth:`LagrangianIterations.headroom_weight`): unchanged on one
instance or between equal caches, damped on a cache whose memory is dearer than another's. Without
the cap the LP (which gives every cache weight 1 where memory binds in aggregate) and the online
steps (a small cache fills while its clients do not) made a small cache beside a large one the most
optimistic of all; it took long requests the large cache holds without preemption, and the priced
headroom lost to the unpriced one on two-instance fleets (``benchmarks/memory.py --ablation-only``;
docs *KV memory*). With known lengths the projection is exact and no request is
preempted: there is nothing to trade, and the price leaves fused admission unchanged (choosing
among the first fitting requests by priced KV holding instead of the planned order was tried:
-0.08 points on training seeds, within noise, not kept). ``fused="auto"`` fuses on one instance
as soon as the known requests can fill its cache: over the single-instance memory-bound workloads
of ``benchmarks/memory.py --ablation-only`` fused chunks end 3.24 % above the bound against 3.86 %
with separate prefills (known lengths; unknown: 6.74 against 7.33 %), and the price steers them.

In workflows of dependent requests the same reasoning applies before the end game: a waiting
request that the request scheduler's plan has no slack for (:attr:`WorkflowQueue.critical
<lloptim.runtime.request_schedulers.WorkflowQueue>`) holds up its successors, and through them the
makespan, for every step it waits, so it is prefilled at once. Conversely, nothing queued is not
the end game while successors of running requests are still to come
(:meth:`WorkflowQueue.successors_to_come
<lloptim.runtime.request_schedulers.WorkflowQueue.successors_to_come>`): waiting requests with slack
are then priced as before the end game, without the multiplier for running out of work, so their
prefills batch instead of stalling the critical chain once each (30 chains on 40 clients: 46-57
prefill iterations at once against a few batched ones, 0.1-0.3 % behind round robin before,
0.7-1.0 % ahead after). With fused prompts, a prompt heading the chain that decides the makespan
(:meth:`WorkflowQueue.decides_makespan
<lloptim.runtime.request_schedulers.WorkflowQueue.decides_makespan>`) gets a prefill iteration of
its own while fewer than ``(a_d - a_p) / (a_p - b_d)`` requests run: its decode then starts after
``a_p`` rather than after a whole decode step, and the ``n`` running requests lose ``a_p`` each.

Each decision is O(1) amortized: the accumulated cost is updated incrementally.
"""

from __future__ import annotations

import heapq

import numpy as np
from scipy.special import log_ndtr

from lloptim.errors import PolicyError, SpecError
from lloptim.runtime.engine import RUNNING
from lloptim.runtime.iteration_schedulers import admissible, kv_room, prompt_chunks
from lloptim.runtime.policy import DECODE, Decision, IterationScheduler, Mixed, Prefill, RunContext

__all__ = ["LagrangianIterations", "survival_function", "SETUP_WEIGHT", "MEMORY_PRICES", "memory_price_weight",
           "memory_price_weights", "memory_lp_prices", "REPRICE_GROWTH", "HEADROOM_Z"]

#: Default weight on the prefill's fixed cost, by whether output lengths are known. Chosen on
#: GSM8K *train* cases by ``benchmarks/tune_hybrid.py``, never on the test split reported.
SETUP_WEIGHT = {"known": 1.0, "unknown": 1.0}

#: Quantile of the learned forecast error (standard normal z) at which the dispatch projects a
#: request's output when lengths are unknown: ``(z at beta = 0, z at beta = 1)``, linear in
#: between (:meth:`LagrangianIterations.projection_scale`). The median where memory costs nothing;
#: the 24 % quantile where memory sets the decode steps, chosen on training seeds 100-103 of
#: ``benchmarks/memory.py`` (the fixed factor it replaces, 0.85, is z = -0.33 at sigma 0.5).
HEADROOM_Z = (0.0, -0.7)
#: How the rule prices KV memory (see the module docstring).
MEMORY_PRICES = ("lp", "uniform", "none")
#: Step of the online update of the memory weight, per decode step and unit of utilization gap.
PRICE_STEP = 0.01


#: Growth of the known requests (factor) after which the ``"lp"`` memory price is solved again as
#: requests arrive: at most ``1 / (1 - 1/REPRICE_GROWTH)`` = 2 times the cost of one solve over them all.
REPRICE_GROWTH = 2.0


def memory_lp_prices(ctx: RunContext, rows: np.ndarray | None = None):
    """The offline LP's memory weights and time shares of every instance (:class:`~lloptim.formulations.binpacking_kv.KvPrices`).

    The LP relaxation of the ``binpacking_kv`` formulation, solved through :func:`lloptim.solve`
    from what the policy knows (the estimates and its own KV areas, in the run's KV mode), with
    the conversion of :func:`lloptim.formulations.binpacking_kv.kv_prices`: ``weights`` (``beta =
    M kappa / (decode_base_s nu)``, ``kappa = -dual("kv")`` in seconds per token-step; 1 where
    memory sets the instance's decode steps, 0 where its clients do, in between where both bind)
    and ``time_shares`` (``nu = -dual("time")``: how much of the makespan's price falls on each
    instance).

    Parameters
    ----------
    ctx
        The run.
    rows
        The requests to price over (the ones known so far); None: every request (only when every
        request is ready at the start).

    Returns
    -------
    lloptim.formulations.binpacking_kv.KvPrices
        ``(m,)`` weights and time shares, dimensionless.
    """
    from lloptim.formulations.binpacking_kv import kv_prices
    from lloptim.runtime.memory_schedulers import estimated_kv_areas

    problem = ctx.problem
    areas = np.column_stack([estimated_kv_areas(ctx, k) for k in range(len(problem.instances))])
    estimates = ctx.estimates
    if rows is not None:
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        if rows.size < problem.n_requests:
            problem = type(problem)(problem.workload.subset(rows), problem.instances, name=problem.name)
            areas, estimates = areas[rows], estimates[rows]
    return kv_prices(problem, estimates=estimates, kv_areas=areas)


def memory_price_weights(ctx: RunContext, rows: np.ndarray | None = None) -> np.ndarray:
    """The offline dual weight on KV memory of every instance, in [0, 1] (dimensionless).

    The ``weights`` of :func:`memory_lp_prices`: the memory share of each instance's decode-step
    price in the LP relaxation of the ``binpacking_kv`` formulation.

    Parameters
    ----------
    ctx
        The run.
    rows
        The requests to price over (the ones known so far); None: every request (only when every
        request is ready at the start).

    Returns
    -------
    numpy.ndarray
        ``(m,)`` weights, dimensionless.
    """
    return memory_lp_prices(ctx, rows).weights


def memory_price_weight(ctx: RunContext, instance: int) -> float:
    """The offline dual weight on KV memory for ``instance`` over every request, in [0, 1] (dimensionless).

    :func:`memory_price_weights` of the whole workload, solved once per run context (cached in
    ``ctx.extra["kv_price_weights"]``): what an offline plan sees, valid only when every request
    is ready at the start. :class:`LagrangianIterations` prices over the requests known so far.

    Parameters
    ----------
    ctx, instance
        The run context and an instance index, as for :func:`~lloptim.runtime.memory_schedulers.kv_mode_of`.

    Returns
    -------
    float
        The weight ``beta`` of the instance (cached per run in ``ctx.extra["kv_price_weights"]``).
    """
    weights = ctx.extra.get("kv_price_weights")
    if weights is None:
        weights = ctx.extra["kv_price_weights"] = memory_price_weights(ctx)
    return float(weights[instance])


#: Forecasts of the next finish that the lookahead can use.
FORECASTS = ("auto", "exact", "lognormal", "survival", "none")
PRIOR_WEIGHT = 20.0


def survival_function(output_tokens: np.ndarray) -> np.ndarray:
    """Empirical survival function of output lengths: entry ``x`` is ``P(output > x)``, tokens.

    Entries run from ``x = 0`` to ``max(output_tokens)``, where the probability is 0.
    """
    o = np.asarray(output_tokens, dtype=np.int64)
    counts = np.bincount(o, minlength=int(o.max()) + 1)
    return 1.0 - np.cumsum(counts) / o.size


class LagrangianIterations(IterationScheduler):
    """Insert a prefill when the accumulated waiting cost of the decodes reaches its cost.

    Parameters
    ----------
    prices
        Price of each client's time (global client index), makespan seconds per client second;
        a callable ``prices(ctx) -> array`` is evaluated at setup. ``None``: ``1/C`` each.
    setup_weight
        Multiplier on ``C_p`` (1.0 is the EOQ balance; larger batches prefills more); ``None``:
        :data:`SETUP_WEIGHT` for known or unknown lengths.
    token_budget
        Most prompt tokens per prefill (or fused) iteration (``None``: unlimited).
    fused
        ``"auto"``: on one instance, separate prefill iterations while every request was present
        from the start and the requests known so far cannot fill the KV cache, fused chunks once
        the request scheduler reports requests arriving during the run (its
        ``arrivals_during_run`` attribute, set by the hybrid's dispatch: an arrival's separate
        prefill would stall every running decode or make the arrival wait for a batch, a fused
        chunk does neither) or once the known requests can fill the cache (the memory price then
        steers the dispatch's priced headroom, and fused chunks keep the cache fuller than
        batched prefills; see the module docstring); fused chunks from the start on a fleet of
        several instances (each client serves few requests, so separate prefills batch poorly)
        and on workflows of dependent requests (a successor becomes ready mid-run, like an
        arrival). ``True``:
        insert prompts as chunks fused into the decode iterations (``C_p = 0``; see the module
        docstring) instead of separate prefill iterations. Needs a backend with mixed iterations
        (the simulated and torch backends have them).
    forecast
        How the lookahead forecasts the next finish of a running request, to decide whether
        waiting for it is cheaper than an extra prefill: ``"exact"`` (finish = start + estimate;
        exact when lengths are known), ``"lognormal"`` (``log(true/estimate) ~ N(0, sigma^2)``
        with ``sigma`` learned as requests finish), ``"survival"`` (the empirical survival
        function ``survival`` of training outputs), ``"none"`` (no forecast: accrue the waiting
        cost step by step and prefill when it reaches the prefill's cost). ``"auto"``: exact with
        known lengths, else survival when given, else none.
    survival
        ``survival[x]`` = probability that an output is longer than ``x`` tokens, learned from
        training requests (see :func:`survival_function`).
    max_wait_steps
        Longest wait, in decode steps, that the probabilistic forecasts consider.
    sigma_prior
        Prior of the lognormal forecast error (log scale), worth 20 observations.
    criticality
        Raise the price of waiting as the pending work runs out (see the module docstring).
    memory_prices
        How waiting is priced in KV memory: ``"lp"`` (the bound's dual weight, then online
        subgradient updates), ``"uniform"`` (weight 1/2, then updates) or ``"none"`` (memory
        unpriced); see the module docstring. Instances whose cache cannot fill up never price it.
    price_updates
        Update the memory weight online from the observed utilizations.
    """

    def __init__(self, prices=None, setup_weight: float | None = None, token_budget: int | None = None,
                 forecast: str = "auto", survival: np.ndarray | None = None, max_wait_steps: int = 32,
                 sigma_prior: float = 0.5, criticality: bool = True, fused: bool | str = False,
                 memory_prices: str = "lp", price_updates: bool = True) -> None:
        if forecast not in FORECASTS:
            raise PolicyError(f"forecast must be one of {FORECASTS}, not {forecast!r}")
        if memory_prices not in MEMORY_PRICES:
            raise SpecError("memory_prices", f"unknown memory price {memory_prices!r}", f"use one of {list(MEMORY_PRICES)}")
        self.memory_prices = memory_prices
        self.price_updates = price_updates
        if forecast == "survival" and survival is None:
            raise PolicyError("forecast='survival' needs a survival function (see survival_function)")
        self.prices = prices
        self.criticality = criticality
        self.forecast = forecast
        self.survival = survival
        self.max_wait_steps = max_wait_steps
        self.sigma_prior = sigma_prior
        self.setup_weight = setup_weight
        self.token_budget = token_budget
        self.fused = fused

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        n = ctx.problem.n_clients
        mu = self.prices(ctx) if callable(self.prices) else self.prices
        mu = np.full(n, 1.0 / n) if mu is None else np.asarray(mu, dtype=np.float64)
        if mu.shape != (n,) or np.any(mu < 0) or not np.all(np.isfinite(mu)) or mu.sum() <= 0:
            raise PolicyError(f"prices must be {n} finite non-negative numbers with a positive sum")
        mu = mu / mu.sum()
        self.step_price: list[float] = []  # per client: C_d added per decode step it waits, seconds
        for k, inst in enumerate(ctx.problem.instances):
            clients = ctx.instance_clients(k)
            share = mu[clients.start:clients.stop]
            # renormalize within the instance: the instance's own makespan is what its decisions move
            share = share / share.sum() if share.sum() > 0 else np.full(len(clients), 1.0 / len(clients))
            self.step_price.extend((share * inst.profile.latency.decode_base_s).tolist())
        weight = self.setup_weight
        if weight is None:
            weight = SETUP_WEIGHT["known" if ctx.known_lengths else "unknown"]
        self.setup_cost = [weight * inst.profile.latency.prefill_base_s for inst in ctx.problem.instances]
        from lloptim.runtime.memory_schedulers import KnownMemory

        # memory is priced from the requests known so far (on_ready), never from one of the future:
        # whether each cache can fill up, and the LP weight, solved again as the known set grows
        self.known_memory = KnownMemory(ctx)
        self.memory_binds = self.known_memory.binds
        self.known: list[int] = []
        self.beta = [0.0] * len(ctx.problem.instances)
        self.pricing = [False] * len(ctx.problem.instances)  # memory priced on the instance yet
        self.lp_weights: np.ndarray | None = None   # the last LP weights, over lp_known requests
        self.lp_known = 0
        # the share of the makespan's price on each instance's time (the LP's time duals; equal
        # shares without an LP): converts memory weights into makespan seconds per token-step
        self.time_share = [1.0 / len(ctx.problem.instances)] * len(ctx.problem.instances)
        self.beta_trace: list[list[float]] = [[] for _ in ctx.problem.instances]
        self.price_step = [-1] * len(ctx.problem.instances)  # decode step of the last price update
        # seconds per token-step of idle KV memory: decode_base_s / capacity
        self.token_price = [inst.profile.latency.decode_base_s / (inst.kv_blocks * inst.kv_block_tokens)
                            for inst in ctx.problem.instances]
        self.accrued = [0.0] * len(ctx.problem.instances)
        self.requests = ctx.extra.get("request_scheduler")
        # the dispatch's priced admission reads the same memory weight (projection_scale); once it
        # does, fused iterations follow the weight at every decode step
        ctx.extra["memory_price"] = self
        self.headroom_read = False
        # requests on the plan's critical path (workflows): never kept waiting for a batch
        self.critical = getattr(self.requests, "critical", None)
        # workflows: whether a request heads the chain that decides the makespan (fused prompts)
        self.binding = getattr(self.requests, "decides_makespan", None)
        if ctx.problem.workload.precedence is None:
            self.binding = None
        # ... given a prefill iteration of its own while fewer than this many run: the n running
        # lose prefill_base_s each, the chain saves the decode step, a_p (n + 1) < a_d + c_s n
        self.own_prefill_below = []
        for inst in ctx.problem.instances:
            lat = inst.profile.latency
            a_p, a_d, c_s = lat.prefill_base_s, lat.decode_base_s, lat.decode_per_seq_s
            self.own_prefill_below.append(np.inf if a_p <= c_s else (a_d - a_p) / (a_p - c_s))
        self.estimates = ctx.estimates.tolist()
        self.finish_heap: list[list[tuple[int, int, int]]] = [[] for _ in ctx.problem.instances]
        self.running: list[dict[int, tuple[int, int]]] = [{} for _ in ctx.problem.instances]
        # running requests migrated in from another instance, registered at the next decision there
        self.arrived: list[list[tuple[int, int, int]]] = [[] for _ in ctx.problem.instances]
        self.decisions_prefill = 0
        mode = self.forecast
        if mode == "auto":
            # measured on GSM8K train cases: point-estimate and lognormal lookaheads gain little over
            # accrual when lengths are unknown, and the lognormal one costs ~0.3 ms per decision
            mode = "exact" if ctx.known_lengths else ("survival" if self.survival is not None else "none")
        self.mode = "fused" if self.fused is True else mode
        # "auto" keeps the paper's separate iterations only in the paper's setting, one instance:
        # on a fleet each client serves a few requests, prefill batches stay small and their fixed
        # cost is paid far more often than the bound's ceil(R/C) (benchmarks/fleet.py: 1-1.6 % of
        # the makespan against fused chunks on every mixed fleet)
        self.fusing = self.fused is True or (self.fused == "auto" and len(ctx.problem.instances) > 1)
        # ... and on workflows of dependent requests: a successor becomes ready when its predecessor
        # finishes, mid-run, like an arrival; its separate prefill stalls every running decode or
        # waits for a batch (benchmarks/workflows.py: 1.3-1.6 points of the makespan on one instance)
        self.fusing = self.fusing or (self.fused == "auto" and ctx.problem.workload.precedence is not None)
        self.horizon = np.arange(1, self.max_wait_steps + 1)
        if mode == "survival":
            surv = np.asarray(self.survival, dtype=np.float64)
            self.log_survival = np.log(np.maximum(surv, 1e-12))
        # forecast error model, learned as requests finish: log(true / estimate) ~ N(0, sigma^2),
        # with the prior counted as PRIOR_WEIGHT observations
        self.sq_log_error = PRIOR_WEIGHT * self.sigma_prior ** 2
        self.n_errors = PRIOR_WEIGHT

    @property
    def sigma(self) -> float:
        """Current estimate of the log-scale forecast error (lognormal forecast)."""
        return float(np.sqrt(self.sq_log_error / self.n_errors))

    def on_ready(self, request: int, now: float) -> None:
        self.known.append(request)
        self.known_memory.add(request)

    def _start_pricing(self, k: int) -> None:
        """Instance ``k``'s cache can now fill up: memory is priced there from now on."""
        if self.memory_prices == "lp":
            self._reprice()
        self.beta[k] = self._current_weight(k)
        self.pricing[k] = True
        self.beta_trace[k].append(self.beta[k])

    def _current_weight(self, k: int) -> float:
        """Instance ``k``'s memory weight as it stands, without stepping it: 0 where its cache cannot
        fill up; the weight it starts from where it is not priced yet."""
        if not self.memory_binds[k]:
            return 0.0
        if self.pricing[k]:
            return self.beta[k]
        if self.memory_prices == "lp":
            return float(self.lp_weights[k]) if self.lp_weights is not None else 0.0
        return 0.5 if self.memory_prices == "uniform" else 0.0

    def _reprice(self) -> None:
        """Solve the LP weights over the known requests; shift the priced instances' weights by the change.

        The online updates correct the LP's weight for what the run shows; a new solve moves the
        offline part only, so the correction is kept.
        """
        n = len(self.known)
        prices = memory_lp_prices(self.ctx, None if n == self.ctx.problem.n_requests else self.known)
        weights = prices.weights
        self.time_share = prices.time_shares.tolist()
        if self.lp_weights is not None:
            for k, priced in enumerate(self.pricing):
                if priced and self.beta_trace[k]:
                    self.beta[k] = min(1.0, max(0.0, self.beta[k] + float(weights[k] - self.lp_weights[k])))
        self.lp_weights = weights
        self.lp_known = n

    def on_finish(self, request: int, client: int, output_tokens: int, now: float) -> None:
        err = np.log(output_tokens / self.estimates[request])
        self.sq_log_error += err * err
        self.n_errors += 1

    def victim(self, state) -> int | None:
        """The priced preemption rule: the running request whose recompute costs least.

        A recompute prefills the victim's whole context again (``prefill_per_token_s`` per token),
        so the victim is the running request holding the fewest KV tokens (the later started on a
        tie). On the memory-bound benchmark workloads this beats vLLM's most-recently-admitted rule
        for every policy (``benchmarks/memory.py``; docs *KV memory*).
        """
        engine = state.engine
        step = state.decode_steps
        best, best_key = None, None
        for c in state.clients:
            if engine.client_state[c] == RUNNING:
                start = engine.client_start_step[c]
                key = (engine.prompt[engine.client_request[c]] + step - start, -start)
                if best_key is None or key < best_key:
                    best, best_key = c, key
        return best

    def on_preempt(self, request: int, client: int, generated: int) -> None:
        # its forecast restarts when it is prefilled again (the engine bumps the client's epoch)
        self.running[int(self.ctx.client_instance[client])].pop(client, None)

    def on_migrate(self, request: int, source_client: int, destination_client: int, generated: int) -> None:
        k = int(self.ctx.client_instance[destination_client])
        self.arrived[k].append((destination_client, request, generated))

    def _register_arrivals(self, state) -> None:
        """Forecast the finish of requests that migrated in, as if prefilled ``generated`` steps ago."""
        k = state.index
        step = state.decode_steps
        for c, r, generated in self.arrived[k]:
            if self.mode in ("survival", "lognormal"):
                self.running[k][c] = (r, step - generated)
            elif self.mode == "exact":
                heapq.heappush(self.finish_heap[k], (step - generated + int(round(self.estimates[r])), c,
                                                     state.engine.client_epoch[c]))
        self.arrived[k].clear()

    def decide(self, state) -> Decision:
        k = state.index
        if self.arrived[k]:
            self._register_arrivals(state)
        if self.fusing and self.headroom_read and self.memory_binds[k]:
            self.memory_weight(state)  # the price follows every decode step (the dispatch reads it)
        if not state.waiting:
            return DECODE
        if not self.fusing and self.fused == "auto" and (self.memory_binds[k] or
                                                         getattr(self.requests, "arrivals_during_run", False)):
            # requests arriving, or known requests that can fill the cache: fused from now on
            self.fusing = True
        if self.fusing:
            if self.binding is not None and 0 < state.n_running < self.own_prefill_below[k]:
                # a prompt heading the chain that decides the makespan, beside few running requests:
                # a prefill iteration of its own starts the chain's decode after prefill_base_s,
                # where a chunk starts it after a whole decode step; each running request loses
                # prefill_base_s, so it goes only where that costs them less in all than the chain
                # saves (LLaMA-65B: at most 4 running; the tail of a run, where the last chains
                # decide the makespan and the fixed cost no longer buys throughput)
                request_of = state.engine.client_request
                chain = [c for c in state.waiting if self.binding(int(request_of[c]))]
                if chain:
                    decision = self._prefill(state, chain)
                    if decision is not DECODE:
                        return decision
            return self._fuse(state)
        end_game = self.requests is not None and self.requests.pending() == 0
        to_come = False
        if self.critical:
            request_of = state.engine.client_request
            if any(request_of[c] in self.critical for c in state.waiting):
                return self._prefill(state)
            # nothing queued, but successors of running requests will come: not the end game
            coming = getattr(self.requests, "successors_to_come", None)
            to_come = end_game and state.n_running > 0 and coming is not None and coming()
            end_game = end_game and not to_come
        if state.n_running == 0 or end_game:
            return self._prefill(state)
        price = self.step_price
        waiting_cost = 0.0
        if self.memory_binds[k]:
            waiting_cost = self._memory_waiting_cost(state)
        else:
            for c in state.waiting:
                waiting_cost += price[c]
        if self.criticality and self.requests is not None and not to_come:
            # online multiplier update: a lost slot-step can only be made up by clients that still
            # have unstarted work to take over, so its price rises as the pending work runs out
            # (not while successors are still to come: the waiting requests have slack, and the
            # clients they hold would idle anyway)
            n_clients = len(state.clients)
            pending = self.requests.pending()
            if pending + 1 < n_clients:
                waiting_cost *= n_clients / (pending + 1)
        mode = self.mode
        if mode == "exact":
            steps = self._steps_to_next_finish(state)
            if steps is None or waiting_cost * steps >= self.setup_cost[k]:
                return self._prefill(state)
            return DECODE
        if mode == "none":
            # the cost of one more decode step with these clients idle, added to what they already lost
            if self.accrued[k] + waiting_cost >= self.setup_cost[k]:
                return self._prefill(state)
            self.accrued[k] += waiting_cost
            return DECODE
        return self._prefill(state) if self._expected_saving_says_prefill(state, waiting_cost) else DECODE

    def memory_weight(self, state) -> float:
        """The memory weight ``beta`` of ``state``'s instance now, in [0, 1] (dimensionless).

        0 where the known requests cannot fill the cache (memory is never priced there) or with
        ``memory_prices="none"``; else the LP's (or the uniform) weight, moved by the online
        subgradient steps up to the instance's current decode step. Read by the dispatch's priced
        admission (:class:`~lloptim.runtime.memory_schedulers.MemoryAwareQueue`, through
        ``ctx.extra["memory_price"]``) as well as by this rule.

        Parameters
        ----------
        state
            The instance (:class:`~lloptim.runtime.engine.InstanceState`).

        Returns
        -------
        float
            The weight on memory in the instance's decode-step price.
        """
        k = state.index
        if not self.memory_binds[k]:
            return 0.0
        if not self.pricing[k]:
            self._start_pricing(k)
        elif self.memory_prices == "lp" and len(self.known) >= REPRICE_GROWTH * self.lp_known:
            self._reprice()
        if self.price_updates and self.memory_prices != "none" and state.decode_steps != self.price_step[k]:
            steps = state.decode_steps - self.price_step[k] if self.price_step[k] >= 0 else 1
            gap = state.kv_used / state.kv_blocks - state.n_running / len(state.clients)
            self.beta[k] = min(1.0, max(0.0, self.beta[k] + PRICE_STEP * steps * gap))
            self.price_step[k] = state.decode_steps
            self.beta_trace[k].append(self.beta[k])
        return self.beta[k]

    def projection_scale(self, state) -> float:
        """Factor on the estimates with which the dispatch projects KV memory: the priced headroom.

        ``exp(sigma z(beta))``, the ``Phi(z)`` quantile of a request's output under the learned
        lognormal forecast error (``sigma``, :attr:`sigma`), with ``z`` linear in the memory
        weight from ``HEADROOM_Z[0]`` (``beta = 0``) to ``HEADROOM_Z[1]`` (``beta = 1``); 1 with
        known lengths (the projection is exact and nothing is preempted). See the module docstring.

        Parameters
        ----------
        state
            The instance (:class:`~lloptim.runtime.engine.InstanceState`).

        Returns
        -------
        float
            The factor, dimensionless (below 1: the projection counts requests shorter than estimated).
        """
        if self.ctx.known_lengths:
            return 1.0
        self.headroom_read = True
        beta = self.headroom_weight(state)
        z = HEADROOM_Z[0] + beta * (HEADROOM_Z[1] - HEADROOM_Z[0])
        return float(np.exp(self.sigma * z))

    def headroom_weight(self, state) -> float:
        """The memory weight the priced headroom uses on ``state``'s instance, in [0, 1] (dimensionless).

        On one instance, :meth:`memory_weight`. On a fleet, the weight is capped by the cheapest
        memory elsewhere: a request the instance's projection refuses is not lost to the fleet,
        the dispatch hands it to another instance's client that it fits, so refusing it leaves
        memory idle at no more than the price of the cheapest other cache that can hold it. In
        makespan seconds per token-step, instance ``i``'s memory costs ``kappa_i = beta_i nu_i
        decode_base_s_i / M_i`` (``nu_i``: its share of the makespan's price, the LP's time dual;
        equal shares without an LP; ``beta_i = 0`` where the cache cannot fill up), and the weight
        is ``beta_k min(1, min_{j != k} kappa_j / kappa_k)``. It changes nothing on one instance
        or between instances whose memory costs the same; it damps the headroom of a cache whose
        memory is dearer than another's (a small cache beside a large one), whose optimistic
        projection would otherwise take long requests the large cache holds without preemption
        (module docstring; docs *KV memory*).

        Parameters
        ----------
        state
            The instance (:class:`~lloptim.runtime.engine.InstanceState`).

        Returns
        -------
        float
            The weight.
        """
        k = state.index
        beta = self.memory_weight(state)
        m = len(self.beta)
        if m < 2 or beta <= 0.0:
            return beta
        cost = [self._current_weight(j) * self.time_share[j] * self.token_price[j] for j in range(m)]
        mine = beta * self.time_share[k] * self.token_price[k]
        if mine <= 0.0:
            return beta
        other = min(cost[j] for j in range(m) if j != k)
        return beta * min(1.0, other / mine)

    def _memory_waiting_cost(self, state) -> float:
        """Cost per decode step of the waiting requests that fit, slots and memory priced (module docstring)."""
        k = state.index
        beta = self.memory_weight(state)
        room = kv_room(state)
        per_token = beta * self.token_price[k] * state.kv_block
        price = self.step_price
        cost = 0.0
        for c in state.waiting:
            need = state.admission_blocks(c)
            if need <= room:
                cost += (1.0 - beta) * price[c] + per_token * need
        return cost

    def _fuse(self, state) -> Decision:
        """Fused insertion: every waiting prompt (that fits) joins the next iteration as a chunk."""
        chunks = prompt_chunks(state, self.token_budget)
        if chunks:
            self.decisions_prefill += 1
            return Mixed(chunks)
        if state.n_running:
            return DECODE
        raise PolicyError(f"instance {state.index}: no waiting request fits the free KV cache")

    def _expected_saving_says_prefill(self, state, waiting_cost: float) -> bool:
        """Unknown lengths: wait ``j`` more steps only if the expected saving beats the waiting cost.

        With ``q(j)``, the probability that some running request finishes within ``j`` steps
        (conditioned on the tokens each has generated; from the survival function of the training
        outputs, or from the lognormal error model around each estimate), waiting ``j`` steps
        costs ``j * C_d`` and saves ``q(j) * C_p`` (the finisher joins this prefill).
        """
        running = self.running[state.index]
        engine = state.engine
        step = state.decode_steps
        gen, est = [], []
        for c, (r, start) in list(running.items()):
            if engine.client_request[c] != r:
                del running[c]
            else:
                gen.append(step - start)
                est.append(self.estimates[r])
        if not gen:
            return True
        g = np.asarray(gen)
        if self.mode == "survival":
            last = self.log_survival.size - 1
            g = np.minimum(g, last)
            ahead = np.minimum(g[:, None] + self.horizon[None, :], last)
            log_none = (self.log_survival[ahead] - self.log_survival[g][:, None]).sum(axis=0)
        else:
            # P(o > x) = 1 - Phi((ln(x + 1/2) - ln est) / sigma), per running request
            inv = 1.0 / max(self.sigma, 1e-3)
            log_est = np.log(np.asarray(est))[:, None]
            z_now = (np.log(g[:, None] + 0.5) - log_est) * inv
            z_ahead = (np.log(g[:, None] + self.horizon[None, :] + 0.5) - log_est) * inv
            log_none = (log_ndtr(-z_ahead) - log_ndtr(-z_now)).sum(axis=0)
        saving = self.setup_cost[state.index] * (1.0 - np.exp(log_none))
        return not np.any(saving > waiting_cost * self.horizon)

    def _steps_to_next_finish(self, state) -> int | None:
        """Decode steps until the next running client is expected to finish (from the estimates)."""
        heap = self.finish_heap[state.index]
        engine = state.engine
        step = state.decode_steps
        while heap:
            f, c, epoch = heap[0]
            if engine.client_epoch[c] != epoch or engine.client_state[c] != RUNNING or f <= step:
                # finished, evicted, preempted, or running past its estimate: no forecast for it
                heapq.heappop(heap)
                continue
            return f - step
        return None

    def _prefill(self, state, clients=None) -> Decision:
        """A prefill iteration of the waiting ``clients`` (default: all waiting) that fit the KV cache."""
        chosen = admissible(state, state.waiting if clients is None else clients, self.token_budget)
        if not chosen:
            if state.n_running:
                return DECODE
            raise PolicyError(f"instance {state.index}: no waiting request fits the free KV cache")
        self.accrued[state.index] = 0.0
        self.decisions_prefill += 1
        if self.mode in ("survival", "lognormal"):
            running = self.running[state.index]
            engine = state.engine
            for c in chosen:
                r = engine.client_request[c]
                running[c] = (r, state.decode_steps - engine.generated_before[r])
        elif self.mode == "exact":
            heap = self.finish_heap[state.index]
            engine = state.engine
            step = state.decode_steps
            for c in chosen:
                r = engine.client_request[c]
                heapq.heappush(heap, (step - engine.generated_before[r] + int(round(self.estimates[r])), c,
                                      engine.client_epoch[c]))
        return Prefill(chosen)
