"""Choosing a variant of the hybrid's dispatch by simulating a few candidates (opt-in).

With the output lengths known and every request present at the start, the runtime's own
simulator answers exactly how a dispatch decision plays out: :class:`SimulatedChoice` runs the
hybrid with each candidate variant on the requests (the simulated engine, the run's KV modes) and
keeps the one of the shortest makespan. The first candidate is the default, so the choice is
never worse than the default in that simulation (with known lengths the run then *is* that
simulation). It costs one simulated run per candidate: the count of candidates is the budget (the
same choice on any machine), with a wall-clock budget only as a safety net. Two uses:

* :class:`SimulatedOrderChoice`, the memory-aware dispatch's start order. Where KV memory and the
  clients bind together (rho about 1), orders equally good on paper end 0.5 points apart or more:
  a dispatch decision moves every later one, and which of the golden-ratio spreads of
  :func:`~lloptim.runtime.memory_schedulers.planned_start_keys` (one per phase of its
  low-discrepancy sequence) packs a given workload best is not known before it runs (about 1 s
  per simulation for 1000 requests on one llama-65b instance).
* :class:`SimulatedWorkflowChoice`, the workflow dispatch's chain pacing (requests with
  precedence, :class:`~lloptim.runtime.request_schedulers.WorkflowQueue`): where a chain decides
  the makespan on a fleet, no fixed scale of the paced batch limits is best on every fleet (a
  scale of 0.75 takes 60 chains on 2 x 20 clients from 4.62 to 4.23 % above the bound and 100
  chains from 3.58 to 4.09 %), and re-planning the unstarted requests for the pacing helps some
  cases and not others; the simulation says which one a given set of workflows wants
  (:data:`WORKFLOW_VARIANTS`; 0.2-0.5 s per simulation of 300 chained requests on 2 x 20 clients).

Both choose once, before the first dispatch. :class:`Rollout` re-chooses during the run (policy
improvement by simulation, as in Bertsekas' rollout): when a given share of the requests has
been handed out, it simulates the rest of the run under each of a few candidate variants of the
dispatch (start-order phases re-planned over the unstarted requests where memory binds; the
chain pacings of :data:`WORKFLOW_VARIANTS` on workflows) and switches to the best, keeping the
current one unless another is strictly shorter. The engine's loop does not fork, so each
candidate is *replayed*: a fresh simulation from time 0 that applies the run's switches so far at
the same dispatch counts and the candidate at this one. With known lengths the replay reaches the
current state exactly, and the run, once switched, is the candidate's simulation; the makespan of
the run as it stands is the one simulated at the last switch, so no epoch re-simulates it.

With estimates the simulation would be of another run (no overrun, no preemption), and with
requests arriving over time of requests not known yet: there the default is kept and nothing is
simulated. Faults are not foreseen (the simulation has none, as a server would not know them).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from lloptim.errors import SpecError
from lloptim.runtime.engine import Engine
from lloptim.runtime.memory_schedulers import planned_start_keys
from lloptim.runtime.policy import RunContext

__all__ = ["SimulatedChoice", "SimulatedOrderChoice", "SimulatedWorkflowChoice", "WORKFLOW_VARIANTS",
           "simulated_makespan", "Rollout", "rollout_points", "ROLLOUT_BUDGET_S"]

#: Default wall-clock safety net of a run's rollout simulations, in seconds, with room for about
#: 40 simulations of 1000 memory-bound requests on a loaded 2-core machine. The count of epochs
#: and candidates is what bounds the work (:class:`Rollout`).
ROLLOUT_BUDGET_S = 120.0

#: The workflow dispatch's variants :class:`SimulatedWorkflowChoice` tries, in order (the first
#: ``candidates`` of them): keyword options of
#: :class:`~lloptim.runtime.request_schedulers.WorkflowQueue`, the default first. Scales of the
#: paced limits near 1 (the pacing sits near an optimum on average, but each fleet's lies
#: elsewhere), then the same without re-planning for the pacing (``plan_paced=False``).
WORKFLOW_VARIANTS: tuple[dict, ...] = tuple(
    {"pace_scale": s, "plan_paced": paced} for paced in (True, False)
    for s in (1.0, 0.9, 0.8, 0.95, 0.85, 0.75, 0.7, 1.05))


def simulated_makespan(ctx: RunContext, policy) -> float:
    """Makespan of ``policy`` on ``ctx``'s problem in the simulated engine with the run's KV modes, seconds.

    Parameters
    ----------
    ctx
        The run's context (its problem; the KV modes the engine put in ``ctx.extra``).
    policy
        A fresh :class:`~lloptim.runtime.policy.Policy` (it is set up for this simulation).

    Returns
    -------
    float
        The simulated makespan, seconds. The simulation reads the true output lengths: call it
        only where ``ctx.known_lengths``.
    """
    modes = ctx.extra.get("kv_mode") or [inst.kv_mode for inst in ctx.problem.instances]
    blocks = ctx.extra.get("kv_block_tokens") or [inst.kv_block_tokens for inst in ctx.problem.instances]
    run_opts = {"kv_mode": modes[0] if len(set(modes)) == 1 else None,
                "kv_block_tokens": blocks[0] if len(set(blocks)) == 1 else None}
    res = Engine(ctx.problem, policy, **run_opts).run()  # simulated backend
    return float(np.nanmax(res.done_s))


class SimulatedChoice:
    """Simulate candidate variants of a policy and keep the one of the shortest makespan (module docstring).

    Parameters
    ----------
    candidates
        Variants to try (count, >= 1; 1: the default, nothing simulated).
    budget_s
        Wall-clock safety net, seconds: no candidate is started once the time spent plus the
        longest simulation so far would exceed it (the default is simulated first, whatever the
        budget). The count of candidates is what normally bounds the work.

    Attributes
    ----------
    tried : list of tuple
        ``(label, makespan_s)`` of each simulated candidate of the last choice.
    chosen
        Label of the variant kept (None: no choice was made, the default).
    spent_s : float
        Wall-clock seconds the last choice took.
    """

    def __init__(self, candidates: int, budget_s: float) -> None:
        if not isinstance(candidates, (int, np.integer)) or isinstance(candidates, bool) or candidates < 1:
            raise SpecError("policy.hybrid.order_candidates", f"must be an integer >= 1, not {candidates!r}",
                            "1 keeps the default; 2-16 simulate that many candidate variants")
        if not (isinstance(budget_s, (int, float)) and not isinstance(budget_s, bool) and budget_s > 0):
            raise SpecError("policy.hybrid.order_budget_s", f"must be > 0 seconds, not {budget_s!r}",
                            "give the wall-clock seconds the simulations of the candidates may take")
        self.candidates = int(candidates)
        self.budget_s = float(budget_s)
        self.tried: list[tuple] = []
        self.chosen = None
        self.spent_s = 0.0

    def _choose(self, ctx: RunContext, variants):
        """Simulate ``variants`` (an iterable of ``(label, value, make_policy)``, the default first) in turn.

        Returns the value of the one of the shortest simulated makespan (the first on a tie), or
        None when none was simulated; records :attr:`tried`, :attr:`chosen` and :attr:`spent_s`.
        """
        self.tried, self.chosen, self.spent_s = [], None, 0.0
        t0 = time.perf_counter()
        best, best_makespan, longest = None, np.inf, 0.0
        for k, (label, value, make_policy) in enumerate(variants):
            if k and time.perf_counter() - t0 + longest > self.budget_s:
                break
            t = time.perf_counter()
            policy = make_policy()
            makespan = simulated_makespan(ctx, policy)
            longest = max(longest, time.perf_counter() - t)
            self.tried.append((label, makespan))
            if makespan < best_makespan - 1e-9:
                best, best_makespan, self.chosen = value, makespan, label
            if not k and self._alike(policy):
                break
        self.spent_s = time.perf_counter() - t0
        return best

    def _alike(self, policy) -> bool:
        """Whether, after simulating the default ``policy``, every other candidate is known to give its run (stop)."""
        return False


class SimulatedOrderChoice(SimulatedChoice):
    """A start planner (``planner(ctx, rows=...)``) that simulates candidate orders and keeps the best.

    Parameters
    ----------
    candidates
        Orders to try (count, >= 1): the default order and ``candidates - 1`` phase shifts of its
        low-discrepancy fractions (:func:`~lloptim.runtime.memory_schedulers.planned_start_keys`,
        ``phase = k / candidates``); an order equal to one tried already is not simulated again
        (where memory alone binds the order is longest first and every phase gives it).
    budget_s
        Wall-clock seconds the simulations may take (:class:`SimulatedChoice`).
    make_policy
        ``make_policy(planner)`` returns a fresh policy, the caller's hybrid with ``planner`` as its
        fixed start planner (so the simulated runs are the real run's configuration).

    Attributes
    ----------
    tried : list of tuple
        ``(phase, makespan_s)`` of each simulated candidate of the last choice.
    chosen : float or None
        Phase of the order kept (None: no choice was made, the default order).
    spent_s : float
        Wall-clock seconds the last choice took.
    """

    def __init__(self, candidates: int, budget_s: float, make_policy: Callable) -> None:
        super().__init__(candidates, budget_s)
        self.make_policy = make_policy

    def __call__(self, ctx: RunContext, rows: np.ndarray | None = None) -> np.ndarray:
        self.tried, self.chosen, self.spent_s = [], None, 0.0
        n = ctx.problem.n_requests
        everyone = rows is None or np.asarray(rows).size == n
        if self.candidates == 1 or not ctx.known_lengths or not everyone:
            return planned_start_keys(ctx, rows=rows)
        best_keys = self._choose(ctx, self._orders(ctx))
        if best_keys is None:
            return planned_start_keys(ctx, rows=rows)
        return best_keys if rows is None else best_keys[np.asarray(rows, dtype=np.int64)]

    def _orders(self, ctx: RunContext):
        """The distinct candidate orders, lazily (the budget may stop before the last)."""
        seen: list[np.ndarray] = []
        for k in range(self.candidates):
            phase = k / self.candidates
            keys = planned_start_keys(ctx, phase=phase)
            if any(np.array_equal(keys, other) for other in seen):
                continue  # the same order (longest first where memory alone binds: no spread to shift)
            seen.append(keys)
            yield phase, keys, (lambda keys=keys: self.make_policy(_Fixed(keys)))


class SimulatedWorkflowChoice(SimulatedChoice):
    """Chooses the workflow dispatch's variant (:data:`WORKFLOW_VARIANTS`) by simulation, per run.

    Called by the hybrid's dispatch when it is set up on requests with precedence; it returns the
    :class:`~lloptim.runtime.request_schedulers.WorkflowQueue` options to run with. It simulates
    only with known output lengths and every request present at the start (arrival time 0; the
    precedence alone makes successors wait); otherwise it returns the default without a
    simulation.

    Parameters
    ----------
    candidates
        Variants to try (count, 1 .. ``len(WORKFLOW_VARIANTS)``): the first ``candidates`` of
        :data:`WORKFLOW_VARIANTS`, the default first.
    budget_s
        Wall-clock safety net of the simulations, seconds (:class:`SimulatedChoice`).
    make_policy
        ``make_policy(**variant)`` returns a fresh policy, the caller's hybrid with those
        :class:`~lloptim.runtime.request_schedulers.WorkflowQueue` options and no choice of its own.

    Attributes
    ----------
    tried : list of tuple
        ``(index into WORKFLOW_VARIANTS, makespan_s)`` of each simulated candidate of the last choice.
    chosen : int or None
        Index of the variant kept (None: nothing was simulated, the default).
    spent_s : float
        Wall-clock seconds the last choice took.
    """

    def __init__(self, candidates: int, budget_s: float, make_policy: Callable) -> None:
        super().__init__(candidates, budget_s)
        self.make_policy = make_policy

    def applies(self, ctx: RunContext) -> bool:
        """Whether the simulation is the run: known lengths, precedence, every request arriving at 0 seconds."""
        w = ctx.problem.workload
        return (self.candidates > 1 and ctx.known_lengths and w.precedence is not None
                and not np.any(np.asarray(w.arrival_s) > 0.0))

    def _alike(self, policy) -> bool:
        # the variants differ only where the pacing limits an instance: if the simulation of the
        # default never did (one instance, or no chain decides), they are all the same run
        delegate = getattr(policy.requests, "delegate", None)  # the memory-aware queue, where memory binds
        queue = policy.requests if delegate is None else getattr(delegate, "workflows", None)
        return queue is not None and not getattr(queue, "ever_paced", True)

    def __call__(self, ctx: RunContext) -> dict:
        self.tried, self.chosen, self.spent_s = [], None, 0.0
        if not self.applies(ctx):
            return dict(WORKFLOW_VARIANTS[0])
        variants = ((k, v, (lambda v=v: self.make_policy(**v)))
                    for k, v in enumerate(WORKFLOW_VARIANTS[:self.candidates]))
        best = self._choose(ctx, variants)
        return dict(WORKFLOW_VARIANTS[0] if best is None else best)


class _Fixed:
    """A start planner that returns given keys (one per request of the problem)."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys

    def __call__(self, ctx: RunContext, rows: np.ndarray | None = None) -> np.ndarray:
        return self.keys if rows is None else self.keys[np.asarray(rows, dtype=np.int64)]


def rollout_points(n_requests: int, epochs: int) -> list[int]:
    """The dispatch counts at which a :class:`Rollout` re-chooses: ``e / (epochs + 1)`` of the requests.

    Parameters
    ----------
    n_requests
        Requests of the run.
    epochs
        Decision points wanted (>= 1).

    Returns
    -------
    list of int
        Distinct counts of handed-out requests, ascending, each in ``1 .. n_requests - 1`` (fewer
        than ``epochs`` on a run too small for them).
    """
    points = {int(round(n_requests * e / (epochs + 1))) for e in range(1, epochs + 1)}
    return sorted(p for p in points if 0 < p < n_requests)


def _variant_kind(dispatch) -> str | None:
    """What a switch of ``dispatch`` changes now: ``"order"``, ``"pacing"`` or None (nothing to choose)."""
    if dispatch.dag is not None:
        return "pacing" if len(dispatch.ctx.problem.instances) > 1 else None  # one instance is never paced
    memory = dispatch.memory
    if (memory is not None and dispatch.delegate is memory and not dispatch.slack_keys
            and memory.order == "planned"):
        return "order"
    return None


def _apply(dispatch, variant) -> None:
    """Switch ``dispatch`` to ``variant`` from its next decision on.

    A float is a phase of the planned order: the unstarted requests get the keys of
    :func:`~lloptim.runtime.memory_schedulers.planned_start_keys` over themselves (the rest of the
    run planned anew) at that phase. A dict is a chain pacing (an entry of
    :data:`WORKFLOW_VARIANTS`), whose cached limits and refusals are dropped.
    """
    if isinstance(variant, dict):
        dispatch._configure(**variant)
        dispatch._limits = None       # limits computed with the old scale
        dispatch._version += 1        # a refusal made before the switch does not stand
        dispatch._limits_version += 1
        return
    memory = dispatch.memory
    rows = np.flatnonzero(~memory.taken)
    if rows.size:
        memory.rekey(rows, planned_start_keys(dispatch.ctx, rows=rows, phase=float(variant)))


class _Replay:
    """A dispatch's rollout that applies given switches, ``((count, variant), ...)``, and simulates nothing."""

    def __init__(self, switches: tuple) -> None:
        self.switches = tuple(switches)
        self.next_at = np.inf

    def setup(self, ctx: RunContext, dispatch) -> None:
        self.left = list(self.switches)
        self.next_at = self.left[0][0] if self.left else np.inf

    def revise(self, dispatch) -> None:
        while self.left and self.left[0][0] <= dispatch.dispatched:
            _apply(dispatch, self.left.pop(0)[1])
        self.next_at = self.left[0][0] if self.left else np.inf


class Rollout:
    """Re-choose the hybrid's dispatch variant during the run by simulating the rest (module docstring).

    At each of ``epochs`` decision points (:func:`rollout_points`: when 1/(epochs+1), 2/(epochs+1),
    ... of the requests have been handed out) it simulates the run with the switches made so far
    and, from this point, each candidate variant, and switches to the one of the shortest
    simulated makespan if it is strictly shorter than the run's as it stands. Candidates, the
    current one excluded: where the memory-aware dispatch runs its planned order, the unstarted
    requests planned anew at phases ``j / (candidates - 1)``, ``j = 0 .. candidates - 2`` (an
    order equal to the current one is not simulated); on workflows on a fleet, the first
    ``candidates`` entries of :data:`WORKFLOW_VARIANTS`. Elsewhere (no planned order, no
    precedence, one instance with precedence) there is nothing to choose and nothing is simulated.

    It simulates only with known output lengths and every request present at the start (as
    :class:`SimulatedChoice`): with estimates or arrivals over time the run keeps its variant and
    :attr:`skipped` says why. The count of simulations is at most
    ``1 + epochs * (candidates - 1)`` per run (the budget, the same on any machine); the wall
    clock is a safety net: no simulation starts once the time spent plus the longest so far would
    exceed ``budget_s``.

    Parameters
    ----------
    epochs
        Decision points (integer >= 1).
    candidates
        Variants per decision point, the current one included (integer >= 2).
    budget_s
        Wall-clock safety net of the run's simulations, seconds (> 0).
    make_policy
        ``make_policy(keys, variant, switches)`` returns a fresh policy: the run's hybrid with
        start keys ``keys`` (one per request; None: its own planner), chain pacing ``variant``
        (``pace_scale``, ``plan_paced``) and a dispatch that applies ``switches`` (a tuple of
        ``(count, variant)``) and simulates nothing.

    Attributes
    ----------
    switches : list of tuple
        ``(count, variant)`` of each switch made in the run (a float phase, or a dict of
        :data:`WORKFLOW_VARIANTS`).
    tried : list of tuple
        ``(count, variant, makespan_s)`` of each simulated candidate (variant None: the run as it
        stood, simulated once at the first decision point).
    simulations : int
        Simulated runs.
    spent_s : float
        Wall-clock seconds the simulations took.
    skipped : str or None
        Why nothing was simulated (estimates, arrivals, nothing to choose, the budget), or None.
    """

    def __init__(self, epochs: int, candidates: int, budget_s: float, make_policy: Callable) -> None:
        if not isinstance(epochs, (int, np.integer)) or isinstance(epochs, bool) or epochs < 1:
            raise SpecError("policy.hybrid.rollout_epochs", f"must be an integer >= 1, not {epochs!r}",
                            "0 (the default) runs without rollout; 1-8 re-choose the variant that many times")
        if not isinstance(candidates, (int, np.integer)) or isinstance(candidates, bool) or candidates < 2:
            raise SpecError("policy.hybrid.rollout_candidates", f"must be an integer >= 2, not {candidates!r}",
                            "the current variant and at least one other: 2-16")
        if not (isinstance(budget_s, (int, float)) and not isinstance(budget_s, bool) and budget_s > 0):
            raise SpecError("policy.hybrid.rollout_budget_s", f"must be > 0 seconds, not {budget_s!r}",
                            "give the wall-clock seconds the run's rollout simulations may take")
        self.epochs, self.candidates, self.budget_s = int(epochs), int(candidates), float(budget_s)
        self.make_policy = make_policy
        self.next_at = np.inf

    def setup(self, ctx: RunContext, dispatch) -> None:
        """Start a run: its decision points, and the dispatch's chain pacing as set up (the replays start from it).

        Parameters
        ----------
        ctx
            The run's context (its problem, estimates, KV modes).
        dispatch
            The :class:`~lloptim.runtime.dispatch.HybridDispatch` this rollout revises, set up
            for the run (after its workflow choice).
        """
        self.ctx = ctx
        self.switches: list[tuple] = []
        self.tried: list[tuple] = []
        self.simulations = 0
        self.spent_s = 0.0
        self._longest = 0.0
        self.current_s: float | None = None  # simulated makespan of the run with its switches so far
        self.keys: np.ndarray | None = None  # the start keys of the planned order, at the first decision
        self.pacing = {"pace_scale": dispatch.pace_scale, "plan_paced": dispatch.plan_paced}
        self.skipped = None
        if not ctx.known_lengths:
            self.skipped = "estimated lengths: the simulation would be of another run"
        elif np.any(np.asarray(ctx.problem.workload.arrival_s) > 0.0):
            self.skipped = "requests arrive over time: the simulation would read the future"
        self.points = [] if self.skipped else rollout_points(ctx.problem.n_requests, self.epochs)
        self.next_at = self.points[0] if self.points else np.inf

    def _simulate(self, switches: tuple) -> float | None:
        """Makespan of the replay with ``switches``, seconds (None: the safety net is spent, nothing run)."""
        if self.spent_s + self._longest > self.budget_s:
            self.skipped = f"the wall-clock safety net of {self.budget_s:g} s is spent"
            return None
        t = time.perf_counter()
        policy = self.make_policy(self.keys, self.pacing, switches)
        makespan = simulated_makespan(self.ctx, policy)
        took = time.perf_counter() - t
        self.spent_s += took
        self._longest = max(self._longest, took)
        self.simulations += 1
        self._last_policy = policy
        return makespan

    def _variants(self, dispatch, kind: str) -> list:
        """The candidates other than the current variant (see the class docstring)."""
        if kind == "pacing":
            current = {"pace_scale": dispatch.pace_scale, "plan_paced": dispatch.plan_paced}
            return [dict(v) for v in WORKFLOW_VARIANTS[:self.candidates] if v != current]
        memory = dispatch.memory
        rows = np.flatnonzero(~memory.taken)
        if rows.size < 2:
            return []
        seen = [rows[np.lexsort((rows, memory.key[rows]))]]
        out = []
        for j in range(self.candidates - 1):
            phase = j / (self.candidates - 1)
            keys = planned_start_keys(self.ctx, rows=rows, phase=phase)
            order = rows[np.lexsort((rows, keys))]
            if any(np.array_equal(order, other) for other in seen):
                continue  # the same order as one simulated or running (longest first where memory alone binds)
            seen.append(order)
            out.append(phase)
        return out

    def revise(self, dispatch) -> None:
        """At a decision point: simulate the candidates from here and switch to the best, if strictly shorter.

        Parameters
        ----------
        dispatch
            The run's :class:`~lloptim.runtime.dispatch.HybridDispatch`, before it chooses its
            next request (its ``dispatched`` count is the decision point).
        """
        at = dispatch.dispatched
        self.points = [p for p in self.points if p > at]
        self.next_at = self.points[0] if self.points else np.inf
        kind = _variant_kind(dispatch)
        if kind is None:
            self.skipped, self.points, self.next_at = "nothing to choose in this run", [], np.inf
            return
        if kind == "order" and self.keys is None:
            self.keys = dispatch.memory.key.copy()  # before any switch: the start order the replays begin with
        variants = self._variants(dispatch, kind)
        if not variants:
            return
        if self.current_s is None:
            self.current_s = self._simulate(tuple(self.switches))
            if self.current_s is None:
                self.points, self.next_at = [], np.inf
                return
            self.tried.append((at, None, self.current_s))
            if kind == "pacing" and not getattr(self._last_policy.requests, "ever_paced", True):
                # never paced in the run as it stands: every pacing gives the same run
                self.skipped, self.points, self.next_at = "the run is never paced", [], np.inf
                return
        best, best_s = None, self.current_s
        for variant in variants:
            makespan = self._simulate(tuple(self.switches) + ((at, variant),))
            if makespan is None:
                self.points, self.next_at = [], np.inf
                break
            self.tried.append((at, variant, makespan))
            if makespan < best_s - 1e-9:
                best, best_s = variant, makespan
        if best is not None:
            _apply(dispatch, best)
            self.switches.append((at, best))
            self.current_s = best_s
