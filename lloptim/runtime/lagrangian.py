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
  ``C * mu_c * decode_base_s`` per step.

``C_d`` accumulates over the steps the current waiting clients have waited (the economic-order-
quantity rule: batch a setup when the holding cost it saves equals the setup cost), and the
prefill is inserted when ``C_d >= C_p``. In the end game, when the request scheduler holds no more
requests, a waiting client is on the critical path (nothing else can fill the time it loses) and
its price rises to ``mu = 1`` per second, i.e. the prefill goes in at once.

Each decision is O(1) amortized: the accumulated cost is updated incrementally.
"""

from __future__ import annotations

import heapq

import numpy as np

from lloptim.errors import PolicyError
from lloptim.runtime.iteration_schedulers import admissible
from lloptim.runtime.policy import DECODE, Decision, IterationScheduler, Prefill, RunContext

__all__ = ["LagrangianIterations"]


class LagrangianIterations(IterationScheduler):
    """Insert a prefill when the accumulated waiting cost of the decodes reaches its cost.

    Parameters
    ----------
    prices
        Price of each client's time (global client index), makespan seconds per client second;
        a callable ``prices(ctx) -> array`` is evaluated at setup. ``None``: ``1/C`` each.
    setup_weight
        Multiplier on ``C_p`` (1.0 is the EOQ balance; larger batches prefills more).
    token_budget
        Most prompt tokens per prefill iteration (``None``: unlimited).
    """

    def __init__(self, prices=None, setup_weight: float = 1.0, token_budget: int | None = None,
                 lookahead: bool = True) -> None:
        self.prices = prices
        self.lookahead = lookahead
        self.setup_weight = setup_weight
        self.token_budget = token_budget

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
            self.step_price.extend((share * len(clients) * inst.profile.latency.decode_base_s / len(clients)).tolist())
        self.setup_cost = [self.setup_weight * inst.profile.latency.prefill_base_s for inst in ctx.problem.instances]
        self.accrued = [0.0] * len(ctx.problem.instances)
        self.requests = ctx.extra.get("request_scheduler")
        self.estimates = ctx.estimates.tolist()
        self.finish_heap: list[list[tuple[int, int, int]]] = [[] for _ in ctx.problem.instances]
        self.decisions_prefill = 0

    def decide(self, state) -> Decision:
        if not state.waiting:
            return DECODE
        k = state.index
        end_game = self.requests is not None and self.requests.pending() == 0
        if state.n_running == 0 or end_game:
            return self._prefill(state)
        price = self.step_price
        waiting_cost = 0.0
        for c in state.waiting:
            waiting_cost += price[c]
        if self.lookahead:
            steps = self._steps_to_next_finish(state)
            if steps is None or waiting_cost * steps >= self.setup_cost[k]:
                return self._prefill(state)
            return DECODE
        # the cost of one more decode step with these clients idle, added to what they already lost
        if self.accrued[k] + waiting_cost >= self.setup_cost[k]:
            return self._prefill(state)
        self.accrued[k] += waiting_cost
        return DECODE

    def _steps_to_next_finish(self, state) -> int | None:
        """Decode steps until the next running client is expected to finish (from the estimates)."""
        heap = self.finish_heap[state.index]
        engine = state.engine
        step = state.decode_steps
        while heap:
            f, c, r = heap[0]
            if engine.client_request[c] != r or f <= step:
                # finished, evicted, or running past its estimate: no forecast for it
                heapq.heappop(heap)
                continue
            return f - step
        return None

    def _prefill(self, state) -> Decision:
        chosen = admissible(state, state.waiting, self.token_budget)
        if not chosen:
            if state.n_running:
                return DECODE
            raise PolicyError(f"instance {state.index}: no waiting request fits the free KV cache")
        self.accrued[state.index] = 0.0
        self.decisions_prefill += 1
        if self.lookahead:
            heap = self.finish_heap[state.index]
            engine = state.engine
            step = state.decode_steps
            for c in chosen:
                r = engine.client_request[c]
                heapq.heappush(heap, (step + int(round(self.estimates[r])), c, r))
        return Prefill(chosen)
