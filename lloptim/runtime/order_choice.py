"""Choosing the memory-aware dispatch's start order by simulating a few candidates (opt-in).

Where KV memory and the clients bind together (rho about 1), orders equally good on paper end
0.5 points apart or more: a dispatch decision moves every later one, and which of the
golden-ratio spreads of :func:`~lloptim.runtime.memory_schedulers.planned_start_keys` (one per
phase of its low-discrepancy sequence) packs a given workload best is not known before it runs.
With the output lengths known and every request present at the start, the simulator answers
exactly: :class:`SimulatedOrderChoice` runs the hybrid with each candidate order on the requests
(the simulated engine, the run's KV modes) and keeps the one of the shortest makespan. The first
candidate is the default order, so the choice is never worse than the default in that simulation
(with known lengths the run then is that simulation). It costs one simulated run per candidate
(about 1 s each for 1000 requests on one llama-65b instance), within a time budget.

With estimates the simulation would be of another run (no overrun, no preemption), and with
requests arriving over time of requests not known yet: there the default order is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from lloptim.errors import SpecError
from lloptim.runtime.engine import Engine
from lloptim.runtime.memory_schedulers import planned_start_keys
from lloptim.runtime.policy import RunContext

__all__ = ["SimulatedOrderChoice"]


class SimulatedOrderChoice:
    """A start planner (``planner(ctx, rows=...)``) that simulates candidate orders and keeps the best.

    Parameters
    ----------
    candidates
        Orders to try (count, >= 1): the default order and ``candidates - 1`` phase shifts of its
        low-discrepancy fractions (:func:`~lloptim.runtime.memory_schedulers.planned_start_keys`,
        ``phase = k / candidates``); an order equal to one tried already is not simulated again
        (where memory alone binds the order is longest first and every phase gives it).
    budget_s
        Wall-clock seconds the simulations may take: no candidate is started once the time spent
        plus the longest simulation so far would exceed it (the default order is simulated first,
        whatever the budget).
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
        if not isinstance(candidates, (int, np.integer)) or isinstance(candidates, bool) or candidates < 1:
            raise SpecError("policy.hybrid.order_candidates", f"must be an integer >= 1, not {candidates!r}",
                            "1 keeps the default order; 2-8 simulate that many candidate orders")
        if not budget_s > 0:
            raise SpecError("policy.hybrid.order_budget_s", f"must be > 0 seconds, not {budget_s!r}",
                            "give the wall-clock seconds the simulations of the candidate orders may take")
        self.candidates = int(candidates)
        self.budget_s = float(budget_s)
        self.make_policy = make_policy
        self.tried: list[tuple[float, float]] = []
        self.chosen: float | None = None
        self.spent_s = 0.0

    def __call__(self, ctx: RunContext, rows: np.ndarray | None = None) -> np.ndarray:
        self.tried, self.chosen, self.spent_s = [], None, 0.0
        n = ctx.problem.n_requests
        everyone = rows is None or np.asarray(rows).size == n
        if self.candidates == 1 or not ctx.known_lengths or not everyone:
            return planned_start_keys(ctx, rows=rows)
        t0 = time.perf_counter()
        modes = ctx.extra.get("kv_mode") or [inst.kv_mode for inst in ctx.problem.instances]
        blocks = ctx.extra.get("kv_block_tokens") or [inst.kv_block_tokens for inst in ctx.problem.instances]
        run_opts = {"kv_mode": modes[0] if len(set(modes)) == 1 else None,
                    "kv_block_tokens": blocks[0] if len(set(blocks)) == 1 else None}
        best_keys, best_makespan, longest = None, np.inf, 0.0
        seen: list[np.ndarray] = []
        for k in range(self.candidates):
            if k and time.perf_counter() - t0 + longest > self.budget_s:
                break
            phase = k / self.candidates
            keys = planned_start_keys(ctx, phase=phase)
            if any(np.array_equal(keys, other) for other in seen):
                continue  # the same order (longest first where memory alone binds: no spread to shift)
            seen.append(keys)
            t = time.perf_counter()
            res = Engine(ctx.problem, self.make_policy(_Fixed(keys)), **run_opts).run()  # simulated backend
            longest = max(longest, time.perf_counter() - t)
            makespan = float(np.nanmax(res.done_s))
            self.tried.append((phase, makespan))
            if makespan < best_makespan - 1e-9:
                best_keys, best_makespan, self.chosen = keys, makespan, phase
        self.spent_s = time.perf_counter() - t0
        if best_keys is None:
            return planned_start_keys(ctx, rows=rows)
        return best_keys if rows is None else best_keys[np.asarray(rows, dtype=np.int64)]


class _Fixed:
    """A start planner that returns given keys (one per request of the problem)."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys

    def __call__(self, ctx: RunContext, rows: np.ndarray | None = None) -> np.ndarray:
        return self.keys if rows is None else self.keys[np.asarray(rows, dtype=np.int64)]
