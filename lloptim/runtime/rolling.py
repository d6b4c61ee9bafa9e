"""Rolling-horizon bin packing: the offline plan, made online without foresight.

The paper's offline step packs every request onto a client before the run. When requests arrive
over time that needs foresight (their lengths, estimates and arrival times), which no server has.
:class:`RollingPlan` plans only the requests it has been told of (announced by the engine through
:meth:`~lloptim.runtime.policy.RequestScheduler.on_ready`) and revises the plan as more arrive:

* **what a revision solves**: the makespan bin packing of every known request that has not
  started, onto the live clients, where a client first finishes what it holds (its *release*:
  the estimated rest of its running or waiting request, seconds), i.e.
  ``min max_c (release_c + sum_{r on c} w[r, c])``; weights are
  :func:`~lloptim.work.request_work_s` of the known requests only (their means set the typical
  step);
* **warm start**: requests planned before keep their client as the start, the new ones go where
  they would finish first (LPT on top of the kept loads), and the move/swap local search of
  :func:`lloptim.solvers.greedy.local_search` improves the whole, with the releases
  (milliseconds; timed in :attr:`RollingPlan.revision_s`), within a work budget
  (:data:`REVISION_WORK`);
* **when**: revisions are batched: the first plan when the first requests are ready (with every
  request at time 0 this is the offline plan of the paper, solved by the chosen backend, so an
  all-at-once run is unchanged); later, when an idle client's queue has run dry while new
  requests wait unplanned, or when the unplanned requests reach ``burst`` times the planned,
  unstarted ones (an arrival burst).

:class:`RollingQueues` is the request scheduler that serves such a plan: per-client queues
longest first, optionally with the paper's stealing (:class:`~lloptim.runtime.request_schedulers.
AssignedQueues`), rebuilt at each revision.

**A deterministic budget.** Every search stops on *work*, not on the clock: the first plan's
local search (the start of :func:`lloptim.solve`, ``solver_options["start_work"]``) on
:data:`PLAN_WORK` elements touched, each revision's on :data:`REVISION_WORK` (see
:class:`lloptim.solvers.greedy.WorkBudget`), so the same run gives the same plans on an idle or a
loaded machine. The wall-clock limits (``time_limit_s``, ``revision_limit_s``) stay only as a
safety net, far above what the budgets take (the hybrid-plan variants on fleets had moved by a
few points with the machine's load while a revision had 0.05 s). A first plan by a MIP backend
(``solver="highs"``, ``"cbc"``...) is still limited by its wall clock.
"""

from __future__ import annotations

import time

import numpy as np

from lloptim.runtime.engine import FAILED, RUNNING, WAITING
from lloptim.runtime.policy import RunContext
from lloptim.runtime.request_schedulers import AssignedQueues

__all__ = ["RollingPlan", "RollingQueues", "BURST", "PLAN_WORK", "REVISION_WORK"]

#: Revise when the requests that arrived since the last plan reach this share of the planned,
#: unstarted ones (an arrival burst), even if no client has run dry.
BURST = 0.1

#: Work budget of the first plan's local search, elements touched (count; see
#: :class:`lloptim.solvers.greedy.WorkBudget`): about 1.5 s of numpy on an idle core (60-70
#: million elements a second), where the old wall-clock limit was 1 s. The first plan of 1,500
#: requests on a fleet of four instances touches about 4 million (0.06 s).
PLAN_WORK = 100_000_000

#: Work budget of each revision's local search, elements touched (count): 0.1-0.35 s on a loaded
#: 2-core machine (a revision's steps are small: 14-50 million elements a second), where the old
#: wall-clock limit was 0.05 s. Revisions under arrivals at 120-200 % load (GSM8K, heavy-tailed,
#: one instance or a fleet) touch at most about 1 million (``benchmarks/plan_budgets.py``).
REVISION_WORK = 5_000_000


class RollingPlan:
    """The bin-packing plan of the known, unstarted requests, revised as requests arrive.

    Parameters
    ----------
    solver
        Backend of :func:`lloptim.solvers.solve` for the first plan (``"greedy"``: LPT + local
        search); revisions always use the warm-started local search.
    time_limit_s
        Wall-clock safety net of the first plan, seconds: set far above what ``plan_work`` takes,
        so that it never decides (the time limit of the solve when ``solver`` is a MIP backend).
    revision_limit_s
        Wall-clock safety net of each revision's local search, seconds.
    burst
        Revise when the unplanned requests reach this share of the planned, unstarted ones
        (dimensionless).
    weights
        ``"work"``: :func:`~lloptim.work.request_work_s` (the paper's client-time at a typical
        step, linear in the output length); ``"bound"``: the client-seconds of the fleet bound,
        ``C_k`` times :func:`~lloptim.work.instance_seconds` (the KV term grows with the square of
        the output, and every coefficient is the instance's own, which matters on fleets of
        different instances and heavy-tailed lengths).
    plan_work, revision_work
        Work budgets of the first plan's and of each revision's local search, elements touched
        (counts; :data:`PLAN_WORK`, :data:`REVISION_WORK`): what stops a search that has not
        reached a local optimum, the same on any machine.

    Attributes
    ----------
    assignment
        ``(R,)`` global client planned for each request (int64; -1 while unplanned or started).
    revisions
        Plans made so far, the first included (count).
    revision_s
        Wall time of each plan, seconds.
    planned_makespan_s
        Largest ``release + load`` of the last plan, seconds from that plan's time.
    """

    def __init__(self, solver: str = "greedy", time_limit_s: float = 20.0, revision_limit_s: float = 2.0,
                 burst: float = BURST, weights: str = "work", plan_work: int = PLAN_WORK,
                 revision_work: int = REVISION_WORK) -> None:
        if weights not in ("work", "bound"):
            from lloptim.errors import SpecError

            raise SpecError("policy.weights", f"unknown plan weights {weights!r}", "use 'work' or 'bound'")
        self.weights = weights
        self.solver = solver
        self.time_limit_s = time_limit_s
        self.revision_limit_s = revision_limit_s
        self.burst = burst
        from lloptim.solvers import all_solvers

        if solver not in all_solvers():
            from lloptim.errors import SpecError

            # checked here, before any work: on a fleet the greedy first plan never calls the backend
            raise SpecError("policy.solver", f"unknown solver {solver!r}", f"use one of {sorted(all_solvers())}")
        for name, value in (("plan_work", plan_work), ("revision_work", revision_work)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                from lloptim.errors import SpecError

                example = PLAN_WORK if name == "plan_work" else REVISION_WORK
                raise SpecError(f"policy.{name}", f"must be a non-negative integer, got {value!r}",
                                f"give a count of elements touched, e.g. {example:_}")
        self.plan_work = int(plan_work)
        self.revision_work = int(revision_work)

    def setup(self, ctx: RunContext) -> None:
        """Start a run with nothing known.

        Parameters
        ----------
        ctx
            The run (problem, estimates, client states).
        """
        self.ctx = ctx
        n = ctx.problem.n_requests
        self.estimates = ctx.estimates
        self.assignment = np.full(n, -1, dtype=np.int64)
        self.known = np.zeros(n, dtype=bool)
        self.started = np.zeros(n, dtype=bool)
        self.unplanned: list[int] = []
        self.n_planned = 0                      # planned and not started
        self.holding: dict[int, tuple[int, float]] = {}  # client -> (request, handed out at)
        self.revisions = 0
        self.revision_s: list[float] = []
        self.planned_makespan_s = 0.0

    # -- events --------------------------------------------------------------------------------
    def on_ready(self, request: int, now: float) -> None:
        """``request`` became known (ready) at ``now`` seconds; it waits for the next revision.

        Parameters
        ----------
        request
            Row of the request.
        now
            Its ready time, seconds.
        """
        self.known[request] = True
        self.unplanned.append(request)

    def on_start(self, request: int, client: int, now: float) -> None:
        """``request`` was handed to ``client`` at ``now`` seconds.

        Parameters
        ----------
        request
            Row of the request.
        client
            Global index of the client.
        now
            Time it was handed out, seconds.
        """
        if self.assignment[request] >= 0:
            self.n_planned -= 1
        self.assignment[request] = -1
        self.started[request] = True
        self.holding[client] = (request, now)

    def on_finish(self, request: int, client: int) -> None:
        """``request`` finished on ``client``.

        Parameters
        ----------
        request
            Row of the request.
        client
            Global index of the client that served it.
        """
        if self.holding.get(client, (-1, 0.0))[0] == request:
            del self.holding[client]

    def on_requeue(self, request: int) -> None:
        """A fault took ``request`` back: it is unstarted again and waits for the next revision."""
        for c, (r, _) in list(self.holding.items()):
            if r == request:
                del self.holding[c]
        self.started[request] = False
        self.unplanned.append(request)

    # -- planning ------------------------------------------------------------------------------
    def due(self, client_dry: bool) -> bool:
        """Whether to revise now.

        Parameters
        ----------
        client_dry
            An idle client has nothing planned for it.
        """
        if not self.unplanned:
            return False
        if self.revisions == 0 or client_dry:
            return True
        return len(self.unplanned) >= self.burst * max(1, self.n_planned)

    def revise(self, now: float) -> np.ndarray:
        """Plan every known, unstarted request from ``now`` on; returns their rows.

        Parameters
        ----------
        now
            Current time, seconds (the clock of the instance asking).

        Returns
        -------
        numpy.ndarray
            Rows of the planned requests (int64), in row order; :attr:`assignment` holds their clients.
        """
        t0 = time.perf_counter()
        ctx = self.ctx
        problem = ctx.problem
        rows = np.flatnonzero(self.known & ~self.started)
        self.unplanned = []
        state = ctx.extra.get("client_state")
        alive = np.array([state is None or state[c] != FAILED for c in range(problem.n_clients)])
        if rows.size == 0 or not alive.any():
            self.n_planned = 0
            return rows
        W = self._weights(rows)
        release = self._release(now, rows)
        first = self.revisions == 0 and not np.any(release[alive] > 0) and alive.all()
        if first and self.weights == "work" and (self.solver != "greedy" or np.all(W == W[:, :1])):
            # the paper's offline plan, by the chosen backend (on a fleet of different instances the
            # greedy backend would also price every client by an LP nobody reads here: skip it)
            from lloptim.problem import Problem, Workload
            from lloptim.solvers import SolveParams, solve

            # the solve sees the known requests' prompts and weights (from their estimates) only:
            # no arrival time, and no true output length (each is given one token)
            known = Workload.from_arrays(problem.workload.prompt_tokens[rows], np.ones(rows.size, dtype=np.int64),
                                         name=problem.workload.name)
            sub = Problem(known, problem.instances, problem.name)
            params = SolveParams(time_limit_s=self.time_limit_s, solver_options={"start_work": self.plan_work})
            res = solve(sub, solver=self.solver, params=params, weights=W)
            ctx.extra["offline"] = res
            assignment = np.asarray(res.assignment, dtype=np.int64)
            makespan = float(res.primal_bound) if res.primal_bound is not None else float("nan")
        else:
            # the first plan gets the first plan's budget (it covers everything known at once)
            first_plan = self.revisions == 0
            assignment, makespan = self._pack(W, rows, release, alive,
                                              self.time_limit_s if first_plan else self.revision_limit_s,
                                              self.plan_work if first_plan else self.revision_work)
        self.assignment[rows] = assignment
        self.n_planned = int(rows.size)
        self.planned_makespan_s = makespan
        self.revisions += 1
        self.revision_s.append(time.perf_counter() - t0)
        return rows

    def _weights(self, rows: np.ndarray, held: np.ndarray | None = None) -> np.ndarray:
        """``(len(rows) [+ len(held)], m)`` client-seconds of ``rows`` (then ``held``) on each instance."""
        from lloptim.work import instance_seconds, request_work_s

        problem = self.ctx.problem
        both = rows if held is None else np.r_[rows, held]
        est = self.estimates[both]
        if self.weights == "bound":
            clients = np.array([i.clients for i in problem.instances], dtype=np.float64)
            return instance_seconds(problem, both, est) * clients[None, :]
        # the typical step is priced on the planned rows' means, so held requests share their scale
        return np.column_stack([request_work_s(problem, est, instance=k, rows=both)
                                for k in range(len(problem.instances))])

    def _release(self, now: float, rows: np.ndarray) -> np.ndarray:
        """Estimated seconds until each client is free of the request it holds (0 if idle)."""
        ctx = self.ctx
        release = np.zeros(ctx.problem.n_clients)
        if not self.holding:
            return release
        held = np.array([r for r, _ in self.holding.values()], dtype=np.int64)
        Wh = self._weights(rows, held)[rows.size:]
        state = ctx.extra.get("client_state")
        for (c, (r, since)), w in zip(self.holding.items(), Wh):
            if state is not None and state[c] not in (RUNNING, WAITING):
                continue
            release[c] = max(0.0, since + float(w[ctx.client_instance[c]]) - now)
        return release

    def _pack(self, W: np.ndarray, rows: np.ndarray, release: np.ndarray, alive: np.ndarray,
              time_limit_s: float, work_limit: int) -> tuple[np.ndarray, float]:
        """Warm-started LPT + local search with releases over the live clients; (assignment, makespan)."""
        from lloptim.formulations.binpacking import BinPackingData
        from lloptim.solvers.greedy import local_search, lpt

        ctx = self.ctx
        live = np.flatnonzero(alive)
        uniform = bool(np.all(W == W[:, :1]))
        data = BinPackingData(np.ascontiguousarray(W[:, :1] if uniform else W),
                              ctx.client_instance[live].astype(np.int64), uniform)
        local = np.full(ctx.problem.n_clients, -1, dtype=np.int64)
        local[live] = np.arange(live.size)
        rel = release[live]
        prev = self.assignment[rows]
        kept = (prev >= 0) & (local[np.maximum(prev, 0)] >= 0)
        start = np.where(kept, local[np.maximum(prev, 0)], -1)
        new = np.flatnonzero(~kept)
        if new.size:
            # the new requests go where they finish first, on top of the kept loads
            kept_rows = np.flatnonzero(kept)
            load = rel.copy()
            if kept_rows.size:
                np.add.at(load, start[kept_rows], data.request_weights_on(np.maximum(start, 0))[kept_rows])
            sub = BinPackingData(np.ascontiguousarray(data.inst_weights[new]), data.client_instance, uniform)
            start[new] = lpt(sub, release=load)
        a = local_search(data, start, time_limit_s=time_limit_s, release=rel, work_limit=work_limit)
        makespan = float((np.bincount(a, weights=data.request_weights_on(a), minlength=live.size) + rel).max())
        return live[a], makespan


class RollingQueues(AssignedQueues):
    """Per-client queues of a :class:`RollingPlan`, longest first, with optional stealing.

    Serves the plan like :class:`~lloptim.runtime.request_schedulers.AssignedQueues` (the paper's
    Algorithm 1 with ``steal=True``) and rebuilds the queues at every revision of the plan. A
    request is planned only after it is ready, so the plan never reads a request of the future.

    Parameters
    ----------
    plan
        The rolling plan (a fresh :class:`RollingPlan` by default).
    steal
        Let an idle client with an empty queue take a planned request of the client with the most
        queued work (see :class:`~lloptim.runtime.request_schedulers.AssignedQueues`).
    memory_aware
        Where the known requests can fill an instance's KV cache, serve the plan within the
        projected memory, in planned-start order (:meth:`_memory_request`; the hybrid's plan
        variants); elsewhere, and with False, longest first per client as the paper.
    start_delay
        Decode steps a handed-out request may wait for its prefill that the memory projection
        allows for (see :func:`~lloptim.runtime.memory_schedulers.admitted_set`).

    Attributes
    ----------
    arrivals_during_run
        Whether a request became ready after the first was handed out (the run is online).
    """

    def __init__(self, plan: RollingPlan | None = None, steal: bool = True, memory_aware: bool = False,
                 start_delay: int = 1) -> None:
        super().__init__(None, steal)
        self.plan = plan if plan is not None else RollingPlan()
        self.memory_aware = memory_aware
        self.start_delay = int(start_delay)

    def setup(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.plan.setup(ctx)
        from lloptim.runtime.memory_schedulers import UNKNOWN_PROJECTION, KnownMemory

        # where a cache can fill up (from the requests known so far), the plan is served within
        # the projected KV memory, in planned-start order (see :meth:`_memory_request`)
        self.known_memory = KnownMemory(ctx)
        self.est = np.asarray(ctx.estimates, dtype=np.float64)
        self.scale, self.over = (1.0, 0.0) if ctx.known_lengths else UNKNOWN_PROJECTION
        self.order_key: np.ndarray | None = None
        self._refused: tuple | None = None
        n_clients = ctx.problem.n_clients
        self.size = ctx.estimates.tolist()
        self.queues = [[] for _ in range(n_clients)]
        self.queued_work = np.zeros(n_clients)
        self.n_pending = 0
        self.steals = 0
        self.arrivals_during_run = False
        self.handed_out = False
        prec = ctx.problem.workload.precedence
        self.roots = None if prec is None else prec.in_degree() == 0

    def on_ready(self, request: int, now: float) -> None:
        if self.handed_out and (self.roots is None or self.roots[request]):
            self.arrivals_during_run = True
        self.plan.on_ready(request, now)
        self.known_memory.add(request)
        self.n_pending += 1

    def next_request(self, state, client: int) -> int | None:
        if self.plan.due(client_dry=not self.queues[client]):
            self._rebuild(state.now)
        if self.memory_aware and self.known_memory.binds[state.index]:
            r = self._memory_request(state, client)
        else:
            r = super().next_request(state, client)
        if r is not None:
            self.handed_out = True
            self.plan.on_start(r, client, state.now)
        return r

    def _memory_request(self, state, client: int) -> int | None:
        """The client's first planned request whose KV memory fits the instance's projection.

        The plan balances the clients' time only; served longest first, every client starts its
        longest request at once and the cache overflows into preemptions. Where the known requests
        can fill the cache, each queue is in planned-start order
        (:func:`~lloptim.runtime.memory_schedulers.planned_start_keys`, which spreads the starts
        of long requests) and a client takes its first request that keeps the projected memory
        (:class:`~lloptim.runtime.kv.ProjectedMemory`) within the cache; with none, a dry or
        blocked client steals the first fitting request of the other queues, most queued work
        first (stealing only from the fullest queue left 1-3 points on the memory benchmark), and
        waits if nothing fits (an empty instance always takes one). With unknown lengths the
        projection's headroom is the run's memory price
        (:meth:`~lloptim.runtime.lagrangian.LagrangianIterations.projection_scale`) when it has one.
        """
        from lloptim.runtime.kv import ProjectedMemory
        from lloptim.runtime.memory_schedulers import admitted_set

        if self.order_key is None:
            self._rebuild_queues()
        price = self.ctx.extra.get("memory_price")
        if price is not None and not self.ctx.known_lengths:
            self.scale = price.projection_scale(state)  # the priced headroom, as the sorted dispatch's
        key = (state.index, state.decode_steps, state.n_running, len(state.waiting), state.now, self.n_pending,
               None if self.steal else client)  # stealing: every client sees the same candidates
        if self._refused == key:
            return None  # nothing fitted a moment ago and nothing has changed since
        t, rem, floors = admitted_set(state, self.est, self.start_delay, self.scale, self.over)
        pm = ProjectedMemory(t, rem, state.kv_blocks, state.kv_block, floors)
        # candidates in order: the client's own queue, then (stealing) the others', most queued work first
        sources = [client]
        if self.steal:
            sources += [int(c) for c in np.argsort(-self.queued_work, kind="stable") if c != client and self.queues[c]]
        owner = np.fromiter((c for c in sources for _ in self.queues[c]), dtype=np.int64)
        if not owner.size:
            return None
        pos = np.fromiter((i for c in sources for i in range(len(self.queues[c]))), dtype=np.int64)
        rows = np.fromiter((r for c in sources for _, r in self.queues[c]), dtype=np.int64)
        tokens = self.ctx.problem.workload.prompt_tokens[rows]
        room = state.kv_blocks * state.kv_block
        steps = np.clip(np.maximum(np.ceil(self.scale * self.est[rows]).astype(np.int64), 1), 1,
                        np.maximum(room - tokens, 1)) + self.start_delay
        fl = np.asarray(state.engine.reserve_floor, dtype=np.int64)[rows] if state.kv_mode == "reserve" else None
        i = pm.first_fit(tokens, steps, fl)
        if i < 0:
            if pm.t.size:
                self._refused = key
                return None
            i = 0  # an empty instance always takes one
        src = int(owner[i])
        r = self.queues[src].pop(int(pos[i]))[1]
        self.queued_work[src] -= self.size[r]
        self.n_pending -= 1
        if src != client:
            self.steals += 1
        return int(r)

    def _rebuild(self, now: float) -> None:
        rows = self.plan.revise(now)
        self.queues = [[] for _ in self.queues]
        self.queued_work[:] = 0.0
        for r, c in zip(rows.tolist(), self.plan.assignment[rows].tolist()):
            self._enqueue(c, r)
        self.order_key = None
        if self.memory_aware and any(self.known_memory.binds):
            self._rebuild_queues()
        for q in self.queues:
            q.sort()

    def _rebuild_queues(self) -> None:
        """Re-sort every queue by planned start (memory can bind); planned over the known requests."""
        from lloptim.runtime.memory_schedulers import planned_start_keys

        known = np.flatnonzero(self.plan.known)
        n = self.ctx.problem.n_requests
        self.order_key = np.full(n, np.inf)
        self.order_key[known] = planned_start_keys(self.ctx, rows=None if known.size == n else known)[
            known if known.size == n else slice(None)]
        for i, q in enumerate(self.queues):
            self.queues[i] = sorted((float(self.order_key[r]), r) for _, r in q)

    def _enqueue(self, client: int, request: int) -> None:
        self.queues[client].append((-self.size[request], request))
        self.queued_work[client] += self.size[request]

    def on_finish(self, request: int, client: int, output_tokens: int, now: float) -> None:
        self.plan.on_finish(request, client)

    def requeue(self, request: int, now: float) -> None:
        self.plan.on_requeue(request)
        self.n_pending += 1

    def on_client_failed(self, client: int, now: float) -> None:
        orphans = [r for _, r in self.queues[client]]
        self.queues[client] = []
        self.queued_work[client] = 0.0
        if orphans:
            # replan them (and everything unstarted) at the next request for work
            for r in orphans:
                self.plan.assignment[r] = -1
                self.plan.unplanned.append(r)
            self.plan.n_planned -= len(orphans)
