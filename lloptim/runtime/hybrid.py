"""The paper's hybrid offline-online method as policies: ``offline`` and ``hybrid``.

* **offline**: the makespan bin packing (:mod:`lloptim.formulations`) assigns requests to clients
  before the run, weights from the *estimated* output lengths; each client serves its queue
  longest first; iterations are prefill-first. No re-assignment.
* **hybrid**: the same offline plan, plus the online request scheduler (an idle client with an
  empty queue takes the unstarted request of the most loaded client that balances the two) and
  the Lagrangian iteration scheduler (:mod:`lloptim.runtime.lagrangian`) priced with the offline
  dual prices of client time.
"""

from __future__ import annotations

import numpy as np

from lloptim.runtime.iteration_schedulers import PrefillFirst
from lloptim.runtime.lagrangian import LagrangianIterations
from lloptim.runtime.policy import Policy, RunContext
from lloptim.runtime.registry import register_policy
from lloptim.runtime.memory_schedulers import MemoryAwareQueue
from lloptim.runtime.request_schedulers import AssignedQueues, WorkflowQueue

__all__ = ["OfflinePlan", "offline_policy", "hybrid_policy", "START_DELAY"]

#: Decode steps the memory projection of the sorted dispatch allows a request to wait for its
#: prefill, by iteration rule (a fused prefill decodes once before the request; the separate rule
#: may batch prefills a few steps). Chosen on training workloads (benchmarks/memory.py --tune).
START_DELAY = {"fused": 2, "separate": 1}

class OfflinePlan:
    """Solves the offline bin packing once per run and keeps the result for both schedulers.

    Parameters
    ----------
    solver
        Backend name for :func:`lloptim.solvers.solve` (``"greedy"`` is LPT + local search).
    time_limit_s
        Time limit of the solve, seconds.
    """

    def __init__(self, solver: str = "greedy", time_limit_s: float = 1.0) -> None:
        self.solver = solver
        self.time_limit_s = time_limit_s
        self.result = None
        self._ctx_id: int | None = None

    def _solve(self, ctx: RunContext):
        if self._ctx_id != id(ctx):
            from lloptim.solvers import SolveParams, solve

            # weights per instance (request_work_s on each), so a slower instance gets less work
            self.result = solve(ctx.problem, solver=self.solver, params=SolveParams(time_limit_s=self.time_limit_s),
                                estimates=ctx.estimates)
            self._ctx_id = id(ctx)
            ctx.extra["offline"] = self.result
        return self.result

    def assignment(self, ctx: RunContext) -> np.ndarray:
        """Global client index of each request.

        Parameters
        ----------
        ctx
            The run; the first call for a run solves the plan from its estimates.
        """
        return self._solve(ctx).assignment

    def prices(self, ctx: RunContext) -> np.ndarray | None:
        """Dual prices of client time (sum 1), or None when the backend has none.

        Parameters
        ----------
        ctx
            The run; the first call for a run solves the plan from its estimates.

        Returns
        -------
        numpy.ndarray or None
            One price per global client: makespan seconds per second of that client's time
            (dimensionless, summing to 1); None when the solve gave no usable load duals.
        """
        mult = getattr(self._solve(ctx), "multipliers", None) or {}
        load = mult.get("load")
        if load is None or not np.isfinite(load).all() or np.sum(load) <= 0:
            return None
        return np.asarray(load, dtype=np.float64)


def offline_policy(solver: str = "greedy", time_limit_s: float = 1.0) -> Policy:
    """Offline bin packing only: static queues, prefill-first.

    Parameters
    ----------
    solver
        Backend name for :func:`lloptim.solvers.solve` (see :class:`OfflinePlan`).
    time_limit_s
        Time limit of the offline solve, seconds.
    """
    plan = OfflinePlan(solver, time_limit_s)
    return Policy("offline", AssignedQueues(plan.assignment, steal=False), PrefillFirst())


def hybrid_policy(solver: str = "greedy", time_limit_s: float = 1.0, setup_weight: float | None = None,
                  dispatch: str = "sorted",
                  steal: bool = True, forecast: str = "auto", token_budget: int | None = None,
                  survival: np.ndarray | None = None, fused: bool = False, memory_prices: str = "lp",
                  price_updates: bool = True, start_delay: int | None = None) -> Policy:
    """The hybrid: offline plan + sorting and preemptive re-assignment + Lagrangian iteration scheduling.

    Parameters
    ----------
    solver, time_limit_s
        Offline solve (see :class:`OfflinePlan`): its dual prices price the iteration decisions.
    dispatch
        ``"sorted"`` (default): an idle client takes the longest (estimated) unstarted request
        wherever the plan put it; a request taken from another client's plan is a preemptive
        re-assignment. Requests of similar length then start together and finish together, so
        prefills batch without idling anyone. ``"plan"``: the literal Algorithm 1, each client
        works through its planned queue (longest first) and steals only when it runs dry.
    setup_weight
        Weight on the prefill's fixed cost ``C_p`` in the Lagrangian rule (``None``: the tuned
        default of :data:`lloptim.runtime.lagrangian.SETUP_WEIGHT`).
    steal
        Online preemptive re-assignment of unstarted requests.
    forecast
        Forecast of finish times for the Lagrangian lookahead (see
        :class:`~lloptim.runtime.lagrangian.LagrangianIterations`).
    survival
        ``P(output > x)`` learned from training requests, for the lookahead with unknown lengths.
    token_budget
        Most prompt tokens per prefill iteration.
    fused
        Insert prompts as chunks fused into decode iterations (``C_p = 0``, see
        :mod:`lloptim.runtime.lagrangian`) rather than as separate prefill iterations: the
        ``hybrid-fused`` policy.
    memory_prices, price_updates
        How the Lagrangian rule prices KV memory (``"lp"``, ``"uniform"``, ``"none"``) and whether
        the price follows the observed utilizations (:mod:`lloptim.runtime.lagrangian`).
    start_delay
        Decode steps a dispatched request may wait for its prefill that the memory projection
        allows for (:class:`~lloptim.runtime.memory_schedulers.MemoryAwareQueue`); None: the
        default of the iteration rule (:data:`START_DELAY`).

    Notes
    -----
    With ``dispatch="sorted"``, an instance whose KV cache can fill up (its clients' largest
    requests do not fit at once) hands out the longest unstarted request *that fits*: the
    instance's admitted requests and it must stay within the cache at every future step
    (:class:`~lloptim.runtime.memory_schedulers.MemoryAwareQueue`), so the run needs no
    preemption when lengths are known; elsewhere it is exactly longest-first.
    """
    plan = OfflinePlan(solver, time_limit_s)
    if dispatch == "sorted":
        delay = START_DELAY["fused" if fused else "separate"] if start_delay is None else start_delay
        requests = MemoryAwareQueue("planned", "first-fit", plan=plan.assignment, start_delay=delay,
                                    workflows=WorkflowQueue(plan=plan.assignment))
    elif dispatch == "plan":
        requests = AssignedQueues(plan.assignment, steal=steal)
    else:
        from lloptim.errors import SpecError

        raise SpecError("policy.hybrid.dispatch", f"unknown dispatch {dispatch!r}", "use 'sorted' or 'plan'")
    return Policy("hybrid-fused" if fused else "hybrid", requests,
                  LagrangianIterations(plan.prices, setup_weight=setup_weight, token_budget=token_budget,
                                       forecast=forecast, survival=survival, fused=fused,
                                       memory_prices=memory_prices, price_updates=price_updates))


register_policy("offline", offline_policy,
                "offline makespan bin packing (longest first per client), no re-assignment, prefill-first")
register_policy("hybrid", hybrid_policy,
                "offline bin packing + sorted dispatch with preemptive re-assignment + Lagrangian prefill/decode "
                "decisions (arXiv 2502.15763)")
register_policy("hybrid-fused", lambda **opts: hybrid_policy(fused=True, **opts),
                "the hybrid with prompts fused into decode iterations as chunks (C_p = 0): no prefill/idle "
                "trade-off left, the strongest policy when output lengths are unknown")
register_policy("hybrid-plan", lambda **opts: _renamed(hybrid_policy(dispatch="plan", **opts), "hybrid-plan"),
                "the hybrid with the literal Algorithm 1: planned queues, steal only when a queue runs dry")


def _renamed(policy: Policy, name: str) -> Policy:
    policy.name = name
    return policy
