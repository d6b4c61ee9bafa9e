"""Request schedulers that see the KV memory: projected-fit admission (MC-SF, the hybrid) and fluid pacing (WAIT).

* :class:`MemoryAwareQueue`: one queue for all clients, in an order (shortest, longest or FCFS
  estimated output, or ``"planned"``: :func:`planned_start_keys`); an idle client gets a request
  only if the instance's admitted requests and that request keep the KV cache within its capacity
  at every future step (:class:`~lloptim.runtime.kv.ProjectedMemory`). ``rule="prefix"`` admits the longest prefix of
  the queue that fits (MC-SF, Jaillet et al., arXiv 2502.07115, with shortest first);
  ``rule="first-fit"`` skips a request that does not fit for a later one that does (the hybrid's
  longest-first dispatch). When the instance's cache can hold its clients' largest requests all
  at once, memory cannot bind and the queue is a plain :class:`~lloptim.runtime.request_schedulers.GlobalQueue`
  (same order, same ties), at no cost.
* :class:`FluidPacedQueue`: WAIT (Ao, Luo, Simchi-Levi, Wang, arXiv 2504.11320) for a known set of
  requests: requests are grouped into types by estimated output; the fluid model gives each type an
  admission rate per decode step (proportional to its share of the requests, scaled so that the
  equilibrium batch fits the KV capacity and the clients), and a type is admitted when its
  accumulated rate reaches a whole request (its threshold).

Both read the engine's state through :class:`~lloptim.runtime.engine.InstanceState` and never
change it; with unknown lengths they see only the estimates.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from lloptim.bounds import decode_steps_lower_bound, memory_decode_steps_lower_bound
from lloptim.memory import blocks, decode_area_tokens
from lloptim.runtime.kv import ProjectedMemory
from lloptim.runtime.policy import RequestScheduler, RunContext

__all__ = ["MemoryAwareQueue", "FluidPacedQueue", "KnownMemory", "FleetMemoryWatch", "FLEET_FLUID_BINDS", "admitted_set", "memory_can_bind", "planned_start_keys",
           "fleet_memory_split", "fleet_speed_mask", "fleet_speed_horizon", "spread_weight", "estimated_kv_area", "kv_mode_of", "UNKNOWN_PROJECTION", "SPREAD_FULL_AT", "RAMP_FULL",
           "memory_sets_steps", "fluid_memory_ratio"]

RUNNING, WAITING = 2, 1  # engine client states (lloptim.runtime.engine), read-only here


def admitted_set(state, estimates, start_delay: int = 1, scale: float = 1.0,
                 overrun: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """KV tokens held now, decode steps left and reservation of each request admitted on ``state``'s instance.

    Running requests hold their prompt plus what they generated; waiting ones (assigned, not yet
    prefilled) count their context. Steps left come from ``estimates`` (at least 1).

    Parameters
    ----------
    state
        The instance (:class:`~lloptim.runtime.engine.InstanceState`).
    estimates
        Estimated output length of each request, tokens.
    start_delay
        Decode steps a waiting request may wait for its prefill (a fused prefill takes part in one
        decode step before the request decodes): it is projected to finish that much later.
    scale
        Factor on the estimates (below 1: admit on the hope that requests end early, and let
        preemption handle the ones that do not; for unknown lengths).
    overrun
        A running request past its (scaled) estimate is projected to run ``overrun`` times the
        tokens it has generated more (heavy tails: the longer it ran, the longer it will).

    Returns
    -------
    tuple
        ``(tokens, remaining, floors)``: int64 arrays; ``floors`` (the reservations) only in
        reserve mode, else None.
    """
    engine = state.engine
    step = state.decode_steps
    cs, cr, start = engine.client_state, engine.client_request, engine.client_start_step
    reserve = state.kv_mode == "reserve"
    tokens, rem, floors = [], [], []
    # math.ceil on the float64 products: the integers np.ceil gives, without a numpy call per client
    for c in state.clients:
        st = cs[c]
        if st == RUNNING:
            r = cr[c]
            g = step - start[c]
            tokens.append(engine.prompt[r] + g)
            rem.append(max(math.ceil(scale * estimates[r]) - g, math.ceil(overrun * g)))
        elif st == WAITING:
            r = cr[c]
            tokens.append(engine.context[r])
            rem.append(math.ceil(scale * estimates[r]) - engine.generated_before[r] + start_delay)
        else:
            continue
        if reserve:
            floors.append(state.floor_tokens(r))
    return (np.asarray(tokens, dtype=np.int64), np.maximum(np.asarray(rem, dtype=np.int64), 1),
            np.asarray(floors, dtype=np.int64) if reserve else None)


def kv_mode_of(ctx: RunContext, instance: int) -> str:
    """The KV mode ``instance`` runs in (the run's override, else its spec's).

    Parameters
    ----------
    ctx
        The run context (:class:`~lloptim.runtime.policy.RunContext`): the problem, the output
        estimates the policy sees, and the run's KV mode overrides.
    instance
        Instance index.

    Returns
    -------
    str
        ``"paged"`` or ``"reserve"``.
    """
    modes = ctx.extra.get("kv_mode")
    return modes[instance] if modes else ctx.problem.instances[instance].kv_mode


def estimated_kv_area(ctx: RunContext, instance: int) -> float:
    """KV area of all requests on ``instance``'s blocks from what the policy knows, token-steps.

    The sum of :func:`estimated_kv_areas`.

    Parameters
    ----------
    ctx, instance
        The run context and an instance index, as for :func:`kv_mode_of`.

    Returns
    -------
    float
        Total KV area, token-steps (tokens held summed over decode steps).
    """
    return float(estimated_kv_areas(ctx, instance).sum())


def estimated_kv_areas(ctx: RunContext, instance: int) -> np.ndarray:
    """KV area of each request on ``instance``'s blocks from what the policy knows, token-steps.

    :func:`lloptim.memory.decode_area_tokens` of the estimated outputs; in reserve mode a request
    holds at least its reservation (its cap, else its estimate).

    Parameters
    ----------
    ctx, instance
        The run context and an instance index, as for :func:`kv_mode_of`.

    Returns
    -------
    numpy.ndarray
        KV area of each request, token-steps (float64).
    """
    from lloptim.memory import decode_area_tokens, reservation_tokens

    inst = ctx.problem.instances[instance]
    w = ctx.problem.workload
    est = np.maximum(np.ceil(ctx.estimates), 1).astype(np.int64)
    floor = None
    if kv_mode_of(ctx, instance) == "reserve":
        floor = np.minimum(reservation_tokens(w.prompt_tokens, w.max_output_tokens, est),
                           inst.kv_blocks * inst.kv_block_tokens)
    return decode_area_tokens(w.prompt_tokens, est, inst.kv_block_tokens, floor)


def memory_can_bind(ctx: RunContext, instance: int, rows: np.ndarray | None = None) -> bool:
    """Whether ``instance``'s cache could fill up: not if it holds its clients' largest requests at once.

    Decided from what the policy knows (prompts, caps and estimates) of ``rows`` (default: every
    request; pass the requests known so far when they arrive over time, so that nothing of the
    future is read).

    Parameters
    ----------
    ctx, instance
        The run context and an instance index, as for :func:`kv_mode_of`.
    rows
        Row indices of the requests to consider (``None``: all).

    Returns
    -------
    bool
        Whether the blocks of its clients' largest peaks (``prompt + max(estimate, cap)`` tokens,
        in whole blocks) exceed its KV blocks.
    """
    inst = ctx.problem.instances[instance]
    w = ctx.problem.workload
    rows = slice(None) if rows is None else np.asarray(rows, dtype=np.int64)
    peak = w.prompt_tokens[rows] + np.maximum(np.ceil(ctx.estimates[rows]).astype(np.int64), w.max_output_tokens[rows])
    B = inst.kv_block_tokens
    top = np.sort(-(-peak // B))[-inst.clients:]
    return int(top.sum()) > inst.kv_blocks


class KnownMemory:
    """Whether each instance's cache can fill up, over the requests known so far, updated as they become known.

    :func:`memory_can_bind` of the known requests, kept incrementally: per instance, the ``C``
    largest peak block counts (a min-heap) and their sum; an instance binds once that sum exceeds
    its blocks, and then for good (more requests only raise the top ``C``). O(m log C) per request,
    so a scheduler can follow arrivals without reading a request before it is known.

    Parameters
    ----------
    ctx
        The run (prompts, caps and estimates; a request's own values are read only by :meth:`add`).

    Attributes
    ----------
    binds : list of bool
        Per instance: whether the known requests can fill its cache (the same list object for
        the whole run, updated in place).
    n_known : int
        Requests added so far (count).
    """

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.insts = [(inst.kv_block_tokens, inst.clients, inst.kv_blocks) for inst in ctx.problem.instances]
        self.top: list[list[int]] = [[] for _ in self.insts]
        self.total = [0] * len(self.insts)
        self.binds = [False] * len(self.insts)
        self.n_known = 0

    def add(self, request: int) -> None:
        """``request`` became known: count its peak KV blocks (prompt plus the larger of estimate and cap).

        Parameters
        ----------
        request
            Row index of the request.
        """
        self.n_known += 1
        if all(self.binds):
            return
        w = self.ctx.problem.workload
        peak = int(w.prompt_tokens[request]) + max(int(np.ceil(self.ctx.estimates[request])),
                                                   int(w.max_output_tokens[request]))
        for k, (block, clients, capacity) in enumerate(self.insts):
            if self.binds[k]:
                continue
            need = -(-peak // block)
            heap = self.top[k]
            if len(heap) < clients:
                heapq.heappush(heap, need)
                self.total[k] += need
            elif need > heap[0]:
                self.total[k] += need - heapq.heapreplace(heap, need)
            else:
                continue
            if self.total[k] > capacity:
                self.binds[k] = True
                heap.clear()


def memory_sets_steps(ctx: RunContext, rows: np.ndarray | None = None) -> bool:
    """Whether the KV memory rather than the clients sets the bound's decode steps, from what the policy knows.

    The memory-aware bound's two decode-step terms (:func:`lloptim.lower_bound`) from the estimates
    of ``rows`` (the requests known so far), the instances pooled: the KV area with the ramp-up
    from an empty cache (:func:`~lloptim.bounds.memory_decode_steps_lower_bound`) against the
    clients term (:func:`~lloptim.bounds.decode_steps_lower_bound`: the output tokens over the
    clients, or the longest requests). Where it is False the clients bind, and memory left idle
    costs no decode step.

    Parameters
    ----------
    ctx
        The run context, as for :func:`kv_mode_of`.
    rows
        Row indices of the requests to consider (``None``: all).

    Returns
    -------
    bool
        Whether the memory term is at least the clients term.
    """
    insts = ctx.problem.instances
    sel = slice(None) if rows is None else np.asarray(rows, dtype=np.int64)
    est = np.maximum(np.ceil(np.asarray(ctx.estimates, dtype=np.float64)[sel]), 1.0).astype(np.int64)
    clients = sum(i.clients for i in insts)
    by_clients = decode_steps_lower_bound(est, clients)
    by_memory = memory_decode_steps_lower_bound(
        estimated_kv_areas(ctx, 0)[sel], sum(i.kv_blocks * i.kv_block_tokens for i in insts), clients,
        start_holdings=ctx.problem.workload.prompt_tokens[sel], block_tokens=insts[0].kv_block_tokens)
    return by_memory >= by_clients


def fluid_memory_ratio(ctx: RunContext, rows: np.ndarray | None = None) -> float:
    """``rho``: the decode steps the KV memory forces over those the clients force, in the fluid limit.

    The estimated KV area over the capacity against the estimated output tokens over the
    clients, pooled over the instances, from what the policy knows of ``rows``: the bound's two
    throughput terms (:func:`memory_sets_steps`) without its ramp-up or its longest request,
    which is what binds in a steady stream of arriving requests (WAIT's fluid model compares the
    same two rates). Above 1 the memory binds, below 1 the clients do.

    Parameters
    ----------
    ctx
        The run context, as for :func:`kv_mode_of`.
    rows
        Row indices of the requests to consider (``None``: all).

    Returns
    -------
    float
        The ratio, dimensionless.
    """
    insts = ctx.problem.instances
    sel = slice(None) if rows is None else np.asarray(rows, dtype=np.int64)
    est = np.maximum(np.ceil(ctx.estimates[sel]), 1).astype(np.int64)
    by_clients = est.sum() / sum(i.clients for i in insts)
    by_memory = float(estimated_kv_areas(ctx, 0)[sel].sum()) / sum(i.kv_blocks * i.kv_block_tokens for i in insts)
    return float(by_memory / by_clients)


def spread_weight(ctx: RunContext, rows: np.ndarray | None = None) -> float:
    """How much the planned order spreads starts (1) rather than going longest first (0), in [0, 1].

    From the estimates: ``rho`` = the decode steps the KV memory forces over those the clients
    force (pooled over the instances). Where only memory binds (``rho >= 1.8``) the tail decides and
    longest first is right; where both bind (``rho <= 1``) the run must keep both busy at once,
    which needs starts of every length spread over it. Linear in between; chosen on training
    workloads (``benchmarks/memory.py --tune``). 0 when no instance's cache can fill up. Over
    ``rows`` only when given (the requests known so far).

    Parameters
    ----------
    ctx
        The run context, as for :func:`kv_mode_of`.
    rows
        Row indices of the requests to consider (``None``: all).

    Returns
    -------
    float
        The weight, a fraction in [0, 1].
    """
    if not any(memory_can_bind(ctx, k, rows) for k in range(len(ctx.problem.instances))):
        return 0.0
    rho = fluid_memory_ratio(ctx, rows)
    return float(np.clip((SPREAD_FULL_AT[1] - rho) / (SPREAD_FULL_AT[1] - SPREAD_FULL_AT[0]), 0.0, 1.0))


#: The projection's factor on estimates and its overrun forecast when lengths are unknown (see
#: :func:`admitted_set`); chosen on training workloads (``benchmarks/memory.py --tune``).
UNKNOWN_PROJECTION = (0.85, 0.3)
#: ``rho`` at which the planned order is fully spread, and at which it is longest first (see :func:`spread_weight`).
SPREAD_FULL_AT = (1.0, 1.8)
_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0
#: Longest wait between two retries of an instance whose queue keeps refusing (decode steps): the
#: wait doubles from 1 with each refusal in a row (a finish makes the engine ask anyway), so a run
#: whose cache stays full does not evaluate the projection at every step. Retrying at every step
#: made memory-bound runs 2-5 times slower; waits of up to 2, 4 or 8 steps gave makespans within
#: 0.2 points of it (``benchmarks/memory.py`` workloads, sigma 1.0-1.5, rho 1.0-2.0), 8 the fastest.
RETRY_BACKOFF_MAX = 8
#: Fraction of its blocks an instance's admitted requests must hold for its cache to count as filled,
#: which ends the fill-up rule of :class:`MemoryAwareQueue` (``fill_ramp``) on that instance.
RAMP_FULL = 0.97
#: Growth of the known requests (factor) that triggers a new planned order (``order="planned"``) as
#: requests arrive: the order of the requests known so far, at amortized O(log n) per request.
REPLAN_GROWTH = 1.5


def planned_start_keys(ctx: RunContext, weight: float | None = None, rows: np.ndarray | None = None,
                       phase: float = 0.0) -> np.ndarray:
    """Sort keys of the ``"planned"`` order: target start steps of a plan that keeps clients and memory busy.

    With ``D`` the decode steps of the bound (from the estimates), request ``r`` of estimated output
    ``o_r`` can start as late as ``D - o_r``. Longest first starts every long request at once, and
    its KV memory then peaks while the short requests left for the end keep the clients busy with
    little memory; spreading each request's start over its window, at a low-discrepancy fraction
    ``phi_r`` (the golden-ratio sequence over the requests sorted by length, so every length gets
    early and late starts) keeps both resources busy throughout. The key blends the two,
    ``w phi_r (D - o_r) + (1 - w)(max o - o_r)``, with ``w`` = :func:`spread_weight`.

    Parameters
    ----------
    ctx
        The run (estimates, problem).
    weight
        The blend ``w``; None: :func:`spread_weight`.
    rows
        Plan only these requests (the ones known so far); default: every request.
    phase
        Shift of the fractions, ``phi_r`` -> ``(phi_r + phase) mod 1`` in [0, 1): the same spread,
        another assignment of early and late starts to the requests (0: the default order; the
        candidates of :class:`~lloptim.runtime.order_choice.SimulatedOrderChoice`).

    Returns
    -------
    numpy.ndarray
        One key per request (of ``rows``), smaller first (float64, steps).
    """
    sel = slice(None) if rows is None else np.asarray(rows, dtype=np.int64)
    est = np.maximum(np.ceil(np.asarray(ctx.estimates, dtype=np.float64)[sel]), 1.0)
    w = spread_weight(ctx, rows) if weight is None else float(weight)
    if w <= 0.0:
        return -est  # longest first, exactly as the sorted dispatch without memory
    insts = ctx.problem.instances
    area = float(estimated_kv_areas(ctx, 0)[sel].sum())
    D = max(est.sum() / sum(i.clients for i in insts), area / sum(i.kv_blocks * i.kv_block_tokens for i in insts))
    rank = np.empty(est.size, dtype=np.int64)
    rank[np.argsort(-est, kind="stable")] = np.arange(est.size)
    phi = (rank * _GOLDEN + phase) % 1.0
    return w * phi * np.maximum(D - est, 0.0) + (1.0 - w) * (est.max() - est) - 1e-6 * est


class MemoryAwareQueue(RequestScheduler):
    """One queue; an idle client gets the first request in order whose KV memory fits the projection.

    Requests enter when the engine announces them ready (:meth:`on_ready`); the scheduler reads no
    arrival time.

    Parameters
    ----------
    order
        ``"shortest"``, ``"longest"`` (by estimated output), ``"fcfs"`` (ready time) or
        ``"planned"`` (target start steps, :func:`planned_start_keys`; longest first where memory
        cannot bind), or ``"external"`` (keys the owner writes, :meth:`rekey`: the hybrid's
        dispatch plans the requests known so far). Ties go to the lower row.
    rule
        ``"first-fit"``: the first request in order that fits, except that a request that has
        become *urgent* is never overtaken: one whose estimated output is at least the decode
        steps the rest of the queue needs at full speed (it would finish last if it waited; with
        ``urgency_horizon``, the rest of the queue and the admitted requests' remaining work), the
        moment longest-first dispatch would have taken it; ``"prefix"``: the head only, so nobody
        overtakes a request waiting for memory (MC-SF).
    plan
        Optional offline assignment (global client per request, or a callable of the run context):
        a request served by another client than planned counts in :attr:`steals`.
    start_delay
        Decode steps between handing a request out and its first decode step that the projection
        allows for (see :func:`admitted_set`).
    unknown_scale, overrun
        With unknown lengths, the projection's factor on the estimates and its forecast for a
        request past its estimate (see :func:`admitted_set`); defaults :data:`UNKNOWN_PROJECTION`.
        With known lengths the projection is exact (1, 0).
    workflows
        A request scheduler for workloads with precedence (the hybrid passes its
        :class:`~lloptim.runtime.request_schedulers.WorkflowQueue`): on such a workload every hook
        goes to it, and its :attr:`critical` requests are this scheduler's.
    priced_headroom
        With unknown lengths, take the projection's factor on the estimates from the run's memory
        price (``ctx.extra["memory_price"]``, the hybrid's
        :meth:`~lloptim.runtime.lagrangian.LagrangianIterations.projection_scale`) at every
        admission instead of the fixed ``unknown_scale``: optimistic where memory sets the decode
        steps, the median where it does not. Without a price in the run, ``unknown_scale``.
    planner
        The keys of the ``"planned"`` order (and of the hybrid's dispatch, which calls it with the
        requests ready at its first dispatch): a function ``planner(ctx, rows=rows)`` of the run context and the
        rows of the requests known so far (None: all) that returns one key per row, smaller
        first (target start steps). None: :func:`planned_start_keys`. For studying other start
        plans (``benchmarks/memory_start_plan.py`` plans them with an LP).
    fill_ramp
        ``rule="first-fit"``, paged KV only: until an instance's cache first fills (its admitted
        requests hold :data:`RAMP_FULL` of its blocks) or first refuses a request, hand an idle
        client the fitting request that will hold the most KV memory when the cache is projected
        to fill rather than the first in order (:meth:`_fill_pick`; an urgent request still goes
        first), wherever memory sets the bound's decode steps (:func:`memory_sets_steps` of the
        requests known so far). From an empty cache the clients bind and the memory idles: the
        requests started first decide how fast it fills. ``"known"``: only when the policy knows
        the output lengths (with noisy estimates the estimated KV areas, sums of squares, run
        high, and the test above says memory binds where it does not); True: on estimates too;
        False: never.
    fleet_homes
        ``rule="first-fit"`` on a fleet: give the requests known at the first decision a *home*
        instance, the offline LP's split (:func:`fleet_memory_split`), and let a client of an
        instance with less KV memory per client than the roomiest instance of the fleet take,
        among the next ``C`` requests in order (``C`` its instance's clients: the ones its
        clients would take in their next wave), the first that is homed there and fits, before
        the first that fits (:meth:`_home_pick`). One queue for a whole fleet otherwise hands a
        small cache the same mix of long and short requests as a large one: its memory fills
        while half its clients idle. The LP sends a small cache many short requests (little KV
        area per decode step) and the roomiest cache the long ones; a hard split by it is worse
        still (the roomiest cache, left only long requests, cannot be kept full: its ramp-up and
        its tail idle it), so the split only steers the small caches' choice within the planned
        order, and the roomiest cache keeps taking whatever comes first. Requests announced
        after the first decision have no home. ``"known"``: only when the policy knows the
        output lengths (with noisy estimates the split, made from estimated KV areas, misplaces
        requests and the rule lost 0.5-2 points on held-out fleets); True: on estimates too;
        False: never. Measured in the docs (*KV memory*, fleets).
    urgency_horizon
        ``rule="first-fit"``, one instance, paged KV: whether the horizon of the urgency test (the decode
        steps the rest of the work needs at full speed, by clients and by KV area) counts the
        instance's admitted requests' remaining steps and KV area besides the queue's. Without
        them the horizon is short by the work already running, and a long request becomes urgent
        while the rest would still run well past its end: the long requests end early and the run
        ends on short ones, with the clients busy and the cache a half to two thirds full.
        ``"known"``: only when the policy knows the output lengths (with noisy estimates it cost
        a point at rho 1.0: docs, *KV memory*); True: on estimates too; False: the queue alone.
    urgency_lookahead
        Where the urgency horizon counts the admitted work (``urgency_horizon`` in force, one
        instance, paged KV), ``rule="first-fit"``, once the cache has filled: before handing out
        the first request that fits, check whether that admission would make the longest ready
        request late, and if so hand out the longest instead (:meth:`_lookahead`). The urgency
        test alone fires only when a long request *is* due; by then the requests admitted in the
        meantime may hold the memory it needs for hundreds of steps, and it waits, urgent, while
        the run's other work drains: on heavy tails the run then ends on two or three long
        requests started together late (``benchmarks/memory.py``, sigma 1.5, rho 1.0, seed 21:
        a 1,230-token request fitted at step 5,880, was urgent at 5,916 and could start only at
        6,149, and the run ended 150 steps after the others, 4.31 % above the bound; 3.50 % with
        it; hand-outs counted in :attr:`lookaheads`). False (default) or True: it fixes that
        pattern but not the means; on held-out workloads of that benchmark (seeds 400-409, sigma
        1.0-1.5, 50 per class) the mean gap moved by +0.02 points at rho 1.0 and +0.03 at rho 1.4
        (no change at rho 2.0), on training seeds by -0.06 to +0.02.
    fleet_speeds
        On a fleet whose instances differ in speed (profiles or client counts): an idle client
        considers only the requests that may start on its instance (:func:`fleet_speed_mask`):
        not one that would by itself run past the fleet's horizon there while another instance
        would finish it sooner. One queue for the whole fleet otherwise hands the longest
        request to whichever client asks first, a slow instance's as readily as a fast one's.
        False (default; MC-SF as published): any client takes the request in order.
    head_first
        ``rule="first-fit"``: the head of the order is always urgent: it starts as soon as it fits,
        and while it waits only requests that end before it can fit start (EASY backfilling, as
        for an urgent request). For an order by due time (the hybrid's least-slack keys once
        requests arrive), where the head is the request due first: first-fit alone lets the
        requests that fit overtake a large one for as long as others keep arriving. The hybrid's
        dispatch turns it on (the attribute) when it hands its queue over under arrivals
        (:class:`~lloptim.runtime.dispatch.HybridDispatch`, ``memory_handover``). False (default):
        the first request in order that fits.
    """

    def __init__(self, order: str = "longest", rule: str = "first-fit", plan=None, start_delay: int = 1,
                 unknown_scale: float | None = None, overrun: float | None = None, workflows=None,
                 priced_headroom: bool = False, planner=None, fill_ramp: bool | str = False,
                 fleet_homes: bool | str = False, urgency_horizon: bool | str = False,
                 fleet_speeds: bool = False, head_first: bool = False, urgency_lookahead: bool = False) -> None:
        self.head_first_default = bool(head_first)
        self.head_first = self.head_first_default
        self.fleet_speeds = bool(fleet_speeds)
        if fleet_homes not in (True, False, "known"):
            raise ValueError(f"fleet_homes must be True, False or 'known', not {fleet_homes!r}")
        self.fleet_homes = fleet_homes if rule == "first-fit" else False
        if planner is not None and not callable(planner):
            raise ValueError(f"planner must be a function planner(ctx, rows=...) -> keys or None, not {planner!r}")
        self.planner = planned_start_keys if planner is None else planner
        self.priced_headroom = priced_headroom
        self.start_delay = int(start_delay)
        self.unknown_scale = UNKNOWN_PROJECTION[0] if unknown_scale is None else float(unknown_scale)
        self.overrun = UNKNOWN_PROJECTION[1] if overrun is None else float(overrun)
        if order not in ("fcfs", "shortest", "longest", "planned", "external"):
            raise ValueError(f"order must be 'fcfs', 'shortest', 'longest', 'planned' or 'external', not {order!r}")
        if rule not in ("first-fit", "prefix"):
            raise ValueError(f"rule must be 'first-fit' or 'prefix', not {rule!r}")
        self.order = order
        self.rule = rule
        if fill_ramp not in (True, False, "known"):
            raise ValueError(f"fill_ramp must be True, False or 'known', not {fill_ramp!r}")
        self.fill_ramp = fill_ramp if rule == "first-fit" else False
        if urgency_horizon not in (True, False, "known"):
            raise ValueError(f"urgency_horizon must be True, False or 'known', not {urgency_horizon!r}")
        self.urgency_horizon = urgency_horizon
        if urgency_lookahead not in (True, False):
            raise ValueError(f"urgency_lookahead must be True or False, not {urgency_lookahead!r}")
        self.urgency_lookahead = urgency_lookahead
        self.plan = plan
        self.workflows = workflows
        self.delegate = None
        self.steals = 0
        self.refusals = 0
        self.lookaheads = 0

    @property
    def critical(self) -> set[int] | None:
        """Requests without slack in the workflow plan (see ``workflows``); None without precedence."""
        return getattr(self.delegate, "critical", None)

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        w = ctx.problem.workload
        self.delegate = None
        if self.workflows is not None and w.precedence is not None:
            self.delegate = self.workflows
            self.workflows.setup(ctx)
            return
        n = ctx.problem.n_requests
        if self.order == "fcfs":
            key = np.zeros(n)  # filed under its ready time by on_ready
        elif self.order == "shortest":
            key = ctx.estimates
        elif self.order == "planned":
            key = np.zeros(n)  # planned over the requests known so far (:meth:`_replan`)
        elif self.order == "external":
            key = np.zeros(n)  # written by the owner (:meth:`rekey`, or ``key[r]`` before on_ready)
        else:
            key = -ctx.estimates
        self.key = np.asarray(key, dtype=np.float64)
        self.est = np.asarray(ctx.estimates, dtype=np.float64)
        self.scale, self.over = (1.0, 0.0) if ctx.known_lengths else (self.unknown_scale, self.overrun)
        # a queued request has not started (a fault restarts one from its prompt): its context is its prompt
        self.cand_tokens = w.prompt_tokens.astype(np.int64)
        # urgency: the ready queue's work at full speed (steps by clients and by memory), its longest request
        insts = ctx.problem.instances
        self.clients_total = sum(i.clients for i in insts)
        self.capacity_total = sum(i.kv_blocks * i.kv_block_tokens for i in insts)
        self.area = estimated_kv_areas(ctx, 0)
        self.ready_steps = 0.0
        self.ready_area = 0.0
        self.longest: list[tuple[float, int]] = []  # (-estimate, row) of ready requests, taken ones skipped
        self.taken = np.ones(n, dtype=bool)  # not ready, or handed out
        # ready requests: a heap by (key, row) for taking the head, and a sorted array of them for
        # scanning in order, merged from the heap when new requests became ready
        self.heap: list[tuple[float, int]] = []
        self._sorted = np.zeros(0, dtype=np.int64)
        self._unsorted = True  # keys or members changed since the last sort (:meth:`_ordered`)
        self._new: list[int] = []
        self.n_pending = 0
        owner = self.plan(ctx) if callable(self.plan) else self.plan
        self.owner = None if owner is None else np.asarray(owner, dtype=np.int64).tolist()
        # whether each cache can fill up, from the requests known so far (never one of the future)
        self.known_memory = KnownMemory(ctx)
        self.binds = self.known_memory.binds
        self.known: list[int] = []           # rows announced ready, in order
        self.planned_n = 0                   # known requests when the planned order was last computed
        self.owner_keys = False              # an owner wrote the keys (:meth:`rekey`): no replanning
        self._cache: tuple | None = None
        self._refused: tuple | None = None
        self._steps_for: dict[tuple, np.ndarray] = {}  # (cache tokens, scale) -> every request's projected steps
        self.retry_step: dict[int, int] = {}  # instance -> decode step at which a refused request may fit
        self.retry_backoff: dict[int, int] = {}  # instance -> least wait before the next retry, steps
        fill = self.fill_ramp is True or (self.fill_ramp == "known" and ctx.known_lengths)
        # the urgency horizon counts the admitted requests' remaining work (one instance: a fleet's
        # other instances are not in the projection this queue computes; paged KV: with reservations
        # it was mixed, docs *KV memory*)
        self.horizon_admitted = len(insts) == 1 and kv_mode_of(ctx, 0) == "paged" and (
            self.urgency_horizon is True or (self.urgency_horizon == "known" and ctx.known_lengths))
        self.filled = [not fill] * len(insts)  # per instance: its cache has filled once (fill-up rule over)
        # the urgency lookahead reads the admitted work's horizon: where that horizon is in force
        self.lookahead = self.urgency_lookahead and self.horizon_admitted and self.rule == "first-fit"
        self.fill_gate: tuple[int, bool] = (0, False)  # (known requests when evaluated, memory_sets_steps of them)
        # fleet homes: per instance, whether its clients prefer their home requests (less KV memory
        # per client than the roomiest instance); the homes themselves at the first decision
        room = [i.kv_blocks * i.kv_block_tokens / i.clients for i in insts]
        homes = self.fleet_homes is True or (self.fleet_homes == "known" and ctx.known_lengths)
        self.prefers = [r < max(room) for r in room] if homes and len(insts) > 1 else None
        self.home: np.ndarray | None = None
        # fleet speeds: per request and instance, whether it may start there (:func:`fleet_speed_mask`),
        # on a fleet whose instances differ in speed; computed over the known requests
        self.speeds_differ = self.fleet_speeds and len(insts) > 1 and len({(i.profile.latency, i.clients) for i in insts}) > 1
        self.allowed: np.ndarray | None = None
        self.allowed_n = 0
        self.allowed_upto = 0                 # known requests whose row of ``allowed`` is set
        self.speed_horizon: tuple | None = None
        self._nothing_here: dict[int, tuple] = {}  # instance -> stamp at which nothing in order could start there
        self.steals = 0
        self.refusals = 0
        self.lookaheads = 0
        self.head_first = self.head_first_default  # an owner may turn it on after set-up

    def pending(self) -> int:
        if self.delegate is not None:
            return self.delegate.pending()
        return self.n_pending

    def on_ready(self, request: int, now: float) -> None:
        if self.delegate is not None:
            self.delegate.on_ready(request, now)
            return
        if self.order == "fcfs":
            self.key[request] = now
        self.known.append(request)
        self.known_memory.add(request)
        self._enter(request)

    def learn(self, request: int) -> None:
        """``request`` became known before this queue took over (another queue handed it out).

        It counts in what the queue knows (whether each cache can fill up, the planned order's
        and the fill-up test's rows) but never enters the queue.

        Parameters
        ----------
        request
            Row index of the request.
        """
        self.known.append(request)
        self.known_memory.add(request)

    def _replan(self) -> None:
        """The ``"planned"`` order of the requests known so far, recomputed when they have grown by
        :data:`REPLAN_GROWTH` (with every request at time 0: once, over all of them)."""
        rows = np.asarray(self.known, dtype=np.int64)
        self.planned_n = rows.size
        keys = self.planner(self.ctx, rows=None if rows.size == self.ctx.problem.n_requests else rows)
        if rows.size == self.ctx.problem.n_requests:
            keys = keys[rows]
        self.key[rows] = keys
        ready = np.flatnonzero(~self.taken)
        self.heap = [(float(self.key[r]), int(r)) for r in ready]
        heapq.heapify(self.heap)
        self._sorted = ready
        self._new = []
        self._unsorted = True

    def rekey(self, rows: np.ndarray, keys: np.ndarray) -> None:
        """Give ``rows`` new sort keys (smaller first) and re-sort the ready requests.

        Parameters
        ----------
        rows
            Request rows (ready or not).
        keys
            Their keys, one per row (float64; the unit is the owner's, e.g. seconds or steps).
        """
        self.owner_keys = True
        self.key[np.asarray(rows, dtype=np.int64)] = keys
        ready = np.flatnonzero(~self.taken)
        self.heap = [(float(self.key[r]), int(r)) for r in ready]
        heapq.heapify(self.heap)
        self._sorted = ready
        self._new = []
        self._unsorted = True

    def _enter(self, r: int, again: bool = False) -> None:
        heapq.heappush(self.heap, (float(self.key[r]), r))
        # a request back in the queue (``again``: preempted, or its client failed) may still be in the
        # sorted list, which drops taken rows only when next read (:meth:`_ordered`): list it once
        if not (again and np.any(self._sorted == r)):
            self._new.append(r)
        self._unsorted = True
        self.taken[r] = False
        self.n_pending += 1
        self.ready_steps += float(self.est[r])
        self.ready_area += float(self.area[r])
        heapq.heappush(self.longest, (-float(self.est[r]), r))

    def _ordered(self) -> np.ndarray:
        """The ready requests in order (rows), merging the newly ready ones."""
        rows = self._sorted
        if self._new:
            rows = np.concatenate([rows, np.asarray(self._new, dtype=np.int64)])
            self._new = []
        rows = rows[~self.taken[rows]]
        if rows.size > 1 and self._unsorted:
            rows = rows[np.lexsort((rows, self.key[rows]))]
        self._unsorted = False
        self._sorted = rows
        return rows

    def _longest_ready(self) -> tuple[float, int] | None:
        """``(estimate, row)`` of the longest ready request (ties: the lower row), or None if none is ready."""
        heap = self.longest
        while heap and self.taken[heap[0][1]]:
            heapq.heappop(heap)
        return (-heap[0][0], heap[0][1]) if heap else None

    def _horizon(self, r: int, est: float, pm: ProjectedMemory | None) -> float:
        """Decode steps the work other than ready request ``r`` needs at full speed (the urgency test's horizon).

        The ready queue's output over the clients or its KV area over the capacity, whichever is
        more; with ``pm`` (``urgency_horizon``) the admitted requests' remaining steps and KV area
        count too.
        """
        steps, area = self.ready_steps - est, self.ready_area - self.area[r]
        if pm is not None and pm.t.size:
            # the admitted requests keep clients and memory busy for their remaining steps too:
            # their client-steps, and their KV area from what they hold now (in whole blocks)
            steps += float(pm.rem.sum())
            area += float(decode_area_tokens(pm.t, pm.rem, pm.B, pm.f if pm.f.any() else None).sum())
        return max(steps / self.clients_total, area / self.capacity_total)

    def _urgent(self, pm: ProjectedMemory | None = None) -> int | None:
        """The ready request that must start now, if any (see the class docstring).

        ``pm``: the instance's admitted set, whose remaining work then counts in the horizon the
        request is compared with (``urgency_horizon``; one instance only).
        """
        top = self._longest_ready()
        if top is None:
            return None
        est, r = top
        return r if est >= self._horizon(r, est, pm) else None

    def _lookahead(self, state, pm: ProjectedMemory, row: int, tokens: int, steps: int) -> int | None:
        """The longest ready request, if admitting ``row`` now would make it late; else None (``urgency_lookahead``).

        With ``D`` the horizon of the longest ready request ``L`` (:meth:`_horizon`, admitted work
        counted) and ``e_L`` its estimated output, ``L`` is due once ``e_L >= D``. If ``L`` fits
        now, and with ``row`` (context ``tokens``, ``steps`` projected decode steps) admitted it
        could first fit only ``w`` steps from now (:meth:`~lloptim.runtime.kv.ProjectedMemory.earliest_start`)
        with ``e_L + w >= D``, then admitting ``row`` would make ``L`` wait past its due time:
        ``L`` is handed out instead. No constant: the test is the urgency test with the wait the
        admission would cause added, and when nothing could make ``L`` wait that long (the
        set's and the candidate's last steps) no projection is computed.
        """
        top = self._longest_ready()
        if top is None or top[1] == row:
            return None
        est, r = top
        due = self._horizon(r, est, pm)
        longest_wait = max(int(pm.taus[-1]) if pm.taus.size else 0, int(steps))
        if est + longest_wait < due:
            return None  # no admission now can make it wait past its due time
        t, st, _ = self._candidates(state, np.array([r], dtype=np.int64))
        if not pm.fits(t, st)[0]:
            return None  # it waits anyway (if due, backfilling around it is the urgency rule's)
        after = ProjectedMemory(np.append(pm.t, tokens), np.append(pm.rem, steps), pm.cap, pm.B)
        return int(r) if est + after.earliest_start(int(t[0]), int(st[0])) >= due else None

    @staticmethod
    def _key(state) -> tuple:
        return state.index, state.decode_steps, state.n_running, len(state.waiting), state.now

    def _projection(self, state) -> ProjectedMemory:
        """The instance's admitted set, reused while only this scheduler's own assignments changed it."""
        key = self._key(state)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        t, rem, floors = admitted_set(state, self.est, self.start_delay, self.scale, self.over)
        pm = ProjectedMemory(t, rem, state.kv_blocks, state.kv_block, floors)
        self._cache = (key, pm)
        return pm

    def _take(self, r: int, client: int) -> int:
        self.taken[r] = True
        self.n_pending -= 1
        self.ready_steps -= float(self.est[r])
        self.ready_area -= float(self.area[r])
        if self.owner is not None and self.owner[r] != client:
            self.steals += 1
        return r

    def next_request(self, state, client: int) -> int | None:
        if self.delegate is not None:
            return self.delegate.next_request(state, client)
        if not self.n_pending:
            return None
        if self.order == "planned" and not self.owner_keys and len(self.known) >= REPLAN_GROWTH * self.planned_n:
            self._replan()
        if self.speeds_differ:
            return self._next_on_fleet(state, client)
        if not self.binds[state.index]:
            heap = self.heap
            while self.taken[heap[0][1]]:
                heapq.heappop(heap)
            return self._take(heapq.heappop(heap)[1], client)
        return self._next_fitting(state, client)

    def _next_on_fleet(self, state, client: int) -> int | None:
        """:meth:`next_request` on a fleet of different speeds: only the requests that may start here.

        A request that would by itself run past the fleet's horizon on this instance, while another
        instance would finish it sooner, is left to the faster one (:func:`fleet_speed_mask`); an
        instance whose cache cannot fill up takes the first of the rest in order.
        """
        if self.allowed is None or len(self.known) >= REPLAN_GROWTH * self.allowed_n:
            rows = np.asarray(self.known, dtype=np.int64)
            self.allowed = np.ones((self.ctx.problem.n_requests, len(self.binds)), dtype=bool)
            self.speed_horizon = fleet_speed_horizon(self.ctx, rows)
            self.allowed[rows] = fleet_speed_mask(self.ctx, rows, self.speed_horizon)
            self.allowed_n = self.allowed_upto = rows.size
        elif len(self.known) > self.allowed_upto:
            # requests that arrived since: the same test against the last horizon (until the known
            # requests have grown enough for a new one); before, they could start anywhere, and a
            # 3,000-token request arriving at 147 s went to an instance 2x slower and ended the
            # run 85 s after the rest
            rows = np.asarray(self.known[self.allowed_upto:], dtype=np.int64)
            self.allowed[rows] = fleet_speed_mask(self.ctx, rows, self.speed_horizon)
            self.allowed_upto = len(self.known)
        stamp = (self._key(state), self.n_pending)
        if self._nothing_here.get(state.index) == stamp or (self.binds[state.index] and self._refused == stamp):
            return None  # refused a moment ago and nothing has changed since
        ordered = self._ordered()
        allowed = self.allowed[ordered]
        # a request whose instances are all down may start anywhere (faults)
        live = np.array([st.alive > 0 for st in state.engine.states]) if state.engine is not None else None
        here = allowed[:, state.index]
        if live is not None and not live.all():
            here |= ~(allowed & live[None, :]).any(axis=1)
        mine = ordered[here]
        if not mine.size:
            self._nothing_here[state.index] = stamp
            return None
        if not self.binds[state.index]:
            return self._take(int(mine[0]), client)
        return self._next_fitting(state, client, mine)

    def _next_fitting(self, state, client: int, ordered: np.ndarray | None = None) -> int | None:
        """The request an instance whose cache can fill up hands ``client``, among ``ordered`` (or None).

        ``ordered``: the candidate rows in order; None: every ready request (:meth:`_ordered`), read
        only past the refusal check: an engine fill asks once per idle client, and after one refusal
        the rest are refused from the stamp alone (on 5,000 requests, 270k of 280k asks).
        """
        if self.priced_headroom and not self.ctx.known_lengths:
            # the projection's optimism follows the memory price (LagrangianIterations.projection_scale)
            price = self.ctx.extra.get("memory_price")
            if price is not None:
                scale = price.projection_scale(state)
                if scale != self.scale:
                    self.scale = scale
                    self._cache = self._refused = None
        key = self._key(state)
        if self._refused == (key, self.n_pending):
            return None  # nothing fitted a moment ago and nothing has changed since
        if ordered is None:
            ordered = self._ordered()
        pm = self._projection(state)
        urgent = self._urgent(pm if self.horizon_admitted else None) if self.rule == "first-fit" else None
        if urgent is None and self.head_first and self.rule == "first-fit" and ordered.size:
            urgent = int(ordered[0])  # the head is due first: only EASY backfilling may pass it
        if urgent is not None and self.speeds_differ and not np.any(ordered == urgent):
            urgent = None  # it may not start here: urgent for the instances where it may
        rows = ordered[:1] if self.rule == "prefix" else ordered
        if urgent is not None:
            rows = np.array([urgent], dtype=np.int64)
        tokens, steps, floors = self._candidates(state, rows)
        i = pm.first_fit(tokens, steps, floors)
        if i >= 0 and urgent is None and self.lookahead and self.filled[state.index]:
            late = self._lookahead(state, pm, int(rows[i]), int(tokens[i]), int(steps[i]))
            if late is not None:
                self.lookaheads += 1
                urgent = late
                rows = np.array([late], dtype=np.int64)
                tokens, steps, floors = self._candidates(state, rows)
                i = 0
        homed = False
        if i >= 0 and urgent is None and self.prefers is not None and self.prefers[state.index]:
            picked = self._home_pick(state, pm, rows)
            if picked is not None:
                rows, tokens, steps, floors, i = picked
                homed = True
        if i < 0 and urgent is not None and pm.t.size:
            rows, tokens, steps, floors, i = self._backfill(state, pm, ordered, urgent, int(tokens[0]), int(steps[0]),
                                                            None if floors is None else int(floors[0]))
        if i < 0:
            if pm.t.size:
                self.refusals += 1
                self.filled[state.index] = True  # memory binds now: the fill-up is over
                self._refused = (key, self.n_pending)
                # ask again when a queued request can first fit, backing off while refusals repeat
                back = self.retry_backoff.get(state.index, 1)
                # without an urgent request the candidates were ``ordered`` (or its head): reuse their numbers
                self.retry_step[state.index] = state.decode_steps + max(back, self._blocked_for(
                    state, pm, ordered[:1] if self.rule == "prefix" else ordered, urgent,
                    None if urgent is not None else (tokens, steps, floors)))
                self.retry_backoff[state.index] = min(2 * back, RETRY_BACKOFF_MAX)
                return None
            i = 0  # an empty instance always takes the head
        elif not homed and urgent is None and not self.filled[state.index] and floors is None and self._fill_applies():
            i = self._fill_pick(state, pm, tokens, steps, floors, i)
        self.retry_step.pop(state.index, None)
        self.retry_backoff.pop(state.index, None)
        pm.add(int(tokens[i]), int(steps[i]), 0 if floors is None else int(floors[i]))
        self._cache = ((state.index, state.decode_steps, state.n_running, len(state.waiting) + 1, state.now), pm)
        return self._take(int(rows[i]), client)

    def _home_pick(self, state, pm: ProjectedMemory, ordered: np.ndarray) -> tuple | None:
        """The first request homed on ``state``'s instance among the next ``C`` in order that fits (``fleet_homes``).

        Returns
        -------
        tuple or None
            ``(rows, tokens, steps, floors, i)`` of the home candidates, ``i`` the position of the
            one to start; None when none of them fits.
        """
        if self.home is None:
            known = np.asarray(self.known, dtype=np.int64)
            self.home = np.full(self.ctx.problem.n_requests, -1, dtype=np.int64)
            if known.size > 1:
                self.home[known] = fleet_memory_split(self.ctx, known)
        head = ordered[:len(state.clients)]
        mine = head[self.home[head] == state.index]
        if not mine.size:
            return None
        tokens, steps, floors = self._candidates(state, mine)
        i = pm.first_fit(tokens, steps, floors)
        return None if i < 0 else (mine, tokens, steps, floors, i)

    def _fill_applies(self) -> bool:
        """Whether memory sets the decode steps (:func:`memory_sets_steps`) of the requests known so far,
        re-evaluated when they have grown by :data:`REPLAN_GROWTH` (amortized O(log n) per request)."""
        n_eval, applies = self.fill_gate
        n = len(self.known)
        if n and n >= REPLAN_GROWTH * n_eval:
            rows = None if n == self.ctx.problem.n_requests else np.asarray(self.known, dtype=np.int64)
            applies = memory_sets_steps(self.ctx, rows)
            self.fill_gate = (n, applies)
        return applies

    def _fill_pick(self, state, pm: ProjectedMemory, tokens: np.ndarray, steps: np.ndarray,
                   floors: np.ndarray | None, first: int) -> int:
        """While the cache fills up: the fitting candidate that will hold the most when it is full.

        From an empty cache every client is busy long before the memory is, and the memory fills
        only as fast as the running requests grow (``C`` tokens per step with every client busy)
        minus what finishing ones release. The bound's ramp-up
        (:func:`lloptim.bounds.memory_decode_steps_lower_bound`) fills it with the largest prompts
        growing together; in order (a spread of every length), short requests start, finish and
        are replaced by fresh prompts, and the cache fills several times slower. So until the
        admitted requests first hold :data:`RAMP_FULL` of the blocks, an idle client gets the
        fitting candidate of the largest ``context + min(steps, T)``, its holding ``T`` steps on,
        with ``T = free tokens / C`` the steps the cache takes to fill at full growth: the largest
        prompts among the requests that last until then (ties: the first in order). Measured on
        ``benchmarks/memory.py`` workloads (docs, *KV memory*).

        Returns
        -------
        int
            Position among the candidates of the one to start (``first``, the first fit, once
            the cache has filled).
        """
        held = int(pm.held_at(np.zeros(1, dtype=np.int64))[0])
        if held >= RAMP_FULL * pm.cap:
            self.filled[state.index] = True
            return first
        rest = slice(first, None)
        ok = first + np.flatnonzero(pm.fits(tokens[rest], steps[rest], None if floors is None else floors[rest]))
        horizon = max((pm.cap - held) * pm.B / max(len(state.clients), 1), 1.0)
        score = tokens[ok] + np.minimum(steps[ok], horizon)
        return int(ok[np.argmax(score)])

    def _candidates(self, state, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Context, projected decode steps (start delay included) and reservation of each queued row."""
        room = state.kv_blocks * state.kv_block
        tokens = self.cand_tokens[rows]
        # every request's steps for this cache and scale, computed once: a fill asks for thousands of
        # rows, and the scale changes only with the memory price (``priced_headroom``)
        steps_all = self._steps_for.get((room, self.scale))
        if steps_all is None:
            # a request is never projected past the cache: beyond it, preemption is the engine's answer
            cand = np.maximum(np.ceil(self.scale * self.est).astype(np.int64), 1)
            steps_all = np.clip(cand, 1, np.maximum(room - self.cand_tokens, 1)) + self.start_delay
            if len(self._steps_for) >= len(self.binds):
                self._steps_for.clear()  # a scale that moved: keep one entry per cache size
            self._steps_for[(room, self.scale)] = steps_all
        steps = steps_all[rows]
        floors = None
        if state.kv_mode == "reserve":
            floors = np.asarray(state.engine.reserve_floor, dtype=np.int64)[rows]
        return tokens, steps, floors

    def _blocked_for(self, state, pm: ProjectedMemory, rows: np.ndarray, urgent: int | None,
                     candidates: tuple | None = None) -> int:
        """Decode steps before which none of ``rows`` (or the urgent request) can fit, >= 1: when to ask again.

        A lower bound from the smallest context and the fewest steps among the candidates
        (:meth:`~lloptim.runtime.kv.ProjectedMemory.blocked_for`): asking earlier would only be
        refused again. A finish before then makes the engine ask anyway. ``candidates``: the
        :meth:`_candidates` of ``rows`` when the caller has them (no urgent request), else None.
        """
        if urgent is not None:
            t, st, fl = self._candidates(state, np.array([urgent], dtype=np.int64))
            d = pm.blocked_for(int(t[0]), int(st[0]), 0 if fl is None else int(fl[0]))
            rows = rows[rows != urgent]
            if not rows.size:
                return d
        else:
            d = None
        t, st, fl = self._candidates(state, rows) if candidates is None else candidates
        d_rows = pm.blocked_for(int(t.min()), int(st.min()), 0 if fl is None else int(fl.min()))
        return d_rows if d is None else min(d, d_rows)

    def _backfill(self, state, pm: ProjectedMemory, ordered: np.ndarray, urgent: int, tokens: int, steps: int,
                  floor: int | None) -> tuple:
        """Requests that may start while the urgent one waits for memory, without delaying it (EASY backfilling).

        The urgent request gets a *reservation*: the first of the admitted set's completion steps
        ``s`` after which it fits (the set as projected then, :class:`~lloptim.runtime.kv.ProjectedMemory`).
        A queued request that fits now and is projected to finish within ``s`` steps holds no memory
        and no client from ``s`` on, so it cannot push the reservation later (Lifka's EASY rule for
        parallel job scheduling, with memory as the resource). Without it, the clients idle while
        the urgent request waits: on 48 heavy-tailed requests over 8 clients the hybrid ran a single
        request for 73 steps with the cache half empty.

        Returns
        -------
        tuple
            ``(rows, tokens, steps, floors, i)`` of the candidates considered, ``i`` the position of
            the one to start (-1: none).
        """
        reserve_at = pm.earliest_start(tokens, steps, 0 if floor is None else floor)
        rows = ordered[ordered != urgent]
        if not rows.size:
            return rows, rows, rows, None, -1
        c_tokens, c_steps, c_floors = self._candidates(state, rows)
        short = c_steps <= reserve_at
        if not short.any():
            return rows, c_tokens, c_steps, c_floors, -1
        rows, c_tokens, c_steps = rows[short], c_tokens[short], c_steps[short]
        c_floors = None if c_floors is None else c_floors[short]
        return rows, c_tokens, c_steps, c_floors, pm.first_fit(c_tokens, c_steps, c_floors)

    def wants_retry(self, state) -> bool:
        """Ask again after a refusal, from the first decode step at which some queued request can fit
        (:meth:`~lloptim.runtime.kv.ProjectedMemory.blocked_for`): a request that did not fit may
        fit as the running requests near their ends, before any of them finishes."""
        if self.delegate is not None:
            return self.delegate.wants_retry(state)
        step = self.retry_step.get(state.index)
        return step is not None and state.decode_steps >= step

    def on_finish(self, request: int, client: int, output_tokens: int, now: float) -> None:
        if self.delegate is not None:
            self.delegate.on_finish(request, client, output_tokens, now)

    def on_client_failed(self, client: int, now: float) -> None:
        if self.delegate is not None:
            self.delegate.on_client_failed(client, now)

    def on_preempt(self, request: int, client: int, generated: int) -> None:
        # the delegate (a WorkflowQueue) remembers refusals until its state moves: a preemption moves it
        if self.delegate is not None:
            self.delegate.on_preempt(request, client, generated)

    def requeue(self, request: int, now: float) -> None:
        if self.delegate is not None:
            self.delegate.requeue(request, now)
            return
        self._enter(request, again=True)


def fleet_speed_mask(ctx: RunContext, rows: np.ndarray, horizon: tuple[np.ndarray, float] | None = None) -> np.ndarray:
    """Where each request may start on a fleet of different speeds: not where it alone outlasts the horizon.

    Request ``r`` holds a client of instance ``k`` for about ``(o_r + 1) s_k`` seconds (its
    estimated decode steps and its prompt's iteration), ``s_k`` the decode-step time of ``k``
    with every client busy and its cache as full as a batch of these requests makes it (their
    mean context, ``prompt + estimate / 2``, per client, at most the capacity). The horizon ``T``
    is the memory-aware makespan bound of ``rows`` (:func:`lloptim.lower_bound`) with the
    estimates as outputs, all present at once. A request may start on ``k`` when it would end
    there within the horizon, or when ``k`` is where it ends soonest: the fluid split of the
    work (the fleet prices, the LP homes) does not see that a long request is a chain of steps
    that one client runs one after another, and a slow instance would hold the makespan
    hostage to it.

    Where the requests end soonest is also a matter of *how many* long requests an instance
    must run: the fastest instance with a small cache runs them nearly one at a time. With known
    lengths, the requests that may not start everywhere are list-scheduled, longest first,
    where each would end soonest after those placed before it (request ``r`` takes
    ``max(1 / C_k, min(1, (p_r + o_r) / M_k)) (o_r + 1) s_k`` instance-seconds of ``k``: its
    client, or its peak's share of the cache ``M_k``), and may start there too. Without it a
    fleet of a fast instance with a 4,320-token cache beside three slower ones with room sent
    every long request to the fast one, which ran them in turn and ended 105 s after the others
    (``benchmarks/stress_memory.py``, fleet class seed 306: 412.9 % above the bound, now 98.3 %;
    seed 313: 41.3 to 20.2 %). With noisy estimates the schedule misplaced requests (seed 300:
    100.4 to 145.9 %), so it is not made there.

    Parameters
    ----------
    ctx
        The run (prompts, caps, estimates, instances).
    rows
        Row indices of the requests (the ones known so far).
    horizon
        ``(s, T)`` of :func:`fleet_speed_horizon` over other rows (the requests known when it was
        computed): the test of ``rows`` against them, without a new bound. None: computed from
        ``rows``.

    Returns
    -------
    numpy.ndarray
        ``(len(rows), m)`` bool: whether each request may start on each instance (every row has
        at least one True).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.ones((0, len(ctx.problem.instances)), dtype=bool)
    step, T = fleet_speed_horizon(ctx, rows) if horizon is None else horizon
    est = np.maximum(np.ceil(np.asarray(ctx.estimates, dtype=np.float64)[rows]), 1.0)
    alone = (est[:, None] + 1.0) * step[None, :]
    mask = (alone <= T) | (alone <= alone.min(axis=1, keepdims=True))
    long = np.flatnonzero(~mask.all(axis=1))
    if ctx.known_lengths and long.size:
        # the long requests, longest first, list-scheduled where each ends soonest with the
        # instance-seconds of those before it: request r holds 1/C_k of instance k (its client)
        # or, at its peak, (prompt + output) / M_k of its cache, whichever is more, for its alone
        # time; a request that fills most of a small cache runs there nearly by itself
        insts = ctx.problem.instances
        cache = np.array([i.kv_blocks * i.kv_block_tokens for i in insts], dtype=np.float64)
        clients = np.array([i.clients for i in insts], dtype=np.float64)
        peak = ctx.problem.workload.prompt_tokens[rows[long]] + est[long]
        share = np.maximum(np.minimum(peak[:, None] / cache[None, :], 1.0), 1.0 / clients[None, :]) * alone[long]
        load = np.zeros(len(insts))
        for i in np.argsort(-alone[long].min(axis=1), kind="stable").tolist():
            k = int(np.argmin(np.maximum(alone[long[i]], load + share[i])))
            load[k] += share[i, k]
            mask[long[i], k] = True
    return mask


def fleet_speed_horizon(ctx: RunContext, rows: np.ndarray) -> tuple[np.ndarray, float]:
    """The full-batch decode step of each instance and the horizon of :func:`fleet_speed_mask`, over ``rows``.

    Parameters
    ----------
    ctx
        The run (prompts, caps, estimates, instances).
    rows
        Row indices of the requests (the ones known so far; not empty).

    Returns
    -------
    tuple
        ``(s, T)``: ``(m,)`` decode-step seconds of each instance with every client busy and its
        cache as full as a batch of these requests makes it, and the memory-aware makespan bound
        of ``rows``, seconds.
    """
    from lloptim.bounds import lower_bound
    from lloptim.problem import Problem, Workload

    problem = ctx.problem
    insts = problem.instances
    rows = np.asarray(rows, dtype=np.int64)
    w = problem.workload
    est = np.maximum(np.ceil(np.asarray(ctx.estimates, dtype=np.float64)[rows]), 1.0)
    context = float(np.mean(w.prompt_tokens[rows] + est / 2.0))
    step = np.array([i.profile.latency.decode_time(i.clients, min(i.clients * context, i.kv_blocks * i.kv_block_tokens))
                     for i in insts])
    # the horizon's requests: the estimates as outputs, within each cap and within every cache
    # (an estimate may exceed both; the true length cannot)
    prompt = w.prompt_tokens[rows]
    cap = w.max_output_tokens[rows]
    room = min(i.kv_blocks * i.kv_block_tokens for i in insts) - max(i.kv_block_tokens for i in insts) - prompt
    out = np.maximum(np.minimum(np.where(cap > 0, np.minimum(est, cap), est), room), 1).astype(np.int64)
    known = Workload.from_arrays(prompt, out, max_output_tokens=np.where(cap > 0, np.maximum(cap, out), 0),
                                 name="known")
    modes = ctx.extra.get("kv_mode")
    blocks = [i.kv_block_tokens for i in insts]
    horizon = lower_bound(Problem(known, insts), kv_mode=modes, kv_block_tokens=blocks, estimates=out,
                          migration=False)
    return step, float(min(horizon.total_s, horizon.fused_s))


def fleet_memory_split(ctx: RunContext, rows: np.ndarray | None = None) -> np.ndarray:
    """Home instance of each request on a fleet where KV memory binds: the offline LP's split.

    The LP relaxation of the ``binpacking_kv`` formulation over instances (the model behind the
    fleet's memory-aware bound and the memory prices, :func:`~lloptim.runtime.lagrangian.memory_lp_prices`),
    solved through :func:`lloptim.solve` from what the policy knows (estimates and its KV areas):
    each instance gets requests in proportion to its clients *and* its cache, and which ones it
    gets follows their KV area per output token (about ``prompt + output / 2``): a small cache
    beside a large one takes many short requests, whose area per decode step is small, and the
    large cache the long ones. A request goes where the LP puts the largest share of it (the LP has
    at most as many fractional requests as binding rows, a handful).

    Parameters
    ----------
    ctx
        The run.
    rows
        Row indices of the requests to split (the ones known so far); None: every request.

    Returns
    -------
    numpy.ndarray
        Instance index of each request of ``rows`` (int64; -1 for all if the LP found no answer).
    """
    from lloptim.solvers import SolveParams, solve

    problem = ctx.problem
    m = len(problem.instances)
    areas = np.column_stack([estimated_kv_areas(ctx, k) for k in range(m)])
    estimates = np.asarray(ctx.estimates, dtype=np.float64)
    rows = np.arange(problem.n_requests) if rows is None else np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    sel = rows[order]
    if sel.size < problem.n_requests:
        problem = type(problem)(problem.workload.subset(sel), problem.instances, name=problem.name)
    params = SolveParams(solver_options={"solver": "ipm", "run_crossover": "on"})
    res = solve(problem, solver="highs", params=params, formulation="binpacking_kv", relax=True,
                estimates=estimates[sel], kv_areas=areas[sel])
    home = np.full(rows.size, -1, dtype=np.int64)
    if res.status.has_solution:  # always expected (the LP is feasible and bounded); else no homes
        home[order] = np.argmax(np.asarray(res.value("y"), dtype=np.float64).reshape(sel.size, m), axis=1)
    return home


#: Fluid memory share at which a fleet instance's KV memory counts as binding for
#: :class:`FleetMemoryWatch`: the known requests' KV area per memory token over their decode
#: steps per client (1: in the fluid equilibrium the cache fills before the clients do).
FLEET_FLUID_BINDS = 1.0


class FleetMemoryWatch:
    """Whether a fleet's KV memory binds, from the requests known so far, kept as they arrive.

    The hybrid decides at its first dispatch whether a cache can fill up; on a fleet whose
    requests arrive over time only the first few are known then, and without a later look the
    run stays on the least-slack dispatch with the fleet prices, which model clients but not
    memory: the engine preempts for memory over and over (2,500 preemptions in 800 requests on
    ``benchmarks/stress_flow.py``'s ``fleet-kv``) and a long request admitted late to the slow
    instance is preempted a dozen times and ends the run (docs, *KV memory*, fleets). An
    instance ``k`` *binds* once both hold over the known requests:

    * its cache can fill up (:class:`KnownMemory`: its clients' largest peaks exceed it), and
    * memory, not clients, sets its decode steps in the fluid model: the known requests' KV
      area on its blocks over its capacity ``M_k`` is at least :data:`FLEET_FLUID_BINDS` times
      their estimated output tokens over its clients ``C_k`` (the mean context a decode step
      holds, weighted by output, is above ``M_k / C_k``).

    The second test keeps fleets whose caches could fill only on a rare coincidence of the
    longest requests (heavy tails on a large cache, ``fleet-mixed``: fluid share 0.2-0.35) on the
    dispatch that serves them, where the memory-aware queue loses (21.9 % to 50.5 % above the
    bound on ``fleet-mixed`` seed 1 at load 1.5).

    Parameters
    ----------
    ctx
        The run (prompts, caps, estimates, instances); each request's KV area is computed up
        front and counted only once :meth:`add` is told of it.

    Attributes
    ----------
    binds : bool
        Whether some instance binds (as above) over the requests added so far.
    n_known : int
        Requests added so far (count).
    """

    def __init__(self, ctx: RunContext) -> None:
        insts = ctx.problem.instances
        self.can_fill = KnownMemory(ctx)
        self.estimates = np.maximum(np.ceil(np.asarray(ctx.estimates, dtype=np.float64)), 1.0)
        self.areas = [estimated_kv_areas(ctx, k) for k in range(len(insts))]
        self.per_token = np.array([1.0 / (i.kv_blocks * i.kv_block_tokens) for i in insts])
        self.per_step = np.array([1.0 / i.clients for i in insts])
        self.area = np.zeros(len(insts))    # KV area of the known requests on each instance's blocks, token-steps
        self.output = 0.0                   # their estimated output tokens
        self.binds = False
        self.n_known = 0

    def add(self, request: int) -> bool:
        """``request`` became known; returns :attr:`binds`.

        Parameters
        ----------
        request
            Row index of the request.
        """
        self.n_known += 1
        if self.binds:
            return True
        self.can_fill.add(request)
        self.output += float(self.estimates[request])
        for k, area in enumerate(self.areas):
            self.area[k] += float(area[request])
        fluid = self.area * self.per_token >= FLEET_FLUID_BINDS * self.output * self.per_step
        self.binds = bool(np.any(fluid & np.asarray(self.can_fill.binds)))
        return self.binds

class FluidPacedQueue(RequestScheduler):
    """WAIT: per-type admission rates from the fluid model, paced per decode step.

    Requests are grouped into ``types`` classes by estimated output (quantiles). Type ``j`` has
    ``N_j`` requests of mean prompt ``p_j`` and mean estimated output ``o_j``; in the fluid
    equilibrium admitting ``n_j`` per decode step holds ``n_j (o_j p_j + o_j (o_j + 1) / 2)`` KV
    tokens and ``n_j o_j`` clients. Serving the types in proportion (``n_j = theta N_j / N``, so
    they all finish together), ``theta`` is the largest rate whose equilibrium fits the KV
    capacity and the clients of the instance. Each decode step adds ``n_j`` to type ``j``'s credit;
    an idle client takes a request of the type with the most credit once that credit reaches one
    request (the threshold), longest first within the type.

    The types and their shares are those of the requests announced so far (WAIT takes the type
    mix as known; here it is learned as requests arrive, and refitted when new ones have become
    ready since the last fit), so the policy never reads a request before it arrives; with every
    request at time 0 the first fit covers them all.

    Parameters
    ----------
    types
        Number of request types (output-length quantile classes).
    headroom
        Fraction of the KV capacity the equilibrium may fill (the fluid model has no variance;
        WAIT keeps a safety buffer).
    """

    def __init__(self, types: int = 4, headroom: float = 0.95) -> None:
        if types < 1:
            raise ValueError("types must be >= 1")
        if not 0 < headroom <= 1:
            raise ValueError("headroom must be in (0, 1]")
        self.types = types
        self.headroom = headroom

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        self.est = np.maximum(np.asarray(ctx.estimates, dtype=np.float64), 1.0)
        self.prompt = ctx.problem.workload.prompt_tokens
        self.known: list[int] = []
        self.fitted = 0
        self.waiting: set[int] = set()
        self.type_of = np.zeros(ctx.problem.n_requests, dtype=np.int64)
        self.rates = [np.zeros(1) for _ in ctx.problem.instances]
        self.credit = [np.zeros(1) for _ in ctx.problem.instances]
        self.last_step = [0] * len(ctx.problem.instances)
        self.queues: list[list[tuple[float, int]]] = [[]]  # heaps, longest first
        self.n_pending = 0

    def _fit(self) -> None:
        """Types, shares and per-instance rates of the requests known so far; refile the waiting ones."""
        rows = np.asarray(self.known, dtype=np.int64)
        self.fitted = rows.size
        est = self.est[rows]
        edges = np.quantile(est, np.linspace(0, 1, self.types + 1)[1:-1]) if self.types > 1 else np.zeros(0)
        self.type_of[rows] = np.searchsorted(edges, est, side="right")
        types = self.type_of[rows]
        n_types = int(types.max()) + 1
        share = np.bincount(types, minlength=n_types) / rows.size
        o_j = np.bincount(types, weights=est, minlength=n_types) / np.maximum(share * rows.size, 1)
        p_j = np.bincount(types, weights=self.prompt[rows], minlength=n_types) / np.maximum(share * rows.size, 1)
        area = o_j * p_j + o_j * (o_j + 1) / 2
        self.rates = []  # per instance: admissions per decode step of each type
        for k, inst in enumerate(self.ctx.problem.instances):
            cap = self.headroom * inst.kv_blocks * inst.kv_block_tokens
            theta = min(cap / float(np.dot(share, area)), inst.clients / float(np.dot(share, o_j)))
            self.rates.append(theta * share)
            old = self.credit[k]
            self.credit[k] = np.zeros(n_types)
            self.credit[k][:min(old.size, n_types)] = old[:n_types]
        self.queues = [[] for _ in range(n_types)]
        for r in self.waiting:
            heapq.heappush(self.queues[self.type_of[r]], (-float(self.est[r]), r))

    def pending(self) -> int:
        return self.n_pending

    def on_ready(self, request: int, now: float) -> None:
        self.known.append(request)
        self._file(request)

    def _file(self, request: int) -> None:
        self.waiting.add(request)
        self.n_pending += 1
        if self.fitted:
            heapq.heappush(self.queues[self.type_of[request]], (-float(self.est[request]), request))

    def next_request(self, state, client: int) -> int | None:
        if len(self.known) > self.fitted:
            self._fit()
        k = state.index
        steps = state.decode_steps - self.last_step[k]
        if steps:
            self.credit[k] += steps * self.rates[k]
            self.last_step[k] = state.decode_steps
        credit = self.credit[k]
        empty = state.n_running == 0 and not state.waiting
        for j in np.argsort(-credit):
            q = self.queues[j]
            if q and (credit[j] >= 1.0 or empty):
                credit[j] = max(credit[j] - 1.0, 0.0)
                self.n_pending -= 1
                r = heapq.heappop(q)[1]
                self.waiting.discard(r)
                return r
        return None

    def requeue(self, request: int, now: float) -> None:
        self._file(request)
