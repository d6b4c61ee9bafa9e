"""The paper's hybrid offline-online method as policies: ``offline``, ``hybrid`` and their variants.

No policy here reads a request before it is ready (the engine announces it through
:meth:`~lloptim.runtime.policy.RequestScheduler.on_ready`): plans cover the requests known so far
and are revised as more arrive (:mod:`lloptim.runtime.rolling`); with every request at time 0
the first plan is the paper's offline plan.

* **offline**: the makespan bin packing (:mod:`lloptim.formulations`) assigns the known requests
  to clients, weights from the *estimated* output lengths, revised as requests arrive
  (:class:`~lloptim.runtime.rolling.RollingPlan`); each client serves its queue longest first;
  iterations are prefill-first. No re-assignment beyond the revisions.
* **hybrid**: the online request scheduler (:class:`~lloptim.runtime.dispatch.HybridDispatch`:
  an idle client takes the ready request of least slack, which is the longest first when every
  request is present at once; on a fleet of different instances steered by instance prices from
  the fractional assignment LP; where the KV cache can fill up, the memory-aware dispatch of
  :class:`~lloptim.runtime.memory_schedulers.MemoryAwareQueue`, its projection's headroom priced
  by the memory weight) and the Lagrangian iteration scheduler (:mod:`lloptim.runtime.lagrangian`):
  separate prefill iterations while every request is present from the start and no cache can fill
  up, prompts fused into decode iterations once requests arrive during the run or the known
  requests can fill the cache (from the start on a fleet and on workflows of dependent requests).
* **hybrid-fused**: the hybrid always fusing prompts (``C_p = 0``).
* **hybrid-plan** / **hybrid-fused-plan**: the literal Algorithm 1 on the rolling plan: each client
  works through its planned queue and steals when it runs dry (separate or fused iterations);
  where a cache can fill up, each queue is in planned-start order and a client takes its first
  request that fits the projected KV memory (:class:`~lloptim.runtime.rolling.RollingQueues`).
"""

from __future__ import annotations

import numpy as np

from lloptim.errors import SpecError
from lloptim.runtime.dispatch import SLACK_WEIGHT, TAIL_PLAN, HybridDispatch
from lloptim.runtime.iteration_schedulers import PrefillFirst
from lloptim.runtime.lagrangian import LagrangianIterations
from lloptim.runtime.policy import Policy
from lloptim.runtime.memory_schedulers import MemoryAwareQueue
from lloptim.runtime.order_choice import (ROLLOUT_BUDGET_S, Rollout, SimulatedOrderChoice, SimulatedWorkflowChoice,
                                          _Fixed, _Replay)
from lloptim.runtime.registry import register_policy
from lloptim.runtime.request_schedulers import DUE_FACTOR, WorkflowQueue
from lloptim.runtime.rolling import RollingPlan, RollingQueues

__all__ = ["offline_policy", "hybrid_policy", "START_DELAY", "ORDER_BUDGET_S", "SORTED_ONLY", "PLAN_ONLY",
           "SEPARATE_ONLY"]

#: Decode steps the memory projection of the sorted dispatch allows a request to wait for its
#: prefill, by iteration rule (a fused prefill decodes once before the request; the separate rule
#: may batch prefills a few steps). Chosen on training workloads (benchmarks/memory.py --tune).
START_DELAY = {"fused": 2, "separate": 1}
#: Default wall-clock budget of the simulated choice among start orders (``order_candidates``),
#: seconds: room for 8 simulations of 1000 memory-bound requests on a loaded 2-core machine.
ORDER_BUDGET_S = 30.0
#: Wall-clock safety net of the plans' searches (the first bin-packing plan, the end game), seconds:
#: they stop on deterministic work budgets (:mod:`lloptim.runtime.rolling`,
#: :mod:`lloptim.runtime.endgame`) long before it.
PLAN_SAFETY_S = 20.0

#: :func:`hybrid_policy` options only ``dispatch="sorted"`` reads, with their defaults: given with
#: another value under ``dispatch="plan"`` they are an error, not silently ignored.
SORTED_ONLY = {"slack_weight": SLACK_WEIGHT, "prices": "lp", "tail_plan": TAIL_PLAN, "objective": "makespan",
               "start_planner": None, "fill_ramp": "known", "fleet_homes": "known", "urgency_horizon": "known",
               "order_candidates": 1, "order_budget_s": ORDER_BUDGET_S, "pace_scale": 1.0, "plan_paced": True,
               "due_factor": DUE_FACTOR, "rollout_epochs": 0, "rollout_candidates": 4,
               "rollout_budget_s": ROLLOUT_BUDGET_S, "memory_handover": "known", "urgency": True,
               "urgency_lookahead": False}
#: :func:`hybrid_policy` options only ``dispatch="plan"`` reads, with their defaults (the same rule).
PLAN_ONLY = {"solver": "greedy", "steal": True, "weights": "work"}
#: :func:`hybrid_policy` options only the choice of a separate prefill iteration reads (the Lagrangian
#: rule's setup cost and forecast), with their defaults: an error with ``fused=True``.
SEPARATE_ONLY = {"setup_weight": None, "forecast": "auto", "survival": None}


def _differs(value, default) -> bool:
    """Whether an option was given a value other than its default (a callable always differs from None)."""
    if value is default:
        return False
    try:
        return bool(value != default)
    except (TypeError, ValueError):  # e.g. an array against a scalar: given, so it differs
        return True


def _shown(value) -> str:
    """``value`` for an error message: arrays by their shape, not their contents."""
    if isinstance(value, np.ndarray):
        return f"<array of {value.size} values>"
    return repr(value)


def _check_time_limit(field: str, value) -> None:
    """A clear error for a time limit that is not a positive number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
        raise SpecError(field, f"must be a positive number of seconds, not {value!r}",
                        f"give e.g. {PLAN_SAFETY_S:g}: a safety net only, the plans stop on work budgets")


def _check_ignored(dispatch: str, given: dict) -> None:
    """Refuse, before any work, an option the policy would ignore.

    The tables are :data:`SORTED_ONLY`, :data:`PLAN_ONLY` and :data:`SEPARATE_ONLY`; ``given`` maps
    each option of :func:`hybrid_policy` they name (and ``fused``) to its value.
    """
    # (options only the other dispatch reads, how each dispatch is named, the -p variant of the other)
    other = {"plan": (SORTED_ONLY, "the sorted dispatch only (dispatch='sorted': hybrid, hybrid-fused)",
                      "dispatch='plan' (hybrid-plan, hybrid-fused-plan)", "sorted", "hybrid"),
             "sorted": (PLAN_ONLY, "the planned dispatch only (dispatch='plan': hybrid-plan, hybrid-fused-plan)",
                        "dispatch='sorted' (hybrid, hybrid-fused)", "plan", "hybrid-plan")}.get(dispatch)
    if other is not None:
        table, applies, this, that, variant = other
        for name, default in table.items():
            if _differs(given[name], default):
                raise SpecError(f"policy.hybrid.{name}", f"applies to {applies}; {this} would ignore "
                                f"{name}={_shown(given[name])}",
                                f"leave {name} out with dispatch='{dispatch}', or use dispatch='{that}' (-p {variant})")
    if dispatch == "sorted":
        if given["rollout_epochs"] == 0:
            for name in ("rollout_candidates", "rollout_budget_s"):
                if _differs(given[name], SORTED_ONLY[name]):
                    raise SpecError(f"policy.hybrid.{name}", "is an option of the rollout, which runs only with "
                                    "rollout_epochs >= 1", "give rollout_epochs >= 1 with it (e.g. rollout_epochs=3), "
                                    "or leave it out")
        if given["order_candidates"] == 1 and _differs(given["order_budget_s"], ORDER_BUDGET_S):
            raise SpecError("policy.hybrid.order_budget_s",
                            "is the budget of the simulated choice, which runs only with order_candidates > 1",
                            "give order_candidates > 1 with it (e.g. order_candidates=4), or leave it out")
    if given["fused"] is True:
        # always fused: the Lagrangian rule never weighs a separate prefill, which is all these tune
        for name, default in SEPARATE_ONLY.items():
            if _differs(given[name], default):
                raise SpecError(f"policy.hybrid.{name}",
                                f"tunes the choice of a separate prefill iteration, which fused=True (hybrid-fused, "
                                f"hybrid-fused-plan) never makes: {name}={_shown(given[name])} would be ignored",
                                f"leave {name} out, or use fused='auto' or False (-p hybrid, -p hybrid-plan)")
    if given["survival"] is not None and given["forecast"] not in ("auto", "survival"):
        raise SpecError("policy.hybrid.survival", f"is read only by forecast='survival' or 'auto', not by "
                        f"forecast={given['forecast']!r}", "leave survival out, or use forecast='survival'")


def offline_policy(solver: str = "greedy", time_limit_s: float = PLAN_SAFETY_S) -> Policy:
    """Offline bin packing only: planned queues (revised as requests arrive), prefill-first.

    Parameters
    ----------
    solver
        Backend of :func:`lloptim.solvers.solve` for the first plan (see
        :class:`~lloptim.runtime.rolling.RollingPlan`).
    time_limit_s
        Wall-clock safety net of the first plan's solve, seconds (the greedy plans stop on
        deterministic work budgets long before it; a MIP backend's time limit).
    """
    _check_time_limit("policy.offline.time_limit_s", time_limit_s)
    return Policy("offline", RollingQueues(RollingPlan(solver, time_limit_s), steal=False), PrefillFirst())


def hybrid_policy(solver: str = "greedy", time_limit_s: float = PLAN_SAFETY_S, setup_weight: float | None = None,
                  dispatch: str = "sorted", steal: bool = True, forecast: str = "auto",
                  token_budget: int | None = None, survival: np.ndarray | None = None,
                  fused: bool | str = "auto", slack_weight: float = SLACK_WEIGHT, prices: str = "lp",
                  weights: str = "work", memory_prices: str = "lp", price_updates: bool = True,
                  start_delay: int | None = None, tail_plan: float | None = TAIL_PLAN,
                  objective: str = "makespan", start_planner=None, fill_ramp: bool | str = "known",
                  fleet_homes: bool | str = "known", urgency_horizon: bool | str = "known",
                  order_candidates: int = 1, order_budget_s: float = ORDER_BUDGET_S, pace_scale: float = 1.0,
                  plan_paced: bool = True, due_factor: float | None = DUE_FACTOR, rollout_epochs: int = 0,
                  rollout_candidates: int = 4, rollout_budget_s: float = ROLLOUT_BUDGET_S,
                  memory_handover: bool | str = "known", urgency: bool = True,
                  urgency_lookahead: bool = False) -> Policy:
    """The hybrid: online dispatch (or a rolling plan) + Lagrangian iteration scheduling.

    Parameters
    ----------
    solver
        Backend of the first bin-packing plan (``dispatch="plan"``).
    time_limit_s
        Wall-clock safety net, seconds, of the first bin-packing plan (``dispatch="plan"``; the
        time limit of its solve when ``solver`` is a MIP backend) or of the end game
        (``dispatch="sorted"``). The greedy plans and the end game stop on deterministic work
        budgets long before it, so that a run's schedule does not depend on the machine's load.
    setup_weight
        Weight on the prefill's fixed cost ``C_p`` in the Lagrangian rule (``None``: the tuned
        default of :data:`lloptim.runtime.lagrangian.SETUP_WEIGHT`).
    dispatch
        ``"sorted"`` (default): an idle client takes the ready request of least slack
        (:class:`~lloptim.runtime.dispatch.HybridDispatch`; longest first when every request is
        present at once, so requests of similar length start and finish together and prefills
        batch without idling anyone). ``"plan"``: the literal Algorithm 1, each client works
        through its queue of the rolling bin-packing plan (longest first) and steals only when it
        runs dry.
    steal
        Online preemptive re-assignment of unstarted requests (``dispatch="plan"``).
    forecast
        Forecast of finish times for the Lagrangian lookahead (see
        :class:`~lloptim.runtime.lagrangian.LagrangianIterations`).
    token_budget
        Most prompt tokens per prefill iteration.
    survival
        ``P(output > x)`` learned from training requests, for the lookahead with unknown lengths.
    fused
        ``True``: insert prompts as chunks fused into decode iterations (``C_p = 0``, see
        :mod:`lloptim.runtime.lagrangian`; the ``hybrid-fused`` policy). ``False``: separate
        prefill iterations (the paper's model). ``"auto"`` (default): on one instance, separate
        while every request is present from the start and the known requests cannot fill the KV
        cache, fused once requests arrive during the run or they can; fused on a fleet of
        several instances and on workflows of dependent requests (whose successors become ready
        during the run).
    slack_weight
        Weight of a request's service time against its waiting time in the dispatch order
        (``dispatch="sorted"``; see :mod:`lloptim.runtime.dispatch`).
    prices
        Instance prices on a fleet of different instances (``dispatch="sorted"``): ``"lp"``
        (default), ``"uniform"`` or ``"none"`` (see :mod:`lloptim.runtime.fleet`).
    weights
        Request weights of the bin-packing plan (``dispatch="plan"``): ``"work"`` or ``"bound"``
        (see :class:`~lloptim.runtime.rolling.RollingPlan`).
    memory_prices, price_updates
        How the Lagrangian rule prices KV memory (``"lp"``, ``"uniform"``, ``"none"``) and whether
        the price follows the observed utilizations (:mod:`lloptim.runtime.lagrangian`).
    start_delay
        Decode steps a dispatched request may wait for its prefill that the memory projection
        allows for (:class:`~lloptim.runtime.memory_schedulers.MemoryAwareQueue`); None: the
        default of the iteration rule (:data:`START_DELAY`).
    tail_plan
        On a fleet of several instances with every request present (``dispatch="sorted"``): once
        at most this many queued requests remain per live client, plan them on two levels and
        serve the plan (:mod:`lloptim.runtime.endgame`); None: list scheduling to the end
        (default :data:`~lloptim.runtime.dispatch.TAIL_PLAN`).
    objective
        What the dispatch order serves (``dispatch="sorted"``): ``"makespan"`` (least slack,
        default) or ``"weighted-completion"`` (Smith's rule of the ``weighted_completion``
        formulation: shortest estimated service first; see :mod:`lloptim.runtime.dispatch`).
    start_planner
        Where the KV cache can fill up (``dispatch="sorted"``), the function that orders the
        requests by target start step (the ``planner`` of
        :class:`~lloptim.runtime.memory_schedulers.MemoryAwareQueue`); None: the golden-ratio
        spread :func:`~lloptim.runtime.memory_schedulers.planned_start_keys`.
    fill_ramp
        Where the KV cache can fill up and memory sets the decode steps (``dispatch="sorted"``,
        paged KV): until the cache first fills, start the requests that will hold the most memory
        when it does (the ``fill_ramp`` rule of
        :class:`~lloptim.runtime.memory_schedulers.MemoryAwareQueue`). ``"known"`` (default):
        when the output lengths are known; True: on estimates too; False: the planned order
        from the first request on.
    fleet_homes
        Where a KV cache can fill up on a fleet (``dispatch="sorted"``): the clients of an
        instance with less KV memory per client than the roomiest one prefer, within their next
        wave of the planned order, the requests the offline LP homes there (the ``fleet_homes``
        rule of :class:`~lloptim.runtime.memory_schedulers.MemoryAwareQueue`). ``"known"``
        (default): when the output lengths are known; True: on estimates too; False: the first
        request that fits, whatever the instance.
    urgency_horizon
        Where the KV cache of a single instance can fill up (``dispatch="sorted"``): whether a
        request becomes urgent (never overtaken) against the work of the queue *and* of the
        admitted requests rather than the queue's alone, so that the run ends on a mix of
        lengths rather than on short requests (the ``urgency_horizon`` of
        :class:`~lloptim.runtime.memory_schedulers.MemoryAwareQueue`). ``"known"`` (default):
        when the output lengths are known; True: on estimates too; False: the queue alone.
    urgency_lookahead
        Where that horizon counts the admitted requests (``urgency_horizon`` in force, one
        instance, paged KV; ``dispatch="sorted"``): hand out the longest unstarted request
        instead of the first that fits when admitting the latter would make the longest wait
        for memory past the step it becomes urgent (the ``urgency_lookahead`` of
        :class:`~lloptim.runtime.memory_schedulers.MemoryAwareQueue`, where it is measured).
        False (default: it did not pay on held-out workloads) or True.
    memory_handover
        On one instance (``dispatch="sorted"``), requests arriving during the run: once the
        requests known so far can fill the KV cache (they could not at the first dispatch), the
        dispatch moves to the memory-aware queue, in least-slack order, instead of leaving memory
        to the engine's preemptions (the ``memory_handover`` of
        :class:`~lloptim.runtime.dispatch.HybridDispatch`). ``"known"`` (default): when the
        output lengths are known; True: on estimates too; False: never.
    order_candidates, order_budget_s
        Opt-in, where the KV cache can fill up, the output lengths are known and every request is
        present at the start (``dispatch="sorted"``): simulate this hybrid with
        ``order_candidates`` start orders (the default and phase shifts of its spread) within
        ``order_budget_s`` seconds of wall clock before the first dispatch, and run the one of the
        shortest simulated makespan
        (:class:`~lloptim.runtime.order_choice.SimulatedOrderChoice`). 1 (default): the default
        order, nothing simulated. On requests with precedence (workflows) with known lengths and
        every request present at the start, the same option chooses the workflow dispatch's
        chain pacing instead: the first ``order_candidates`` (at most 16) variants of
        :data:`~lloptim.runtime.order_choice.WORKFLOW_VARIANTS` (``pace_scale`` and
        ``plan_paced``, the default first) are simulated and the best is run
        (:class:`~lloptim.runtime.order_choice.SimulatedWorkflowChoice`); with estimates or
        arrivals over time the default is run, nothing simulated. It presumes a simulator
        calibrated to the engine.
    pace_scale, plan_paced
        On workflows on a fleet: every chain pacing limit scaled by ``pace_scale`` (default 1),
        and whether the unstarted requests are re-planned for the pacing (default True; see
        :class:`~lloptim.runtime.request_schedulers.WorkflowQueue`). Fixed values, for studies;
        ``order_candidates`` chooses them per case.
    due_factor
        On workflows arriving over time (``dispatch="sorted"``): a number ``f > 0`` (default
        :data:`~lloptim.runtime.request_schedulers.DUE_FACTOR`, 1.25) makes each workflow due
        ``f`` times the fleet's time to serve the work known at its arrival, and a request goes
        out by its planned start or its latest start for that due date, whichever is earlier: the
        p99 latency at or below Sarathi's on overloaded DAGs (the plan alone kept short last steps
        of early workflows waiting until the arrivals stop: up to 1.3 x Sarathi's p99 and 2-3 x
        on GSM8K DAGs), the makespan about 0.1 point longer on average, more with estimated
        lengths. None or False (``-o due_factor=false``) orders ready requests by the workflow
        plan alone. Workflows all known at the start and independent requests run the same either
        way (see :class:`~lloptim.runtime.request_schedulers.WorkflowQueue`, *Due dates*, and
        docs: workflows, *Latency under load*).
    rollout_epochs, rollout_candidates, rollout_budget_s
        Opt-in (``dispatch="sorted"``), with known lengths and every request present at the
        start: re-choose the dispatch's variant ``rollout_epochs`` times during the run (when
        1/(N+1), ..., N/(N+1) of the requests have been handed out) by simulating the rest of the
        run under ``rollout_candidates`` variants (the current one included: the planned order of
        the unstarted requests at other phases where memory binds, the chain pacings of
        :data:`~lloptim.runtime.order_choice.WORKFLOW_VARIANTS` on workflows on a fleet) and
        switching to the shortest, within ``rollout_budget_s`` seconds of wall clock as a
        safety net (:class:`~lloptim.runtime.order_choice.Rollout`; at most
        ``1 + rollout_epochs * (rollout_candidates - 1)`` simulations). 0 (default): none. With
        estimates or arrivals over time it simulates nothing and the run keeps its variant.
    urgency
        Once requests arrive during the run (``dispatch="sorted"``, independent requests, one
        instance or identical ones, ``objective="makespan"``): the longest queued request starts
        ahead of the least-slack order once its estimated decode steps reach the known work per
        client, so that it does not finish after everything else (*Urgency* in
        :mod:`lloptim.runtime.dispatch`). Default True; False: least slack alone.

    Raises
    ------
    SpecError
        Before any work, for an option the chosen ``dispatch`` would ignore, given a value other
        than its default (:data:`SORTED_ONLY` with ``dispatch="plan"``, :data:`PLAN_ONLY` with
        ``dispatch="sorted"``, :data:`SEPARATE_ONLY` with ``fused=True``; ``order_budget_s``
        without ``order_candidates > 1``, ``rollout_candidates`` or ``rollout_budget_s`` without
        ``rollout_epochs``, ``survival`` with a forecast that does not read it),
        and for a value out of range.

    Notes
    -----
    With ``dispatch="sorted"``, when an instance's KV cache can fill up (its clients' largest
    requests do not fit at once) the dispatch is the memory-aware one: the longest unstarted
    request *that fits* (the instance's admitted requests and it must stay within the cache at
    every future step; :class:`~lloptim.runtime.memory_schedulers.MemoryAwareQueue`), so the run
    needs no preemption when lengths are known; elsewhere it is least slack first
    (:class:`~lloptim.runtime.dispatch.HybridDispatch`).
    """
    _check_time_limit("policy.hybrid.time_limit_s", time_limit_s)
    _check_ignored(dispatch, dict(fused=fused, setup_weight=setup_weight, forecast=forecast, survival=survival,
                                  solver=solver, steal=steal, weights=weights, slack_weight=slack_weight,
                                  prices=prices, tail_plan=tail_plan, objective=objective,
                                  start_planner=start_planner, fill_ramp=fill_ramp, fleet_homes=fleet_homes,
                                  urgency_horizon=urgency_horizon, order_candidates=order_candidates,
                                  order_budget_s=order_budget_s, pace_scale=pace_scale, plan_paced=plan_paced,
                                  due_factor=due_factor, rollout_epochs=rollout_epochs,
                                  rollout_candidates=rollout_candidates, rollout_budget_s=rollout_budget_s,
                                  memory_handover=memory_handover, urgency=urgency,
                                  urgency_lookahead=urgency_lookahead))
    if dispatch == "sorted":
        # the memory-aware queue runs only where a cache can fill up, where "auto" fuses too
        delay = START_DELAY["separate" if fused is False else "fused"] if start_delay is None else start_delay
        if start_planner is not None and not callable(start_planner):
            raise SpecError("policy.hybrid.start_planner", f"must be a function, not {start_planner!r}",
                            "pass planner(ctx, rows=...) returning one start key per request, or None")
        if fill_ramp not in (True, False, "known"):
            raise SpecError("policy.hybrid.fill_ramp", f"must be true, false or 'known', not {fill_ramp!r}",
                            "'known' fills the empty cache first when the output lengths are known")
        if fleet_homes not in (True, False, "known"):
            raise SpecError("policy.hybrid.fleet_homes", f"must be true, false or 'known', not {fleet_homes!r}",
                            "'known' steers small caches to their LP share when the output lengths are known")
        if memory_handover not in (True, False, "known"):
            raise SpecError("policy.hybrid.memory_handover", f"must be true, false or 'known', not {memory_handover!r}",
                            "'known' hands the dispatch to the memory-aware queue once arriving requests can fill "
                            "the cache, when the output lengths are known")
        if urgency_horizon not in (True, False, "known"):
            raise SpecError("policy.hybrid.urgency_horizon", f"must be true, false or 'known', not {urgency_horizon!r}",
                            "'known' counts the running requests' work in the urgency test when the output lengths "
                            "are known")
        if urgency_lookahead not in (True, False):
            raise SpecError("policy.hybrid.urgency_lookahead", f"must be true or false, not {urgency_lookahead!r}",
                            "true hands out the longest request when the next admission would make it late")
        opts = dict(solver=solver, time_limit_s=time_limit_s, setup_weight=setup_weight, dispatch=dispatch,
                    steal=steal, forecast=forecast, token_budget=token_budget, survival=survival, fused=fused,
                    slack_weight=slack_weight, prices=prices, weights=weights, memory_prices=memory_prices,
                    price_updates=price_updates, start_delay=start_delay, tail_plan=tail_plan,
                    objective=objective, fill_ramp=fill_ramp, fleet_homes=fleet_homes,
                    urgency_horizon=urgency_horizon, due_factor=due_factor, memory_handover=memory_handover,
                    urgency_lookahead=urgency_lookahead)
        if order_candidates != 1:
            if start_planner is not None:
                raise SpecError("policy.hybrid.order_candidates", "a start_planner is given too",
                                "give either start_planner or order_candidates > 1, not both")
            if pace_scale != 1.0 or not plan_paced:
                raise SpecError("policy.hybrid.pace_scale" if pace_scale != 1.0 else "policy.hybrid.plan_paced",
                                "is chosen by simulation when order_candidates > 1",
                                "give either order_candidates > 1 or fixed pace_scale / plan_paced, not both")
            start_planner = SimulatedOrderChoice(order_candidates, order_budget_s,
                                                 lambda planner: hybrid_policy(start_planner=planner, **opts))
            workflow_choice = SimulatedWorkflowChoice(
                order_candidates, order_budget_s, lambda **variant: hybrid_policy(**opts, **variant))
        else:
            workflow_choice = None
        rollout = None
        if rollout_epochs != 0:
            rollout = Rollout(rollout_epochs, rollout_candidates, rollout_budget_s,
                              lambda keys, pacing, switches: _replaying(hybrid_policy(
                                  **opts, start_planner=None if keys is None else _Fixed(keys), **pacing), switches))
        workflow_opts = dict(pace_scale=pace_scale, plan_paced=plan_paced, due_factor=due_factor)
        memory = MemoryAwareQueue("planned", "first-fit", start_delay=delay, workflows=WorkflowQueue(**workflow_opts),
                                  priced_headroom=True, planner=start_planner, fill_ramp=fill_ramp,
                                  fleet_homes=fleet_homes, urgency_horizon=urgency_horizon, fleet_speeds=True,
                                  urgency_lookahead=urgency_lookahead)
        requests = HybridDispatch(slack_weight=slack_weight, prices=prices, time_limit_s=time_limit_s,
                                  memory=memory, tail_plan=tail_plan,
                                  objective=objective, workflow_choice=workflow_choice, rollout=rollout,
                                  memory_handover=memory_handover, urgency=urgency, **workflow_opts)
    elif dispatch == "plan":
        delay = START_DELAY["separate" if fused is False else "fused"] if start_delay is None else start_delay
        requests = RollingQueues(RollingPlan(solver, time_limit_s, weights=weights), steal=steal, memory_aware=True,
                                 start_delay=delay)
    else:
        raise SpecError("policy.hybrid.dispatch", f"unknown dispatch {dispatch!r}", "use 'sorted' or 'plan'")
    if fused not in (True, False, "auto"):
        raise SpecError("policy.hybrid.fused", f"must be true, false or 'auto', not {fused!r}",
                        "'auto' fuses prompts once requests arrive during the run or memory can bind")
    return Policy("hybrid-fused" if fused is True else "hybrid", requests,
                  LagrangianIterations(None, setup_weight=setup_weight, token_budget=token_budget,
                                       forecast=forecast, survival=survival, fused=fused,
                                       memory_prices=memory_prices, price_updates=price_updates))


register_policy("offline", offline_policy,
                "offline makespan bin packing of the requests known so far (revised as requests arrive), "
                "longest first per client, no re-assignment, prefill-first")
register_policy("hybrid", hybrid_policy,
                "least-slack dispatch (longest first when all requests are present; fleet-priced) + Lagrangian "
                "prefill/decode decisions, prompts fused once requests arrive or memory can bind (arXiv 2502.15763)")
register_policy("hybrid-fused", lambda **opts: _variant("hybrid-fused", opts, fused=True),
                "the hybrid with prompts always fused into decode iterations as chunks (C_p = 0): no prefill/idle "
                "trade-off left, the strongest policy when output lengths are unknown")
register_policy("hybrid-plan", lambda **opts: _variant("hybrid-plan", opts, dispatch="plan", fused=False),
                "the hybrid with the literal Algorithm 1: rolling planned queues, steal only when a queue runs dry")
register_policy("hybrid-fused-plan",
                lambda **opts: _variant("hybrid-fused-plan", opts, dispatch="plan", fused=True),
                "Algorithm 1 on the rolling plan with fused prompt chunks: each client's total work balanced to "
                "a token, the closest to the bound on fleets and few requests per client")


def _replaying(policy: Policy, switches: tuple) -> Policy:
    """``policy`` (a sorted-dispatch hybrid) with a dispatch that applies ``switches`` and simulates nothing."""
    policy.requests.rollout = _Replay(switches)
    return policy


def _variant(name: str, opts: dict, **fixed) -> Policy:
    """The registered variant ``name``: :func:`hybrid_policy` with ``fixed`` options ``opts`` may not override."""
    for key in fixed:
        if key in opts:
            raise SpecError(f"policy.{name}.{key}", f"is fixed to {fixed[key]!r} by the {name} policy",
                            f"leave {key} out, or use the hybrid policy with {key}={opts[key]!r}")
    policy = hybrid_policy(**fixed, **opts)
    policy.name = name
    return policy
