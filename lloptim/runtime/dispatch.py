"""The hybrid's dispatch: one queue of ready requests by least slack, steered by fleet prices.

**Least slack first.** An idle client takes the ready request with the smallest key
``ready_s - slack_weight * service_s``, where ``service_s`` is the request's estimated decode
steps times the decode-step time of a full batch on the fastest instance (``decode_base_s +
clients * decode_per_seq_s``; the KV term is left out because it depends on the other requests).
With a common target ``D`` on end-to-end latency, a request must *start* by ``ready + D -
service``: the key is that latest start (less the constant ``D``), and serving the earliest latest
start first is the earliest-deadline rule that keeps the worst latency down. Two cases pin the
rule down:

* every request present at once (the paper's offline setting): the key is ``-service``, the
  hybrid's longest-first dispatch (LPT), so requests of similar length start and finish together
  and the makespan is packed as before;
* requests arriving over time: a request's age counts as much as its length, so a short request
  is not starved behind a stream of longer ones (longest-first alone holds short requests back
  until the queue runs dry, which under overload is the end of the run), while a long request
  still starts early enough not to finish last.

``slack_weight`` trades the two: 0 is first-come first-served, a large weight is longest first;
1 prices a second of waiting and a second of service alike. A per-request latency target
proportional to the service (``D + beta * service``) is the same rule with ``slack_weight = 1 -
beta``.

**Urgency.** Least slack alone packs the makespan badly when the queue is long against a long
request's service: a long request arriving in a late burst (or into the backlog of a few
clients) keeps its place behind requests that arrived a little earlier, starts when the queue
has drained, and finishes alone, up to its whole service after everything else
(``benchmarks/stress_flow.py``'s ``bursty`` and ``poisson-heavy`` classes with 8-16 clients:
2-6 points of the makespan). Once requests arrive during the run, the longest queued request is
therefore *urgent* when its estimated decode steps reach the *horizon*, the known work per live
client (the queue's estimated steps, its own included, plus what the running requests have
left): started later, it would finish after the clients have drained everything else; started
now, it ends with them. An urgent request goes ahead of the least-slack head; otherwise the head
goes. Not once the engine has preempted a request: the KV cache then binds, memory rather than
the clients sets how long the work takes, and the memory-aware machinery decides (the last
paragraph below). Only while a backlog stands: the queue's own work per client must be at least
:data:`URGENCY_BACKLOG` of the request's (else, at 80 % load, a burst's long requests overtook its
short ones while the running requests made up the horizon). The test reads only the requests
that have arrived and their estimates: if more arrive, the horizon grows and the request would
not have had to hurry, which costs the requests it overtook some latency and nothing else. With
every request at time 0 least slack is already longest first and nothing changes (the test is
not even made). With estimated lengths the estimate is scaled by the median ratio of true to
estimated output over the requests finished so far (:data:`URGENCY_QUANTILE`, at least 1): a
server learns how its estimator errs from the requests it has served.

**Tail hold.** Least slack makes the latencies of the last requests of an overloaded run about
equal (it serves the earliest latest start first, which is what keeps the *worst* latency down),
so the p99 latency is about the worst one: the short requests that arrived last are served last
and all end with the run. First come first served (Sarathi) ends the run on the few long
requests of the last arrivals instead, which run alone past the others (a makespan 2-4 % longer)
while the short ones leave before; with 8 clients and 800 requests (``benchmarks/stress_flow.py``,
``poisson-heavy``) its p99 was below the hybrid's on 25 of 39 training cases, by up to 6 %. A p99
is blind to 1 % of the requests: the end of the run can be given to one long request per client,
whose latency the quantile does not see, and the others then leave before it. So once the queue
*drains* (no request has arrived for :data:`DRAIN_GAPS` mean inter-arrival gaps: the stream has
stopped, or paused, and the run heads for its end), the longest queued request per live client
is *held*, less the clients already running a request to the end (one the urgency test or the
hold started, or one running past the level the queue fills the clients to): the least-slack
order passes over it, and it starts once its decode steps reach that level (the queue's work
spread over the clients as they free up; :func:`_water_level`), so that it ends with the rest as
the last request of its client; when only held requests remain the longest goes. Only where the
held latencies stay beyond the quantile and their starts are not guesses:

* the live clients plus the finished requests whose latency already exceeds what the request due
  first would see if it started now are at most ``1 - TAIL_QUANTILE`` of the requests known (with
  16 clients and 800 requests, half the clients would still end on short requests; at load 1.1,
  where long requests served mid-run hold the top latencies, the held ones added to them: the
  p99 1.16 x Sarathi's on ``poisson-heavy`` seed 402, 0.96 x without the hold);
* known lengths only (with noisy estimates, sigma 0.5, the held requests ended 3-5 points of the
  makespan away from the rest on ``unknown`` seeds 9 and 11).

If requests arrive again, the hold lapses: the held requests only waited a little. On the 39
cases with 8 clients of ``poisson-heavy`` seeds 0-101 (loads 1.1-3) the p99 went from 0.86-1.06 x
Sarathi's (above it on 25) to 0.80-1.03 x (above on 2, both at load 1.1 and lower than before or
unchanged), the mean latency from 1.24 to 1.18 x, the makespan 0.05 points longer on average (at
most 0.33) and at most 0.33 points behind longest first (0.41 before); on 29 held-out cases
(seeds 404-440) 1.01 to 0.91 x on average, above Sarathi's on 23 then 2 (1.038 and 1.026, from
1.045 and 1.026), the makespan 0.07 points longer on average (at most 0.28) and still below
Sarathi's on every case.

**Fleet prices.** On a fleet whose instances differ, the queue in that order is list-scheduled by
earliest completion among the instances where each request belongs at the LP's prices, and the
idle client takes the first request that lands on it (:meth:`~lloptim.runtime.fleet.FleetPrices.pick`;
see :mod:`lloptim.runtime.fleet`).

**End game.** Longest-first list scheduling leaves the clients of an instance finishing up to one
short request apart, and the instances up to one request apart; with few requests per client (a
fleet of several instances serving one batch, about eight per client on GSM8K and four
instances) that is 2-4 % of the makespan. On such a fleet, with every request present, once at
most :data:`TAIL_PLAN` queued requests remain per live client the rest of the queue is planned on
two levels from what every client holds (:func:`~lloptim.runtime.endgame.endgame_assignment`:
instances by the fractional assignment LP, clients by ``P||Cmax`` in decode steps) and served
from per-client queues with stealing only where it ends the pair earlier
(:class:`~lloptim.runtime.endgame.EndgameQueues`). Planning earlier is worse on heavy-tailed
lengths, where the plan's forecast of step times ages; later leaves too few requests to balance
(the threshold was chosen on training workloads of ``benchmarks/fleet.py``: 4-6 per client all
within 0.1-0.3 points of each other). A request arriving during the run ends the end game (the
planned requests return to the queue): the queue was only short because the run had just begun.

**Latency objective.** ``objective="weighted-completion"`` orders the queue by the rule of the
offline ``"weighted_completion"`` formulation (:func:`lloptim.formulations.weighted_completion.
wspt_priority`, Smith's ratio ``service / weight``, every weight 1: shortest estimated service
first) instead of least slack, from the first dispatch on. It minimizes the mean completion time
of the requests present; it neither packs the makespan nor bounds the wait of long requests
under overload (``benchmarks/arrivals.py`` measures both), so it is an option, not the default.

With precedence (workflows) the dispatch is :class:`~lloptim.runtime.request_schedulers.
WorkflowQueue`'s plan order. Where an instance's KV cache can fill up (its clients' largest
requests do not fit at once), the dispatch is the memory-aware queue it is given
(:class:`~lloptim.runtime.memory_schedulers.MemoryAwareQueue`: the longest request that keeps the
cache within its capacity at every future step).

**KV memory under arrivals.** Which queue serves is decided at the first dispatch, from the
requests ready then; when requests arrive over time that is one or a few requests, which cannot
fill a cache, and least slack then served the whole run, leaving memory to the engine: a request
is admitted when its prompt fits *now*, and when the running requests' growth runs the cache out
the engine preempts the one holding the fewest tokens, which is recomputed. On one instance with
paged KV, heavy-tailed lengths and Poisson arrivals (``benchmarks/stress_flow.py``, ``kv-paged``:
800 requests, 40 clients, 20,480 tokens) that was 4,400-4,600 preemptions for 800 requests (a few
requests preempted 20-40 times each: re-admitted as soon as their context fit, preempted again at
the next block boundaries), 440,000 tokens prefilled again (about 36 s of a 790 s run) and the
clients a third idle beside a full cache: 8.9-12.4 % above the bound, behind vLLM and WAIT. With
``memory_handover`` (known lengths, by default) the dispatch hands its queue to the memory-aware
queue once the requests known so far show that the cache binds: it can fill up
(:class:`~lloptim.runtime.memory_schedulers.KnownMemory`), the memory sets the stream's decode steps
(:func:`~lloptim.runtime.memory_schedulers.fluid_memory_ratio` at least :data:`HANDOVER_RHO`: the KV
area over the capacity against the output over the clients, WAIT's fluid comparison; where the
clients bind, as on the Azure conversation and code traces with their 163,840 tokens, the
queue's hold-back of a large prompt only delays it: the p99 rose 10 % on one case) and the cache
holds at least :data:`HANDOVER_BATCH` of them at their mean peak (the exact projection keeps about
one request's peak free; with 12-16 clients and 4-5k tokens that cost more than the preemptions it
saves). The queued requests keep their least-slack keys, and the head of that order is never
overtaken except by EASY backfilling (``head_first``): plain first-fit let the requests that fit
pass a large one for as long as others kept arriving, its p99 up to 28 % above Sarathi's. No
request is preempted after the hand-over when lengths are known (the projection is exact).
Measured in :ref:`memory-arrivals`. With estimates it is off by default: the projection
guesses, and on memory-bound Poisson cases with noisy estimates (sigma 0.5) the makespan gained
1.7 points on average but the p99 latency rose above Sarathi's on 8 of 12 cases, by up to 45 %.
"""

from __future__ import annotations

import bisect
import heapq

import numpy as np

from lloptim.runtime.endgame import EndgameQueues, endgame_assignment
from lloptim.runtime.engine import FAILED, RUNNING, WAITING
from lloptim.runtime.fleet import FleetPrices
from lloptim.runtime.policy import RunContext
from lloptim.runtime.request_schedulers import WorkflowQueue, heap_remove

__all__ = ["HybridDispatch", "SLACK_WEIGHT", "TAIL_PLAN", "DISPATCH_OBJECTIVES", "HANDOVER_RHO", "HANDOVER_BATCH",
           "URGENCY_QUANTILE", "URGENCY_BACKLOG", "URGENCY_MIN_LEARNED", "TAIL_QUANTILE", "DRAIN_GAPS"]

#: What the dispatch order serves: the makespan (least slack) or the mean completion time (WSPT).
DISPATCH_OBJECTIVES = ("makespan", "weighted-completion")

#: Default weight of the service time against the waiting time in the dispatch key (module
#: docstring): 1 prices a second of waiting and a second of service alike.
SLACK_WEIGHT = 1.0
#: On a fleet of several instances with every request present from the start, the rest of the queue
#: is planned (:mod:`lloptim.runtime.endgame`) once at most this many queued requests remain per
#: live client (module docstring, *End game*).
TAIL_PLAN = 5.0
#: ``memory_handover``: the fluid ratio of KV-memory steps to client steps of the known requests
#: (:func:`~lloptim.runtime.memory_schedulers.fluid_memory_ratio`) from which the dispatch moves to
#: the memory-aware queue as requests arrive (module docstring, *KV memory under arrivals*).
HANDOVER_RHO = 1.0
#: ``memory_handover``: the fewest known requests, at their mean peak KV tokens, that the cache must
#: hold for the hand-over (module docstring, *KV memory under arrivals*): the projection keeps about
#: one request's peak free, a loss that only a cache of many requests makes small.
HANDOVER_BATCH = 16.0
#: With estimated lengths, the urgency test scales a queued request's estimate by this quantile of
#: ``true / estimated`` output over the requests finished so far (module docstring, *Urgency*),
#: once :data:`URGENCY_MIN_LEARNED` have finished, and never below 1: the median corrects an
#: estimator that runs short; a higher quantile shortens the makespan but lengthens the p99 latency
#: (docs: arrivals, *Urgency*).
URGENCY_QUANTILE = 0.5
#: The urgency test applies only while the queue's own estimated work per client is at least this
#: share of the request's (module docstring, *Urgency*): a backlog stands, not a burst that the
#: running requests will absorb (chosen on ``benchmarks/arrivals.py``'s ``conv`` 0.8 seed 0 and the
#: training seeds 0-1 of the stress classes: 0.2 kept every makespan gain, 0.3 lost some).
URGENCY_BACKLOG = 0.2
#: Finished requests before the urgency test trusts what it learned of the estimates' errors.
URGENCY_MIN_LEARNED = 20
#: The latency quantile the *tail hold* serves (module docstring, *Tail hold*): the hold reserves
#: one request per live client for the end of a drain, and only while the clients are at most
#: ``1 - TAIL_QUANTILE`` of the requests known, so that the held requests, whose latency it
#: gives up, stay beyond this quantile (the p99 latency of the benchmarks).
TAIL_QUANTILE = 0.99
#: The queue is *draining* (no request has arrived for a while) once the time since the last
#: arrival reaches this many mean inter-arrival gaps of the requests known (module docstring,
#: *Tail hold*): a Poisson stream at its mean rate stays silent that long with probability
#: ``exp(-20)``, about 2e-9. Not tuned (10-40 behave alike on the training cases: the drains of
#: ``stress_flow.py``'s overloaded runs last hundreds of gaps).
DRAIN_GAPS = 20.0


def _water_level(work: float, busy: list[float], clients: int) -> float:
    """When the clients would finish ``work`` steps spread over them, steps from now.

    The level ``L`` with ``sum(max(L - b, 0)) = work`` over the clients' busy steps ``busy``
    (the clients not listed are idle): the running requests that outlast it take no share of
    the work, where an average over every client would spread theirs too (*Tail hold*).
    """
    b = sorted(busy)
    b = [0.0] * max(clients - len(b), 0) + b
    filled, level = 0.0, 0.0
    for k, x in enumerate(b):  # raise the level over the k lowest clients up to the next one
        if k and filled + k * (x - level) >= work:
            break
        filled += k * (x - level)
        level = x
    else:
        k = len(b)
    return level + (work - filled) / max(k, 1)


class _RunningQuantile:
    """The ``q``-quantile of a growing set of numbers, O(log n) per number (two heaps).

    :attr:`value` is the element at sorted index ``min(int(q n), n - 1)`` of the ``n`` numbers
    added so far, exactly (a sorted list with ``bisect.insort`` gives the same in O(n) per
    number, which is quadratic over a million finished requests). The smallest ``index + 1``
    numbers sit in a max-heap, the rest in a min-heap; as ``n`` grows the index moves by at most
    one, so each :meth:`add` moves at most one number between them.
    """

    def __init__(self, q: float) -> None:
        self.q = float(q)
        self.low: list[float] = []   # max-heap (negated) of the smallest index + 1 numbers
        self.high: list[float] = []  # min-heap of the others
        self.n = 0

    def add(self, x: float) -> None:
        """Count ``x``."""
        if self.low and x <= -self.low[0]:
            heapq.heappush(self.low, -x)
        else:
            heapq.heappush(self.high, x)
        self.n += 1
        size = min(int(self.q * self.n), self.n - 1) + 1
        while len(self.low) > size:
            heapq.heappush(self.high, -heapq.heappop(self.low))
        while len(self.low) < size:
            heapq.heappush(self.low, -heapq.heappop(self.high))

    @property
    def value(self) -> float:
        """The quantile of the numbers added so far (at least one)."""
        return -self.low[0]


class HybridDispatch(WorkflowQueue):
    """The hybrid's request scheduler (module docstring).

    Parameters
    ----------
    slack_weight
        Weight of the estimated service time against the time waited (0: FCFS; large: longest
        first; default :data:`SLACK_WEIGHT`).
    prices
        Fleet price mode (:data:`~lloptim.runtime.fleet.PRICE_MODES`), or a
        :class:`~lloptim.runtime.fleet.FleetPrices`.
    time_limit_s
        Wall-clock safety net of the end game's LP and local searches, seconds (they stop on their
        work budgets, :mod:`lloptim.runtime.endgame`; the clock never decides in a normal run).
        The workflow plan stops on its work budgets too
        (:class:`~lloptim.runtime.request_schedulers.WorkflowQueue`'s defaults).
    memory
        The request scheduler to hand the dispatch to when the KV cache of an instance can fill up
        (a :class:`~lloptim.runtime.memory_schedulers.MemoryAwareQueue`); None: never.
    tail_plan
        On a fleet of several instances, with every request present: once at most this many
        queued requests remain per live client, hand them to the end-game plan (module
        docstring, *End game*); None: never. Only with ``objective="makespan"``: the plan packs
        the makespan.
    objective
        ``"makespan"`` (least slack, default) or ``"weighted-completion"`` (Smith's rule, module
        docstring).
    pace_scale, plan_paced
        The workflow dispatch's chain pacing options
        (:class:`~lloptim.runtime.request_schedulers.WorkflowQueue`; also given to the memory
        delegate's workflow queue).
    due_factor
        Workflow due dates for latency under arrivals (None: off; see
        :class:`~lloptim.runtime.request_schedulers.WorkflowQueue`, also given to the memory
        delegate's workflow queue).
    workflow_choice
        Optional :class:`~lloptim.runtime.order_choice.SimulatedWorkflowChoice`: on requests with
        precedence it is asked at set-up for the ``pace_scale`` and ``plan_paced`` to run with
        (it simulates its candidates where lengths are known and every request is present).
    memory_handover
        On one instance without precedence, where the requests known at the first dispatch could
        not fill the KV cache but requests arriving during the run make it able to (module
        docstring, *KV memory under arrivals*): hand the dispatch to ``memory`` then, the queued
        requests keeping their least-slack order. ``"known"`` (default): when the output lengths
        are known; True: on estimates too; False: never (least slack, the engine preempting when
        the cache runs out).
    rollout
        Optional :class:`~lloptim.runtime.order_choice.Rollout` (or a replay of one's switches):
        set up after the workflow choice, and asked to :meth:`~lloptim.runtime.order_choice.Rollout.revise`
        this dispatch before the next request is chosen once :attr:`dispatched` reaches its
        ``next_at`` (a count, so the same decision point on any machine).
    urgency
        Once requests arrive during the run, start the longest queued request ahead of the
        least-slack order when it would otherwise finish after the rest of the known work
        (module docstring, *Urgency*), and hold one long request per client for the end once the
        queue drains (*Tail hold*). Independent requests, without fleet prices, with
        ``objective="makespan"``; default True.

    Attributes
    ----------
    fleet
        The :class:`~lloptim.runtime.fleet.FleetPrices` of the run.
    arrivals_during_run
        Whether a request (without predecessors) became ready after the first was handed out:
        the run is online (the Lagrangian rule's ``fused="auto"`` reads it).
    tail_at_s
        When the end game started, seconds (None if it did not).
    handover_at_s
        When arrivals made the dispatch hand its queue to the memory-aware queue (``memory_handover``
        on one instance, :class:`~lloptim.runtime.memory_schedulers.FleetMemoryWatch` on a
        fleet), seconds (None if they did not).
    dispatched
        Requests handed out so far in the run (count; the ``rollout``'s decision points).
    n_urgent
        Requests handed out ahead of the least-slack order by the urgency test (count).
    n_tail
        Requests the tail hold started for the end of a drain (count; module docstring, *Tail hold*).
    urgency_scale
        The urgency test's factor on the estimates, learned from the finished requests (1 with
        known lengths; module docstring, *Urgency*).
    """

    def __init__(self, slack_weight: float = SLACK_WEIGHT, prices: str | FleetPrices = "lp",
                 time_limit_s: float = 20.0, memory=None,
                 tail_plan: float | None = TAIL_PLAN, objective: str = "makespan", pace_scale: float = 1.0,
                 plan_paced: bool = True, workflow_choice=None, due_factor: float | None = None,
                 rollout=None, memory_handover: bool | str = "known", urgency: bool = True) -> None:
        if memory_handover not in (True, False, "known"):
            from lloptim.errors import SpecError

            raise SpecError("policy.memory_handover", f"must be true, false or 'known', not {memory_handover!r}",
                            "'known' hands the dispatch to the memory queue once arrivals fill the cache, with "
                            "known output lengths")
        self.memory_handover = memory_handover
        if not (isinstance(slack_weight, (int, float)) and np.isfinite(slack_weight) and slack_weight >= 0):
            from lloptim.errors import SpecError

            raise SpecError("policy.slack_weight", f"must be a finite number >= 0, got {slack_weight!r}",
                            "0 is first-come first-served, 1 the default, larger favours long requests")
        if objective not in DISPATCH_OBJECTIVES:
            from lloptim.errors import SpecError

            raise SpecError("policy.objective", f"unknown objective {objective!r}",
                            f"use one of {list(DISPATCH_OBJECTIVES)}")
        if not isinstance(urgency, (bool, np.bool_)):
            from lloptim.errors import SpecError

            raise SpecError("policy.urgency", f"must be true or false, got {urgency!r}",
                            "true (default) starts a long request before it would finish last; "
                            "false: least slack alone")
        super().__init__(None, pace_scale=pace_scale, plan_paced=plan_paced, due_factor=due_factor)
        self.workflow_choice = workflow_choice
        self.rollout = rollout
        self.endgame_limit_s = float(time_limit_s)
        self.slack_weight = float(slack_weight)
        self.objective = objective
        self.fleet = prices if isinstance(prices, FleetPrices) else FleetPrices(prices)
        self.memory = memory
        self.delegate = None
        self.tail_plan = tail_plan
        self.tail = None
        self.urgency = bool(urgency)

    def setup(self, ctx: RunContext) -> None:
        if self.workflow_choice is not None and ctx.problem.workload.precedence is not None:
            self._configure(**self.workflow_choice(ctx))
        super().setup(ctx)
        self.delegate = None
        self.started = False
        self.memory_watch = None                    # on a fleet: whether memory binds, as requests arrive
        self.early: list[tuple[int, float]] = []   # requests ready before the first dispatch
        self.ready_at: dict[int, float] = {}        # ready time of each queued request
        self.slack_keys = False                     # the delegate orders by least slack
        step = min(i.profile.latency.decode_base_s + i.clients * i.profile.latency.decode_per_seq_s
                   for i in ctx.problem.instances)
        self.slack_step_s = step
        self.estimates = ctx.estimates
        self.fleet.setup(ctx)
        self.steered = self.dag is None and self.fleet.active
        self.arrivals_during_run = False
        self.handed_out = False
        self.roots = None if self.dag is None else self.dag.in_degree() == 0
        self._nothing_for: tuple | None = None
        self.tail = None
        self.tail_at_s: float | None = None
        self.holding: dict[int, tuple[int, float]] = {}   # client -> (request, handed out at)
        self.tail_enabled = (self.tail_plan is not None and self.dag is None and self.objective == "makespan"
                             and len(ctx.problem.instances) > 1)
        self.dispatched = 0  # requests handed out so far (the rollout's clock)
        # one instance without precedence: whether the requests known so far can fill its cache,
        # followed as they arrive, for the hand-over to the memory queue (memory_handover)
        self.late_memory = None
        handover = self.memory_handover is True or (self.memory_handover == "known" and ctx.known_lengths)
        if handover and self.memory is not None and self.dag is None and len(ctx.problem.instances) == 1:
            from lloptim.runtime.memory_schedulers import KnownMemory

            self.late_memory = KnownMemory(ctx)
        self.known_rows: list[int] = []  # requests announced so far while late_memory follows them
        self.memory_gate: tuple[int, bool] = (0, False)  # (known requests when evaluated, hand over)
        self.handover_at_s: float | None = None
        # urgency (module docstring, *Urgency*): the queued requests' estimated decode steps and a
        # heap of them longest first (handed-out rows skipped when met)
        self.urgency_on = (self.urgency and self.dag is None and not self.steered
                           and self.objective == "makespan")
        self.queued = np.zeros(ctx.problem.n_requests, dtype=bool)
        self.queued_steps = 0.0
        self.longest: list[tuple[float, int]] = []
        self.n_urgent = 0
        self.n_tail = 0
        self.tail_running: set[int] = set()  # requests the tail hold started for the end, until they finish
        self.n_known = 0  # independent requests announced so far (the tail hold's quantile budget)
        # first and last arrival of the requests announced (the drain test), seconds; not the
        # workflow queue's first/last_arrival_s, which time its workflows' plans
        self.request_first_s, self.request_last_s = np.inf, -np.inf
        self.arrival_s = np.full(ctx.problem.n_requests, np.nan)  # when each announced request became ready
        self.top_latencies: list[float] = []  # the longest latencies of the finished requests, s, ascending
        self.urgency_scale = 1.0
        self.known_lengths = ctx.known_lengths
        self.overruns = _RunningQuantile(URGENCY_QUANTILE)  # log(true / estimated) output of the finished requests
        if self.rollout is not None:
            self.rollout.setup(ctx, self)

    def _configure(self, pace_scale: float, plan_paced: bool) -> None:
        """Run with these chain pacing options, and so does the memory delegate's workflow queue."""
        queues = [self, getattr(self.memory, "workflows", None)]
        for queue in (q for q in queues if q is not None):
            queue.pace_scale, queue.plan_paced = float(pace_scale), bool(plan_paced)

    @property
    def critical(self):
        """Requests without slack in the workflow plan (see :class:`WorkflowQueue`), or the delegate's."""
        if self.delegate is not None:
            return self.delegate.critical
        return self.__dict__.get("_critical", set())

    @critical.setter
    def critical(self, value) -> None:
        self.__dict__["_critical"] = value

    def pending(self) -> int:
        if not self.started:
            return len(self.early)
        if self.tail is not None:
            return self.tail.pending()
        return self.delegate.pending() if self.delegate is not None else super().pending()

    def _slack_key(self, request: int, ready: float) -> float:
        service = self.slack_step_s * float(self.estimates[request])
        if self.objective == "weighted-completion":
            from lloptim.formulations.weighted_completion import wspt_priority

            return float(wspt_priority(service))
        return ready - self.slack_weight * service

    def _start(self) -> None:
        """At the first dispatch: hand over to the memory-aware queue if the known requests can fill a cache.

        The decision and the delegate's planned order read the requests ready so far only (with
        every request at time 0, all of them: the memory-aware hybrid as it is offline). Where
        they cannot fill a cache, requests arriving later may still hand the queue over, on one
        instance (``memory_handover``, module docstring *KV memory under arrivals*).
        """
        self.started = True
        self.memory_watch = None
        early, self.early = self.early, []
        rows = np.array([r for r, _ in early], dtype=np.int64)
        if self.memory is not None and self.dag is None and rows.size:
            from lloptim.runtime.memory_schedulers import memory_can_bind

            ctx = self.ctx
            binds = [memory_can_bind(ctx, k, rows) for k in range(len(ctx.problem.instances))]
            if any(binds):
                self.late_memory = None  # handed over already
                self.delegate = self.memory
                self.memory.setup(ctx)  # it learns which caches bind from the requests it is told of
                if self.objective == "weighted-completion":
                    self.slack_keys = True  # the latency order from the start
                    self.memory.rekey(rows, np.array([self._slack_key(r, t) for r, t in early]))
                else:
                    self.memory.rekey(rows, self.memory.planner(ctx, rows=rows))
                for r, t in early:
                    self.ready_at[r] = t
                    self.memory.on_ready(r, t)
                return
            if len(ctx.problem.instances) > 1:
                # on a fleet, look again as requests arrive (:meth:`_hand_over`)
                from lloptim.runtime.memory_schedulers import FleetMemoryWatch

                self.memory_watch = FleetMemoryWatch(ctx)
                for r, _ in early:
                    self.memory_watch.add(r)
        for r, t in early:
            self._enter(r, t)

    def on_ready(self, request: int, now: float) -> None:
        if self.handed_out and (self.roots is None or self.roots[request]):
            self.arrivals_during_run = True
        if self.roots is None or self.roots[request]:
            self.n_known += 1
            self.request_first_s = min(self.request_first_s, now)
            self.request_last_s = max(self.request_last_s, now)
            self.arrival_s[request] = now
        if self.late_memory is not None:
            self.late_memory.add(request)
            self.known_rows.append(request)
        if not self.started:
            self.early.append((request, now))
            return
        if self.tail is not None:
            if not self.arrivals_during_run:
                self.tail.on_ready(request, now)
                return
            self._leave_end_game(now)
        if self.memory_watch is not None and self.memory_watch.add(request):
            self._hand_over(request, now)
            return
        if (self.late_memory is not None and self.arrivals_during_run and self.late_memory.binds[0]
                and self._hand_over_due()):
            self._hand_over(request, now)
            return
        if self.delegate is not None:
            if self.arrivals_during_run and not self.slack_keys:
                # requests arrive over time: every queued request by least slack from now on
                self.slack_keys = True
                queued = np.array(list(self.ready_at), dtype=np.int64)
                self.delegate.rekey(queued, [self._slack_key(r, self.ready_at[r]) for r in queued.tolist()])
            self.ready_at[request] = now
            if self.slack_keys:
                self.delegate.key[request] = self._slack_key(request, now)
            self.delegate.on_ready(request, now)
            return
        self._enter(request, now)

    def _hand_over_due(self) -> bool:
        """Whether the known requests' stream is one the memory-aware queue serves better (``memory_handover``).

        Two tests on the requests known so far, evaluated again when they have grown by
        :data:`~lloptim.runtime.memory_schedulers.REPLAN_GROWTH` (amortized O(log n) evaluations):
        the memory binds the stream (:func:`~lloptim.runtime.memory_schedulers.fluid_memory_ratio`
        at least :data:`HANDOVER_RHO`), and the cache holds at least :data:`HANDOVER_BATCH` of
        them at their mean peak (prompt plus estimated output; module docstring, *KV memory under
        arrivals*).
        """
        from lloptim.runtime.memory_schedulers import REPLAN_GROWTH, fluid_memory_ratio

        n_eval, sets = self.memory_gate
        n = len(self.known_rows)
        if n >= REPLAN_GROWTH * n_eval:
            rows = np.asarray(self.known_rows, dtype=np.int64)
            inst = self.ctx.problem.instances[0]
            peak = self.ctx.problem.workload.prompt_tokens[rows] + np.ceil(self.ctx.estimates[rows])
            batch = inst.kv_blocks * inst.kv_block_tokens / float(np.mean(peak))
            sets = batch >= HANDOVER_BATCH and fluid_memory_ratio(self.ctx, rows) >= HANDOVER_RHO
            self.memory_gate = (n, sets)
        return sets

    def _hand_over(self, request: int, now: float) -> None:
        """The requests known so far now say that a KV memory binds: the memory-aware queue from here on.

        :meth:`_start` decided from the requests ready at the first dispatch; on a fleet the
        :class:`~lloptim.runtime.memory_schedulers.FleetMemoryWatch` follows the arrivals, and once
        an instance's memory binds in its fluid model the queued requests (and ``request``, ready
        at ``now``) go to the memory-aware queue, ordered by least slack (requests arrive during
        the run). What the clients hold stays where it runs. On ``fleet-kv`` of
        ``benchmarks/stress_flow.py`` (2 instances, 1x and 1.6x slower, KV binding, 150 % load) the
        makespan fell from 23.3 / 19.1 % above the bound to 7.0 / 8.4 % (seeds 0 / 1; WAIT 13.8 /
        15.8 %) and the preemptions from 2,500 to none (docs, *KV memory*, *Found and fixed*). On
        one instance the trigger is ``memory_handover`` (:meth:`_hand_over_due`, module docstring
        *KV memory under arrivals*), and the memory-aware queue is also told of the requests
        handed out before (its test of whether the cache can fill reads them; they never enter
        its queue). On both, the memory-aware queue serves the head of its least-slack order first
        (``head_first``).
        """
        self.handover_at_s = now
        self.memory_watch = None
        queued = sorted(r for _, r in self.ready)
        self.ready = []
        self.n_pending = 0
        self.queued[:] = False  # the urgency test reads the least-slack queue, now empty for good
        self.queued_steps, self.longest = 0.0, []
        if self.steered:
            self.fleet.queued[queued] = False
            self.fleet.n_queued = 0
        self.delegate = self.memory
        self.memory.setup(self.ctx)
        self.slack_keys = True
        self.ready_at[request] = now
        rows = np.array(queued + [request], dtype=np.int64)
        self.memory.rekey(rows, np.array([self._slack_key(r, self.ready_at[r]) for r in rows.tolist()]))
        for r in rows.tolist():
            self.memory.on_ready(r, self.ready_at[r])
        # least slack: the request due first is not overtaken, on a fleet too (without it the
        # requests that fit overtook the large ones while others kept arriving: an Azure conv
        # trace window on 2 x llama-65b at 130 % load had its p99 1.5x Sarathi's)
        self.memory.head_first = True
        if self.late_memory is not None:  # one instance (memory_handover)
            self.late_memory = None
            entered = set(rows.tolist())
            for r in self.known_rows:
                if r not in entered:
                    self.memory.learn(r)

    def _enter(self, request: int, now: float) -> None:
        if self.dag is not None:
            super().on_ready(request, now)
            return
        key = self._slack_key(request, now)
        self.key[request] = key
        self.ready_at[request] = now
        heapq.heappush(self.ready, (key, request))
        self.n_pending += 1
        self._queue(request)
        if self.steered:
            self.fleet.on_ready(request, key)

    def _queue(self, request: int) -> None:
        """Count a request joining the least-slack queue in the urgency test (module docstring)."""
        if self.urgency_on and not self.queued[request]:
            est = float(self.estimates[request])
            self.queued[request] = True
            self.queued_steps += est
            heapq.heappush(self.longest, (-est, request))

    def _unqueue(self, request: int) -> None:
        if self.queued[request]:
            self.queued[request] = False
            self.queued_steps -= float(self.estimates[request])

    def _learn_overrun(self, request: int, output_tokens: int) -> None:
        """Learn how far the true lengths exceed the estimates, from a finished request (*Urgency*)."""
        ratio = np.log(max(output_tokens, 1) / max(float(self.estimates[request]), 1.0))
        self.overruns.add(float(ratio))
        if self.overruns.n >= URGENCY_MIN_LEARNED:
            self.urgency_scale = max(1.0, float(np.exp(self.overruns.value)))

    def _running_left(self, state) -> list[tuple[float, int]]:
        """``(steps left, request)`` of each running (or preempted, waiting) request, by estimate.

        Each request's estimate less the steps it has decoded, at least 0 (*Urgency*).
        """
        engine = state.engine
        est_all = self.estimates
        cs, cr, start = engine.client_state, engine.client_request, engine.client_start_step
        out = []
        for s in engine.states:
            step = s.decode_steps
            for c in s.clients:
                if cs[c] == RUNNING:
                    out.append((max(float(est_all[cr[c]]) - (step - start[c]), 0.0), int(cr[c])))
                elif cs[c] == WAITING:
                    out.append((max(float(est_all[cr[c]]) - engine.generated_before[cr[c]], 0.0), int(cr[c])))
        return out

    def _longest_queued(self, k: int) -> list[tuple[float, int]]:
        """The ``k`` longest queued requests by estimate, ``(-estimate, request)``, longest first.

        O(k log n): the top of :attr:`longest`, its handed-out rows dropped on the way.
        """
        heap, out = self.longest, []
        while heap and len(out) < k:
            item = heapq.heappop(heap)
            if self.queued[item[1]]:
                out.append(item)
        for item in out:
            heapq.heappush(heap, item)
        return out

    def _urgent(self, state) -> int | None:
        """The queued request that would finish last if it waited, if any (module docstring, *Urgency*).

        The longest queued request is urgent when its estimated decode steps (scaled by
        :attr:`urgency_scale`) reach the steps the known work needs per live client, the queue's
        (its own included) and what the running requests have left, and the queue's own work per
        client is at least :data:`URGENCY_BACKLOG` of its steps. Started later, it would finish
        after the clients had drained the rest.
        """
        top = self._longest_queued(1)
        if not top:
            return None
        est, r = -top[0][0], top[0][1]
        clients = max(self._live_clients(), 1)
        scaled = self.urgency_scale * est
        queue = self.queued_steps / clients
        if not URGENCY_BACKLOG * scaled <= queue <= scaled:
            return None  # no backlog, or the queue alone outlasts it: the running work need not be read
        return r if scaled >= queue + sum(left for left, _ in self._running_left(state)) / clients else None

    def _draining(self, now: float) -> bool:
        """Whether no request has arrived for :data:`DRAIN_GAPS` mean inter-arrival gaps (*Tail hold*)."""
        if self.n_known < 2:
            return False
        gap = (self.request_last_s - self.request_first_s) / (self.n_known - 1)
        return now - self.request_last_s >= DRAIN_GAPS * gap

    def _tail_hold(self, state) -> int | None:
        """The request to serve while the queue drains, one long request per client held for the end.

        Module docstring, *Tail hold*. None when the hold does not apply (the caller then serves
        by urgency and least slack). Else the request, taken out of the queue: the longest held
        request whose start is due (its decode steps reach the level the queue fills the clients
        to, :func:`_water_level`: started later, it would end after the rest; counted in
        :attr:`n_tail`), else the least-slack head
        of the requests not held, else, when only held requests remain, the longest of them.
        """
        if not self.known_lengths or not self.ready or not self._draining(state.now):
            return None
        clients = max(self._live_clients(), 1)
        # the latencies beyond the quantile: one per client given up, and those of the finished
        # requests that already exceed what the request due first would see if it started now
        beyond = len(self.top_latencies) - bisect.bisect_left(self.top_latencies, state.now - self.ready[0][0])
        if clients + beyond > (1.0 - TAIL_QUANTILE) * self.n_known:
            return None
        running = self._running_left(state)
        horizon = _water_level(self.queued_steps, [left for left, _ in running], clients)
        # one held request per client that is not already running one to the end (started for it,
        # or running past the level the queue fills the clients to)
        ending = self.tail_running.union(r for left, r in running if left >= horizon)
        held = self._longest_queued(clients - len(ending))
        if not held:
            return None
        due = next((r for neg_est, r in held if -neg_est >= horizon), None)  # held: longest first
        if due is None:
            ids = {r for _, r in held}
            skipped = []
            while self.ready and self.ready[0][1] in ids:
                skipped.append(heapq.heappop(self.ready))
            if self.ready:
                r = heapq.heappop(self.ready)[1]
                self.n_pending -= 1
            else:
                due = held[0][1]  # only held requests are left: the longest first
            for item in skipped:
                heapq.heappush(self.ready, item)
            if due is None:
                return r
        self._take(due)
        self.tail_running.add(due)
        self.n_tail += 1
        return due

    def _take(self, request: int) -> None:
        """Take ``request`` out of the least-slack queue in O(log n) (urgency and tail hold: arrivals only)."""
        if self.ready[0][1] == request:
            heapq.heappop(self.ready)
        else:
            heap_remove(self.ready, (self.key[request], request))
        self.n_pending -= 1

    def next_request(self, state, client: int) -> int | None:
        if not self.started:
            self._start()
        if self.rollout is not None and self.dispatched >= self.rollout.next_at:
            self.rollout.revise(self)
        if (self.tail is None and self.tail_enabled and self.delegate is None and not self.arrivals_during_run
                and self.n_pending <= self.tail_plan * self.ctx.problem.n_clients
                and self.n_pending <= self.tail_plan * self._live_clients()):
            self._plan_tail(state)
        if self.tail is not None:
            r = self.tail.next_request(state, client)
        elif self.delegate is not None:
            r = self.delegate.next_request(state, client)
        elif self.steered:
            r = self._steered_request(state, client)
        else:
            r = None
            if self.urgency_on and self.arrivals_during_run:
                r = self._tail_hold(state)
                if r is None:
                    r = self._urgent(state)
                    if r is not None:
                        self.n_urgent += self.ready[0][1] != r
                        self._take(r)
                        self.tail_running.add(r)  # started to end with the rest: its client's last
            if r is None:
                r = super().next_request(state, client)
        if r is not None:
            self._unqueue(r)
            self.handed_out = True
            self.dispatched += 1
            self.ready_at.pop(r, None)
            self.holding[client] = (r, state.now)
        return r

    def wants_retry(self, state) -> bool:
        if self.tail is None and self.delegate is not None:
            return self.delegate.wants_retry(state)
        return False

    def _live_clients(self) -> int:
        state = self.ctx.extra.get("client_state")
        if state is None:
            return self.ctx.problem.n_clients
        return sum(1 for s in state if s != FAILED)

    def _plan_tail(self, state) -> None:
        """Hand the rest of the queue to the two-level end-game plan (:mod:`lloptim.runtime.endgame`)."""
        rows = np.array(sorted(r for _, r in self.ready), dtype=np.int64)
        owner = np.zeros(self.ctx.problem.n_requests, dtype=np.int64)
        owner[rows] = endgame_assignment(self.ctx, state.engine, rows, self.holding, self.endgame_limit_s)
        tail = EndgameQueues(owner, self.holding)
        tail.setup(self.ctx)
        for r in rows.tolist():
            tail.on_ready(r, state.now)
        self.ready = []
        self.n_pending = 0
        self.queued[:] = False
        self.queued_steps, self.longest = 0.0, []
        self.tail = tail
        self.tail_at_s = state.now

    def _leave_end_game(self, now: float) -> None:
        """A request arrived during the run: the end game was not one; back to the least-slack queue.

        The plan was made when the queue looked short at the first dispatch (nothing tells a
        policy that more requests will come); the planned requests return to the queue with their
        ready times, and the fleet prices restart from what the clients hold now.
        """
        queued = [r for queue in self.tail.queues for _, r in queue]
        self.tail = None
        self.tail_enabled = False
        if self.steered:
            self.fleet.setup(self.ctx)
            for c, (r, since) in self.holding.items():
                self.fleet.on_ready(r)
                self.fleet.on_start(r, c, since)
        for r in queued:
            self._enter(r, self.ready_at.get(r, now))

    def _steered_request(self, state, client: int) -> int | None:
        """:meth:`next_request` on a fleet of different instances: the priced earliest-completion pick."""
        if not self.ready:
            return None
        fleet = self.fleet
        engine = state.engine
        stamp = (state.index, state.now, fleet.version)
        if stamp == self._nothing_for:
            return None  # another idle client of this instance was just refused: same answer
        fleet.refresh(state.now)
        late = self.arrivals_during_run
        item = fleet.pick(self.ready, state.index, state.now, engine.states, past_horizon=late)
        if item is None and fleet.changes and fleet.refresh(state.now, stuck=True):
            item = fleet.pick(self.ready, state.index, state.now, engine.states, past_horizon=late)
        if item is None and not any(s.n_running or s.waiting for s in engine.states):
            item = self.ready[0]  # nothing runs anywhere: never leave the fleet idle
        if item is None:
            self._nothing_for = stamp
            return None
        if item == self.ready[0]:
            heapq.heappop(self.ready)
        elif self.arrivals_during_run:
            # under arrivals the queue is long (overload) and the pick takes from deep in it:
            # O(log n), where remove + heapify rebuilt the heap (8 % of the run at 10k requests)
            heap_remove(self.ready, item)
        else:
            # every request at once: keys tie often (equal estimates) and the deep scan of
            # FleetPrices.pick breaks ties by the heap list's order, which remove + heapify keeps
            # as it was (heap_remove leaves another order: other, equally good, decisions)
            self.ready.remove(item)
            heapq.heapify(self.ready)
        self.n_pending -= 1
        fleet.on_start(item[1], client, state.now, engine.states)
        return item[1]

    def on_finish(self, request: int, client: int, output_tokens: int, now: float) -> None:
        if self.holding.get(client, (-1, 0.0))[0] == request:
            del self.holding[client]
        self.tail_running.discard(request)
        if self.urgency_on and self.known_lengths and not np.isnan(self.arrival_s[request]):
            # only the longest (1 - TAIL_QUANTILE) share can decide the tail hold: keep those
            bisect.insort(self.top_latencies, now - float(self.arrival_s[request]))
            if len(self.top_latencies) > (1.0 - TAIL_QUANTILE) * self.n_known + 1:
                del self.top_latencies[0]
        if self.urgency_on and not self.known_lengths:
            self._learn_overrun(request, output_tokens)
        if self.tail is not None:
            self.tail.on_finish(request, client, output_tokens, now)
            return
        if self.delegate is not None:
            self.delegate.on_finish(request, client, output_tokens, now)
            return
        super().on_finish(request, client, output_tokens, now)
        if self.steered:
            self.fleet.on_finish(request, client, now)

    def on_client_failed(self, client: int, now: float) -> None:
        self.holding.pop(client, None)
        if self.tail is not None:
            self.tail.on_client_failed(client, now)
            return
        if self.delegate is not None:
            self.delegate.on_client_failed(client, now)
            return
        super().on_client_failed(client, now)

    def on_preempt(self, request: int, client: int, generated: int) -> None:
        # the KV cache binds: memory, not the clients, sets how long the work takes, and the
        # horizon in client steps no longer says when a request would finish last
        self.urgency_on = False
        super().on_preempt(request, client, generated)
        # whichever queue holds the requests now remembers refusals until its state moves: tell it
        inner = self.tail if self.tail is not None else self.delegate
        if inner is not None:
            inner.on_preempt(request, client, generated)

    def requeue(self, request: int, now: float) -> None:
        self.tail_running.discard(request)
        for c, (r, _) in list(self.holding.items()):
            if r == request:
                del self.holding[c]
        if self.tail is not None:
            self.tail.requeue(request, now)
            return
        if self.delegate is not None:
            self.ready_at[request] = now
            if self.slack_keys:
                self.delegate.key[request] = self._slack_key(request, now)
            self.delegate.requeue(request, now)
            return
        self.ready_at.setdefault(request, now)
        super().requeue(request, now)
        self._queue(request)
        if self.steered:
            self.fleet.on_requeue(request, self.key[request])
