"""Lower bounds on the makespan (total inference time) of a problem.

The bound ``T^LB`` of the paper, made exact for lloptim's latency model. Every iteration of an
instance runs after the previous one, so the makespan of an instance is at least the sum of its
iteration times. Split those times into

* per-token terms that every schedule pays in full: ``prefill_per_token_s * sum(p)``,
  ``decode_per_seq_s * sum(o)`` and ``decode_per_kv_token_s * sum(o*p + o*(o-1)/2)`` (request ``r``
  holds ``p + k`` KV tokens at its ``k``-th decode step);
* fixed costs per iteration: ``decode_base_s`` times the number of decode steps, which is at
  least the optimum of ``P||Cmax`` with job sizes ``o`` on ``C`` machines (a client advances one
  token per step, and runs its requests one after another) and so at least
  ``max(ceil(sum(o)/C), max(o), o_(C) + o_(C+1))``; and ``prefill_base_s`` times the number of
  prefill iterations, at least ``ceil(R/C)``.

Fused (chunked-prefill) iterations share the fixed cost of a decode, so for schedules that use
them only one prefill base (the first iteration, when nothing runs yet) is certain:
:attr:`LowerBound.fused_s` is the bound that holds for those too.

For several identical instances the per-request terms are divided by the number of instances. For
instances that differ (profiles or client counts), instance ``k`` serving a set ``S_k`` runs for at
least ``sum_{r in S_k} v[k, r]`` with ``v[k, r]`` = request ``r``'s per-token terms on ``k`` plus
its share ``o_r / C_k`` of the decode steps and ``1 / C_k`` of the prefill iterations at ``k``'s
fixed costs; the makespan is then at least the optimum of the *fractional* assignment
``min T s.t. sum_r v[k, r] y[k, r] <= T, sum_k y[k, r] = 1, y >= 0``. Its Lagrangian dual,
``max_lambda sum_r min_k lambda_k v[k, r]`` over ``lambda >= 0, sum_k lambda_k = 1`` (identical
instances pooled), gives a valid bound for *any* ``lambda``; it is maximized exactly by cutting
planes whose master LPs HiGHS solves, and the best ``lambda`` evaluated, so the bound is the LP
optimum and never overstates it.
A request can never finish before ``arrival + its own minimal time``.

**Precedence** (:mod:`lloptim.precedence`). A request with predecessors starts only after they
finish, so the makespan is at least the *critical path*: the longest chain of
``arrival + minimal processing times`` through the DAG (:func:`critical_path_bound`). A request's
minimal time (:func:`minimal_request_time_s`) is what it costs alone on the fastest instance: one
iteration that holds its prompt (``prefill_base_s``, or for fused schedules the cheaper of
``prefill_base_s`` and ``decode_base_s``, since a chunk can ride on a decode), then ``o`` decode
steps of at least ``decode_base_s + decode_per_seq_s + decode_per_kv_token_s * (p + k)`` each; the
coefficients are minimized one by one over the instances, which stays valid when a request migrates
mid-decode. On a single instance the chain also counts iterations: its decode steps and prefills run
one after another, so the decode steps are at least the chain's output tokens and the prefill
iterations at least its length (for fused schedules, iterations along the chain are at least its
tokens plus its length). Finally the *window* bound combines the work bound with heads and tails:
requests that cannot start before ``a`` (their arrival or their predecessors) and must be followed
by ``b`` seconds of successors run inside ``[a, T - b]``, so ``T >= a + b + bound(those requests)``
(the bound of the requests alone, all arriving at 0); it is taken over a few thresholds ``a``, ``b``.
On a fleet a long chain also cannot be batched for free: every request decoding beside one of its
steps slows that step (``_chain_coupling_bound``). With ``migration=False`` (schedules in which
a request is prefilled and decoded on one instance: every lloptim policy without
:func:`~lloptim.runtime.migration.with_migration`) a co-runner's prompt is also prefilled on the
chain's instance, on the chain's clock, except for a few carry-ins; and on a fleet whose
instances differ an LP over instance kinds charges each kind its own costs
(``_chain_coupling_lp``). The default (``migration=True``) holds for every schedule.
The *backlog* bound (:func:`backlog_bound`) also counts the work of the requests that could start
before ``a`` but cannot have been done by then: the decode steps that start before ``a`` are a
flow through slots of one minimal iteration each, at most ``C`` per slot and one per request, from
each request's earliest decode start on; its max-flow bounds them, and everything else runs in
``[a, T]`` (with the chain coupling below applied there).

**Release dates on a fleet** (:func:`fleet_release_bound`, ``migration=False``). The window and
backlog bounds pool the instances, so a long request released late may, there, spread its decode
steps over the whole fleet, and a slow instance's capacity counts as if it could finish anything in
time. Without migration a request runs on one instance, where it cannot finish before its release
plus its minimal time *there*, and every instance must fit the work still left on it after each
threshold ``t`` (its requests' remaining tokens, at least ``remaining`` decode iterations for a
request there, the clients and the KV capacity bounding the iterations) into ``[t, T]``. The LP
relaxation of that assignment, with the requests that cannot finish in time on an instance kept
off it, is solved by HiGHS for a few guesses of ``T`` (``f(T0)``: the least ``T`` with the
requests made eligible at ``T0``; ``min(T0, f(T0))`` is valid for every guess).

**KV memory.** A decode step holds at most the instance's KV capacity ``M`` (its blocks times the
block size), and request ``r`` holds ``blocks(max(p + k, floor))`` blocks during its ``k``-th
decode step (:func:`lloptim.memory.decode_area_tokens`; ``floor`` = 0 in paged mode, the
reservation in reserve mode). Summed over requests this *KV area* ``A`` is the same in every
schedule, preemptions included (a recomputed request resumes with the same context; a swapped
one, ``preemption="swap"``, resumes with the same cache copied back, and its swap time only
lengthens iterations), so an instance runs at least ``A / M`` decode steps. On one instance whose requests all start from
scratch, the first steps cannot fill the cache: at its ``t``-th decode step a request has taken at
most ``t`` steps, so the cache holds at most ``U(t)``, the ``C`` largest holdings at progress
``t``; the steps before ``U(t)`` reaches ``M`` process at most ``sum_t U(t)`` of the area, and

    decode steps >= t* + (A - sum_{t <= t*} U(t)) / M,    t* = first t with U(t) >= M.

The decode steps of the bound are the larger of this and the clients bound above
(:attr:`LowerBound.decode_steps_memory`, :attr:`LowerBound.decode_steps_clients`); both the
separate-iteration and the fused bounds use them. For several instances, request ``r`` takes
``a_d area_r / M_k`` seconds of instance ``k``'s decode fixed cost by memory (or ``a_d o_r / C_k``
by clients): both weights give valid fractional assignment bounds, and the larger is kept.

**The ramp-up on a fleet** (``migration=False``, the whole problem, instances that all differ, at most
:data:`FLEET_RAMP_MAX_INSTANCES`). Without migration a request decodes on one instance only, so
at instance ``k``'s ``t``-th decode step it has taken at most ``t`` steps there and ``k`` holds at
most ``U_k(t) = min(M_k, the C_k largest blocks(s_r + t))``, the ``s_r`` the start holdings of
*all* requests (a superset of the ones ``k`` serves, so whatever the assignment). Its KV area is
then at most ``F_k(D_k) = sum_{t <= D_k} U_k(t)``, a convex function of its decode steps ``D_k``
(``U_k`` grows with ``t``), which an LP cannot take as it is; two linear cases cover it. Either
``D_k >= t*_k`` (the step at which ``U_k`` reaches ``M_k``): then ``F_k(D_k) = M_k (D_k - R_k)``
with the ramp deficit ``R_k = t*_k - F_k(t*_k) / M_k``, so ``D_k >= A_k / M_k + R_k``: instance
``k`` pays ``a_d R_k`` seconds more, an *offset* of its row in the fractional assignment
(:func:`fractional_assignment_bound`, ``offset``). Or ``D_k < t*_k``: then ``F_k`` lies below its
chord, ``F_k(D_k) <= D_k F_k(t*_k) / t*_k``, so ``D_k >= A_k t*_k / F_k(t*_k)``: a request's
memory share at the mean fill of the ramp instead of ``M_k``. Every schedule falls in one case per
instance; the LP of each of the ``2^m`` combinations is a valid bound for the schedules in it
(the case's own condition on ``D_k`` dropped, a relaxation), so their *minimum* bounds every
schedule without migration, and the larger of it and the memory LP without ramps is kept. A
small cache filled by its clients' prompts has no ramp (``t* = 0``, a single case); a large one
beside it takes hundreds of steps to fill from ``C`` tokens per step: on the fleets of
``benchmarks/memory.py`` the bound rises 0.5-1.6 %. With migration (the default of
:func:`lower_bound`) a request may arrive at an instance holding more than ``t`` steps of
context, and the ramp is not counted.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from lloptim.memory import check_block_tokens, check_kv_mode, decode_area_tokens, reservation_tokens
from lloptim.problem import Problem, as_problem

__all__ = ["LowerBound", "lower_bound", "decode_steps_lower_bound", "fractional_assignment_bound",
           "FLEET_LP_TOLERANCE", "minimal_request_time_s", "critical_path_bound", "memory_decode_steps_lower_bound",
           "backlog_bound", "FLEET_RAMP_MAX_INSTANCES", "fleet_release_bound", "FLEET_RELEASE_THRESHOLDS",
           "FLEET_RELEASE_LONGEST", "FLEET_RELEASE_MAX_COLUMNS", "release_terms"]

#: Most instances for which the fleet bound counts each instance's KV ramp-up (module docstring):
#: it solves one fractional assignment per combination of cases, ``2^m`` of them.
FLEET_RAMP_MAX_INSTANCES = 4

#: Thresholds of heads (and of tails) the window bound tries (count); each costs one work bound.
WINDOW_THRESHOLDS = 12

#: The fast paths of the window bound (one HiGHS master across the cutting-plane rounds of
#: :func:`fractional_assignment_bound`; windows that cannot beat the best one skip their fleet LP).
#: False runs the path before them (a fresh ``linprog`` per round, every window solved): kept for
#: the tests and ``benchmarks/bound_speed.py --reference``, which check that both give the same bound.
_WINDOW_FAST = True


@dataclass(frozen=True)
class LowerBound:
    """A makespan lower bound and its parts, seconds.

    Attributes
    ----------
    total_s
        The bound for schedules of separate prefill and decode iterations (the paper's model).
    fused_s
        The bound that also holds for fused (chunked-prefill) iterations; ``<= total_s``.
    token_s
        Per-token terms (paid by every schedule).
    decode_base_s
        Fixed decode cost of the minimal number of decode steps.
    prefill_base_s
        Fixed prefill cost of the minimal number of prefill iterations.
    single_request_s
        Longest ``arrival + minimal time`` of any single request.
    decode_steps
        The lower bound on decode steps used (per instance): the larger of
        ``decode_steps_clients`` and ``decode_steps_memory``.
    prefill_iterations
        The lower bound on prefill iterations used (per instance).
    decode_steps_clients
        Decode steps the clients force (per instance): at most ``C`` requests advance per step
        (and, with precedence, a chain's tokens one after another).
    decode_steps_memory
        Decode steps the KV memory forces (per instance): the KV area over the capacity, with the
        ramp-up of a single instance (see the module docstring).
    kv_area_token_steps
        KV memory the requests hold summed over their decode steps, token-steps (in whole blocks;
        in reserve mode at least the reservation).
    kv_mode
        The KV mode bounded (``"paged"``, ``"reserve"``, or ``"mixed"`` for instances that differ).
    critical_path_s
        Longest chain of ``arrival + minimal processing times`` through the precedence DAG
        (:func:`critical_path_bound`; without precedence, the longest single request), for
        separate-iteration schedules.
    critical_path_fused_s
        The same for fused schedules (a prompt may ride on a decode iteration); ``<= critical_path_s``.
    window_s
        The best window bound ``a + b + bound(requests inside [a, T - b])`` (module docstring), for
        separate-iteration schedules; 0 when every request is ready at 0 and there is no precedence.
    window_fused_s
        The same for fused schedules.
    backlog_s
        The best backlog bound ``a + (work that cannot be done before a) / capacity``
        (:func:`backlog_bound`), for separate-iteration schedules; 0 when every request is ready at
        0 and there is no precedence.
    backlog_fused_s
        The same for fused schedules.
    fleet_release_s
        The release-date fleet bound (:func:`fleet_release_bound`): each request on one instance,
        released over time; it holds for fused and separate-iteration schedules without migration.
        0 when not computed (one instance, every request released at 0, ``migration=True``, too
        large) or when it cannot lift the other terms.
    """

    total_s: float
    fused_s: float
    token_s: float
    decode_base_s: float
    prefill_base_s: float
    single_request_s: float
    decode_steps: int
    prefill_iterations: int
    critical_path_s: float = 0.0
    critical_path_fused_s: float = 0.0
    window_s: float = 0.0
    window_fused_s: float = 0.0
    backlog_s: float = 0.0
    backlog_fused_s: float = 0.0
    fleet_release_s: float = 0.0
    decode_steps_clients: int = 0
    decode_steps_memory: int = 0
    kv_area_token_steps: float = 0.0
    kv_mode: str = "paged"

    @property
    def memory_binds(self) -> bool:
        """Whether the KV memory, rather than the clients, sets the decode steps of the bound."""
        return self.decode_steps_memory > self.decode_steps_clients

    def to_dict(self) -> dict:
        """Plain dictionary (JSON-ready)."""
        return asdict(self)


def decode_steps_lower_bound(output_tokens: np.ndarray, clients: int) -> int:
    """Lower bound on the decode steps of one instance with ``clients`` clients, steps.

    The optimum of ``P||Cmax`` (sizes ``output_tokens`` on ``clients`` machines) is at least the
    average load, the largest job, and the sum of the ``C``-th and ``(C+1)``-th largest jobs (two of
    the ``C+1`` largest share a machine).

    Parameters
    ----------
    output_tokens
        Output length of each request, tokens (one decode step per token).
    clients
        Clients of the instance (count, >= 1).

    Returns
    -------
    int
        The bound, decode steps.
    """
    o = np.asarray(output_tokens, dtype=np.int64)
    bound = max(int(-(-int(o.sum()) // clients)), int(o.max()))
    if o.size > clients:
        top = np.partition(o, o.size - clients - 1)[o.size - clients - 1:]
        top.sort()
        bound = max(bound, int(top[0] + top[1]))
    return bound


#: Relative gap between the cutting planes' master value and the best dual value at which
#: :func:`fractional_assignment_bound` stops: Kelley's cuts reach the optimum in a few dozen rounds
#: but prove it slowly (hundreds of rounds of a few milliseconds at 1e-12).
FLEET_LP_TOLERANCE = 1e-9


def fractional_assignment_bound(work: np.ndarray, count: np.ndarray, iterations: int | None = None,
                                return_prices: bool = False, time_limit_s: float | None = None,
                                offset: np.ndarray | None = None):
    """``min T s.t. sum_r work[j, r] y[j, r] <= count[j] (T - offset[j]), sum_j y[j, r] = 1, y >= 0``, s, exactly.

    The fractional assignment of requests to ``count[j]`` identical machines of kind ``j`` is an LP
    with ``J * R`` columns (400k at 100k requests and 4 kinds, where HiGHS takes minutes). Its
    dual has ``J`` variables: maximize ``g(mu) = sum_r min_j (mu_j / count[j]) work[j, r]`` over the
    simplex, a concave piecewise-linear function. For two kinds its maximum is at one of the ``R``
    breaks, all evaluated at once after a sort (``O(R log R)``). For more it is solved exactly by
    Kelley's cutting planes:
    each round evaluates ``g`` and its supergradient at the master's ``mu`` (``O(J R)``) and adds
    that cut to the master LP (``J + 1`` variables, solved by HiGHS through
    ``scipy.optimize.linprog``), until the master's value and the best ``g`` agree to
    :data:`FLEET_LP_TOLERANCE` (relative). The value returned is ``g`` at the best ``mu``: by
    weak duality a valid bound for any ``mu`` on the simplex, so it never overstates the optimum
    whatever the tolerances, and it equals the LP optimum when the rounds converge (they do in a
    few dozen).

    Parameters
    ----------
    work
        ``(J, R)`` seconds of machine time of request ``r`` on a machine of kind ``j``.
    count
        ``(J,)`` machines of each kind (count).
    iterations
        Most cutting-plane rounds (default 500); the bound is valid whenever it stops.
    time_limit_s
        Wall-clock limit of the cutting-plane rounds, seconds (None: none); at the limit the best
        ``g`` so far is returned, still a valid bound. Kinds with the same work row are pooled
        first (their capacities add), which keeps the master small and its rounds few.
    return_prices
        Also return ``mu``, the prices of each kind's capacity (dimensionless, summing to 1: makespan
        seconds per second of that kind's total machine time lost).
    offset
        ``(J,)`` seconds every machine of kind ``j`` is busy besides its requests' work (default
        0): the dual gains ``sum_j mu_j offset[j]``. With offsets, kinds with the same work row
        are not pooled.

    Returns
    -------
    float or tuple
        The bound, seconds; with ``return_prices``, ``(bound, mu)``.
    """
    from scipy.optimize import linprog

    work = np.asarray(work, dtype=np.float64)
    count = np.asarray(count, dtype=np.float64)
    off = np.zeros(work.shape[0]) if offset is None else np.asarray(offset, dtype=np.float64)
    if work.shape[0] > 1 and offset is None:
        # identical rows are one kind with the capacities added: the optimum is the same, and
        # the cutting planes, degenerate on symmetric kinds, converge in far fewer rounds
        uniq, inverse = _unique_rows(work)
        if uniq.shape[0] < work.shape[0]:
            pooled = np.bincount(inverse, weights=count, minlength=uniq.shape[0])
            out = fractional_assignment_bound(uniq, pooled, iterations, True, time_limit_s)
            # each row's share of its kind's price, in proportion to its capacity
            mu = out[1][inverse] * count / pooled[inverse]
            return (out[0], mu) if return_prices else out[0]
    deadline = None if time_limit_s is None else time.perf_counter() + float(time_limit_s)
    J, R = work.shape
    scaled = work / count[:, None]

    def g(mu: np.ndarray) -> tuple[float, np.ndarray]:
        """``g(mu)`` and its supergradient (each kind's share of the scaled work it wins)."""
        if not R:
            return float(mu @ off), off.copy()
        priced = mu[:, None] * scaled
        win = priced.argmin(axis=0)
        return float(priced[win, np.arange(R)].sum() + mu @ off), np.bincount(
            win, weights=scaled[win, np.arange(R)], minlength=J) + off

    if J == 1 or not R:
        mu = np.ones(J) / max(J, 1)
        if not R and J > 1:
            mu = np.eye(J)[int(np.argmax(off))]  # nothing to assign: the largest offset
        val = g(mu)[0]
        return (val, mu) if return_prices else val
    if J == 2:
        # one dimension: g(m, 1 - m) is concave and piecewise linear with its breaks where the two
        # kinds price a request alike, m_r = s2_r / (s1_r + s2_r); the maximum is at one of them,
        # and g at every break is two cumulative sums over the sorted breaks
        s1, s2 = scaled
        both = s1 + s2
        br = np.divide(s2, both, out=np.zeros(R), where=both > 0)
        order = np.argsort(br, kind="stable")
        b, a1, a2 = br[order], s1[order], s2[order]
        suffix1 = np.cumsum(a1[::-1])[::-1]                  # sum of s1 over breaks >= b_i
        prefix2 = np.r_[0.0, np.cumsum(a2)[:-1]]             # sum of s2 over breaks < b_i
        vals = b * suffix1 + (1.0 - b) * prefix2 + b * off[0] + (1.0 - b) * off[1]
        i = int(np.argmax(vals))
        mu = np.array([b[i], 1.0 - b[i]])
        if offset is not None and max(off) > vals[i]:
            # with offsets the maximum may sit at an end of the simplex (one kind priced alone)
            mu = np.array([1.0, 0.0]) if off[0] >= off[1] else np.array([0.0, 1.0])
        val = g(mu)[0]
        return (val, mu) if return_prices else val
    # the pure kinds and the centre seed the master with J + 1 cuts
    seeds = list(np.eye(J)) + [np.full(J, 1.0 / J)]
    cuts, best, best_mu = [], -np.inf, seeds[-1]
    for mu in seeds:
        val, grad = g(mu)
        cuts.append(grad)
        if val > best:
            best, best_mu = val, mu
    master = _CutMaster(J, cuts) if _WINDOW_FAST else None
    cost = np.r_[np.zeros(J), -1.0]                       # maximize z over (mu, z)
    a_eq, b_eq = np.r_[np.ones(J), 0.0][None, :], np.ones(1)
    bounds = [(0, None)] * J + [(None, None)]
    for _ in range(500 if iterations is None else int(iterations)):
        if master is not None:
            solved = master.solve()
            if solved is None:
                break
            mu, upper = solved
        else:
            a_ub = np.column_stack([-np.asarray(cuts), np.ones(len(cuts))])  # z - cut . mu <= 0
            res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(len(cuts)), A_eq=a_eq, b_eq=b_eq, bounds=bounds,
                          method="highs")
            if res.status != 0:
                break
            mu, upper = res.x[:J], -float(res.fun)
        mu = np.clip(mu, 0.0, None)
        mu /= mu.sum()
        val, grad = g(mu)
        if val > best:
            best, best_mu = val, mu
        if upper - best <= FLEET_LP_TOLERANCE * max(1.0, abs(upper)):
            break
        if deadline is not None and time.perf_counter() > deadline:
            break
        cuts.append(grad)
        if master is not None:
            master.add(grad)
    return (best, best_mu) if return_prices else best


def _unique_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(a, axis=0, return_inverse=True)`` for a few long rows: the same rows, order and inverse.

    ``np.unique`` with ``axis`` sorts the rows as structured records of ``R`` fields, which took
    most of :func:`fractional_assignment_bound`'s time at 50k requests; a handful of rows are
    sorted here by their values (lexicographically, as ``np.unique``) and compared whole.
    """
    order = sorted(range(a.shape[0]), key=lambda i: a[i].tolist())
    inverse = np.empty(a.shape[0], dtype=np.int64)
    kept: list[int] = []
    for i in order:
        if not kept or not np.array_equal(a[kept[-1]], a[i]):
            kept.append(i)
        inverse[i] = len(kept) - 1
    return a[kept], inverse


class _CutMaster:
    """The cutting planes' master LP ``max z s.t. z <= cut . mu, sum(mu) = 1, mu >= 0``, kept in one HiGHS model.

    Each round adds one row and re-solves from the last basis (dual simplex, a fraction of a
    millisecond), where a fresh ``scipy.optimize.linprog`` call per round costs milliseconds of
    set-up: the rounds of :func:`fractional_assignment_bound` were most of ``lower_bound``'s time on
    mixed fleets with precedence or arrivals (one per window of ``_window_bound``).
    """

    def __init__(self, kinds: int, cuts: list[np.ndarray]):
        import highspy

        self._inf = highspy.kHighsInf
        self._optimal = highspy.HighsModelStatus.kOptimal
        self._kinds = kinds
        self._index = np.arange(kinds + 1, dtype=np.int32)
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        for _ in range(kinds):
            h.addVar(0.0, self._inf)
        h.addVar(-self._inf, self._inf)
        h.changeColCost(kinds, -1.0)                      # maximize z
        h.addRow(1.0, 1.0, kinds, self._index[:kinds], np.ones(kinds))
        self._highs = h
        for cut in cuts:
            self.add(cut)

    def add(self, cut: np.ndarray) -> None:
        """Add the cut ``z <= cut . mu`` (a supergradient of ``g``, which is positively homogeneous)."""
        self._highs.addRow(-self._inf, 0.0, self._kinds + 1, self._index, np.r_[-np.asarray(cut, float), 1.0])

    def solve(self) -> tuple[np.ndarray, float] | None:
        """``(mu, z)`` at the master's optimum, or None when HiGHS does not reach one."""
        self._highs.run()
        if self._highs.getModelStatus() != self._optimal:
            return None
        x = np.asarray(self._highs.getSolution().col_value, dtype=np.float64)
        return x[:self._kinds], float(x[self._kinds])


def memory_decode_steps_lower_bound(area: np.ndarray, capacity_tokens: int, clients: int,
                                    start_holdings: np.ndarray | None = None, block_tokens: int = 1) -> int:
    """Lower bound on the decode steps of one instance from its KV memory, steps.

    Parameters
    ----------
    area
        KV area of each request, token-steps (:func:`lloptim.memory.decode_area_tokens`).
    capacity_tokens
        Tokens the cache holds in whole blocks (blocks x block tokens).
    clients
        Clients of the instance (count).
    start_holdings
        Tokens each request holds before its first decode step (prompt, or its reservation); with
        it, the ramp-up from an empty cache is counted (single instance, requests from scratch).
    block_tokens
        Tokens per block (holdings are rounded up to whole blocks).

    Returns
    -------
    int
        The bound, decode steps.
    """
    A = float(np.sum(area))
    M = float(capacity_tokens)
    if A <= 0:
        return 0
    plain = int(np.ceil(A / M - 1e-9))
    if start_holdings is None or start_holdings.size == 0:
        return plain
    cum = _ramp_fill(start_holdings, capacity_tokens, clients, block_tokens)
    t_star = cum.size
    if t_star == 0:
        return plain
    if cum[-1] >= A:
        return int(np.searchsorted(cum, A - 1e-9) + 1)
    return max(plain, int(np.ceil(t_star + (A - cum[-1]) / M - 1e-9)))


def _ramp_fill(start_holdings: np.ndarray, capacity_tokens: int, clients: int, block_tokens: int) -> np.ndarray:
    """``sum_{t' <= t} U(t')`` for ``t = 1 .. t*``: the most KV area the first decode steps can process, token-steps.

    ``U(t) = min(M, sum of the C largest B ceil((h + t) / B))`` is the most the cache holds at
    an instance's ``t``-th decode step when every request started from its start holding ``h``
    there (module docstring); ``t*`` the first step at which it reaches ``M`` (an empty array
    when the ``C`` largest start holdings fill the cache already).
    """
    h = np.asarray(start_holdings, dtype=np.int64)
    M = float(capacity_tokens)
    C = min(int(clients), h.size)
    if C <= 0:
        return np.zeros(0)
    top = np.sort(h)[-C:]  # the C largest holdings give the largest cache at every progress
    B = int(block_tokens)
    # U(t) = sum of the C largest blocks(h + t) * B: the most the cache can hold at step t
    t_star = int(max(1, np.ceil((M - top.sum()) / C))) if top.sum() < M else 0
    if t_star == 0:
        return np.zeros(0)
    t = np.arange(1, t_star + 1)
    held = (B * -(-(top[None, :] + t[:, None]) // B)).sum(axis=1).astype(np.float64)
    return np.cumsum(np.minimum(held, M))


def _fleet_ramp_bound(rows: np.ndarray, a_d: np.ndarray, area: np.ndarray, caps: list, starts: list,
                      clients: np.ndarray, sizes: list, floor: float = -np.inf) -> float:
    """The fleet's memory-share fractional assignment with each instance's ramp-up, seconds (module docstring).

    ``rows``: ``(m, R)`` seconds of each request on each instance *without* its memory share;
    ``a_d``: ``(m,)`` decode base seconds; ``area``: ``(m, R)`` KV areas, token-steps. The
    minimum over the ``2^m`` cases (each instance past its ramp, or within it) of the fractional
    assignment bound of the case; 0 when no instance has a ramp (the caller's LP is the same) or
    when some case cannot beat ``floor`` (the bound so far: the minimum would not lift it), which
    a case's cheap upper estimate (:func:`_assignment_upper` plus its largest offset) often
    tells without an LP.
    """
    m = rows.shape[0]
    ramps = [_ramp_fill(starts[k], caps[k], int(clients[k]), sizes[k]) for k in range(m)]
    if not any(r.size for r in ramps):
        return 0.0
    best = np.inf
    for case in range(1 << m):
        work = np.empty_like(rows)
        offset = np.zeros(m)
        for k in range(m):
            cum = ramps[k]
            if not cum.size or case >> k & 1:
                # past the ramp (or none): D >= A / M + R, R = t* - F(t*) / M
                work[k] = rows[k] + a_d[k] * area[k] / caps[k]
                if cum.size:
                    offset[k] = a_d[k] * (cum.size - cum[-1] / caps[k])
            else:
                # within it: D >= A t* / F(t*), the mean fill of the ramp for M
                work[k] = rows[k] + a_d[k] * area[k] * cum.size / cum[-1]
        if _assignment_upper(work, np.ones(m)) + offset.max() <= floor:
            return 0.0
        best = min(best, fractional_assignment_bound(work, np.ones(m), offset=offset))
        if best <= floor:
            return 0.0
    return float(best)


def _kv_area(problem: Problem, o: np.ndarray, kv_mode, kv_block_tokens, estimates) -> tuple[list, list, list, list, str]:
    """Per instance: the KV area of each request, the capacity in whole blocks, the start holdings, the block."""
    w = problem.workload
    p = w.prompt_tokens
    oi = np.asarray(o, dtype=np.int64)
    modes = kv_mode if isinstance(kv_mode, (list, tuple)) else [kv_mode] * len(problem.instances)
    blocks_ = kv_block_tokens if isinstance(kv_block_tokens, (list, tuple)) else \
        [kv_block_tokens] * len(problem.instances)
    room = min(inst.kv_blocks * inst.kv_block_tokens for inst in problem.instances)
    areas, caps, starts, sizes, used = [], [], [], [], set()
    for inst, mode, blk in zip(problem.instances, modes, blocks_):
        mode = inst.kv_mode if mode is None else check_kv_mode(mode)
        B = inst.kv_block_tokens if blk is None else check_block_tokens(blk, inst.kv_capacity_tokens)
        used.add(mode)
        if mode == "reserve":
            # the engine reserves the cap, else the run's estimate, clipped to the smallest cache;
            # without estimates only the caps are certain
            est = np.zeros(len(w)) if estimates is None else np.asarray(estimates, dtype=np.float64)
            floor = np.where(w.max_output_tokens > 0, reservation_tokens(p, w.max_output_tokens, np.ones(len(w))),
                             p + (np.ceil(est).astype(np.int64) if estimates is not None else 0))
            floor = np.minimum(floor, room)
        else:
            floor = None
        areas.append(decode_area_tokens(p, oi, B, floor))
        caps.append((inst.kv_capacity_tokens // B) * B)
        starts.append(p if floor is None else np.maximum(p, floor))
        sizes.append(B)
    return areas, caps, starts, sizes, used.pop() if len(used) == 1 else "mixed"


def minimal_request_time_s(problem: Problem, output_tokens: np.ndarray | None = None,
                           fused: bool = False) -> np.ndarray:
    """Least time any schedule takes from a request's first prefill iteration to its finish, seconds.

    The request alone on the fastest instance: its prefill iteration (``prefill_base_s`` plus the
    prompt's per-token cost; with ``fused``, a prompt chunk riding on a decode pays
    ``decode_base_s`` instead when that is cheaper), then ``o`` decode steps of at least
    ``decode_base_s + decode_per_seq_s + decode_per_kv_token_s * (p + k)`` for ``k = 0 .. o-1``.
    The decode coefficients are minimized one by one over the instances (valid even when the
    request migrates between instances mid-decode).

    Parameters
    ----------
    problem
        The problem.
    output_tokens
        Output lengths, tokens; default: the workload's true lengths.
    fused
        Whether the schedule may fuse prompt chunks into decode iterations.

    Returns
    -------
    numpy.ndarray
        Seconds per request (float64).
    """
    w = problem.workload
    p = w.prompt_tokens.astype(np.float64)
    o = (w.output_tokens if output_tokens is None else np.asarray(output_tokens)).astype(np.float64)
    lats = [inst.profile.latency for inst in problem.instances]
    prefill = np.min([(min(l.prefill_base_s, l.decode_base_s) if fused else l.prefill_base_s)
                      + l.prefill_per_token_s * p for l in lats], axis=0)
    step = min(l.decode_base_s + l.decode_per_seq_s for l in lats)
    per_kv = min(l.decode_per_kv_token_s for l in lats)
    return prefill + step * o + per_kv * (o * p + o * (o - 1) / 2)


def critical_path_bound(problem: Problem, output_tokens: np.ndarray | None = None,
                        fused: bool = False) -> tuple[float, list[int]]:
    """The critical-path lower bound on the makespan and the chain of requests that attains it.

    The longest path through the precedence DAG, each request weighing its
    :func:`minimal_request_time_s` and starting no earlier than its arrival:
    ``finish_r >= max(arrival_r, max_{q -> r} finish_q) + t_r``.

    Parameters
    ----------
    problem
        The problem (without precedence, the chain is the single request that finishes last).
    output_tokens
        Output lengths, tokens; default: the workload's true lengths.
    fused
        Bound fused schedules too (see :func:`minimal_request_time_s`).

    Returns
    -------
    bound, rows
        The bound, seconds, and the request rows of the critical chain, first to last.
    """
    w = problem.workload
    t = minimal_request_time_s(problem, output_tokens, fused)
    if w.precedence is None:
        finish = w.arrival_s + t
        last = int(np.argmax(finish))
        return float(finish[last]), [last]
    return w.precedence.critical_path(t, w.arrival_s)


def _critical_path_s(problem: Problem, output_tokens: np.ndarray, fused: bool) -> float:
    """Length of :func:`critical_path_bound` without tracing the chain, seconds."""
    w = problem.workload
    t = minimal_request_time_s(problem, output_tokens, fused)
    if w.precedence is None:
        return float(np.max(w.arrival_s + t))
    return w.precedence.longest_path(t, w.arrival_s)


def lower_bound(problem: Problem, output_tokens: np.ndarray | None = None,
                decode_steps: int | None = None, kv_mode=None, kv_block_tokens=None,
                estimates: np.ndarray | None = None, migration: bool = True) -> LowerBound:
    """Makespan lower bound of ``problem``, seconds, with the clients and the KV memory.

    The work bound (clients and KV memory), the critical path of the precedence DAG (arrivals
    included) and the window bound that combines them (module docstring); ``total_s`` and
    ``fused_s`` are the largest.

    Parameters
    ----------
    problem
        The problem.
    output_tokens
        Output lengths to bound with, tokens; default: the workload's true lengths.
    decode_steps
        A proven lower bound on the decode steps of a single instance (e.g. a MIP solver's dual
        bound for the ``P||Cmax`` relaxation); the larger of it and the closed form is used.
    kv_mode
        KV mode to bound for (a run option that overrides the instances', or a list with one per
        instance); None: each instance's own.
    kv_block_tokens
        Tokens per KV block, likewise.
    estimates
        The run's output-length estimates, tokens: in reserve mode an uncapped request reserves
        ``prompt + estimate``, which the bound then counts; None counts only the caps.
    migration
        Whether the schedules bounded may move running requests between instances
        (:func:`~lloptim.runtime.migration.with_migration`). False bounds only schedules in which a
        request is prefilled and decoded on one instance (every other lloptim policy; a run without
        migrations): on a fleet the chain-coupling term then also charges each request that decodes
        beside a chain its prompt's prefill (``_chain_coupling_bound``), and requests released over
        time get the release-date fleet term (:func:`fleet_release_bound`). The default holds for
        every schedule.

    Raises
    ------
    SpecError
        ``problem`` is not a :class:`~lloptim.problem.Problem`.
    """
    problem = as_problem(problem)
    kv = (kv_mode, kv_block_tokens, estimates)
    w = problem.workload
    if w.precedence is None and not np.any(w.arrival_s > 0):
        return _work_bound(problem, output_tokens, decode_steps, kv, migration, fleet_lp=True)
    window, window_fused = _window_bound(problem, output_tokens, kv, migration)
    backlog, backlog_fused = backlog_bound(problem, output_tokens)
    # the work bound's LPs need not be solved where they cannot beat the window and backlog bounds
    # (the fast paths; total_s and fused_s below are the larger of all, whichever is skipped)
    floor = (max(window, backlog), max(window_fused, backlog_fused)) if _CHAIN_LP_FAST else (-np.inf, -np.inf)
    bound = _work_bound(problem, output_tokens, decode_steps, kv, migration, fleet_lp=True, floor=floor)
    total = max(bound.total_s, window, backlog)
    fused = max(bound.fused_s, window_fused, backlog_fused)
    # each request on one instance, released over time: the fleet's LP (valid for both kinds)
    release = 0.0 if migration else fleet_release_bound(problem, output_tokens, floor=fused)
    return replace(bound, total_s=float(max(total, release)), fused_s=float(max(fused, release)),
                   window_s=float(window), window_fused_s=float(window_fused),
                   backlog_s=float(backlog), backlog_fused_s=float(backlog_fused), fleet_release_s=float(release))


def _window_bound(problem: Problem, output_tokens: np.ndarray | None, kv: tuple = (None, None, None),
                  migration: bool = True) -> tuple[float, float]:
    """``max a + b + bound(S)`` over requests ``S`` with head ``>= a`` and tail ``>= b`` (separate, fused), s.

    Heads and tails are longest paths of minimal (fused) times, which bound both kinds of
    schedule. ``bound(S)`` is the work and critical-path bound of ``S`` alone, all arriving at 0:
    the iterations that serve ``S`` lie in ``[a, T - b]`` on every instance and, without the
    others, would form a schedule of ``S``.
    """
    w = problem.workload
    o = w.output_tokens if output_tokens is None else np.asarray(output_tokens)
    t = minimal_request_time_s(problem, o, fused=True)
    if w.precedence is None:
        head, tail = w.arrival_s.astype(np.float64), np.zeros(len(w))
    else:
        head, tail = w.precedence.earliest_start(t, w.arrival_s), w.precedence.tails(t)
    best, best_fused = 0.0, 0.0
    seen: set[bytes] = set()
    for a_min, b_min in _thresholds(head, tail):
        rows = np.flatnonzero((head >= a_min) & (tail >= b_min))
        if rows.size == 0:
            continue
        key = rows.tobytes()
        if key in seen:
            continue
        seen.add(key)
        a, b = float(head[rows].min()), float(tail[rows].min())
        # the requests alone, all arriving at 0, with the dependencies among them (already valid)
        alone = replace(w, prompt_tokens=w.prompt_tokens[rows], output_tokens=w.output_tokens[rows],
                        arrival_s=np.zeros(rows.size), max_output_tokens=w.max_output_tokens[rows],
                        ids=tuple(w.ids[i] for i in rows.tolist()),
                        precedence=None if w.precedence is None else w.precedence.subset(rows))
        sub_kv = (kv[0], kv[1], None if kv[2] is None else np.asarray(kv[2])[rows])
        # a window whose fleet LP cannot lift it above the best so far skips that LP (_WINDOW_FAST)
        floor = (best - a - b, best_fused - a - b)
        part = _work_bound(Problem(alone, problem.instances, problem.name), o[rows], None, sub_kv, migration,
                           floor=floor)
        best, best_fused = max(best, a + b + part.total_s), max(best_fused, a + b + part.fused_s)
    return best, best_fused


#: Most thresholds the backlog bound tries (count): half quantiles of the requests' earliest
#: decode starts, half evenly spaced over them; each costs O(R log R) (fewer beyond 62,500 requests).
BACKLOG_THRESHOLDS = 64


def backlog_bound(problem: Problem, output_tokens: np.ndarray | None = None) -> tuple[float, float]:
    """``max_a a + (work left at a) / capacity`` when requests become ready over time (separate, fused), s.

    The window bound counts only the requests that cannot start before ``a``; this one also counts
    what the requests that *could* start earlier cannot have finished by ``a``. Under overload the
    first seconds run small batches (few requests are ready yet), which the window bound, charging
    all the remaining work at full batches from ``a`` on, cannot see.

    *Proof sketch.* Let ``L = min_k (decode_base_k + decode_per_seq_k)``: every iteration that
    advances a decode token lasts at least ``L``, so an instance starts at most one of them in any
    interval of length ``L``, and a request's consecutive decode steps start at least
    ``L_r = min_k (decode_base_k + decode_per_seq_k) + min_k decode_per_kv_token_k * p_r >= L``
    apart. Request ``r``'s first decode step starts no earlier than ``e_r = head_r + prefill_r``
    (its earliest start through arrivals and predecessors at minimal times, then its minimal
    fused prefill). Cut ``[0, a)`` into slots ``[a - (j+1) L, a - j L)``: the decode steps that
    *start* before ``a`` form a flow in which slot ``j`` carries at most ``C = sum_k C_k`` tokens
    and request ``r`` at most one token per slot in its ``J_r = ceil((a - e_r) / L)`` latest slots
    and at most ``u_r = min(o_r, ceil((a - e_r) / L_r))`` tokens in all. The neighbourhoods are
    nested, so the least cut takes the ``k`` latest slots and by max-flow min-cut

        Phi(a) = min_k  C k + sum_r min(u_r, max(0, J_r - k))

    bounds the tokens decoded in iterations starting before ``a``. The iterations that start at
    or after ``a`` lie in ``[a, T]`` and decode the other ``>= O - Phi(a)`` tokens in at least
    ``(O - Phi(a)) / C_max`` iterations (summed over the ``m`` instances; ``ceil`` on one), each
    costing at least ``min_k decode_base_k``; each token costs its own decode share (``k``-th of
    ``r``: ``c_s + c_kv (p_r + k - 1)``), of which the ``Phi(a)`` dearest among the first ``u_r``
    of each request are the most the early iterations can have taken; and every request whose
    head is at or after ``a`` is prefilled after ``a`` (its prompt's per-token cost, and for
    separate iterations ``prefill_base`` per ``C_max`` of them). Summed over the instances these
    iterations take at most ``m (T - a)``. Restarts, preemptions and migrations only add work.
    Iterations that straddle ``a`` are counted before it, so the bound holds for every schedule.

    Parameters
    ----------
    problem
        The problem.
    output_tokens
        Output lengths to bound with, tokens; default: the workload's true lengths.

    Returns
    -------
    total_s, fused_s
        The bound for separate-iteration schedules and the one that also holds for fused
        (chunked-prefill) schedules, seconds; ``(0, 0)`` when every request is ready at 0.
    """
    w = problem.workload
    if len(w) == 0:
        return 0.0, 0.0
    o = (w.output_tokens if output_tokens is None else np.asarray(output_tokens)).astype(np.int64)
    p = w.prompt_tokens.astype(np.int64)
    lats = [inst.profile.latency for inst in problem.instances]
    m = len(problem.instances)
    c_tot = sum(inst.clients for inst in problem.instances)
    c_max = max(inst.clients for inst in problem.instances)
    a_d = min(l.decode_base_s for l in lats)
    a_p = min(l.prefill_base_s for l in lats)
    c_p = min(l.prefill_per_token_s for l in lats)
    c_s = min(l.decode_per_seq_s for l in lats)
    c_kv = min(l.decode_per_kv_token_s for l in lats)
    slot = min(l.decode_base_s + l.decode_per_seq_s for l in lats)  # > 0 (profile validation)
    t = minimal_request_time_s(problem, o, fused=True)
    head = w.arrival_s.astype(np.float64) if w.precedence is None else w.precedence.earliest_start(t, w.arrival_s)
    if not np.any(head > 0):
        return 0.0, 0.0
    first_decode = head + minimal_request_time_s(problem, np.zeros_like(o), fused=True)
    step = slot + c_kv * p
    # every token's own decode cost, all requests: c_s o + c_kv (o p + o (o - 1) / 2)
    token_cost = float(np.sum(c_s * o + c_kv * (o * p + o * (o - 1) / 2.0)))
    total_tokens = int(o.sum())
    # the dearest token a request can decode early reads at most p + o - 1 KV tokens
    reads = np.arange(int((p + o).max()) + 1, dtype=np.float64)
    unit = c_s + c_kv * reads

    distinct = np.unique(first_decode[first_decode > 0])
    if distinct.size == 0:
        return 0.0, 0.0
    # fewer thresholds on very large workloads (each costs O(R log R)); any set of them is valid
    half = int(np.clip(2_000_000 // len(w), 8, BACKLOG_THRESHOLDS // 2))
    quantiles = distinct[np.linspace(0, distinct.size - 1, min(half, distinct.size)).round().astype(np.int64)]
    grid = np.linspace(float(distinct[0]), float(distinct[-1]), half)
    best, best_fused = 0.0, 0.0
    for a in np.unique(np.r_[quantiles, grid]):
        early = first_decode < a
        slots = np.where(early, np.ceil((a - first_decode) / slot), 0.0).astype(np.int64)
        cap = np.minimum(o, np.where(early, np.ceil((a - first_decode) / step), 0.0).astype(np.int64))
        phi = _early_tokens(slots, cap, c_tot)
        # the phi dearest tokens among each request's first cap tokens (reads p .. p + cap - 1)
        diff = np.zeros(reads.size + 1, dtype=np.int64)
        np.add.at(diff, p[early], 1)
        np.add.at(diff, (p + cap)[early], -1)
        count = np.cumsum(diff)[:-1].astype(np.float64)
        from_top = np.cumsum(count[::-1])
        cost_top = np.cumsum((count * unit)[::-1])
        i = int(np.searchsorted(from_top, phi, side="left"))
        if i >= from_top.size:
            removed = float(cost_top[-1])
        else:
            done = float(from_top[i - 1]) if i else 0.0
            removed = (float(cost_top[i - 1]) if i else 0.0) + (phi - done) * float(unit[::-1][i])
        late = head >= a
        left = total_tokens - phi
        decodes = left / c_max if m > 1 else float(-(-left // c_max))
        if m == 1 and np.any(o > cap):
            decodes = max(decodes, float((o - cap).max()))
        prefills = late.sum() / c_max if m > 1 else float(-(-int(late.sum()) // c_max))
        work = token_cost - removed + c_p * float(p[late].sum()) + a_d * decodes
        best_fused = max(best_fused, a + work / m)
        best = max(best, a + (work + a_p * prefills) / m)
        if a_d > 0 and np.any(late):
            # the chain-coupling of _chain_coupling_bound over [a, T]: the longest chain of the
            # late requests runs its steps itself, and whatever decodes beside them slows them
            chain = _late_chain(w, t, head, late)
            steps, tau, start = float(o[chain].sum()), float(t[chain].sum()), float(head[chain[0]])
            base = work - a_d * decodes + a_d * (steps + max(0.0, left - steps) / c_max)
            capacity = _cheapest_tokens(p, o, chain, c_s, c_kv)
            x_max = min(steps * (c_max - 1), max(0.0, left - steps))
            for fused, extra in ((True, 0.0), (False, a_p * prefills)):
                coupled = _coupled_makespan(base + extra, a_d / c_max, x_max, capacity, m, a, start + tau)
                best_fused = max(best_fused, coupled) if fused else best_fused
                best = max(best, coupled)
    return float(max(best, best_fused)), float(best_fused)


#: Release thresholds ``t`` of :func:`fleet_release_bound` (count): half quantiles of the release
#: dates, half the release dates of the requests that could finish last; each adds ``2 m`` rows of
#: up to ``R`` entries to its LP (fewer thresholds when ``R m`` is large, see the function).
FLEET_RELEASE_THRESHOLDS = 32
#: Requests per threshold and instance whose remaining decode steps each bound the instance's
#: decode iterations after the threshold (count): the longest remainders.
FLEET_RELEASE_LONGEST = 16
#: Most request-instance columns (``R m``) of :func:`fleet_release_bound`'s LP; beyond it the term
#: is skipped (0). At 16,000 columns (4,000 requests on 4 instances, 5 thresholds) one LP takes
#: about 2 s on a loaded 2-core machine, and a bound that lifts takes a few of them.
FLEET_RELEASE_MAX_COLUMNS = 16_000


def fleet_release_bound(problem: Problem, output_tokens: np.ndarray | None = None,
                        floor: float = -np.inf) -> float:
    """Makespan bound of a fleet whose requests are released over time, without migration, seconds.

    For schedules in which every request is prefilled and decoded on one instance (every lloptim
    policy without :func:`~lloptim.runtime.migration.with_migration`), on two or more instances.
    The window and backlog bounds pool the fleet: a request that arrives late with a long output
    may, there, spread its decode steps over every instance, and the slow instances' capacity
    counts as if it could serve anyone in time. Here request ``r`` (release ``h_r``: its arrival,
    or its earliest start through its predecessors at minimal times) runs on one instance ``k``,
    given in fraction ``y[k, r]`` (the LP relaxation of the choice), and

    * it finishes no earlier than ``h_r + t_k(r)``, its minimal time alone on ``k``
      (:func:`minimal_request_time_s` with ``k``'s own coefficients, prompt fused into a decode
      where cheaper): ``T >= h_r + sum_k t_k(r) y[k, r]``, and ``y[k, r] = 0`` when
      ``h_r + t_k(r) > T`` (*eligibility*);
    * for every threshold ``t``, instance ``k`` runs its iterations that start at or after ``t``
      one after another inside ``[t, T]``. They hold every token of ``k``'s requests that remains
      at ``t``: on ``k``, request ``r`` decodes first at ``e_{k,r} = h_r +`` its prompt there at the
      least, and its ``i``-th step lasts at least ``a_k + c_k (p_r + i)`` (``a_k`` the decode base
      plus the per-sequence cost, ``c_k`` the per-KV-token cost), so it has started at most
      ``d_{k,r}(t)`` steps before ``t`` (the ``i >= 0`` whose earliest start
      ``i (a_k + c_k p_r) + c_k i (i - 1) / 2`` after ``e_{k,r}`` is before ``t``); its last
      ``rem_{k,r}(t) = o_r - d_{k,r}(t)`` tokens (the dearest: they read the most KV) and, when
      ``h_r >= t``, its prompt's per-token prefill come after ``t``.
      Their decode iterations ``D[k, t]`` are at least ``rem_{k,r}(t)`` for a request there (one
      token per iteration), ``sum_r rem_{k,r}(t) y[k, r] / C_k`` (clients) and
      ``sum_r A_{k,r}(t) y[k, r] / M_k``
      (KV memory: the remainder holds at least ``p_r + i`` tokens at its ``i``-th step, ``A_{k,r}(t)``
      summed over its steps, and no step holds more than the capacity ``M_k``), never fewer than
      at a later threshold, each costing at least ``decode_base_s`` of ``k``; so
      ``sum_r y[k, r] (per-token cost of r's remainder on k) + decode_base_k D[k, t] <= T - t``.

    Restarts, preemptions and faults only add work (a restarted request's last run starts no
    earlier than its release), so every schedule without migration satisfies these rows with its
    0/1 assignment and its makespan ``T``. The least ``T`` of the LP depends on ``T`` through the
    eligibility; for a guess ``T0`` let ``f(T0)`` be the LP's least ``T`` with the requests made
    eligible at ``T0``: a schedule of makespan ``T* <= T0`` is feasible for it (its requests are
    eligible at ``T* <= T0``), so ``T* >= min(T0, f(T0))`` for every ``T0``, a valid bound
    whatever ``T0``. ``f`` falls as ``T0`` grows and changes only where ``T0`` passes some
    ``h_r + t_k(r)``, so bisection over those breakpoints (one LP each, re-solved by HiGHS's dual
    simplex from the last basis after the bounds of the newly eligible columns change) finds the
    best: ``min(next breakpoint, f(T0))`` at the last breakpoint with ``f(T0) > T0``. The value
    is shrunk by HiGHS's feasibility tolerance in relative terms. The KV ramp-up and block
    rounding are left out (a relaxation). It holds for fused and for separate-iteration schedules
    (no prefill fixed cost is counted).

    Size: ``R m`` columns and up to ``3 m`` rows of ``R`` entries per threshold (32 thresholds,
    fewer above 2,500 request-instance columns: ``80,000 / (R m)``, at least 4); skipped above
    :data:`FLEET_RELEASE_MAX_COLUMNS`. 800 requests on 3-4 instances: 2-6 LPs, 0.5-4 s on a
    loaded 2-core machine; 4,000 on 4: one LP of about 2 s where it cannot lift the bound.

    Parameters
    ----------
    problem
        The problem (a fleet of two or more instances; requests released over time).
    output_tokens
        Output lengths to bound with, tokens; default: the workload's true lengths.
    floor
        A bound already known, seconds: the LP starts its search there and returns 0 when it
        cannot lift it.

    Returns
    -------
    float
        The bound, seconds; 0 when skipped (one instance, every request released at 0, too
        large) or when it does not exceed ``floor``.
    """
    import highspy
    from scipy.sparse import coo_matrix

    terms = release_terms(problem, output_tokens)
    if terms is None:
        return 0.0
    # the floor, or every request's release plus its minimal time on its fastest instance
    start = max(float(floor), float(np.max(terms["head"] + terms["alone"].min(axis=0))))
    if _release_upper(terms, start) * (1.0 - 1e-7) <= start:
        # a feasible assignment shows that the LP cannot lift the start (the result below is at
        # most f(start), shrunk by 1e-7): no LP
        result = start * (1.0 - 1e-7)
        return result if result > floor else 0.0
    head, alone, thresholds = terms["head"], terms["alone"], terms["thresholds"]
    cost, rem, longest, base, clients = terms["cost"], terms["remaining"], terms["longest"], terms["base"], terms["clients"]
    area, capacity = terms["area"], terms["capacity"]
    m, R = alone.shape
    nt = thresholds.size
    # columns: T, y[k, r] (k-major), D[k, j]
    col_y = 1 + np.arange(m * R).reshape(m, R)
    col_d = 1 + m * R + np.arange(m * nt).reshape(m, nt)
    n_cols = 1 + m * R + m * nt
    rows, cols, vals, lo, hi = [], [], [], [], []
    inf = highspy.kHighsInf
    n_rows = 0

    def add(row_of: np.ndarray, col: np.ndarray, val, low, high) -> None:
        """Entries of new rows (``row_of`` numbers them from 0) and the rows' bounds."""
        nonlocal n_rows
        rows.append(n_rows + np.asarray(row_of, dtype=np.int64))
        cols.append(np.asarray(col, dtype=np.int64))
        vals.append(np.broadcast_to(np.asarray(val, dtype=np.float64), np.shape(col)))
        lo.append(np.atleast_1d(np.asarray(low, dtype=np.float64)))
        hi.append(np.atleast_1d(np.asarray(high, dtype=np.float64)))
        n_rows += lo[-1].size

    every = np.arange(R)
    # sum_k y[k, r] = 1
    add(np.tile(every, m), col_y.ravel(), 1.0, np.ones(R), np.ones(R))
    # sum_k t_k(r) y[k, r] - T <= -h_r
    add(np.r_[np.tile(every, m), every], np.r_[col_y.ravel(), np.zeros(R, dtype=np.int64)],
        np.r_[alone.ravel(), -np.ones(R)], np.full(R, -inf), -head)
    for j, t in enumerate(thresholds.tolist()):
        for k in range(m):
            keep = np.flatnonzero((cost[k, j] > 0) | (rem[k, j] > 0))
            top = longest[k][j]
            n = top.size
            # busy after t: sum_r cost y + base_k D - T <= -t
            add(np.zeros(keep.size + 2), np.r_[col_y[k, keep], col_d[k, j], 0], np.r_[cost[k, j, keep], base[k], -1.0],
                -inf, -t)
            # D >= sum_r rem y / C_k, and D >= rem_r y for the longest remainders
            add(np.zeros(keep.size + 1), np.r_[col_y[k, keep], col_d[k, j]],
                np.r_[rem[k, j, keep] / clients[k], -1.0], -inf, 0.0)
            # D >= sum_r area y / M_k: no decode step holds more than the KV capacity (unless the
            # clients' row dominates it request by request)
            if np.any(area[k, j, keep] / capacity[k] > rem[k, j, keep] / clients[k]):
                add(np.zeros(keep.size + 1), np.r_[col_y[k, keep], col_d[k, j]],
                    np.r_[area[k, j, keep] / capacity[k], -1.0], -inf, 0.0)
            add(np.r_[np.arange(n), np.arange(n)], np.r_[col_y[k, top], np.full(n, col_d[k, j])],
                np.r_[rem[k, j, top], -np.ones(n)], np.full(n, -inf), np.zeros(n))
            if j + 1 < nt:  # D[k, t] >= D[k, t'] for t < t'
                add(np.zeros(2), np.r_[col_d[k, j], col_d[k, j + 1]], np.r_[1.0, -1.0], 0.0, inf)
    a = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                   shape=(n_rows, n_cols)).tocsc()
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n_cols, n_rows
    lp.col_cost_ = np.r_[1.0, np.zeros(n_cols - 1)]
    lp.col_lower_, lp.col_upper_ = np.zeros(n_cols), np.full(n_cols, inf)
    lp.row_lower_, lp.row_upper_ = np.concatenate(lo), np.concatenate(hi)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = a.indptr, a.indices, a.data
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = n_cols, n_rows
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    # presolve took 60 % of the first solve at 4,000 requests (5.3 -> 2.1 s); the later solves
    # start from the last basis and skip it anyway
    h.setOptionValue("presolve", "off")
    h.passModel(lp)
    y_cols = col_y.ravel().astype(np.int32)
    finish = (head[None, :] + alone).ravel()  # k-major, as y_cols
    optimal = highspy.HighsModelStatus.kOptimal

    def least_makespan(guess: float) -> float:
        """``f(guess)``: the LP's least ``T`` with the requests eligible at ``guess``, s (inf: none)."""
        upper = np.where(finish <= guess, inf, 0.0)
        h.changeColsBounds(y_cols.size, y_cols, np.zeros(y_cols.size), upper)
        h.run()
        if h.getModelStatus() != optimal:
            return inf if h.getModelStatus() == highspy.HighsModelStatus.kInfeasible else -inf
        return float(h.getInfo().objective_function_value)

    at_start = least_makespan(start)
    if not at_start > start:
        result = start * (1.0 - 1e-7)  # the LP does not lift the start, itself a bound
        return result if result > floor else 0.0
    # breakpoints above the start, up to f(start) (f falls, so the crossing lies below it)
    breaks = np.unique(finish[(finish > start) & (finish <= at_start)])
    guesses = np.r_[start, breaks]

    def following(i: int) -> float:
        return float(guesses[i + 1]) if i + 1 < guesses.size else np.inf

    best = min(following(0), at_start)
    low, high = 0, guesses.size - 1  # f(guesses[low]) > guesses[low]
    while low < high:
        mid = (low + high + 1) // 2
        value = least_makespan(float(guesses[mid]))
        if value == -inf:
            break  # HiGHS did not finish: the best so far stands
        best = max(best, min(following(mid), value))
        if value > guesses[mid]:
            low = mid
        else:
            high = mid - 1
    result = best * (1.0 - 1e-7)
    return float(result) if result > floor else 0.0


def _release_upper(terms: dict, guess: float) -> float:
    """An upper estimate of ``f(guess)`` of :func:`fleet_release_bound`, seconds, in ``O(m nt R)``.

    The LP's value at two feasible assignments of the requests eligible at ``guess``: each
    request on its fastest instance (eligible, as ``guess`` is at least its release plus its time
    there), and each split over the instances where it is eligible in proportion to their
    throughput (clients over decode base). Each row's least ``T`` is read off with the decode
    iterations at their least (the largest of the clients', the memory's and the longest
    remainder's counts, and the next threshold's).
    """
    head, alone, th = terms["head"], terms["alone"], terms["thresholds"]
    cost, rem, area = terms["cost"], terms["remaining"], terms["area"]
    base, clients, capacity = terms["base"], terms["clients"], terms["capacity"]
    m, R = alone.shape
    eligible = head[None, :] + alone <= guess
    fastest = np.zeros((m, R))
    fastest[np.argmin(alone, axis=0), np.arange(R)] = 1.0
    rate = np.where(eligible, (clients / base)[:, None], 0.0)
    split = rate / np.maximum(rate.sum(axis=0, keepdims=True), 1e-300)
    best = np.inf
    for y in (fastest, split):
        finish = float(np.max(head + (alone * y).sum(axis=0)))
        iters = np.maximum.reduce([(rem * y[:, None, :]).sum(axis=2) / clients[:, None],
                                   (area * y[:, None, :]).sum(axis=2) / capacity[:, None],
                                   (rem * y[:, None, :]).max(axis=2)])              # (m, nt)
        iters = np.maximum.accumulate(iters[:, ::-1], axis=1)[:, ::-1]             # >= later thresholds
        busy = th[None, :] + (cost * y[:, None, :]).sum(axis=2) + base[:, None] * iters
        best = min(best, max(finish, float(busy.max())))
    # a hair of slack over the rounding of the sums, so a skipped LP is never one that mattered
    return best * (1.0 + 1e-9)


def release_terms(problem: Problem, output_tokens: np.ndarray | None = None) -> dict | None:
    """The coefficients of :func:`fleet_release_bound`'s LP, or None where it does not apply.

    For users who write the same model with integer assignments (``benchmarks/fleet_release.py``
    does, with :class:`lloptim.Model`, to measure how far the LP is from its integer optimum).

    Parameters
    ----------
    problem
        The problem.
    output_tokens
        Output lengths, tokens; default: the workload's true lengths.

    Returns
    -------
    dict or None
        ``head`` ``(R,)`` release dates, s; ``alone`` ``(m, R)`` minimal time of each request alone
        on each instance, s; ``thresholds`` ``(nt,)`` s, increasing, 0 first; ``cost``
        ``(m, nt, R)`` seconds of instance ``k`` that request ``r`` needs after threshold ``j``
        (its remaining tokens' per-token costs, and its prompt's if released at or after it);
        ``remaining`` ``(m, nt, R)`` decode steps left at each threshold if it runs on ``k``,
        tokens; ``area`` ``(m, nt, R)`` KV tokens the remainder holds summed over its steps (at
        least ``p + i`` at step ``i``), token-steps; ``longest`` (``m`` lists of ``nt`` arrays)
        rows of the longest remainders;
        ``base`` ``(m,)`` decode base, s; ``clients`` ``(m,)``; ``capacity`` ``(m,)`` KV
        capacity, tokens. None with one instance, no requests, every request released at 0,
        or more than :data:`FLEET_RELEASE_MAX_COLUMNS` request-instance columns.
    """
    w = problem.workload
    m, R = len(problem.instances), len(w)
    if m < 2 or R == 0 or R * m > FLEET_RELEASE_MAX_COLUMNS:
        return None
    o = (w.output_tokens if output_tokens is None else np.asarray(output_tokens)).astype(np.float64)
    p = w.prompt_tokens.astype(np.float64)
    t_fused = minimal_request_time_s(problem, o, fused=True)
    head = (w.arrival_s.astype(np.float64) if w.precedence is None
            else w.precedence.earliest_start(t_fused, w.arrival_s))
    if not np.any(head > 0):
        return None
    lats = [inst.profile.latency for inst in problem.instances]
    kv_steps = o * p + o * (o - 1) / 2
    # minimal time of each request alone on each instance (a prompt may ride on a decode)
    alone = np.array([min(l.prefill_base_s, l.decode_base_s) + l.prefill_per_token_s * p
                      + (l.decode_base_s + l.decode_per_seq_s) * o + l.decode_per_kv_token_s * kv_steps
                      for l in lats])
    count = max(4, min(FLEET_RELEASE_THRESHOLDS, 80_000 // (R * m)))
    thresholds = _release_thresholds(head, head + alone.min(axis=0), count)
    t = thresholds[:, None]
    late = head[None, :] >= t
    rem, area, cost = [], [], []
    for l in lats:
        # on this instance (no migration): the first decode after the prompt there, then steps of
        # at least a + c (p + i); the i-th starts at least S(i) = i (a + c p) + c i (i - 1) / 2
        # after it, so the steps started before t are the i >= 0 with S(i) < t - e, ceil(root)
        first_decode = head + min(l.prefill_base_s, l.decode_base_s) + l.prefill_per_token_s * p
        a, c = l.decode_base_s + l.decode_per_seq_s, l.decode_per_kv_token_s
        room = np.maximum(t - first_decode[None, :], 0.0)                    # (nt, R)
        lin = a + c * p - c / 2
        if c > 0:
            root = (-lin + np.sqrt(lin * lin + 2.0 * c * room)) / c
        else:
            root = room / lin
        started = np.ceil(root - 1e-12 * np.maximum(root, 1.0))  # a hair below: never more than possible
        started = np.where(room > 0, np.maximum(started, 1.0), 0.0)
        left = np.maximum(0.0, o[None, :] - started)                       # (nt, R)
        done = o[None, :] - left                                            # it reads p + done .. p + o - 1
        # KV tokens the remainder reads, summed over its steps: also the KV it holds (token-steps)
        held = left * (p + done) + left * (left - 1) / 2
        rem.append(left)
        area.append(held)
        cost.append(l.decode_per_seq_s * left + c * held + np.where(late, l.prefill_per_token_s * p, 0.0))
    rem, area, cost = np.array(rem), np.array(area), np.array(cost)    # (m, nt, R)
    longest = []
    for k in range(m):
        tops = np.argsort(-rem[k], axis=1, kind="stable")[:, :FLEET_RELEASE_LONGEST]
        longest.append([top[rem[k, j, top] > 0] for j, top in enumerate(tops)])
    return {"head": head, "alone": alone, "thresholds": thresholds, "cost": cost, "remaining": rem,
            "longest": longest, "base": np.array([l.decode_base_s for l in lats]),
            "clients": np.array([inst.clients for inst in problem.instances], dtype=np.float64),
            "area": area, "capacity": np.array([inst.kv_capacity_tokens for inst in problem.instances], dtype=np.float64)}


def _release_thresholds(head: np.ndarray, finish: np.ndarray, count: int) -> np.ndarray:
    """Thresholds of :func:`fleet_release_bound`, seconds: quantiles of the release dates and the
    release dates of the requests with the latest minimal finish, 0 first."""
    distinct = np.unique(head)
    half = max(1, count // 2)
    quantiles = distinct[np.linspace(0, distinct.size - 1, min(half, distinct.size)).round().astype(np.int64)]
    latest = head[np.argsort(-finish, kind="stable")[:count - half]]
    return np.unique(np.r_[0.0, quantiles, latest])


def _late_chain(w, t: np.ndarray, head: np.ndarray, late: np.ndarray) -> list[int]:
    """Rows of the chain of ``late`` requests that could finish last (each released at its head)."""
    rows = np.flatnonzero(late)
    sub = None if w.precedence is None else w.precedence.subset(rows)
    if sub is None:
        return [int(rows[np.argmax(head[rows] + t[rows])])]
    return [int(rows[i]) for i in sub.critical_path(t[rows], head[rows])[1]]


def _coupled_makespan(work: float, saved: float, x_max: float, capacity, m: int, a: float, chain_end: float) -> float:
    """Largest ``T`` shown infeasible for ``m (T - a) >= work - saved X``, ``X <= min(x_max, g^-1(T - chain_end))``, s.

    ``X`` tokens decode beside a chain that cannot end before ``chain_end`` plus their cost
    ``g(X)`` (``capacity`` is ``g^-1``), each saving ``saved`` seconds of iterations of their
    own; the right side does not grow with ``T``, so bisection finds the least feasible ``T``,
    and the largest infeasible one found is returned (valid whatever the tolerance).
    """
    def infeasible(T: float) -> bool:
        return m * (T - a) < work - saved * min(x_max, capacity(T - chain_end))

    lo, hi = a + (work - saved * x_max) / m, a + work / m
    if not infeasible(lo):
        return lo
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if infeasible(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _early_tokens(slots: np.ndarray, cap: np.ndarray, per_slot: int) -> int:
    """``min_k per_slot k + sum_r min(cap_r, max(0, slots_r - k))``: the max flow of :func:`backlog_bound`, tokens.

    ``min(u, max(0, J - k)) = max(0, J - k) - max(0, J - u - k)``, and ``sum_r max(0, x_r - k)`` is
    read off the sorted ``x`` and its suffix sums; the minimum over ``k`` is at a break
    (``0``, ``J_r - u_r`` or ``J_r``), where every term is linear in between.
    """
    keep = cap > 0  # the others add nothing at any k
    if not np.any(keep):
        return 0
    slots, cap = slots[keep], cap[keep]

    def excess(x: np.ndarray, k: np.ndarray) -> np.ndarray:
        x = np.sort(x)
        suffix = np.r_[np.cumsum(x[::-1])[::-1], 0]
        i = np.searchsorted(x, k, side="right")
        return suffix[i] - k * (x.size - i)

    k = np.sort(np.r_[0, slots - cap, slots])  # all >= 0 (cap <= slots); sorted queries search fast
    flow = per_slot * k + excess(slots, k) - excess(slots - cap, k)
    return int(flow.min())


def _assignment_upper(work: np.ndarray, count: np.ndarray) -> float:
    """An upper estimate of :func:`fractional_assignment_bound` ``(work, count)``, seconds, in ``O(J R)``.

    The makespan of a feasible fractional assignment bounds the LP's optimum from above: the
    better of every request split over the kinds in the same shares (kind ``j`` takes the share
    ``count[j] / W[j]`` of the whole, normalized, with ``W[j]`` its total work; all kinds then
    finish together at ``1 / sum_j count[j] / W[j]``) and every request on the kind that does it
    fastest per machine, ``max_j`` of the load each kind then has over its machines.
    """
    work = np.asarray(work, dtype=np.float64)
    count = np.asarray(count, dtype=np.float64)
    if work.shape[1] == 0:
        return 0.0
    totals = work.sum(axis=1)
    if np.any(totals <= 0):
        split = float(np.max(totals / count))
    else:
        split = 1.0 / float(np.sum(count / totals))
    scaled = work / count[:, None]
    win = scaled.argmin(axis=0)
    fastest = float(np.bincount(win, weights=scaled[win, np.arange(work.shape[1])], minlength=work.shape[0]).max())
    # a hair of slack over the rounding of the sums, so a skipped LP is never one that mattered
    return min(split, fastest) * (1.0 + 1e-12)


def _thresholds(head: np.ndarray, tail: np.ndarray) -> list[tuple[float, float]]:
    """Head and tail thresholds to try: quantiles of the distinct values, each alone and paired."""
    def pick(values: np.ndarray) -> np.ndarray:
        distinct = np.unique(values)
        if distinct.size <= WINDOW_THRESHOLDS:
            return distinct
        return distinct[np.linspace(0, distinct.size - 1, WINDOW_THRESHOLDS).round().astype(np.int64)]

    heads, tails = pick(head), pick(tail)
    pairs = [(a, 0.0) for a in heads] + [(0.0, b) for b in tails]
    few_h, few_t = heads[:: max(1, heads.size // 3)], tails[:: max(1, tails.size // 3)]
    pairs += [(a, b) for a in few_h for b in few_t if a > 0 and b > 0]
    return pairs


def _chain_coupling_bound(problem: Problem, o: np.ndarray, token_s: float, a_d: float, c_max: int,
                          pre_total: float, pre_fused: float, migration: bool = True,
                          fleet_lp: bool = False, floor: tuple[float, float] = (-np.inf, -np.inf)) -> tuple[float, float]:
    """The work bound when a long chain must also run fast (separate, fused), seconds.

    Summed over the ``m`` instances, the iterations take at least ``token_s + a_d * D + prefills``
    with ``D`` decode iterations. A chain ``C`` of ``S`` output tokens needs ``S`` decode
    iterations of its own, in which ``X`` tokens of other requests advance beside it; every other
    decode iteration advances at most ``C_max``, so ``D >= S + (O - S - X) / C_max`` for ``O``
    output tokens in all (and ``X <= S (C_max - 1)``). Each of those ``X`` co-running tokens slows
    its chain iteration by its own decode cost, at least ``c_s + c_kv h`` for a token that reads
    ``h`` KV tokens (``c_s``, ``c_kv``: the smallest per-request and per-KV-token decode costs
    of the instances); distinct tokens, so together at least ``g(X)``, the cost of the ``X``
    cheapest tokens outside the chain (request ``r``'s ``k``-th token reads ``p_r + k - 1``, as in
    ``token_s``). The chain runs inside ``[h, T]`` at its minimal time ``tau`` plus those
    slow-downs: ``g(X) <= T - h - tau``. Batching the chain fully is therefore not free when it is
    nearly as long as the whole schedule:
    ``m T >= f(T) = token_s + a_d (S + (O - S - min(S (C_max - 1), g^-1(T - h - tau))) / C_max) + prefills``
    with ``f`` non-increasing, so the least ``T`` with ``m T >= f(T)`` bounds the makespan; it is
    found by bisection and the largest ``T`` shown infeasible is returned (valid whatever the
    tolerance). Tried on the longest chain in tokens and on the critical path.

    Without migration (``migration=False``: a started request never leaves its instance, as in
    every lloptim policy but :func:`~lloptim.runtime.migration.with_migration`; a preempted request
    waits on its client), a co-runner is also prefilled on the chain's instance. Chain request
    ``r_i`` runs on one instance ``k_i`` from its admission to its finish, and the chain's span
    ``[h, T]`` holds, one after another, the wait before ``r_1``'s admission, the ``n`` lifetimes
    and the waits between them. A request decoding beside ``r_i`` was admitted on ``k_i`` either
    after ``r_i``, so that its whole prompt is prefilled inside ``r_i``'s lifetime, or before, so
    that it holds one of the other ``C_max - 1`` clients at ``r_i``'s admission (a *carry-in*);
    every prompt token adds at least ``c_p`` (the smallest ``prefill_per_token_s``) to an iteration
    of its instance, fused or not. A carry-in was prefilled on ``k_i`` during an earlier lifetime
    on ``k_i`` or during a wait (both inside the span, on one instance, so that its prompt costs
    the span as well), before ``h`` (only if a request arrives before ``h``), or while the chain
    ran on another instance (only for ``i >= 2`` on a fleet). So at most
    ``(C_max - 1) ((n - 1) [m > 1] + [a request arrives before h])`` co-runners are free, and every
    other request with tokens beside the chain also costs ``c_p p_r`` of the budget
    ``T - h - tau``, once (:func:`_cheapest_tokens` with ``entry``). With migration a co-runner
    could be prefilled elsewhere and a chain request could move to fresh carry-ins, so the entry
    costs are left out (the bound stays valid for every schedule).

    With ``fleet_lp`` on a fleet whose instances differ, and without migration, the critical
    chains are also bounded by :func:`_chain_coupling_lp`, which charges each instance kind its
    own costs; ``floor`` (separate, fused), seconds: bounds the caller already holds, below
    which an LP's value would not matter (it may then stop early, with a lower value).
    """
    w = problem.workload
    lats = [inst.profile.latency for inst in problem.instances]
    c_s = min(l.decode_per_seq_s for l in lats)
    c_kv = min(l.decode_per_kv_token_s for l in lats)
    # without migration a co-runner's prompt is prefilled on the chain's instance (docstring)
    entry = None if migration else min(l.prefill_per_token_s for l in lats) * w.prompt_tokens.astype(np.float64)
    if c_s + c_kv * float(w.prompt_tokens.min()) <= 0 or a_d <= 0:
        return 0.0, 0.0
    m = len(problem.instances)
    total_tokens = float(o.sum())
    p = w.prompt_tokens.astype(np.int64)
    oi = np.asarray(o, dtype=np.int64)
    out = []
    chains = {}
    for fused, pre in ((False, pre_total), (True, pre_fused)):
        t = minimal_request_time_s(problem, o, fused)
        best = 0.0
        tried = set()
        for chain in (w.precedence.critical_path(o)[1], w.precedence.critical_path(t, w.arrival_s)[1]):
            key = tuple(chain)
            if key in tried:
                continue
            tried.add(key)
            if key not in chains:
                head = float(w.arrival_s[chain[0]])
                # free carry-ins: on the instance of a later chain request while the chain ran
                # elsewhere (a fleet), and before the chain's start if another request was there
                early = bool(np.any(np.delete(w.arrival_s, chain) < head))
                carry_ins = (c_max - 1) * ((len(chain) - 1 if m > 1 else 0) + int(early))
                chains[key] = _token_curves(p, oi, chain, c_s, c_kv, entry, carry_ins)
            steps, tau, head = float(o[chain].sum()), float(t[chain].sum()), float(w.arrival_s[chain[0]])
            k = token_s + a_d * steps + a_d * (total_tokens - steps) / c_max + pre
            x_max = steps * (c_max - 1)
            # every lambda's curve gives a valid bound (any T below its root is infeasible): keep the best
            for shift, cum_tokens, cum_cost, slope in chains[key]:
                best = max(best, _coupled_root(m, k, a_d / c_max, x_max, head + tau - shift,
                                               cum_tokens, cum_cost, slope))
            if fleet_lp and not migration and chains[key]:
                best = max(best, _chain_coupling_lp(problem, o, chain, fused, chains[key], head,
                                                    max(best, floor[int(fused)])))
        out.append(best)
    return out[0], out[1]


#: Most columns (instance kinds x requests) of the chain-coupling LP built whole
#: (:func:`_chain_coupling_lp_reference`); beyond it that path skips the LP (the pooled
#: chain-coupling bound still holds).
CHAIN_LP_MAX_COLUMNS = 100_000
#: Most columns (instance kinds x requests) of the chain-coupling LP solved by column generation
#: (:func:`_chain_coupling_lp`): its rounds cost ``O(J R)`` time and a few ``J x R`` float arrays
#: of memory (32 MiB each at the limit); beyond it the LP is skipped.
CHAIN_LP_FAST_MAX_COLUMNS = 4_000_000
#: Most column-generation rounds of :func:`_chain_coupling_lp` (count) and their wall-clock limit,
#: seconds; at either limit the Lagrangian bound so far is returned, still valid.
CHAIN_LP_ROUNDS = 500
CHAIN_LP_TIME_LIMIT_S = 20.0
#: Relative gap between the master's value and the Lagrangian bound at which the column
#: generation of :func:`_chain_coupling_lp` stops (the two then agree to that, and to HiGHS's
#: optimum of the whole LP to its own tolerances, about 1e-10 relative).
CHAIN_LP_TOLERANCE = 2e-10
#: Supporting lines of each co-runner cost curve in :func:`_chain_coupling_lp` (count).
CHAIN_LP_TANGENTS = 64
#: The fast path of the chain-coupling LP (column generation over one HiGHS master, skipped when
#: it cannot lift the bound above ``floor``). False solves the whole LP with ``linprog`` (the path
#: before it), kept for the tests and ``benchmarks/bound_speed.py --reference``.
_CHAIN_LP_FAST = True


def _chain_lp_terms(problem: Problem, o: np.ndarray, chain, fused: bool, max_columns: int) -> dict | None:
    """The coefficients of the chain-coupling LP over instance kinds; None with one kind or over ``max_columns``.

    ``count``, ``clients``, ``a`` (``decode_base_s``) per kind ``j``; ``work[j, r]``: request ``r``'s
    busy time on kind ``j`` (its per-token terms, ``prefill_base_s / C_j`` for separate iterations,
    and for a request off the chain its share ``a_j o_r / C_j`` of decode steps), seconds;
    ``chain_time[j, i]``: the minimal time of the ``i``-th chain request on kind ``j``, seconds;
    ``in_chain``: a mask of the chain's requests.
    """
    w = problem.workload
    kinds: dict[tuple, int] = {}
    for inst in problem.instances:
        key = (inst.profile.latency, inst.clients)
        kinds[key] = kinds.get(key, 0) + 1
    if len(kinds) < 2 or len(kinds) * len(w) > max_columns:
        return None
    lats = [key[0] for key in kinds]
    clients = np.array([key[1] for key in kinds], dtype=np.float64)
    count = np.array(list(kinds.values()), dtype=np.float64)
    R = len(w)
    p = w.prompt_tokens.astype(np.float64)
    kv_steps = o * p + o * (o - 1) / 2
    in_chain = np.zeros(R, dtype=bool)
    in_chain[np.asarray(chain, dtype=np.int64)] = True
    others = ~in_chain
    a = np.array([lat.decode_base_s for lat in lats])
    work, chain_time = [], []
    for j, lat in enumerate(lats):
        per_token = lat.prefill_per_token_s * p + lat.decode_per_seq_s * o + lat.decode_per_kv_token_s * kv_steps
        if not fused:
            per_token = per_token + lat.prefill_base_s / clients[j]
        work.append(per_token + np.where(others, a[j] * o / clients[j], 0.0))
        first = (min(lat.prefill_base_s, a[j]) if fused else lat.prefill_base_s) + lat.prefill_per_token_s * p
        chain_time.append((first + (a[j] + lat.decode_per_seq_s) * o + lat.decode_per_kv_token_s * kv_steps)[in_chain])
    return {"count": count, "clients": clients, "a": a, "work": np.array(work), "chain_time": np.array(chain_time),
            "in_chain": in_chain}


def _tangents(curves: list) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """Per co-runner cost curve: ``(shift, slopes, offsets)`` of its :data:`CHAIN_LP_TANGENTS` supporting lines.

    The curve's cost of ``X`` tokens is at least ``slope_i X - offset_i`` for each ``i``.
    """
    out = []
    for shift, cum_tokens, cum_cost, slope in curves:
        at_tokens = np.concatenate([[0.0], cum_tokens[:-1]])
        at_cost = np.concatenate([[0.0], cum_cost[:-1]])
        pick = np.unique(np.linspace(0, slope.size - 1, min(CHAIN_LP_TANGENTS, slope.size)).round().astype(np.int64))
        out.append((float(shift), slope[pick], slope[pick] * at_tokens[pick] - at_cost[pick]))
    return out


def _chain_coupling_lp(problem: Problem, o: np.ndarray, chain, fused: bool, curves: list, head: float,
                       floor: float = -np.inf) -> float:
    """The chain-coupling bound on a fleet whose instances differ, as an LP, seconds; 0 if skipped.

    The pooled bound (:func:`_chain_coupling_bound`) gives every instance the cheapest
    coefficients, so on a mixed fleet it lets the fast instances absorb the work beside a chain
    as if the slow ones were fast. Here request ``r`` goes to instance kind ``j`` (``n_j``
    instances of ``C_j`` clients) in fraction ``y[j, r]`` (a relaxation of running it there
    whole: without migration a request is prefilled and decoded on one instance). The chain runs
    ``S_j = sum_{r in chain} o_r y[j, r]`` of its steps on kind ``j`` with ``X_j <= (C_j - 1) S_j``
    tokens of others beside them (and no more than the others' tokens there), so kind ``j``'s
    decode iterations are at least ``S_j + (others' tokens on j - X_j) / C_j`` and its instances
    are busy at least ``sum_r v[j, r] y[j, r] + a_j (S_j + (sum_{r not in chain} o_r y[j, r] - X_j) / C_j)
    <= n_j T`` (``v``: the per-token terms, and for separate iterations ``prefill_base_s / C_j``
    per request). The chain itself takes its minimal time on each kind, ``sum t[j, r] y[j, r]``,
    plus what its co-runners cost, at least ``g_lambda(X) - shift_lambda`` for every curve of
    :func:`_token_curves` (``X = sum_j X_j``; ``g_lambda`` is convex, bounded below by
    :data:`CHAIN_LP_TANGENTS` of its supporting lines), inside ``[h, T]``. The least ``T``
    of this LP bounds the makespan of every schedule without migration.

    The requests off the chain enter the LP only through ``2 J`` sums, their busy time and their
    tokens on each kind, so the LP is solved by column generation (Dantzig-Wolfe) over the
    polytope of those sums: a HiGHS master (kept across rounds, re-solved from its last basis)
    holds ``T``, the chain's ``y``, ``X``, the curves and a convex combination of assignments of
    the others; each round prices every request at the master's duals (each goes to the kind of
    least reduced cost, ``O(J R)`` with numpy) and adds that assignment as a column. The master's
    value bounds the LP from above and the master's value plus the least reduced cost (the
    Lagrangian bound, a feasible dual solution of the whole LP) from below; the rounds stop when
    the two agree to :data:`CHAIN_LP_TOLERANCE`, when the least reduced cost is that of a column
    the master has already (negative only by HiGHS's dual tolerance: the master's optimum is then
    the LP's, to HiGHS's tolerances), when the master shows that the LP cannot exceed ``floor``
    (the caller's best bound so far, seconds: the LP could not lift it), or at
    :data:`CHAIN_LP_ROUNDS` / :data:`CHAIN_LP_TIME_LIMIT_S`. The Lagrangian bound (the master's
    optimum in the second case) is returned, less HiGHS's feasibility tolerance in relative terms
    (as the whole LP's optimum was before, :func:`_chain_coupling_lp_reference`, to which it
    agrees to 1e-9 relative); 0 when the LP is skipped (one kind, or above
    :data:`CHAIN_LP_FAST_MAX_COLUMNS`).
    """
    if not _CHAIN_LP_FAST:
        return _chain_coupling_lp_reference(problem, o, chain, fused, curves, head)
    import highspy

    terms = _chain_lp_terms(problem, o, chain, fused, CHAIN_LP_FAST_MAX_COLUMNS)
    if terms is None:
        return 0.0
    count, clients, a, work = terms["count"], terms["clients"], terms["a"], terms["work"]
    J = work.shape[0]
    deadline = time.perf_counter() + CHAIN_LP_TIME_LIMIT_S
    in_chain = terms["in_chain"]
    others = ~in_chain
    o_chain, o_others = o[in_chain], o[others]
    w_chain, w_others = work[:, in_chain], work[:, others]
    n = int(in_chain.sum())
    lines = _tangents(curves)
    inf = highspy.kHighsInf
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    # the pricing reads the master's duals: tight tolerances keep their noise below what the rounds
    # must tell apart (at the default 1e-7 an improving column could hide behind a duplicate)
    h.setOptionValue("primal_feasibility_tolerance", 1e-10)
    h.setOptionValue("dual_feasibility_tolerance", 1e-10)
    # columns: T, y[j, i] for the chain's requests (J n, kind-major), X_j (J), G_l (one per curve),
    # then the assignments of the others (added by the rounds)
    col_y = lambda j: 1 + j * n + np.arange(n)  # noqa: E731
    col_x, col_g = 1 + J * n, 1 + J * n + J
    n_cols = col_g + len(lines)
    for _ in range(n_cols):
        h.addVar(0.0, inf)
    h.changeColCost(0, 1.0)

    def row(lo: float, hi: float, cols, vals) -> int:
        cols = np.asarray(cols, dtype=np.int32).ravel()
        vals = np.broadcast_to(np.asarray(vals, dtype=np.float64), cols.shape).ravel()
        h.addRow(lo, hi, cols.size, cols, np.ascontiguousarray(vals))
        return h.getNumRow() - 1

    for i in range(n):  # sum_j y[j, i] = 1 for the chain's requests
        row(1.0, 1.0, [col_y(j)[i] for j in range(J)], 1.0)
    busy, cap = [], []
    for j in range(J):
        # kind j busy <= n_j T: the chain's work with its steps at a_j each (S_j), the others' sums,
        # less a_j / C_j per co-running token
        busy.append(row(-inf, 0.0, np.r_[col_y(j), col_x + j, 0],
                        np.r_[w_chain[j] + a[j] * o_chain, -a[j] / clients[j], -count[j]]))
        row(-inf, 0.0, np.r_[col_x + j, col_y(j)], np.r_[1.0, -(clients[j] - 1.0) * o_chain])  # X_j <= (C_j - 1) S_j
        cap.append(row(-inf, 0.0, [col_x + j], 1.0))  # X_j <= the others' tokens on j (the sums)
    chain_time = terms["chain_time"]
    for g, (shift, slopes, offsets) in enumerate(lines):
        # the chain: sum_j t[j, i] y[j, i] + G_l - shift_l <= T - h
        row(-inf, shift - head, np.r_[np.concatenate([col_y(j) for j in range(J)]), col_g + g, 0],
            np.r_[chain_time.ravel(), 1.0, -1.0])
        for s, off in zip(slopes.tolist(), offsets.tolist()):  # G_l >= slope X - offset
            row(-inf, off, np.r_[col_x + np.arange(J), col_g + g], np.r_[np.full(J, s), -1.0])
    convex = row(1.0, 1.0, [], [])
    busy_rows, cap_rows = np.array(busy), np.array(cap)
    rows_of_column = np.r_[busy_rows, cap_rows, convex].astype(np.int32)
    cols_r = np.arange(w_others.shape[1])

    added: set[bytes] = set()

    def add_assignment(kind: np.ndarray) -> bool:
        """Add the column of an assignment of the others; False if the master has it already."""
        sums_work = np.bincount(kind, weights=w_others[kind, cols_r], minlength=J)
        sums_tokens = np.bincount(kind, weights=o_others, minlength=J)
        column = np.r_[sums_work, -sums_tokens, 1.0]
        if column.tobytes() in added:
            return False
        added.add(column.tobytes())
        h.addCol(0.0, 0.0, inf, rows_of_column.size, rows_of_column, column)
        return True

    # seeds: every request on one kind, for each kind, and each request on its kind of least work per instance
    for j in range(J):
        add_assignment(np.full(cols_r.size, j, dtype=np.int64))
    add_assignment(np.argmin(w_others / count[:, None], axis=0))
    optimal = highspy.HighsModelStatus.kOptimal
    lower = 0.0
    for _ in range(CHAIN_LP_ROUNDS):
        h.run()
        if h.getModelStatus() != optimal:
            break
        upper = float(h.getInfo().objective_function_value)
        duals = np.asarray(h.getSolution().row_dual, dtype=np.float64)
        # reduced cost of an assignment: sum_r (-dual_busy[j_r] work[j_r, r] + dual_cap[j_r] o_r) - dual_convex
        price = -duals[busy_rows][:, None] * w_others + duals[cap_rows][:, None] * o_others[None, :]
        kind = np.argmin(price, axis=0)
        least = float(price[kind, cols_r].sum()) - float(duals[convex])
        lower = max(lower, upper + min(least, 0.0))
        if upper * (1.0 - 1e-7) <= floor or upper - lower <= CHAIN_LP_TOLERANCE * max(1.0, abs(upper)):
            break
        if time.perf_counter() > deadline:
            break
        if not add_assignment(kind):
            # the least reduced cost is a column the master has already: below zero only by HiGHS's
            # dual tolerance, so no assignment improves the master and its optimum is the LP's (to
            # HiGHS's tolerances, as the whole LP's optimum in _chain_coupling_lp_reference); the
            # returned value, shrunk by 1e-7, is then still below this round's Lagrangian bound
            if -least <= 1e-7 * abs(upper):
                lower = max(lower, upper)
            break
    # less HiGHS's feasibility tolerance in relative terms
    return lower * (1.0 - 1e-7)


def _chain_coupling_lp_reference(problem: Problem, o: np.ndarray, chain, fused: bool, curves: list,
                                 head: float) -> float:
    """The LP of :func:`_chain_coupling_lp` built whole and solved by ``linprog`` (HiGHS), seconds; 0 if skipped.

    The path before column generation, kept for the tests and the benchmark's ``--reference``; its
    feasibility tolerances are now 1e-10 (at HiGHS's default, 1e-7, its optimum was up to 2e-9
    off in relative terms, which column generation with tight tolerances showed). HiGHS's optimum
    is returned, less its feasibility tolerance in relative terms, when it solves to optimality
    (0 otherwise, or above :data:`CHAIN_LP_MAX_COLUMNS`).
    """
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    terms = _chain_lp_terms(problem, o, chain, fused, CHAIN_LP_MAX_COLUMNS)
    if terms is None:
        return 0.0
    count, clients, a, work = terms["count"], terms["clients"], terms["a"], terms["work"]
    chain_time, in_chain = terms["chain_time"], terms["in_chain"]
    J, R = work.shape
    others = ~in_chain
    lines = _tangents(curves)
    # columns: T, y[j, r] (J R), S_j (J), X_j (J), G_l (one per curve)
    n_cols = 1 + J * R + 2 * J + len(lines)
    col_y = lambda j: 1 + j * R + np.arange(R)  # noqa: E731
    col_s, col_x, col_g = 1 + J * R, 1 + J * R + J, 1 + J * R + 2 * J
    eq_r, eq_c, eq_v = [], [], []
    ub_r, ub_c, ub_v, b_ub = [], [], [], []

    def put(rows, cols, vals, r, c, v):
        rows.append(np.broadcast_to(np.asarray(r), np.shape(c)).ravel())
        cols.append(np.asarray(c).ravel())
        vals.append(np.broadcast_to(np.asarray(v, dtype=np.float64), np.shape(c)).ravel())

    for j in range(J):
        put(eq_r, eq_c, eq_v, np.arange(R), col_y(j), 1.0)  # sum_j y[j, r] = 1
    put(eq_r, eq_c, eq_v, R + np.arange(J), col_s + np.arange(J), 1.0)  # S_j = chain tokens on j
    b_eq = np.concatenate([np.ones(R), np.zeros(J)])
    row = 0
    for j in range(J):
        put(eq_r, eq_c, eq_v, R + j, col_y(j)[in_chain], -o[in_chain])
        # kind j's instances: busy <= n_j T
        put(ub_r, ub_c, ub_v, row, col_y(j), work[j])
        put(ub_r, ub_c, ub_v, row, [col_s + j, col_x + j, 0], [a[j], -a[j] / clients[j], -count[j]])
        b_ub.append(0.0)
        # co-runners: X_j <= (C_j - 1) S_j and X_j <= the others' tokens on j
        put(ub_r, ub_c, ub_v, row + 1, [col_x + j, col_s + j], [1.0, -(clients[j] - 1.0)])
        put(ub_r, ub_c, ub_v, row + 2, col_x + j, 1.0)
        put(ub_r, ub_c, ub_v, row + 2, col_y(j)[others], -o[others])
        b_ub += [0.0, 0.0]
        row += 3
    for g, (shift, slopes, offsets) in enumerate(lines):
        # the chain: sum_j t[j, r] y[j, r] + G_l - shift_l <= T - h
        for j in range(J):
            put(ub_r, ub_c, ub_v, row, col_y(j)[in_chain], chain_time[j])
        put(ub_r, ub_c, ub_v, row, [col_g + g, 0], [1.0, -1.0])
        b_ub.append(shift - head)
        row += 1
        # G_l >= slope_i X - offset_i along supporting lines of the convex curve
        for s, off in zip(slopes.tolist(), offsets.tolist()):
            put(ub_r, ub_c, ub_v, row, np.append(col_x + np.arange(J), col_g + g), np.append(np.full(J, s), -1.0))
            b_ub.append(off)
            row += 1
    a_eq = coo_matrix((np.concatenate(eq_v), (np.concatenate(eq_r), np.concatenate(eq_c))), shape=(R + J, n_cols))
    a_ub = coo_matrix((np.concatenate(ub_v), (np.concatenate(ub_r), np.concatenate(ub_c))), shape=(row, n_cols))
    cost = np.zeros(n_cols)
    cost[0] = 1.0
    # feasibility tolerances of 1e-10 (HiGHS's default 1e-7 left optima up to 2e-9 off, relative):
    # an accurate reference for the column generation of _chain_coupling_lp
    res = linprog(cost, A_ub=a_ub.tocsr(), b_ub=np.array(b_ub), A_eq=a_eq.tocsr(), b_eq=b_eq,
                  bounds=(0, None), method="highs",
                  options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10})
    if res.status != 0:
        return 0.0
    # the LP optimum, less HiGHS's feasibility tolerance in relative terms
    return float(res.fun) * (1.0 - 1e-7)


def _coupled_root(m: int, k: float, rate: float, x_max: float, base: float,
                  cum_tokens: np.ndarray, cum_cost: np.ndarray, slope: np.ndarray) -> float:
    """The least ``T`` with ``m T >= k - rate min(x_max, X(T - base))``, ``X`` the curve's tokens per budget, s.

    ``phi(T) = m T - k + rate min(x_max, X(T - base))`` increases with ``T`` and is piecewise linear,
    so its root is found exactly: it is the larger of the root with ``x_max`` (``(k - rate x_max) / m``)
    and the root along the curve, located among the curve's breakpoints and interpolated. The result
    is shrunk by a relative 1e-12 so that rounding never lifts it above the true root.
    """
    capped = (k - rate * x_max) / m
    times = base + np.concatenate([[0.0], cum_cost])
    phi = m * times - k + rate * np.concatenate([[0.0], cum_tokens])
    j = int(np.searchsorted(phi, 0.0, side="left"))  # first breakpoint with phi >= 0 (phi increases)
    if j == 0:
        along = k / m  # no budget yet at the root: no co-running token
    elif j == phi.size:
        along = (k - rate * float(cum_tokens[-1])) / m  # every token affordable
    else:
        along = float(times[j - 1]) - float(phi[j - 1]) / (m + rate / float(slope[j - 1]))
    return max(capped, along) * (1.0 - 1e-12)


def _cheapest_tokens(p: np.ndarray, o: np.ndarray, chain, c_s: float, c_kv: float,
                     entry: np.ndarray | None = None, carry_ins: int = 0):
    """``g^-1``: most tokens outside ``chain`` whose slow-downs of the chain sum to at most a budget (fractional).

    Token ``k`` of request ``r`` costs ``c_s + c_kv (p_r + k - 1)``, seconds; the cheapest ones
    come first, read off a histogram of the KV tokens read (one bin per token count).

    With ``entry`` (seconds per request, e.g. its prompt's prefill), a request that decodes beside
    the chain also costs its entry once, except for at most ``carry_ins`` requests (those already
    on the chain's instance when a chain request started there). Request ``r``'s ``x`` tokens then
    cost at least ``F_r(x) + eps_r [x > 0]`` with ``eps_r = min(entry_r, lambda)``, less
    ``lambda carry_ins`` in all, for every ``lambda >= 0`` (a Lagrangian relaxation of the choice
    of the carry-ins); ``F_r(x) + eps_r [x > 0]`` is bounded below by its convex envelope (a first
    segment to the ``x*`` of least cost per token, then the tokens' own costs), whose cheapest
    ``X`` tokens are a greedy by slope. So a budget ``B`` affords at most
    ``min_lambda cap_lambda(B + lambda carry_ins)`` tokens, ``cap_0`` the plain histogram above;
    ``lambda`` runs over quantiles of ``entry`` (any set is valid).

    Returns
    -------
    callable
        ``budget_s -> tokens`` (float, non-decreasing; 0 for a budget <= 0).
    """
    curves = _token_curves(p, o, chain, c_s, c_kv, entry, carry_ins)
    if not curves:
        return lambda budget: 0.0

    def capacity(budget: float) -> float:
        if budget <= 0.0:
            return 0.0
        return min(_afford(cum_tokens, cum_cost, slope, budget + shift)
                   for shift, cum_tokens, cum_cost, slope in curves)

    return capacity


def _token_curves(p: np.ndarray, o: np.ndarray, chain, c_s: float, c_kv: float,
                  entry: np.ndarray | None = None, carry_ins: int = 0) -> list[tuple]:
    """The curves of :func:`_cheapest_tokens`: ``(shift, cum_tokens, cum_cost, slope)`` per ``lambda``.

    ``lambda = 0`` first (no entry costs, shift 0); a budget ``B`` buys at most
    ``cap(B + shift)`` tokens along each (see :func:`_afford`). Empty when no request is outside ``chain``.
    """
    keep = np.asarray(o) > 0
    keep[np.asarray(chain, dtype=np.int64)] = False
    pk, ok = p[keep].astype(np.int64), o[keep].astype(np.int64)
    if pk.size == 0:
        return []
    curves = [(0.0, *_token_curve(pk, ok, np.zeros(pk.size), c_s, c_kv))]
    if entry is not None and carry_ins < pk.size:
        e = np.asarray(entry, dtype=np.float64)[keep]
        for lam in np.unique(np.quantile(e, np.linspace(0.0, 1.0, ENTRY_MULTIPLIERS + 1)[1:])):
            if lam > 0:
                curves.append((float(lam) * carry_ins, *_token_curve(pk, ok, np.minimum(e, lam), c_s, c_kv)))
    return curves


#: Multipliers of the co-runners' entry costs the chain-coupling bound tries (count): each is a
#: valid relaxation; more tighten the bound a little and cost one sort each.
ENTRY_MULTIPLIERS = 4


def _token_curve(p: np.ndarray, o: np.ndarray, eps: np.ndarray, c_s: float, c_kv: float):
    """Cumulative tokens and cost of the cheapest tokens, each request's fixed cost ``eps`` spread (convex envelope).

    Request ``r``'s first ``x*`` tokens (``x*`` minimizes ``(F_r(x) + eps_r) / x``) form one segment
    at that mean cost; its later tokens cost ``c_s + c_kv (p_r + k - 1)`` each, binned by the KV
    tokens they read. Returns cumulative tokens, cumulative seconds and slopes, by slope.
    """
    if c_kv > 0:
        root = np.sqrt(2.0 * eps / c_kv)
        cand = np.stack([np.floor(root), np.ceil(root)])
        cand = np.clip(cand, 1, o[None, :]).astype(np.float64)
        mean = eps / cand + c_kv * (cand - 1) / 2
        first = cand[np.argmin(mean, axis=0), np.arange(o.size)]
    else:
        first = np.where(eps > 0, o, 1).astype(np.float64)
    first = np.minimum(first, o).astype(np.int64)
    bulk_slope = c_s + c_kv * (p + (first - 1) / 2.0) + eps / first
    lo, hi = p + first, p + o  # the later tokens read p + x* .. p + o - 1
    top = int(hi.max()) + 1
    diff = np.bincount(lo, minlength=top + 1) - np.bincount(hi, minlength=top + 1)
    count = np.cumsum(diff)[:top].astype(np.float64)
    unit = c_s + c_kv * np.arange(top, dtype=np.float64)
    slope = np.concatenate([bulk_slope, unit])
    tokens = np.concatenate([first.astype(np.float64), count])
    order = np.argsort(slope, kind="stable")
    slope, tokens = slope[order], tokens[order]
    used = tokens > 0
    slope, tokens = slope[used], tokens[used]
    return np.cumsum(tokens), np.cumsum(tokens * slope), slope


def _afford(cum_tokens: np.ndarray, cum_cost: np.ndarray, slope: np.ndarray, budget: float) -> float:
    """Tokens a budget buys along a cumulative (tokens, cost) curve of increasing slopes (fractional)."""
    if budget <= 0.0:
        return 0.0
    i = int(np.searchsorted(cum_cost, budget, side="right"))  # segments 0 .. i-1 fit whole
    if i >= cum_cost.size:
        return float(cum_tokens[-1])
    done_tokens = float(cum_tokens[i - 1]) if i else 0.0
    done_cost = float(cum_cost[i - 1]) if i else 0.0
    return done_tokens + min(float(cum_tokens[i]) - done_tokens, (budget - done_cost) / float(slope[i]))


def _work_bound(problem: Problem, output_tokens: np.ndarray | None = None,
                decode_steps: int | None = None, kv: tuple = (None, None, None), migration: bool = True,
                fleet_lp: bool = False, floor: tuple[float, float] = (-np.inf, -np.inf)) -> LowerBound:
    """The work and critical-path bounds of ``problem`` (everything but the window bound).

    ``fleet_lp``: also the chain-coupling LP of a mixed fleet (:func:`_chain_coupling_lp`; the
    whole problem only, not every window of :func:`_window_bound`, for speed).

    ``floor``: (separate, fused) values, seconds, the caller has no use for a bound at or below:
    a fractional assignment bound whose cheap upper estimate (:func:`_assignment_upper`) is at or
    below the floor (or the bound so far) is not solved, so ``total_s`` / ``fused_s`` may then be
    lower than the bound, but only where the bound is at most the floor.
    """
    w = problem.workload
    p = w.prompt_tokens.astype(np.float64)
    o = (w.output_tokens if output_tokens is None else np.asarray(output_tokens)).astype(np.float64)
    lats = [inst.profile.latency for inst in problem.instances]
    m = len(problem.instances)
    kv_steps = o * p + o * (o - 1) / 2
    per_inst = np.array([l.prefill_per_token_s * p + l.decode_per_seq_s * o + l.decode_per_kv_token_s * kv_steps
                         for l in lats])
    per_req = per_inst.min(axis=0)
    token_s = float(per_req.sum())
    c_max = max(inst.clients for inst in problem.instances)
    a_d = min(l.decode_base_s for l in lats)
    a_p = min(l.prefill_base_s for l in lats)
    areas, caps, starts, sizes, mode_name = _kv_area(problem, o, *kv)
    if m == 1:
        steps = decode_steps_lower_bound(o.astype(np.int64), c_max)
        if decode_steps is not None:
            steps = max(steps, int(decode_steps))
        prefills = int(-(-len(w) // c_max))
        # iterations along the longest chain (one prefill and o decodes per request), one at a time
        chain_iterations = int(o.max()) + 1
        if w.precedence is not None:
            steps = max(steps, int(round(w.precedence.longest_path(o))))
            prefills = max(prefills, w.precedence.depth)
            chain_iterations = int(round(w.precedence.longest_path(o + 1.0)))
        steps_clients = steps
        steps_memory = memory_decode_steps_lower_bound(areas[0], caps[0], c_max, starts[0], sizes[0])
        steps = max(steps_clients, steps_memory)
        decode_base = a_d * steps
        total_iter_work = token_s + decode_base
        total = total_iter_work + a_p * prefills
        # fused: x iterations with a decode (>= steps), y without (>= 1), x + y >= chain_iterations
        if a_p <= a_d:
            fused = total_iter_work + a_p * max(1, chain_iterations - steps)
        else:
            fused = token_s + a_d * max(steps, chain_iterations - 1) + a_p
    else:
        steps_clients = int(np.ceil(o.sum() / c_max / m))
        # pooled over instances: each has at most the largest cache, and a request holds at least
        # its smallest area over the instances
        cap_max = max(caps)
        area_min = float(np.min(np.array(areas), axis=0).sum())
        steps_memory = int(np.ceil(area_min / cap_max / m - 1e-9))
        steps = max(steps_clients, steps_memory)
        prefills = int(-(-len(w) // (c_max * m)))
        decode_base = a_d * max(o.sum() / c_max, area_min / cap_max)
        total = (token_s + decode_base + a_p * len(w) / c_max) / m
        fused = (token_s + decode_base + a_p * m) / m
        kinds: dict[tuple, list[int]] = {}
        for k, inst in enumerate(problem.instances):
            kinds.setdefault((inst.profile.latency, inst.clients, caps[k], float(areas[k].sum())), []).append(k)
        if len(kinds) > 1:
            # instances differ: the fractional assignment bound (module docstring), by its dual,
            # once with the decode steps the clients force and once with those the memory forces
            first = [ks[0] for ks in kinds.values()]
            count = np.array([len(ks) for ks in kinds.values()], dtype=np.float64)
            clients = np.array([problem.instances[k].clients for k in first], dtype=np.float64)
            a_dk = np.array([lats[k].decode_base_s for k in first])[:, None]
            share_clients = o[None, :] / clients[:, None]
            share_memory = np.array([areas[k] / caps[k] for k in first])
            a_pk = np.array([lats[k].prefill_base_s for k in first])[:, None] / clients[:, None]
            for share in (share_clients, share_memory):
                v_fused = per_inst[first] + a_dk * share
                if not _WINDOW_FAST or _assignment_upper(v_fused + a_pk, count) > max(total, floor[0]):
                    total = max(total, fractional_assignment_bound(v_fused + a_pk, count))
                if not _WINDOW_FAST or _assignment_upper(v_fused, count) > max(fused, floor[1]):
                    fused = max(fused, fractional_assignment_bound(v_fused, count))
            if fleet_lp and not migration and np.all(count == 1) and m <= FLEET_RAMP_MAX_INSTANCES:
                # each instance's ramp-up from an empty cache (module docstring, without migration)
                area_k = np.array([areas[k] for k in first])
                ramp_args = (a_dk[:, 0], area_k, [caps[k] for k in first], [starts[k] for k in first], clients,
                             [sizes[k] for k in first])
                fused = max(fused, _fleet_ramp_bound(per_inst[first], *ramp_args, floor=max(fused, floor[1])))
                total = max(total, _fleet_ramp_bound(per_inst[first] + a_pk, *ramp_args, floor=max(total, floor[0])))
    single = float(np.max(w.arrival_s + per_req + min(a_p, a_d) + a_d * o))
    path = _critical_path_s(problem, o, fused=False)
    path_fused = _critical_path_s(problem, o, fused=True)
    if w.precedence is not None:
        pre_total = a_p * (prefills if m == 1 else len(w) / c_max)
        # what the chain-coupling LP must beat to matter (it stops early below: _CHAIN_LP_FAST)
        lp_floor = (max(total, fused, single, path, floor[0]), max(fused, single, path_fused, floor[1]))
        coupled, coupled_fused = _chain_coupling_bound(problem, o, token_s, a_d, c_max, pre_total, a_p * m, migration,
                                                       fleet_lp, lp_floor)
        total, fused = max(total, coupled), max(fused, coupled_fused)
    # separate-iteration schedules are fused schedules too, so the fused bound holds for them
    total = max(total, fused)
    return LowerBound(total_s=max(total, single, path), fused_s=max(fused, single, path_fused), token_s=token_s,
                      decode_base_s=float(decode_base), prefill_base_s=float(a_p * prefills),
                      single_request_s=single, decode_steps=int(steps), prefill_iterations=int(prefills),
                      critical_path_s=path, critical_path_fused_s=path_fused,
                      decode_steps_clients=int(steps_clients), decode_steps_memory=int(steps_memory),
                      kv_area_token_steps=float(sum(float(a.sum()) for a in areas) / len(areas)),
                      kv_mode=mode_name)
