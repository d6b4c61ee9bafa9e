"""The end game of the hybrid's dispatch on a fleet: a two-level plan of the last requests.

Longest-first list scheduling (the hybrid's dispatch with every request present) leaves the
clients of an instance finishing up to one short request apart, and the instances up to one
request apart; with few requests per client (a fleet of several instances serving one batch)
both cost percents of the makespan, while a bin-packing plan balances each client to a token.
Planning everything at the start is worse where lengths are heavy-tailed: a plan whose weights
price a request's client-time alone does not see the KV load a long request puts on its whole
instance. :func:`endgame_assignment` plans only the queue that is left, from what every client
holds, on the two levels the latency model has (:mod:`lloptim.bounds`):

* **instances**: the fractional assignment LP of the fleet bound over the queued requests,
  ``min T s.t. b_k + sum_r v[k, r] y[k, r] <= T, sum_k y[k, r] = 1``, with ``v[k, r]`` the
  instance-seconds of request ``r`` on ``k`` (:func:`~lloptim.work.instance_seconds`: its
  per-token terms, KV included, and its share of the fixed costs, plus the iteration of its
  prompt) and ``b_k`` the instance-seconds ``k`` still owes its running requests (their
  estimated tokens left, read from the engine). A basic optimum splits at most ``m - 1``
  requests; each goes where the LP puts most of it. On identical instances the level is
  skipped (one pool of clients).
* **clients**: on each instance (or pool), ``P||Cmax`` in decode steps: request ``r`` holds its
  client ``o_r + 1`` iterations (its estimate, plus its prompt's), a client is first busy for
  the steps its request has left; LPT + the move/swap local search of
  :mod:`lloptim.solvers.greedy` with those releases. Every client of an instance advances one
  token per step whatever the step costs, so balancing steps is what makes them finish together.

The LP is HiGHS (milliseconds at a few hundred requests); a failed solve, or one stopped by its
limits, falls back to the cheapest instance of each request.

**A deterministic budget.** The LP stops on simplex iterations (:data:`ENDGAME_LP_ITERATIONS`
per row and column) and each local search on elements touched (:data:`ENDGAME_WORK`, see
:class:`lloptim.solvers.greedy.WorkBudget`), never on the clock: the same run gives the same end
game on an idle or a loaded machine. The wall-clock limit (``time_limit_s``) stays only as a
safety net, far above what the budgets take.

:class:`EndgameQueues` serves the plan: each client its own queue, longest first; a client that
runs dry steals from the client that would finish last, only a request it would *finish before
that client finishes its queue* (at each instance's current full-batch step time), so the steal
lowers the later of the two ends. Unguarded stealing (the paper's, for identical clients) lets a
slow instance take a long request that a fast one would have finished first: on a 3 fast + 1
slow fleet (GSM8K-train, 1319 requests) it cost 2.8 % of the makespan.
"""

from __future__ import annotations

import numpy as np

from lloptim.runtime.engine import FAILED, RUNNING, WAITING
from lloptim.runtime.fleet import split_lp
from lloptim.runtime.policy import RunContext
from lloptim.runtime.request_schedulers import AssignedQueues
from lloptim.work import instance_seconds

__all__ = ["EndgameQueues", "endgame_assignment", "full_step_s", "steps_left", "ENDGAME_WORK",
           "ENDGAME_LP_ITERATIONS"]

#: Work budget of each local search of the end game, elements touched (count; see
#: :class:`lloptim.solvers.greedy.WorkBudget`): about 0.8 s on an idle core (the old wall-clock limit
#: was 1 s); the end game of 1,500 requests on four instances touches about 35,000.
ENDGAME_WORK = 50_000_000

#: Simplex iterations the split LP may take per row and column (count): a basic optimum of the
#: ``R + m`` rows takes about as many iterations as rows, so this only stops a solve gone wrong.
ENDGAME_LP_ITERATIONS = 10


def steps_left(ctx: RunContext, engine, holding: dict[int, tuple[int, float]]) -> np.ndarray:
    """``(n_clients,)`` decode iterations each client still owes the request it holds (0 if idle).

    A running request owes its estimated tokens less those generated (at least 1 while it runs);
    one waiting for its prefill owes them all plus the prompt's iteration.

    Parameters
    ----------
    ctx
        The run (estimates, clients' instances and states).
    engine
        The engine, whose instance states count each client's decode steps (None: every held
        request owes all its steps).
    holding
        ``client -> (request, handed out at)`` of the requests the clients hold.

    Returns
    -------
    numpy.ndarray
        Decode iterations owed by each client (0 if it holds nothing), iterations.
    """
    out = np.zeros(ctx.problem.n_clients)
    state = ctx.extra.get("client_state")
    for c, (r, _) in holding.items():
        cs = None if state is None else state[c]
        est = float(ctx.estimates[r])
        if cs == RUNNING and engine is not None:
            k = int(ctx.client_instance[c])
            done = engine.states[k].decode_steps - engine.client_start_step[c]
            out[c] = max(1.0, est - done)
        elif cs in (None, WAITING, RUNNING):
            out[c] = est + 1.0
    return out


#: Instance-seconds that stand for "not here" in the split LP (an instance without live clients, or
#: one where a request cannot finish in time): large against any makespan, small enough for HiGHS.
BIG = 1e9


def full_step_s(engine, k: int, problem) -> float:
    """Seconds of a decode step of instance ``k`` with every client busy, at its current KV load.

    Parameters
    ----------
    engine
        The engine (None: an empty cache).
    k
        Instance index.
    problem
        The problem (its instances' latency models).

    Returns
    -------
    float
        Step time, seconds.
    """
    inst = problem.instances[k]
    lat = inst.profile.latency
    if engine is None:
        return float(lat.decode_time(inst.clients, 0.0))
    st = engine.states[k]
    return float(lat.decode_time(len(st.clients), st.kv_tokens))


def _instance_split(v: np.ndarray, owed: np.ndarray, time_limit_s: float) -> tuple[np.ndarray, float]:
    """Instance of each request from the fractional assignment LP (module docstring), and the LP's ``T``.

    ``v`` is ``(R, m)`` instance-seconds, ``owed`` ``(m,)`` seconds each instance still owes;
    returns ``((R,) int64, T seconds)`` (T is inf when the solve failed or hit a limit).
    """
    R, m = v.shape
    res = split_lp(v.T, owed, time_limit_s, max_iter=ENDGAME_LP_ITERATIONS * (R * m + R + m + 1))
    if res.status != 0 or res.x is None:
        return v.argmin(axis=1), np.inf
    return res.x[:m * R].reshape(m, R).argmax(axis=0), float(res.x[-1])


def endgame_assignment(ctx: RunContext, engine, rows: np.ndarray, holding: dict[int, tuple[int, float]],
                       time_limit_s: float = 20.0, work_limit: int = ENDGAME_WORK) -> np.ndarray:
    """The client of each of ``rows`` in the two-level end-game plan (module docstring).

    Parameters
    ----------
    ctx
        The run.
    engine
        The engine (its instance states and clients' progress are read; None: every held
        request is counted whole).
    rows
        The queued requests to plan (row indices).
    holding
        ``client -> (request, handed out at)`` of the requests the clients hold now.
    time_limit_s
        Wall-clock safety net of the LP and of each local search, seconds: far above what the
        budgets take, so that it never decides.
    work_limit
        Work budget of each local search, elements touched (count; :data:`ENDGAME_WORK`).

    Returns
    -------
    numpy.ndarray
        ``(len(rows),)`` global client of each request (int64).
    """
    from lloptim.formulations.binpacking import BinPackingData
    from lloptim.solvers.greedy import local_search, lpt

    problem = ctx.problem
    rows = np.asarray(rows, dtype=np.int64)
    est = np.asarray(ctx.estimates, dtype=np.float64)[rows]
    state = ctx.extra.get("client_state")
    alive = np.array([state is None or state[c] != FAILED for c in range(problem.n_clients)])
    ci = np.asarray(ctx.client_instance, dtype=np.int64)
    release = steps_left(ctx, engine, holding)
    insts = problem.instances
    kinds = {(i.profile.latency, i.clients) for i in insts}
    m = len(insts)
    live_inst = np.array([alive[ci == k].any() for k in range(m)])
    if len(kinds) == 1 or live_inst.sum() <= 1:
        pools = [np.flatnonzero(alive)]
        members = [np.arange(rows.size)]
    else:
        clients = np.array([i.clients for i in insts], dtype=np.float64)
        step_share = np.array([i.profile.latency.decode_base_s for i in insts]) / clients
        v = instance_seconds(problem, rows, est) + step_share[None, :]
        # what each instance owes its running requests: their tokens left, at their instance-seconds
        owed = np.zeros(m)
        held = [(c, r) for c, (r, _) in holding.items() if alive[c]]
        if held:
            hr = np.array([r for _, r in held], dtype=np.int64)
            hv = instance_seconds(problem, hr, np.asarray(ctx.estimates, dtype=np.float64)[hr]) + step_share[None, :]
            for (c, r), vr in zip(held, hv):
                k = int(ci[c])
                owed[k] += vr[k] * min(1.0, release[c] / (float(ctx.estimates[r]) + 1.0))
        v[:, ~live_inst] = np.inf
        # a request can go only where it can finish by the LP's makespan on its own: its steps at
        # the instance's full-batch step after the instance's first client frees up. The fluid
        # LP does not see that a long request is a chain of steps (it would load a slow instance
        # with long requests as readily as with short ones); solve, drop the pairs that cannot
        # finish by T, solve again
        step = np.array([full_step_s(engine, k, problem) for k in range(m)])
        free = np.array([release[alive & (ci == k)].min() if live_inst[k] else np.inf for k in range(m)]) * step
        alone = free[None, :] + (est[:, None] + 1.0) * step[None, :]
        where, T = _instance_split(np.where(np.isfinite(v), v, BIG), owed, time_limit_s)
        late = alone > T
        late[np.arange(rows.size), alone.argmin(axis=1)] = False
        if np.isfinite(T) and (late & np.isfinite(v)).any():
            where, _ = _instance_split(np.where(np.isfinite(v) & ~late, v, BIG), owed, time_limit_s)
        pools = [np.flatnonzero(alive & (ci == k)) for k in range(m)]
        members = [np.flatnonzero(where == k) for k in range(m)]
    out = np.full(rows.size, -1, dtype=np.int64)
    for pool, mine in zip(pools, members):
        if mine.size == 0 or pool.size == 0:
            continue
        steps = est[mine] + 1.0
        data = BinPackingData(steps[:, None].copy(), np.zeros(pool.size, dtype=np.int64), True)
        rel = release[pool]
        a = lpt(data, release=rel)
        a = local_search(data, a, time_limit_s=time_limit_s, release=rel, work_limit=work_limit)
        out[mine] = pool[a]
    lost = np.flatnonzero(out < 0)
    if lost.size:  # planned onto an instance with no live client: spread over the live ones
        live = np.flatnonzero(alive)
        out[lost] = live[np.arange(lost.size) % live.size]
    return out


class EndgameQueues(AssignedQueues):
    """Per-client queues of the end-game plan, with guarded stealing (module docstring).

    Parameters
    ----------
    assignment
        Global client of each request (only the queued ones are read).
    holding
        ``client -> (request, handed out at)`` of the requests the clients hold now; kept up to
        date by :meth:`started` and :meth:`finished`.
    """

    def __init__(self, assignment, holding: dict[int, tuple[int, float]]) -> None:
        super().__init__(assignment, steal=True)
        self.holding = holding

    def next_request(self, state, client: int) -> int | None:
        r = self._pop_own(state, client)
        if r is not None:
            return r
        return self._guarded_steal(state, client)

    def _guarded_steal(self, state, client: int) -> int | None:
        engine = state.engine
        ctx = self.ctx
        if engine is None or not self.n_pending:
            return None
        ci = ctx.client_instance
        step = np.array([s.latency.decode_time(len(s.clients), s.kv_tokens) for s in engine.states])
        left = steps_left(ctx, engine, self.holding)
        queued = np.array([sum(self.size[q[1]] + 1.0 for q in queue) for queue in self.queues])
        ends = state.now + (left + queued) * step[ci]
        ends[queued == 0] = -np.inf
        victim = int(np.argmax(ends))
        q = self.queues[victim]
        if not q or victim == client:
            return None
        mine = step[int(ci[client])]
        # the smallest request is the likeliest to pass; take the largest that does (fewest steals)
        for j in range(len(q)):
            r = q[j][1]
            if state.now + (self.size[r] + 1.0) * mine < ends[victim]:
                q.pop(j)
                self.queued_work[victim] -= self.size[r]
                self.n_pending -= 1
                self.steals += 1
                return r
        return None
