"""Request schedulers: which client serves which request.

Every scheduler here holds only *ready* requests: the engine announces each request once, when it
becomes schedulable (:meth:`~lloptim.runtime.policy.RequestScheduler.on_ready`: at its arrival, or
when its last predecessor finishes), and the scheduler files it then. None reads an arrival time.

* :class:`RoundRobinQueues`: the paper's baseline; the ``i``-th request to become ready is dealt
  to client ``i mod C`` and never moves.
* :class:`GlobalQueue`: one shared queue, the first idle client takes the head (vLLM-style FCFS by
  ready time, shortest/longest estimated output first, or highest critical-path rank first).
* :class:`WorkflowQueue`: the hybrid's dispatch: one queue in the order of a precedence-aware plan
  of the workflows known so far (list scheduling by critical-path rank with forward-backward
  improvement, :mod:`lloptim.dag_plan`); longest first without precedence.
* :class:`AssignedQueues`: per-client queues from an offline assignment, each sorted longest
  first; with ``steal=True`` an idle client with an empty queue takes work from the client with
  the most queued work (the paper's Algorithm 1). Only ready requests that have not started move.

:func:`critical_path_rank` is the priority of ``GlobalQueue("rank")``: HEFT's upward rank in decode
steps, which is the estimated output length itself for requests without successors.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections import deque

import numpy as np

from lloptim.errors import SpecError
from lloptim.dag_plan import PLAN_WORK, REVISION_WORK, plan_workflows
from lloptim.runtime.engine import FAILED
from lloptim.runtime.policy import RequestScheduler, RunContext
from lloptim.work import request_work_s, typical_step_s

#: A binding chain's next request is handed only to an instance whose decode step for one request
#: is within this factor of the fastest instance's (1.02: within 2 %).
CHAIN_SPEED_TOLERANCE = 1.02
#: On a paced instance (one that carries a chain deciding the makespan), an idle client takes the
#: ready request that costs the chain least per token among those planned to start within this
#: many typical decode steps of the plan's next one (see :class:`WorkflowQueue`, *Co-runners*).
CORUNNER_WINDOW_STEPS = 20.0
#: While the known workflows have at most this many unfinished requests, every arrival re-plans
#: them all (count): a revision of 1,000 requests takes 3-10 ms, and on DAGs arriving faster than
#: they are served a full plan beats slotting new workflows in by rank (held-out seeds 31-35 of
#: ``benchmarks/workflows.py``: 2.32 -> 2.08 % above the bound at one workflow a second, 1.83 ->
#: 1.51 % at 1.5). Beyond it ``revise_fraction`` bounds the revisions' cost.
REPLAN_BELOW = 1000
#: Arrived work per second, as a fraction of the fleet's full rate, from which workflows arriving
#: over time count as an overload and the fleet is not paced (:meth:`WorkflowQueue.overloaded`).
OVERLOAD = 1.0
#: Standard normal quantile of the upper confidence bound on the arrival rate of work that
#: :meth:`WorkflowQueue.overloaded` compares with :data:`OVERLOAD` (1.0: one-sided 84 %).
OVERLOAD_CONFIDENCE = 1.0
#: While workflows arrive over time, a paced instance is not held to its limit when more requests
#: have waited a mean inter-arrival gap than the other instances have room for plus a whole
#: instance's clients, as long as the last arrival is less than this many mean inter-arrival gaps
#: ago (count; ``WorkflowQueue`` Notes, *A backlog while workflows arrive*). Under Poisson arrivals a longer silence has
#: probability ``exp(-2)``, about 14 %: the stream has likely ended, and the end is paced.
BACKLOG_LIVE_GAPS = 2.0
#: While workflow due dates are on (``WorkflowQueue(due_factor=...)``), the ready request heading
#: the longest chain goes first once that chain at full-batch steps takes this share of the
#: remaining work at the fleet's full rate (fraction; 1 without due dates). Requests promoted by
#: their due dates would otherwise delay the chains of the last workflows, which decide the
#: makespan: 0.6 cut the makespan cost of the due dates on ``benchmarks/workflows.py``'s online
#: DAGs from +0.39 to +0.14 points on average (training seeds 1-3; WorkflowQueue Notes, *Due dates*).
DUE_BINDING_SHARE = 0.6
#: The hybrid's default due factor (``hybrid_policy(due_factor=...)``; WorkflowQueue Notes, *Due
#: dates*): each workflow arriving over time is due 1.25 times the fleet's time to serve the work
#: known at its arrival after it. Chosen on ``benchmarks/workflow_latency.py``'s cases, seeds 0-5
#: (GSM8K DAGs) and 0-2 (``stress_flow``'s online DAGs): the makespan +0.09 point on average on the
#: GSM8K DAGs against +0.17 with 1 (+0.14 with 1.5), the p99 at or below Sarathi's on 20 of 24
#: GSM8K cases and all 9 stress cases (docs: workflows, *Latency under load*).
DUE_FACTOR = 1.25
#: On a fleet, the share of the running requests' decode progress (estimated decode steps they have
#: already run) that the chain rules take off the remaining work (fraction; ``WorkflowQueue`` Notes,
#: *Progress on a fleet*). The remaining work counts a request's whole estimate until it finishes,
#: which overstates it by about half a wave of requests at full batches: on 100 three-step chains
#: on 2 x 20 clients, seed 5, by 2.1 s at 4 s into the run, as long as the whole gap to the bound,
#: so the pacing saw the work and not the chain as binding and never paced. Counting all of the
#: progress makes the rules fire at the end, where the last steps of the short chains all look
#: binding against the little work left and the drain of the last wave is not counted (100 chains
#: 2.82 to 3.81 % above the bound, seeds 1-5 3.12 to 3.19 % over the seven chain fleets of
#: ``benchmarks/workflows.py --configs chains``); a share between 0.6 and 0.7 was best there (0.5:
#: 2.56 %, 0.6: 2.44 %, 0.7: 2.44 %, 0.8: 2.53 %; seeds 1-5, every case at or below its value
#: without), 0.6 chosen; on held-out seeds 400-404 2.66 to 2.20 %, no case worse (docs: workflows,
#: *The running requests' progress*, with the trade on mixed-fleet DAGs). Not on one instance (no
#: pacing there; the binding-chain rule with it took 30 fan-in workflows on 40 clients, seed 5,
#: from 3.27 to 4.33 %), not with workflows arriving over time, nor in the due dates (their factor
#: was chosen with the plain remaining work), nor where a request joins branches (``WorkflowQueue`` Notes).
PROGRESS_SHARE = 0.6
#: :meth:`WorkflowQueue.overloaded` reads the stream of workflows as ended, and the fleet may be
#: paced for its end, once no workflow has arrived for this many mean gaps between arrivals and
#: for :data:`ARRIVALS_ENDED_LONGEST` times the longest gap so far (count; under Poisson arrivals a
#: silence of 4 mean gaps has probability ``exp(-4)``, about 2 %, and 100 arrivals bring a couple:
#: the longest gap guards against them). The confidence bound alone falls slowly after the last
#: arrival: on ``stress_flow``'s online ``dag-fleet`` case, seed 0, it still read an overload 75 s
#: after it while the deciding chain ran at full batches (12.1 % above the bound against LPT's
#: 10.5 %; 8.2 % with this rule).
ARRIVALS_ENDED_GAPS = 4.0
#: See :data:`ARRIVALS_ENDED_GAPS` (factor of the longest gap between arrivals so far).
ARRIVALS_ENDED_LONGEST = 2.0

__all__ = ["RoundRobinQueues", "GlobalQueue", "WorkflowQueue", "AssignedQueues", "critical_path_rank", "heap_remove",
           "CHAIN_SPEED_TOLERANCE", "CORUNNER_WINDOW_STEPS", "REPLAN_BELOW", "OVERLOAD",
           "OVERLOAD_CONFIDENCE", "BACKLOG_LIVE_GAPS", "DUE_BINDING_SHARE", "DUE_FACTOR",
           "ARRIVALS_ENDED_GAPS", "ARRIVALS_ENDED_LONGEST", "PROGRESS_SHARE"]


def critical_path_rank(ctx: RunContext) -> np.ndarray:
    """Upward rank of each request (HEFT), in decode steps, from the run's estimated output lengths.

    ``rank_r = o_r + max_{r -> s} (handoff_s + rank_s)``: the estimated decode steps from ``r``'s
    first decode to the end of its workflow, along the longest chain of successors. A successor's
    *handoff* is what passing the work on costs before it decodes: its prefill iteration, in decode
    steps of a full instance (:func:`~lloptim.work.typical_step_s` of the fastest instance), plus
    one step of waiting for an iteration boundary. Requests without successors rank by their
    estimated output length alone, so dispatching by rank is the hybrid's longest-first dispatch
    wherever there is no precedence.

    Parameters
    ----------
    ctx
        The run: its problem (workload, instances) and its output-length estimates, tokens.

    Returns
    -------
    numpy.ndarray
        Rank of each request, decode steps (float64).
    """
    est = np.asarray(ctx.estimates, dtype=np.float64)
    w = ctx.problem.workload
    if w.precedence is None:
        return est
    mean_p, mean_o = float(w.prompt_tokens.mean()), float(est.mean())
    step, prefill = min(((typical_step_s(inst.profile.latency, inst.clients, mean_p, mean_o), inst.profile.latency)
                         for inst in ctx.problem.instances), key=lambda sp: sp[0])
    handoff = 1.0 + (prefill.prefill_base_s + prefill.prefill_per_token_s * w.prompt_tokens) / step
    return w.precedence.upward_rank(est, handoff)


class _PerClientQueues(RequestScheduler):
    """Shared mechanics of schedulers with one queue per client (ready requests only)."""

    def _init_queues(self, ctx: RunContext) -> None:
        self.queues: list = [deque() for _ in range(ctx.problem.n_clients)]
        self.n_pending = 0

    def pending(self) -> int:
        return self.n_pending

    def _pop_own(self, state, client: int) -> int | None:
        q = self.queues[client]
        if q:
            self.n_pending -= 1
            return q.popleft()
        return None

    def next_request(self, state, client: int) -> int | None:
        return self._pop_own(state, client)

    def _least_loaded_alive(self) -> int:
        state = self.ctx.extra["client_state"]
        alive = [c for c in range(len(self.queues)) if state[c] != FAILED]
        return min(alive, key=lambda c: len(self.queues[c])) if alive else 0

    def _enqueue(self, client: int, request: int) -> None:
        """Put ``request`` at the head of ``client``'s queue (it was due first)."""
        self.queues[client].appendleft(request)

    def requeue(self, request: int, now: float) -> None:
        self._enqueue(self._least_loaded_alive(), request)
        self.n_pending += 1

    def on_client_failed(self, client: int, now: float) -> None:
        orphans = self.queues[client]
        self.queues[client] = deque()
        while orphans:
            self._enqueue(self._least_loaded_alive(), orphans.pop())


class RoundRobinQueues(_PerClientQueues):
    """Deal requests, in the order they become ready, to live clients ``0, 1, ..., C-1, 0, ...``; no re-assignment."""

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        self._init_queues(ctx)
        self.turn = 0

    def on_ready(self, request: int, now: float) -> None:
        state = self.ctx.extra["client_state"]
        n = len(self.queues)
        for _ in range(n):
            c = self.turn % n
            self.turn += 1
            if state[c] != FAILED:
                break
        self.queues[c].append(request)
        self.n_pending += 1


def heap_remove(heap: list, item) -> None:
    """Remove ``item`` from the binary min-heap ``heap`` (a :mod:`heapq` list) in O(log n) after finding it.

    The last entry takes its place and sifts down or up. ``list.remove`` followed by
    ``heapq.heapify`` rebuilt the whole heap at every removal from its middle, O(n) each: on a
    fleet under overload, where the dispatch takes requests from deep in a queue of thousands,
    that was about 8 % of the hybrid's run (``benchmarks/scale.py --tools fleet-arrivals``, 10k
    requests). The heap holds the same entries either way, only in another list order.

    Parameters
    ----------
    heap
        The heap (modified in place).
    item
        An entry of it (``ValueError`` if absent).
    """
    i = heap.index(item)
    last = heap.pop()
    n = len(heap)
    if i == n:
        return
    # sift the last entry down from the hole at i (towards the smaller child) ...
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and heap[child + 1] < heap[child]:
            child += 1
        if not heap[child] < last:
            break
        heap[i] = heap[child]
        i = child
    # ... or up, when it is smaller than the parent of the hole
    while i > 0:
        parent = (i - 1) >> 1
        if not last < heap[parent]:
            break
        heap[i] = heap[parent]
        i = parent
    heap[i] = last


class GlobalQueue(RequestScheduler):
    """One queue for all clients; the first idle client takes the best ready request.

    Parameters
    ----------
    order
        ``"fcfs"`` (by ready time: arrival, or the finish that made it ready), ``"shortest"`` or
        ``"longest"`` (by estimated output length), or ``"rank"`` (highest
        :func:`critical_path_rank` first: longest first along the critical paths of workflows,
        the same as ``"longest"`` without precedence). Ties go to the lower row.
    plan
        Optional offline assignment (global client per request, or a callable of the run context):
        a request served by another client than planned counts as a preemptive re-assignment
        (:attr:`steals`).
    """

    ORDERS = ("fcfs", "shortest", "longest", "rank")

    def __init__(self, order: str = "fcfs", plan=None) -> None:
        if order not in self.ORDERS:
            raise ValueError(f"order must be one of {self.ORDERS}, not {order!r}")
        self.order = order
        self.plan = plan
        self.steals = 0

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        if self.order == "fcfs":
            key = None
        elif self.order == "shortest":
            key = ctx.estimates
        elif self.order == "longest":
            key = -ctx.estimates
        else:
            key = -critical_path_rank(ctx)
        n = ctx.problem.n_requests
        # fcfs files a request under its ready time, known at on_ready
        self.key = [0.0] * n if key is None else np.asarray(key, dtype=np.float64).tolist()
        self.ready: list[tuple[float, int]] = []
        self.n_pending = 0
        owner = self.plan(ctx) if callable(self.plan) else self.plan
        self.owner = None if owner is None else np.asarray(owner, dtype=np.int64).tolist()
        self.steals = 0

    def on_ready(self, request: int, now: float) -> None:
        if self.order == "fcfs":
            self.key[request] = now
        heapq.heappush(self.ready, (self.key[request], request))
        self.n_pending += 1

    def pending(self) -> int:
        return self.n_pending

    def next_request(self, state, client: int) -> int | None:
        if not self.ready:
            return None
        self.n_pending -= 1
        r = heapq.heappop(self.ready)[1]
        if self.owner is not None and self.owner[r] != client:
            self.steals += 1
        return r

    def requeue(self, request: int, now: float) -> None:
        heapq.heappush(self.ready, (self.key[request], request))
        self.n_pending += 1


class WorkflowQueue(GlobalQueue):
    """One queue of ready requests, in the order of a precedence-aware plan of the known workflows.

    The plan (:func:`~lloptim.dag_plan.plan_workflows`: list scheduling by upward rank, improved
    by forward-backward passes) covers every unfinished request of the workflows that have arrived
    (weakly connected components of the precedence DAG whose first requests became ready). It is
    made when the first requests become ready and revised as new workflows arrive (a rolling
    horizon): running requests keep their clients until their estimated finish, and requests
    waiting for a running predecessor until that finish. Small arrivals are slotted into the plan's
    order where a rank-ordered list scheduler would put them, and everything is re-planned once
    they add up (``revise_fraction``). A request's key is its planned
    start, and an idle client takes the ready request with the earliest key; requests without
    slack in the plan are listed in :attr:`critical`. The plan reads the
    DAG and the estimated lengths of arrived workflows and what this scheduler handed out, never
    an arrival time; so do the chain rules (the remaining work, the typical step and the rates
    are those of the arrived workflows): a workflow is known as a whole once its first request
    is ready, one that has not arrived is not read. Without precedence the order is longest estimated output first
    (:class:`GlobalQueue` ``"longest"``).

    Parameters
    ----------
    plan
        Optional offline assignment for counting re-assignments (see :class:`GlobalQueue`).
    time_limit_s
        Wall-clock safety net of the improvement passes of the first plan, seconds: far above what
        ``plan_work`` takes, so that the schedule does not depend on the machine's load.
    revision_limit_s
        The same for each revision when workflows arrive later, seconds.
    plan_work, revision_work
        Work budgets of the first plan and of each revision, job placements of the list scheduler
        (count; :func:`~lloptim.dag_plan.plan_workflows`): what stops the improvement passes, the
        same on any machine (default :data:`~lloptim.dag_plan.PLAN_WORK`,
        :data:`~lloptim.dag_plan.REVISION_WORK`).
    slack_steps
        A request with at most this slack in the plan, in decode steps of a full instance, is
        *critical* (:attr:`critical`): the Lagrangian iteration scheduler prefills it at once
        rather than keep it waiting for a larger prefill batch.
    replan_below
        Re-plan everything at every arrival while the known workflows have at most this many
        unfinished requests (count; default :data:`REPLAN_BELOW`): a revision then takes a few
        milliseconds, and slotting new workflows in by rank loses to a full plan under overload.
    revise_fraction
        Re-plan everything when the work of the workflows that arrived since the last full plan
        exceeds this fraction of the work that plan covered (fraction); below it, new workflows are
        slotted into the plan's order by their rank (0: re-plan at every arrival, which costs time
        in proportion to the backlog each time).
    pace
        The chain rules (Notes): a ready request heading a chain that decides the makespan is
        handed out first, to an instance that runs it fastest; on a fleet the instances that run
        long chains are paced (:meth:`batch_limit`): an idle client there takes work only while
        the instance runs fewer requests than its limit, so that the chain's decode steps stay
        fast and the other instances take the rest, and it takes the co-runner that slows the
        chain least.
    plan_paced
        With ``pace``: re-plan the unstarted requests on the clients the pacing leaves each
        instance whenever its limits change (Notes, *The plan sees the pacing*); False keeps the
        plan made for every client (the ablation).
    pace_scale
        With ``pace``: every paced limit is this multiple of the one the pacing computes (rounded
        up, between 1 and the instance's clients; fraction, default 1). A variant for a choice by
        simulation (:class:`~lloptim.runtime.order_choice.SimulatedWorkflowChoice`): no fixed
        scale is best on every fleet (docs: workflows, *what remains*).
    due_factor
        Workflow due dates for latency (Notes, *Due dates*): None or False (default here) serves
        the plan's order alone; a number ``f > 0`` makes each workflow due ``f`` times the fleet's
        time to serve the work known at its arrival after that arrival, and, once workflows arrive
        over time, an idle client takes a request by its planned start or by the latest start that
        meets its workflow's due date, whichever is earlier (1: the drain time of the backlog). The
        hybrid runs with :data:`DUE_FACTOR`.

    Notes
    -----
    **A binding chain first.** The ready request with the longest remaining chain (its
    estimated output plus its longest path of successors, tokens) goes before the planned order
    when that chain at full-batch steps takes at least as long as the remaining work at the
    fleet's full rate: the plan, made with work weights, may have given it slack it does not have.
    It goes only to an instance whose decode step for a lone request is within
    :data:`CHAIN_SPEED_TOLERANCE` of the fastest one's; and a slower instance leaves every request
    whose chain at its own full-batch steps would end after the remaining work at the fleet's rate
    (both unless no such fast instance has a live client).

    **Chain pacing.** A chain of ``S`` remaining decode steps (the running request's rest plus
    its longest path of successors, in estimated tokens) runs one step per iteration of its
    instance; an iteration with ``n`` requests takes ``a + n beta`` seconds (``a`` the decode
    base, ``beta`` a request's per-step cost at the mean context plus its prompt's prefill
    spread over its steps), so the chain needs ``S (a + n beta)``: a full batch stretches it by
    up to a third on LLaMA-65B. Every instance ``k`` is paced at once: for a horizon ``T`` it
    runs the largest batch ``n_k <= C_k`` with which its longest chain ``S_k`` ends by ``T``
    (``C_k`` when it runs none), then full batches; the limit is ``n_k`` at the least ``T`` with
    which the fleet completes the remaining work (bisection). With one chain and the other
    instances at full batches that is the least ``n`` with ``n S + (others' full rate) S (a + n
    beta)`` tokens covering the remaining work. It is the schedule the chain-coupling bound
    (:mod:`lloptim.bounds`) says the optimum must trade off.

    **Co-runners.** A paced instance completes few tokens beside its chain, each slowing every
    chain step it shares: its decode share and, spread over its output, its prompt's prefill
    (:attr:`token_cost`). Among the ready requests planned to start within
    :data:`CORUNNER_WINDOW_STEPS` typical steps of the plan's next one, an idle client of a paced
    instance takes the one of least cost: GSM8K *solve* steps (short prompt, long answer) rather
    than *verify* steps (a long prompt for a short verdict), which the other instances take. While
    an instance is paced, an idle client of an unpaced one takes, from the same window, the one of
    *most* cost, so that the cheap co-runners are still there when the paced instance has room.

    **The plan sees the pacing.** The plan's keys (planned starts) assume every client takes
    work; a paced instance runs only its limit of them, so a plan made for the whole fleet gives
    the other chains' middle and last steps slack they do not have: they wait for planned starts
    the fleet cannot keep, and their last steps form the tail of the run. While the fleet is
    paced and its limits differ from those the plan assumed, the unstarted requests are re-planned
    (a revision, as at an arrival) on the first ``limit`` clients of each instance (those free
    soonest), at most once per typical decode step, and back on every client once no instance is
    paced. Only while the known workflows have at most ``replan_below`` unfinished requests (a
    revision there takes milliseconds), and only with every workflow known from the start: with
    workflows arriving over time every arrival re-plans on all clients and the fleet is paced at
    the end only, where re-planning for the pacing measured neutral (45 online cases on 2 x 20
    clients: 0.773 % above the bound on average with it, 0.772 % without; fan-in at one workflow
    a second 0.83 against 0.74 %).

    **A backlog while workflows arrive.** The pacing weighs a chain against the work that has
    arrived; at a load near the fleet's rate (DAGs at 0.75 workflows a second on 2 x 20 clients)
    each arriving DAG's critical path is long next to that work, one instance is paced for most
    of the run, and ready requests pile up behind the limit (50-90 waiting), which lowers the
    fleet's rate below the arrivals'. So while workflows arrive over time, a paced instance's idle
    client takes work past its limit when more requests have waited at least a mean gap between
    arrivals (a backlog, not the burst of maps one fan-in brings) than the other live instances
    have room for below their limits plus a whole instance's clients, as long as the last arrival
    is less than :data:`BACKLOG_LIVE_GAPS` mean gaps ago (once the stream has likely ended, the
    end is paced as before). Only with arrivals over time, and only on a fleet (where pacing is).

    **The deciding chain.** Near the end of workflows arriving over time the remaining known work
    is small, and every chain of the last workflows looks binding. Only the chains that the paced
    horizon ``T`` cannot absorb decide the makespan: a binding chain's head goes past an
    instance's pacing limit only if the chain at full-batch steps would end after ``T``; other
    binding heads still go first, but only to an instance below its limit (otherwise they all
    gathered on the paced instance, whose chain then ran at a large batch: 0.2-1.5 % above the
    bound for chains arriving at one a second on 2 x 20 clients, against 0.05-0.25 % now). A
    deciding head of the workflow of the longest remaining chain (every branch into its join
    counts) goes to the instance where its steps are fastest: the first idle client to ask may
    be on an instance running a full batch while another runs a few requests, and that instance
    takes it at its next iteration boundary (:meth:`_faster_instance`; only once workflows arrive
    over time). Workflows arriving over time pace the fleet only once they do not keep it busy
    (:meth:`overloaded`).

    **Progress on a fleet.** The remaining work the chain rules weigh a chain against (the binding
    chain, the pacing, :meth:`decides_makespan`) counts each unfinished request at its whole
    estimate until it finishes, which overstates the work by the decode steps the running requests
    have already done: about half a wave of requests at full batches, as long as the whole gap to
    the bound on 100 chains on 2 x 20 clients (where the deciding chain and the rest of the work
    end together and the pacing, seeing the work as binding, never paced). On a fleet with every
    workflow known from the start, :data:`PROGRESS_SHARE` of that progress comes off the remaining
    work. Not all of it: near the end the last steps of the short chains then all look binding
    against the little work left, while the drain of the last wave (requests becoming ready only
    as their predecessors finish) is not counted. Not on one instance (no pacing there), not with
    workflows arriving over time (measured there: online DAGs on 2 x 20 clients at 0.75 a second
    1.89 to 2.06 % above the bound and the p99 latency 1.08 to 1.23 times Sarathi's, seeds 1-5),
    never in the due dates, and not where a request joins branches (fan-in, fan-out-then-join,
    layered DAGs): there the pacing the share lets fire held clients idle beside a wide map whose
    join waits for all of it (fan-outs of 16-32 on a 1x + 1.5x fleet at time 0, the lead's held-out
    ``stress_flow`` seeds 500-507: 5.56 to 8.02 % above the bound, up to 15.2 %; random DAGs 1.37
    to 1.03 %, not kept for the fan-out's risk).

    **Due dates** (``due_factor``; the hybrid's default is :data:`DUE_FACTOR`). The plan orders by
    makespan: a request with slack in it (a short last step, a branch off the critical path) is
    planned late, and while workflows keep arriving each revision plans the new workflows'
    critical paths ahead of it, so under load it waits until the arrivals stop (DAGs at 200 %
    load: p99 latency 1.2x Sarathi's, the p99 made by short last steps of early workflows that
    waited 110-120 s once ready). With due dates, a workflow arriving at ``a`` is due at ``a + f H``, ``H`` the known work's
    estimated decode steps over the fleet's full rate once it is known (the time the fleet needs
    to serve what it has been given), and a request's key is the earlier of its planned start and
    its latest start for that due date (the due date less its remaining chain, its estimated
    output and longest path of successors, at full-batch steps): earliest deadline first, where
    the plan's order counts as a deadline too. Only once a workflow arrives after the first plan
    (with every workflow known at the start the run is one batch, and its latency is the
    makespan's business), and then for every known workflow. The promoted requests would
    otherwise delay the last workflows' chains, which decide the makespan, so the longest chain's
    head goes first from :data:`DUE_BINDING_SHARE` of the remaining work on (rather than all of
    it). Reads only arrivals that happened (when each workflow's first requests became ready) and
    the work of known workflows.

    Attributes
    ----------
    token_cost
        Seconds each request adds to a chain's decode step per token it completes beside it, on
        the instance whose lone step is fastest (list, one per row; set when workflows are known).
    """

    def __init__(self, plan=None, time_limit_s: float = 20.0, revision_limit_s: float = 2.0,
                 slack_steps: float = 2.0, revise_fraction: float = 0.1, pace: bool = True,
                 replan_below: int = REPLAN_BELOW, plan_paced: bool = True, plan_work: int = PLAN_WORK,
                 revision_work: int = REVISION_WORK, pace_scale: float = 1.0,
                 due_factor: float | None = None) -> None:
        super().__init__("longest", plan)
        if due_factor is False:
            due_factor = None  # off (``-o due_factor=false`` on the command line)
        if due_factor is not None and not (isinstance(due_factor, (int, float)) and not isinstance(due_factor, bool)
                                           and np.isfinite(due_factor) and due_factor > 0):
            raise SpecError("policy.hybrid.due_factor",
                            f"must be a finite number > 0, or None / false (off), not {due_factor!r}",
                            f"{DUE_FACTOR:g} (the hybrid's default) makes each workflow due after {DUE_FACTOR:g} times "
                            "the time the fleet needs for the work known at its arrival; false orders by the plan "
                            "alone")
        self.due_factor = None if due_factor is None else float(due_factor)
        if not (isinstance(pace_scale, (int, float)) and not isinstance(pace_scale, bool)
                and np.isfinite(pace_scale) and pace_scale > 0):
            raise SpecError("policy.hybrid.pace_scale", f"must be a finite number > 0, not {pace_scale!r}",
                            "1 keeps the computed chain pacing; 0.8 paces 20 % tighter, 1.2 looser")
        self.pace = bool(pace)
        self.pace_scale = float(pace_scale)
        self.plan_paced = bool(plan_paced)
        self.time_limit_s = time_limit_s
        self.revision_limit_s = revision_limit_s
        self.plan_work = int(plan_work)
        self.revision_work = int(revision_work)
        self.slack_steps = slack_steps
        self.revise_fraction = revise_fraction
        self.replan_below = int(replan_below)
        #: Requests with at most ``slack_steps`` decode steps of slack in the current plan (rows;
        #: updated in place at every revision): an iteration scheduler should not keep them waiting.
        self.critical: set[int] = set()

    def setup(self, ctx: RunContext) -> None:
        for name in ("on_ready", "next_request", "requeue", "on_finish"):
            self.__dict__.pop(name, None)  # a previous run without precedence bound them
        super().setup(ctx)
        prec = ctx.problem.workload.precedence
        self.dag = prec
        self._deferred_to: set[int] = set()  # instances a binding chain's head was left for
        self._deferred_now: int | None = None  # the one the current call left it for
        # an idle client asking at a moment nothing has changed since the last refusal is refused
        # at once (:meth:`_moment`): the version counts every change of this queue's state
        self._version = 0
        self._limits_version = 0  # counts the pacing cache's refills (:meth:`_pacing`)
        #: Whether the pacing ever asked an instance for a batch below its clients in this run
        #: (before rounding up; if not, no ``pace_scale`` or ``plan_paced`` changes the run).
        self.ever_paced = False
        self._chains: dict[int, tuple] = {}  # instance -> (its moment, (longest chain, progress)): :meth:`_load`
        self._states: list | None = None  # the engine's instances, once an idle client has asked (:meth:`_left_work`)
        # (moment, instance deferred to, clocks if read) of the last refusal (:meth:`next_request`)
        self._refused: tuple = (None, None, None)
        self._clocks_read = False  # whether the current call read other instances' clocks
        self.plans = 0
        if prec is None:
            # independent requests: exactly GlobalQueue("longest"), without the indirection per
            # call (unless a subclass overrides the hook)
            for name in ("on_ready", "next_request", "requeue", "on_finish"):
                if getattr(type(self), name) is getattr(WorkflowQueue, name):
                    setattr(self, name, getattr(super(), name))
            return
        n = ctx.problem.n_requests
        self.component = prec.workflows()
        order = np.argsort(self.component, kind="stable")
        bounds = np.searchsorted(self.component[order], np.arange(self.component.max() + 2))
        self.members = [order[bounds[k]:bounds[k + 1]] for k in range(bounds.size - 1)]
        # client-seconds of each request on each instance, priced when its workflow becomes known
        # (:meth:`_learn`, at the typical step of the requests known then: never one not arrived)
        self.weights = np.full((n, len(ctx.problem.instances)), np.nan)
        self.preds = prec.predecessors()
        # the progress share only where no request joins branches (chains, out-trees): Notes,
        # *Progress on a fleet*
        self._progress_joins = any(len(p) > 1 for p in self.preds)
        self.key = [np.inf] * n
        self.known: set[int] = set()        # workflows (components) in the plan
        self.arrived: set[int] = set()      # workflows whose first requests are ready
        self._unfiled: list[int] = []       # ready requests of workflows not planned yet (in no heap)
        self.waiting: set[int] = set()      # ready requests not handed out
        self.running: dict[int, tuple[int, float]] = {}  # handed out, unfinished: client, when
        self.finished = np.zeros(n, dtype=bool)
        self.batch_time = 0.0
        self.fastest = np.full(n, np.nan)
        self.planned_work = 0.0
        self.appended_work = 0.0
        self.plan_keys = np.zeros(0)
        self.plan_suffix_rank = np.zeros(0)
        self.plan_end = 0.0
        # chain pacing: estimated decode steps of each request and of its longest path of successors
        self.est_steps = np.maximum(np.ceil(np.asarray(ctx.estimates, dtype=np.float64)), 1.0)
        self.tail_steps = prec.tails(self.est_steps)
        self.chain_steps = self.est_steps + self.tail_steps
        # for scalar reads
        self._est_list, self._tail_list = self.est_steps.tolist(), self.tail_steps.tolist()
        self._neg_chain_list = (-self.chain_steps).tolist()
        self.by_chain: list[tuple[float, int]] = []  # (-chain steps, row) of ready requests, lazily pruned
        # the typical step and the pacing rates come from the workflows known so far (never one that
        # has not arrived): sums of prompts, estimates and steps of their requests, count
        self.known_sums = np.zeros(4)
        self.left_steps = 0.0  # estimated decode steps of the unfinished requests of known workflows
        self.left_requests = 0  # unfinished requests of known workflows (count)
        self.step_s = self.full_step_s = self.fleet_rate = 0.0
        self.step_cost: list[tuple[float, float, int]] = []
        self.chain_fast = [True] * len(ctx.problem.instances)  # instances that run a chain fastest
        self.step_full = [np.inf] * len(ctx.problem.instances)  # a full batch's step on each, seconds
        self.token_cost: list[float] = []  # chain seconds per step of each request as a co-runner
        self._token_costs: dict[int, list[float]] = {}  # token_cost with each instance's latency, by instance
        self._limits: tuple | None = None  # (when, limits, horizon T in seconds) of the last pacing
        self._pace_horizon_s = 0.0  # the horizon T of the pacing just asked for, seconds (0: none paced)
        self.open_chains: list[tuple[float, int]] = []  # (-chain steps, row) of unfinished known rows, lazily pruned
        #: Whether a workflow arrived after the first plan (workflows arrive over time).
        self.open_arrivals = False
        self.first_arrival_s = 0.0  # when the first workflow was planned, seconds
        # the arrival stream: estimated decode steps of the workflows known in the first plan and of
        # those that arrived after it, and the sum of squares of every known workflow's steps
        self.first_work = self.later_work = self.work_squares = 0.0
        self.arrivals = 0  # workflows known (count), for the mean gap between arrivals
        self.ready_s = [0.0] * n  # when each request last became ready, seconds
        self.last_arrival_s = 0.0  # when the last workflow was planned, seconds
        self.longest_gap_s = 0.0  # the longest time between two plannings of new workflows, seconds
        #: Clients per instance the current plan was made on (None: every client; class Notes,
        #: *The plan sees the pacing*).
        self.plan_limits: tuple[int, ...] | None = None
        self._paced_plan_s = -np.inf  # when the plan was last re-made for new pacing limits, seconds
        # due dates (class Notes, *Due dates*): each workflow's, seconds, and each request's planned start
        self.due_s = np.full(len(self.members), np.inf)
        self.plan_start = np.full(n, np.inf)
        #: Whether keys are due-date capped (``due_factor`` set and workflows arrive over time).
        self.due_on = False

    def _learn(self, rows: np.ndarray) -> None:
        """The requests ``rows`` of newly known workflows: their work and the typical step of the known ones.

        The typical step (:func:`~lloptim.work.typical_step_s` of the fastest instance at the mean
        prompt and estimate) sets the slack of :attr:`critical`; a co-runner's cost per decode step
        of a chain (its own decode share at the mean context and its prompt's prefill, which runs
        on the chain's clock, spread over its steps) sets the chain rules (class Notes).
        """
        w = self.ctx.problem.workload
        self.left_steps += float(self.est_steps[rows][~self.finished[rows]].sum())
        for r in rows[~self.finished[rows]].tolist():
            heapq.heappush(self.open_chains, (-self.chain_steps[r], r))
        self.left_requests += int(np.count_nonzero(~self.finished[rows]))
        self.known_sums += (float(w.prompt_tokens[rows].sum()), float(np.sum(self.ctx.estimates[rows])),
                            float(self.est_steps[rows].sum()), rows.size)
        if self.known_sums[3] == w.prompt_tokens.size:  # every workflow known (all at the start): exact means
            prompt, estimate = float(w.prompt_tokens.mean()), float(np.mean(self.ctx.estimates))
            output = float(self.est_steps.mean())
        else:
            prompt, estimate, output = (float(x) for x in self.known_sums[:3] / self.known_sums[3])
        insts = self.ctx.problem.instances
        est = np.asarray(self.ctx.estimates)[rows]
        for i in range(len(insts)):
            self.weights[rows, i] = request_work_s(self.ctx.problem, est, instance=i, rows=rows,
                                                   means=(prompt, estimate))
        self.fastest[rows] = self.weights[rows].min(axis=1)
        self.step_s = min(typical_step_s(inst.profile.latency, inst.clients, prompt, estimate) for inst in insts)
        self.step_cost = []
        for inst in insts:
            lat = inst.profile.latency
            beta = (lat.decode_per_seq_s + lat.decode_per_kv_token_s * (prompt + output / 2.0)
                    + lat.prefill_per_token_s * prompt / output)
            self.step_cost.append((lat.decode_base_s, beta, inst.clients))
        self.full_step_s = min(a + beta * c for a, beta, c in self.step_cost)
        # a chain's step alone on each instance: a binding chain runs only where it is (nearly) fastest
        alone = np.array([inst.profile.latency.decode_time(1, prompt + output / 2.0) for inst in insts])
        self.chain_fast = (alone <= CHAIN_SPEED_TOLERANCE * alone.min()).tolist()
        self.step_full = [a + beta * c for a, beta, c in self.step_cost]
        # a co-runner's cost to a chain per step: its decode share and its prompt spread over its steps
        # (one list per instance that can be the fastest: the means move it only between instances)
        k = min(range(len(insts)), key=lambda i: insts[i].profile.latency.decode_time(1, prompt + output / 2.0))
        if k not in self._token_costs:
            lat = insts[k].profile.latency
            p = w.prompt_tokens.astype(np.float64)
            self._token_costs[k] = (lat.decode_per_seq_s + lat.decode_per_kv_token_s * (p + self.est_steps / 2.0)
                                    + lat.prefill_per_token_s * p / self.est_steps).tolist()
        self.token_cost = self._token_costs[k]
        self.fleet_rate = sum(c / (a + beta * c) for a, beta, c in self.step_cost)  # tokens per second

    def on_ready(self, request: int, now: float) -> None:
        if self.dag is None:
            super().on_ready(request, now)
            return
        self._version += 1
        self.waiting.add(request)
        self.ready_s[request] = now
        self.n_pending += 1
        comp = int(self.component[request])
        if comp in self.known:
            heapq.heappush(self.ready, (self.key[request], request))
            heapq.heappush(self.by_chain, (-self.chain_steps[request], request))
        else:
            self.arrived.add(comp)
            self._unfiled.append(request)
            self.batch_time = now

    def _replan(self) -> None:
        """Plan the workflows that arrived: all unfinished work again, or the new workflows after it.

        A full revision re-plans every unstarted request of the known workflows from now on
        (running requests hold their clients until their estimated finish). When the newly
        arrived work is small next to what the last full plan covered (less than
        ``revise_fraction`` of it, counting every workflow slotted in since), the new requests are
        slotted into the plan's order by rank, at a cost in proportion to them alone.
        """
        self._version += 1
        now = self.batch_time
        new = sorted(self.arrived - self.known)
        self.arrivals += len(new)
        if self.known:
            self.longest_gap_s = max(self.longest_gap_s, now - self.last_arrival_s)
        self.last_arrival_s = now
        self.arrived = set()
        first = not self.known
        self.open_arrivals = self.open_arrivals or not first
        if first:
            self.first_arrival_s = now
        self.known.update(new)
        new_rows = np.concatenate([self.members[k] for k in new])
        work = np.array([self.est_steps[self.members[k]].sum() for k in new])
        if first:
            self.first_work += float(work.sum())
        else:
            self.later_work += float(work.sum())
        self.work_squares += float(np.dot(work, work))
        self._learn(new_rows)
        new_work = float(self.fastest[new_rows].sum())
        full = first or self.appended_work + new_work > self.revise_fraction * self.planned_work \
            or self.left_requests <= self.replan_below
        if full:
            self._plan_all(now, first)
        else:
            self._append(now, new_rows)
            self.appended_work += new_work
        self.plans += 1
        if self.due_factor is not None:
            self.due_s[new] = now + self.due_factor * self._horizon_s(progress=False)
            if self.open_arrivals:
                self._key_by_due_dates()
        # the same lists as [(key[r], r) for r in waiting], built in C: the backlog can hold thousands
        waiting = self.waiting
        self.ready = list(zip(map(self.key.__getitem__, waiting), waiting))
        heapq.heapify(self.ready)
        if full:
            self.by_chain = list(zip(map(self._neg_chain_list.__getitem__, waiting), waiting))
            heapq.heapify(self.by_chain)
        else:
            # chains never change and the heap is read only by _binding_chain, which first drops
            # requests no longer waiting from its top: filing the new requests answers as a rebuild
            for r in self._unfiled:
                if r in waiting:
                    heapq.heappush(self.by_chain, (self._neg_chain_list[r], r))
        self._unfiled = []

    def _plan_all(self, now: float, first: bool, limits: tuple[int, ...] | None = None) -> None:
        """Re-plan every unstarted request of the known workflows from ``now``.

        With ``limits`` (clients per instance) the plan uses only that many clients of each
        instance, those free soonest (class Notes, *The plan sees the pacing*); None: every client.
        """
        self.plan_limits = limits
        rows = np.concatenate([self.members[k] for k in sorted(self.known)])
        rows = rows[~self.finished[rows]]
        rows = rows[[r not in self.running for r in rows.tolist()]]
        if rows.size == 0:
            return
        kinds = self.ctx.client_instance
        free = np.full(kinds.size, now)
        expected = {}
        for r, (c, t0) in self.running.items():
            expected[r] = max(now, t0 + float(self.weights[r, kinds[c] if self.weights.shape[1] > 1 else 0]))
            free[c] = max(free[c], expected[r])
        release = np.array([max([now] + [expected[q] for q in self.preds[r] if q in expected]) for r in rows.tolist()])
        self.critical.clear()
        clients = None
        if limits is not None:
            # a paced instance plans on its clients free soonest: those running requests first
            clients = np.sort(np.concatenate([
                cl[np.argsort(free[cl], kind="stable")[:max(n, 1)]]
                for cl, n in zip((np.flatnonzero(kinds == k) for k in range(len(limits))), limits)]))
        self._plan(rows, release, free, self.time_limit_s if first else self.revision_limit_s, first, clients,
                   work=self.plan_work if first else self.revision_work)
        self.planned_work = float(self.fastest[rows].sum())
        self.appended_work = 0.0

    def _append(self, now: float, rows: np.ndarray) -> None:
        """Slot new workflows into the plan's order where a rank-ordered list scheduler would put them.

        A free client takes the ready request of highest upward rank, so a new request goes ahead
        of every planned request that it outranks and that is not followed by one it does not:
        its key is the first planned start from which all planned requests rank below it.
        """
        sub = self.dag.subset(rows)
        rank = self.fastest[rows] if sub is None else sub.upward_rank(self.fastest[rows])
        keys, suffix_rank = self.plan_keys, self.plan_suffix_rank
        # suffix_rank is non-increasing: the first position whose later requests all rank below
        pos = np.searchsorted(-suffix_rank, -rank, side="right")
        at = np.where(pos < keys.size, keys[np.minimum(pos, keys.size - 1)], self.plan_end)
        at = np.maximum(at, now)
        for r, k in zip(rows.tolist(), at.tolist()):
            self.key[r] = k
        self.plan_start[rows] = at

    def _key_by_due_dates(self) -> None:
        """Key every unfinished request of the known workflows by the earlier of its planned and its latest start.

        The latest start meets its workflow's due date: the due date less the request's remaining
        chain (estimated output and longest path of successors) at full-batch decode steps (class
        Notes, *Due dates*). The caller rebuilds the ready heap.
        """
        self.due_on = True
        rows = np.concatenate([self.members[k] for k in sorted(self.known)])
        rows = rows[~self.finished[rows]]
        latest = self.due_s[self.component[rows]] - self.chain_steps[rows] * self.full_step_s
        key = self.key
        for r, k in zip(rows.tolist(), np.minimum(self.plan_start[rows], latest).tolist()):
            key[r] = k

    def _plan(self, rows: np.ndarray, release: np.ndarray, free: np.ndarray, limit: float, exact: bool,
              clients: np.ndarray | None = None, work: int | None = None) -> None:
        """Plan ``rows`` from ``free`` (per client) and ``release`` on ``clients`` (default all); set keys, critical rows."""
        kinds = self.ctx.client_instance
        if clients is not None:
            kinds, free = kinds[clients], free[clients]
        sub = self.dag.subset(rows)
        plan = plan_workflows(sub, self.weights[rows], kinds, release=release, machine_free=free,
                              time_limit_s=limit, exact=exact, work_limit=work)
        for r, start in zip(rows.tolist(), plan.start_s.tolist()):
            self.key[r] = start
        self.plan_start[rows] = plan.start_s
        # requests without slack in the plan: delaying one of them delays the plan's makespan
        fastest = self.fastest[rows]
        rank = fastest if sub is None else sub.upward_rank(fastest)
        latest = plan.makespan_s - rank
        self.critical.update(rows[latest - plan.start_s <= self.slack_steps * self.step_s].tolist())
        # the plan's order and ranks, for slotting in workflows that arrive before the next revision
        order = np.argsort(plan.start_s, kind="stable")
        self.plan_keys = plan.start_s[order]
        self.plan_suffix_rank = np.maximum.accumulate(rank[order][::-1])[::-1]
        self.plan_end = plan.makespan_s

    def _binding_chain(self) -> int | None:
        """The ready request that heads the longest remaining chain, if that chain decides the makespan.

        It does when the chain at full-batch steps takes at least as long as the remaining work at
        the fleet's full rate (class Notes; :data:`DUE_BINDING_SHARE` of it while due dates are on);
        such a request is handed out before any planned order.
        """
        heap = self.by_chain
        while heap and heap[0][1] not in self.waiting:
            heapq.heappop(heap)
        if not heap:
            return None
        r = heap[0][1]
        share = DUE_BINDING_SHARE if self.due_on else 1.0
        return r if -heap[0][0] * self.full_step_s >= share * self._horizon_s() else None

    def decides_makespan(self, request: int) -> bool:
        """Whether ``request`` heads a chain that decides the makespan (class Notes, *A binding chain first*).

        Its estimated remaining chain (its output and its longest path of successors) at
        full-batch steps takes at least as long as the remaining work of the known workflows at
        the fleet's full rate. An iteration scheduler should then start its decode as early as it
        can (:class:`~lloptim.runtime.lagrangian.LagrangianIterations` gives its prompt a prefill
        iteration of its own rather than a chunk in a decode). False without precedence or pacing.

        Parameters
        ----------
        request
            Row of a request that is ready (queued or handed out).
        """
        if self.dag is None or not self.pace:
            return False
        return bool(self.chain_steps[request] * self.full_step_s >= self._horizon_s())

    def overloaded(self, now: float) -> bool:
        """Whether workflows arriving over time may keep the fleet busy: the chain pacing is then off.

        Pacing pays only at the end of the arrivals, where the last workflows' chains decide the
        makespan; while work arrives as fast as the fleet serves it, the clients it leaves idle are
        capacity the coming work needs, and the remaining work it weighs a chain against is only
        what has arrived. So the fleet is paced only once the arrivals so far show, with
        confidence, a load below its full rate: this is True unless an upper confidence bound of
        the rate of arriving work stays below :data:`OVERLOAD` times the fleet's full rate.

        The bound (no foresight: only workflows that have arrived are read): the work ``W``
        (estimated decode steps) of the workflows that arrived after the first plan, over the
        time ``e`` since it (the first plan's workflows start the clock and are not counted, which
        would bias the rate up by one batch per elapsed time: fan-in at one workflow a second read
        as an overload over its first arrivals). Workflows arrive as a Poisson process and their
        work varies, so ``W`` is a compound Poisson sum of variance ``lambda e E[w^2]``; in units
        of ``u = E[w^2] / E[w]`` (moments over the known workflows) it is a Poisson count ``n =
        W / u``, whose score bound gives the rate ``(n + z^2/2 + z sqrt(n + z^2/4)) u / e``, ``z``
        = :data:`OVERLOAD_CONFIDENCE`. Few arrivals give a wide bound, so the answer stays True
        until the evidence says otherwise, and a measured load near the full rate (DAGs at one
        workflow a second are about 1.0) stays True rather than flipping with each arrival;
        after the last arrival the bound falls as time passes without arrivals, and the pacing
        returns for the end. That fall is slow (a minute and more after the last of 60 workflows
        at 150 % load), so the stream is also read as ended once no workflow has arrived for
        :data:`ARRIVALS_ENDED_GAPS` mean gaps between arrivals and
        :data:`ARRIVALS_ENDED_LONGEST` times the longest gap so far (False then). False when
        every workflow arrived at once.

        Parameters
        ----------
        now
            The current time, seconds.
        """
        if not self.open_arrivals or self.fleet_rate <= 0.0:
            return False
        if self.arrivals >= 2:
            gap = (self.last_arrival_s - self.first_arrival_s) / (self.arrivals - 1)
            if now - self.last_arrival_s > max(ARRIVALS_ENDED_GAPS * gap, ARRIVALS_ENDED_LONGEST * self.longest_gap_s):
                return False  # the stream has likely ended: the end is paced
        elapsed = now - self.first_arrival_s
        if elapsed <= 0.0:
            return True
        unit = self.work_squares / (self.first_work + self.later_work)  # E[w^2] / E[w], steps
        n = self.later_work / unit
        z = OVERLOAD_CONFIDENCE
        upper = (n + z * z / 2.0 + z * np.sqrt(n + z * z / 4.0)) * unit / elapsed  # steps per second
        return bool(upper >= OVERLOAD * self.fleet_rate)

    def _horizon_s(self, progress: bool = True) -> float:
        """The remaining work of the known workflows at the fleet's full rate, seconds.

        Parameters
        ----------
        progress
            On a fleet, take :data:`PROGRESS_SHARE` of the running requests' decode progress off
            the remaining work (class Notes, *Progress on a fleet*); False: every unfinished
            request at its whole estimate.
        """
        return self._left_work(progress) / self.fleet_rate if self.fleet_rate > 0 else 0.0

    def _left_work(self, progress: bool = True) -> float:
        """Estimated decode steps left of the known workflows (:meth:`_horizon_s`), steps."""
        if not progress or len(self.step_cost) < 2 or self.open_arrivals or self._states is None \
                or self._progress_joins:
            return self.left_steps
        done = sum(self._load(st)[1] for st in self._states)
        return max(self.left_steps - PROGRESS_SHARE * done, 0.0)

    def _cheapest_co_runner(self, state, client: int, too_long: float, dearest: bool = False) -> int | None:
        """For a paced instance: the ready request among those planned to start next that costs its chain least.

        The candidates are the ready requests whose planned start is within
        :data:`CORUNNER_WINDOW_STEPS` typical steps of the earliest (and whose chain is shorter than
        ``too_long`` steps); the pick has the least :attr:`token_cost` (ties: planned start, row),
        or with ``dearest`` (an unpaced instance while another is paced) the most. None when there
        is none.
        """
        taken: list[tuple[float, int]] = []
        until = np.inf
        while self.ready:
            key, r = self.ready[0]
            if r not in self.waiting or key != self.key[r]:
                heapq.heappop(self.ready)  # stale
                continue
            if key > until:
                break
            if until == np.inf:
                until = key + CORUNNER_WINDOW_STEPS * self.step_s
            taken.append(heapq.heappop(self.ready))
        sign = -1.0 if dearest else 1.0
        fits = [(sign * self.token_cost[r], key, r) for key, r in taken if self.chain_steps[r] < too_long]
        best = min(fits)[2] if fits else None
        for item in taken:
            if item[1] != best:
                heapq.heappush(self.ready, item)
        return None if best is None else self._hand_out(best, client, state.now)

    def _hand_out(self, r: int, client: int, now: float) -> int:
        """Book ``r`` as handed to ``client`` at ``now``; returns ``r``."""
        self._version += 1
        self.waiting.discard(r)
        self.running[r] = (client, now)
        self.n_pending -= 1
        if self.owner is not None and self.owner[r] != client:
            self.steals += 1
        return r

    def _fast_instance_alive(self) -> bool:
        """Whether an instance that runs chains fastest (:data:`CHAIN_SPEED_TOLERANCE`) has a live client."""
        state = self.ctx.extra.get("client_state")
        kinds = self.ctx.client_instance
        return state is None or any(self.chain_fast[kinds[c]] and state[c] != FAILED for c in range(len(kinds)))

    def batch_limit(self, state) -> int:
        """Most requests ``state``'s instance should run while it carries a long chain (class Notes), count.

        Parameters
        ----------
        state
            The instance (:class:`~lloptim.runtime.engine.InstanceState`).

        Returns
        -------
        int
            The limit, requests; the instance's clients when no chain decides the makespan.
        """
        return self._pacing(state)

    def _held(self, state):
        """The requests ``state``'s instance runs or prefills, each with its estimated decode steps left (at least 1)."""
        engine = state.engine
        est, idle, waiting = self._est_list, state.idle, state.waiting
        request, start = engine.client_request, engine.client_start_step
        for c in state.clients:
            r = int(request[c])
            if r < 0 or c in idle:
                continue
            done = state.decode_steps - start[c] if c not in waiting else 0
            yield r, max(est[r] - done, 1.0)

    def _longest_chain(self, state) -> float:
        """Estimated decode steps left of the longest chain running on ``state``'s instance (0: none)."""
        return self._load(state)[0]

    def _load(self, state) -> tuple[float, float]:
        """``state``'s instance: its longest running chain and its requests' decode progress, estimated steps.

        The longest chain: the estimated steps left of a request it holds plus its longest path of
        successors (0: none). The progress: the estimated decode steps its requests have run, each
        up to its estimate less one (what :meth:`_held` no longer counts as left). Kept per
        instance until the instance changes: what it holds and how far each request has decoded
        change only with its clock, decode steps, clients running, waiting, idle or alive (an
        iteration moves the clock; a hand-out, finish, preemption or failure moves a count), so
        the pacing (:meth:`_pacing`) recomputes only the instances that moved since.
        """
        seen = (state.now, state.decode_steps, state.n_running, len(state.waiting), len(state.idle), state.alive,
                state.kv_tokens)
        cached = self._chains.get(state.index)
        if cached is not None and cached[0] == seen:
            return cached[1]
        tail, est = self._tail_list, self._est_list
        longest = done = 0.0
        for r, left in self._held(state):
            longest = max(longest, left + tail[r])
            done += est[r] - left
        self._chains[state.index] = (seen, (longest, done))
        return longest, done

    def _pacing(self, state) -> int:
        """:meth:`batch_limit` of ``state``'s instance.

        All instances are paced at once (class Notes, *Chain pacing*): the least horizon ``T`` at
        which every instance's longest chain, at the largest batch ``n_k`` that lets it finish by
        ``T``, and the fleet complete the remaining work; found by bisection, cached per moment.
        When even the longest unfinished chain (not counting its progress) ends within the
        remaining work at the fleet's full rate at full-batch steps, no instance is paced, and
        nothing is computed.
        """
        heap = self.open_chains
        while heap and self.finished[heap[0][1]]:
            heapq.heappop(heap)
        if not heap or -heap[0][0] * max(self.step_full) <= self._horizon_s():
            self._pace_horizon_s = 0.0
            return self.step_cost[state.index][2]
        work = self._left_work()
        key = (state.now, len(self.running), work)
        if self._limits is not None and self._limits[0] == key:
            self._pace_horizon_s = self._limits[2]
            return self._limits[1][state.index]
        chains = [self._longest_chain(st) for st in state.engine.states]
        # (S, a, b, c, a + b c) per instance; the bisection evaluates tokens(T) 31 times per moment
        rows = [(S, a, b, float(c), a + b * c) for S, (a, b, c) in zip(chains, self.step_cost)]

        def batch(T: float) -> list[float]:
            return [min(max((T / S - a) / b, 1.0), c) if S > 0.0 else c for S, a, b, c, _ in rows]

        def tokens(T: float) -> float:
            # n_k per step while its chain runs, then full batches until T
            total = 0.0
            for S, a, b, c, full in rows:
                n = min(max((T / S - a) / b, 1.0), c) if S > 0.0 else c
                total += n * S + max(T - S * (a + n * b), 0.0) * c / full
            return total

        lo = max(S * (a + b) for S, a, b, _, _ in rows)  # the longest chain alone
        hi = lo + max(S * full for S, _, _, _, full in rows) + work / self.fleet_rate
        if tokens(lo) < work:
            for _ in range(30):
                mid = 0.5 * (lo + hi)
                if tokens(mid) < work:
                    lo = mid
                else:
                    hi = mid
            lo = hi
        scale, sizes = self.pace_scale, batch(lo)
        limits = [int(min(c, max(1.0, np.ceil(n * scale - 1e-9)) if n < c else c))
                  for n, (_, _, _, c, _) in zip(sizes, rows)]
        # a batch below the clients (before rounding): a pace_scale would change this limit
        self.ever_paced = self.ever_paced or any(n < r[3] for n, r in zip(sizes, rows))
        self._limits = (key, limits, lo)
        self._limits_version += 1
        self._pace_horizon_s = lo
        return limits[state.index]

    def next_request(self, state, client: int) -> int | None:
        if self.dag is None:
            return super().next_request(state, client)
        self._states = state.engine.states
        if self.arrived:
            self._replan()
        moment = self._moment(state)
        refused = self._refused
        if moment == refused[0] and (refused[2] is None or refused[2] == self._clocks(state)):
            # another idle client of this instance was refused and nothing has changed since
            self._deferred_to.discard(state.index)
            if refused[1] is not None:
                self._deferred_to.add(refused[1])
            return None
        self._clocks_read = False
        r = self._next_request(state, client)
        if r is None:
            self._refused = (self._moment(state), self._deferred_now,
                             self._clocks(state) if self._clocks_read else None)
        return r

    def _moment(self, state) -> tuple:
        """What :meth:`next_request` reads besides the client and the other instances' clocks, as a key.

        It changes whenever any of it may have: this queue's state (its version), the pacing
        cache, the asking instance's clock and occupancy, and the engine's iterations (``trace``)
        and failed clients. A refusal is a function of these, not of the client, so another idle
        client asking at the same moment is refused at once (``_fill`` asks every idle client of
        an instance in turn, and a paced instance refuses most of them); the other instances'
        clocks (:meth:`_clocks`, which move on without an iteration while an instance idles) are
        compared too when the refusal read them (:meth:`_faster_instance`). A rule that reads
        other state must bump ``_version`` where that state changes (or add it here), or a
        refusal outlives it; ``tests/test_workflow_queue_moments.py`` compares with answering
        every question from scratch.
        """
        engine = state.engine
        return (state.now, self._version, self._limits_version, len(engine.trace), state.index,
                getattr(engine, "failed_clients", 0), state.n_running, len(state.waiting), len(state.idle))

    @staticmethod
    def _clocks(state) -> tuple:
        """Every instance's clock, seconds."""
        return tuple([st.now for st in state.engine.states])

    def _next_request(self, state, client: int) -> int | None:
        """:meth:`next_request` with precedence, its workflows planned: the chain rules, then the plan (class Notes)."""
        self._deferred_to.discard(state.index)
        self._deferred_now = None
        first = self._binding_chain() if self.pace else None
        # workflows arriving faster than the fleet serves them: a chain that looks binding against
        # the work known so far is not binding against the work still to come, and pacing would
        # idle the fleet meanwhile
        fleet = self.pace and len(self.step_cost) > 1 and not self.overloaded(state.now)
        # on a slower instance, a request whose chain would end after the remaining work at the
        # fleet's rate waits for an instance that runs chains fastest
        fast = self.chain_fast[state.index] or not self._fast_instance_alive()
        limit = self._pacing(state) if fleet and self.ready else np.inf
        if self.plan_paced and fleet and self.ready and not self.open_arrivals:
            self._plan_for_pacing(state.now)
        if limit < self.step_cost[state.index][2] and self.open_arrivals and self._backlog_past_limits(state):
            limit = np.inf  # a backlog while workflows arrive (class Notes)
        if first is not None and fast:
            # a binding chain's head goes out first; past the pacing limit only if its chain decides
            # the paced horizon (class Notes, *The deciding chain*)
            if not self._decides_paced_horizon(first, limit):
                if state.n_running + len(state.waiting) < limit:
                    return self._hand_out(first, client, state.now)
            else:
                target = self._faster_instance(first, state) if self._in_deciding_workflow(first, state) else None
                if target is None:
                    return self._hand_out(first, client, state.now)
                # another instance runs it clearly faster, from its next iteration boundary: this one
                # takes other work meanwhile
                self.waiting.discard(first)
                self._deferred_to.add(target)
                self._deferred_now = target
                try:
                    return self._next_planned(state, client, fleet, fast, limit)
                finally:
                    self.waiting.add(first)
                    heapq.heappush(self.ready, (self.key[first], first))
                    heapq.heappush(self.by_chain, (-self.chain_steps[first], first))
        return self._next_planned(state, client, fleet, fast, limit)

    def _backlog_past_limits(self, state) -> bool:
        """Whether ``state``'s paced instance should take work past its limit (class Notes, *A backlog while workflows arrive*).

        True when more requests have been ready and waiting for at least the mean gap between
        arrivals than the other live instances have room for below their pacing limits plus a
        whole instance's clients, and the last workflow arrived less than
        :data:`BACKLOG_LIVE_GAPS` mean gaps ago.
        """
        if self.arrivals < 2:
            return False
        gap = (self.last_arrival_s - self.first_arrival_s) / (self.arrivals - 1)
        if state.now - self.last_arrival_s >= BACKLOG_LIVE_GAPS * gap:
            return False
        limits = self._limits[1] if self._limits is not None else [c for _, _, c in self.step_cost]
        room = sum(max(limits[st.index] - st.n_running - len(st.waiting), 0)
                   for st in state.engine.states if st is not state and st.alive)
        need = room + self.step_cost[state.index][2]
        if len(self.waiting) <= need:
            return False
        since = state.now - gap  # a backlog, not the burst of one arrival: ready for a mean gap
        old = 0
        for r in self.waiting:
            if self.ready_s[r] <= since:
                old += 1
                if old > need:
                    return True
        return False

    def _plan_for_pacing(self, now: float) -> None:
        """Re-plan on the clients the pacing leaves each instance when its limits changed (class Notes).

        At most once per typical decode step, and only while the known workflows have at most
        ``replan_below`` unfinished requests; the limits are those :meth:`_pacing` just computed
        (every client when no instance is paced). The caller asks only while every workflow has
        been known from the start.
        """
        paced = self._limits is not None and self._pace_horizon_s > 0.0
        full = tuple(c for _, _, c in self.step_cost)
        limits = tuple(self._limits[1]) if paced else full
        if limits == (self.plan_limits or full) or now - self._paced_plan_s < self.step_s \
                or self.left_requests > self.replan_below:
            return
        self._paced_plan_s = now
        self._version += 1  # new keys: a refusal made before them does not stand (:meth:`_moment`)
        self._plan_all(now, False, None if limits == full else limits)
        self.ready = [(self.key[r], r) for r in self.waiting]
        heapq.heapify(self.ready)

    def _decides_paced_horizon(self, request: int, limit: float) -> bool:
        """Whether the chain ``request`` heads would end after the pacing's horizon on a full instance.

        The pacing (:meth:`_pacing`) chose its limits for the horizon ``T`` at which every
        instance's longest chain and the remaining work end; a chain that ends by ``T`` even at
        full-batch steps can run anywhere and waits for room below the limits like other work,
        and one that cannot decides the makespan and goes past them (class Notes, *The deciding
        chain*). True when no instance is paced (``limit`` infinite or ``T`` 0).
        """
        return limit == np.inf or self.chain_steps[request] * self.full_step_s >= self._pace_horizon_s

    def _in_deciding_workflow(self, request: int, state) -> bool:
        """Whether ``request`` belongs to the workflow of the longest remaining chain (class Notes, *The deciding chain*).

        The chains compared are the one ``request`` heads and those of the requests the fleet
        runs (their estimated remaining steps and longest path of successors); ties go to
        ``request``. In a fan-in or a DAG every branch into the deciding join is in that workflow.
        """
        best, who = self.chain_steps[request], request
        for st in state.engine.states:
            for r, left in self._held(st):
                if left + self.tail_steps[r] > best:
                    best, who = left + self.tail_steps[r], r
        return bool(self.component[who] == self.component[request])

    def _faster_instance(self, request: int, state) -> int | None:
        """Another instance on which the binding chain headed by ``request`` would run clearly faster, or None.

        On a fleet the first idle client to ask need not be on the instance that runs the chain
        fastest: its instance may run a full batch while another runs a few requests (pacing
        leaves such instances, and so do workflows' predecessors finishing). The chain's decode
        steps over the request's estimated output, ``H`` steps, cost ``a + beta n`` each (class
        Notes, *Chain pacing*), ``n`` the mean batch: the request itself and each request the
        instance runs or has prefilling, for its estimated remaining steps up to ``H``, as a
        fraction of ``H``. Another live instance that runs chains fastest
        (:data:`CHAIN_SPEED_TOLERANCE`) and has an idle client takes it at its next iteration
        boundary, which is at most one of its iterations away (instances are served in the order of
        their clocks); it is chosen when its chain time, counted from this instance's clock,
        is shorter by more than one typical decode step (so two instances never defer to each
        other). Future co-runners are left out: pacing governs those on either instance.

        Only once workflows arrive over time (:attr:`open_arrivals`), when a deciding workflow
        lands on a fleet whose instances carry different loads. With every workflow known from
        the start the pacing places the deciding chains from the first iteration, and moving a
        head by the loads of the moment undoes it: at time 0 the first instance to ask has
        clients prefilling and the other none, the head went to the other, which the pacing had
        left unpaced (60 three-step chains on 2 x 20 clients, seed 4: 5.5 to 9.9 % above the
        bound; the rest of the chain study within 0.2 point).
        """
        engine = state.engine
        if len(engine.states) < 2 or not self.open_arrivals:
            return None
        self._clocks_read = True
        horizon = float(self.est_steps[request])
        client_state = self.ctx.extra["client_state"]

        def chain_s(st) -> float:
            a, beta, _ = self.step_cost[st.index]
            batch = 1.0 + sum(min(left, horizon) for _, left in self._held(st)) / horizon
            return horizon * (a + beta * batch)

        here = chain_s(state)
        best, best_s = None, here - self.step_s
        for st in engine.states:
            if st is state or not st.alive or not self.chain_fast[st.index] \
                    or not any(client_state[c] != FAILED for c in st.idle):
                continue
            t = max(st.now - state.now, 0.0) + chain_s(st)
            if t < best_s:
                best, best_s = st.index, t
        return best

    def wants_retry(self, state) -> bool:
        """Ask again when a binding chain's head was left for this instance (:meth:`_faster_instance`)."""
        return state.index in self._deferred_to

    def _next_planned(self, state, client: int, fleet: bool, fast: bool, limit: float) -> int | None:
        """:meth:`next_request` past the binding chain: the planned order, paced (class Notes)."""
        if state.n_running + len(state.waiting) >= limit or not self.ready:
            return None  # paced (the other instances take this work), or nothing is ready
        # while the fleet is paced it is planned to end at the pacing horizon T, not at the remaining
        # work at its full rate: a chain that ends by T on this slower instance delays nothing, and
        # holding it back for the paced fast instances leaves this one idle (class Notes)
        horizon = max(self._horizon_s(), self._pace_horizon_s) if fleet else self._horizon_s()
        too_long = np.inf if fast else horizon / self.step_full[state.index]
        if limit < self.step_cost[state.index][2]:
            return self._cheapest_co_runner(state, client, too_long)
        if fleet and self._limits is not None and any(
                n < c for n, (_, _, c) in zip(self._limits[1], self.step_cost)):
            # another instance is paced: leave it the co-runners that cost its chain least
            return self._cheapest_co_runner(state, client, too_long, dearest=True)
        held = []
        while self.ready:
            key, r = heapq.heappop(self.ready)
            if r in self.waiting and key == self.key[r]:
                if self.chain_steps[r] >= too_long:
                    held.append((key, r))
                    continue
                for item in held:
                    heapq.heappush(self.ready, item)
                return self._hand_out(r, client, state.now)
        for item in held:
            heapq.heappush(self.ready, item)
        return None

    def on_finish(self, request: int, client: int, output_tokens: int, now: float) -> None:
        if self.dag is not None:
            self._version += 1
            if not self.finished[request] and int(self.component[request]) in self.known:
                self.left_steps -= float(self.est_steps[request])
                self.left_requests -= 1
            self.finished[request] = True
            self.running.pop(request, None)

    def on_client_failed(self, client: int, now: float) -> None:
        self._version += 1
        super().on_client_failed(client, now)

    def on_preempt(self, request: int, client: int, generated: int) -> None:
        self._version += 1
        super().on_preempt(request, client, generated)

    def successors_to_come(self) -> bool:
        """Whether requests of the known workflows are unfinished and neither ready nor handed out.

        They wait for predecessors that run now (or for ready ones), so the queue will grow again
        even when it is empty: an iteration scheduler should not treat an empty queue as the end
        game. False without precedence.
        """
        if self.dag is None:
            return False
        return self.left_requests > len(self.waiting) + len(self.running)

    def requeue(self, request: int, now: float) -> None:
        if self.dag is None:
            super().requeue(request, now)
            return
        self._version += 1
        self.running.pop(request, None)
        self.waiting.add(request)
        self.n_pending += 1
        heapq.heappush(self.ready, (self.key[request], request))
        heapq.heappush(self.by_chain, (-self.chain_steps[request], request))


class AssignedQueues(_PerClientQueues):
    """Per-client queues from an offline assignment, sorted longest first, with optional stealing.

    A request joins its planned client's queue when it becomes ready (a live client's queue if
    the planned one has failed), at its place in longest-first order.

    Parameters
    ----------
    assignment
        Global client index of each request (from an offline solve), or a callable
        ``assignment(ctx) -> array`` evaluated at setup (so the solve sees the run's estimates).
    steal
        Let an idle client with an empty queue take a ready request from the client with the
        most queued estimated work: the one whose size is closest to half that work, which
        balances the two (the paper's Algorithm 1, preemptive re-assignment of unstarted requests).
    """

    def __init__(self, assignment, steal: bool = True) -> None:
        self.assignment = assignment
        self.steal = steal
        self.steals = 0

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        owner = self.assignment(ctx) if callable(self.assignment) else self.assignment
        owner = np.asarray(owner, dtype=np.int64)
        n = ctx.problem.n_requests
        if owner.shape != (n,) or owner.min() < 0 or owner.max() >= ctx.problem.n_clients:
            raise ValueError(f"assignment must give a client in [0, {ctx.problem.n_clients}) for each of {n} requests")
        self.owner = owner.tolist()
        self.size = ctx.estimates.tolist()
        # queues of (-size, request): longest first within a client (the paper's "sorting"), ties by row
        self.queues = [[] for _ in range(ctx.problem.n_clients)]
        self.n_pending = 0
        self.queued_work = np.zeros(ctx.problem.n_clients)
        self.steals = 0

    def on_ready(self, request: int, now: float) -> None:
        c = self.owner[request]
        if self.ctx.extra["client_state"][c] == FAILED:
            c = self._least_loaded_alive()
        self._enqueue(c, request)
        self.n_pending += 1

    def _pop_own(self, state, client: int) -> int | None:
        q = self.queues[client]
        if q:
            self.n_pending -= 1
            r = q.pop(0)[1]
            self.queued_work[client] -= self.size[r]
            return r
        return None

    def next_request(self, state, client: int) -> int | None:
        r = self._pop_own(state, client)
        if r is not None or not self.steal:
            return r
        victim = int(np.argmax(self.queued_work))
        q = self.queues[victim]
        if not q:
            return None
        half = self.queued_work[victim] / 2.0
        # the queue is sorted longest first: the request whose size is nearest half the work is next to i
        i = min(bisect_left(q, (-half, -1)), len(q) - 1)
        best = min((j for j in (i - 1, i, i + 1) if 0 <= j < len(q)), key=lambda j: (abs(self.size[q[j][1]] - half), j))
        r = q.pop(best)[1]
        self.queued_work[victim] -= self.size[r]
        self.n_pending -= 1
        self.steals += 1
        return r

    def _enqueue(self, client: int, request: int) -> None:
        insort(self.queues[client], (-self.size[request], request))
        self.queued_work[client] += self.size[request]

    def on_client_failed(self, client: int, now: float) -> None:
        orphans = self.queues[client]
        self.queues[client] = []
        self.queued_work[client] = 0.0
        for _, r in orphans:
            self._enqueue(self._least_loaded_alive(), r)
