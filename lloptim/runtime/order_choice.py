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
           "simulated_makespan"]

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
