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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from lloptim.problem import Problem

__all__ = ["LowerBound", "lower_bound", "decode_steps_lower_bound", "fractional_assignment_bound"]


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
        The lower bound on decode steps used (per instance).
    prefill_iterations
        The lower bound on prefill iterations used (per instance).
    """

    total_s: float
    fused_s: float
    token_s: float
    decode_base_s: float
    prefill_base_s: float
    single_request_s: float
    decode_steps: int
    prefill_iterations: int

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


def fractional_assignment_bound(work: np.ndarray, count: np.ndarray, iterations: int | None = None,
                                return_prices: bool = False):
    """``min T s.t. sum_r work[j, r] y[j, r] <= count[j] T, sum_j y[j, r] = 1, y >= 0``, seconds, exactly.

    The fractional assignment of requests to ``count[j]`` identical machines of kind ``j`` is an LP
    with ``J * R`` columns (400k at 100k requests and 4 kinds, where HiGHS takes minutes). Its
    dual has ``J`` variables: maximize ``g(mu) = sum_r min_j (mu_j / count[j]) work[j, r]`` over the
    simplex, a concave piecewise-linear function. It is solved exactly by Kelley's cutting planes:
    each round evaluates ``g`` and its supergradient at the master's ``mu`` (``O(J R)``) and adds
    that cut to the master LP (``J + 1`` variables, solved by HiGHS through
    ``scipy.optimize.linprog``), until the master's value and the best ``g`` agree to 1e-12
    (relative). The value returned is ``g`` at the best ``mu``: by weak duality a valid bound for
    any ``mu`` on the simplex, so it never overstates the optimum whatever the tolerances, and it
    equals the LP optimum when the rounds converge (they do in a few dozen).

    Parameters
    ----------
    work
        ``(J, R)`` seconds of machine time of request ``r`` on a machine of kind ``j``.
    count
        ``(J,)`` machines of each kind (count).
    iterations
        Most cutting-plane rounds (default 500); the bound is valid whenever it stops.
    return_prices
        Also return ``mu``, the prices of each kind's capacity (dimensionless, summing to 1: makespan
        seconds per second of that kind's total machine time lost).

    Returns
    -------
    float or tuple
        The bound, seconds; with ``return_prices``, ``(bound, mu)``.
    """
    from scipy.optimize import linprog

    work = np.asarray(work, dtype=np.float64)
    count = np.asarray(count, dtype=np.float64)
    J, R = work.shape
    scaled = work / count[:, None]

    def g(mu: np.ndarray) -> tuple[float, np.ndarray]:
        """``g(mu)`` and its supergradient (each kind's share of the scaled work it wins)."""
        if not R:
            return 0.0, np.zeros(J)
        priced = mu[:, None] * scaled
        win = priced.argmin(axis=0)
        return float(priced[win, np.arange(R)].sum()), np.bincount(win, weights=scaled[win, np.arange(R)],
                                                                    minlength=J)

    if J == 1 or not R:
        mu = np.ones(J) / max(J, 1)
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
    cost = np.r_[np.zeros(J), -1.0]                       # maximize z over (mu, z)
    a_eq, b_eq = np.r_[np.ones(J), 0.0][None, :], np.ones(1)
    bounds = [(0, None)] * J + [(None, None)]
    for _ in range(500 if iterations is None else int(iterations)):
        a_ub = np.column_stack([-np.asarray(cuts), np.ones(len(cuts))])  # z - cut . mu <= 0
        res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(len(cuts)), A_eq=a_eq, b_eq=b_eq, bounds=bounds,
                      method="highs")
        if res.status != 0:
            break
        mu = np.clip(res.x[:J], 0.0, None)
        mu /= mu.sum()
        upper = -float(res.fun)
        val, grad = g(mu)
        if val > best:
            best, best_mu = val, mu
        if upper - best <= 1e-12 * max(1.0, abs(upper)):
            break
        cuts.append(grad)
    return (best, best_mu) if return_prices else best


def lower_bound(problem: Problem, output_tokens: np.ndarray | None = None,
                decode_steps: int | None = None) -> LowerBound:
    """Makespan lower bound of ``problem``, seconds.

    Parameters
    ----------
    problem
        The problem.
    output_tokens
        Output lengths to bound with, tokens; default: the workload's true lengths.
    decode_steps
        A proven lower bound on the decode steps of a single instance (e.g. a MIP solver's dual
        bound for the ``P||Cmax`` relaxation); the larger of it and the closed form is used.
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
    if m == 1:
        steps = decode_steps_lower_bound(o.astype(np.int64), c_max)
        if decode_steps is not None:
            steps = max(steps, int(decode_steps))
        prefills = int(-(-len(w) // c_max))
        decode_base = a_d * steps
        total_iter_work = token_s + decode_base
        total = total_iter_work + a_p * prefills
        fused = total_iter_work + a_p
    else:
        steps = int(np.ceil(o.sum() / c_max / m))
        prefills = int(-(-len(w) // (c_max * m)))
        decode_base = a_d * o.sum() / c_max
        total = (token_s + decode_base + a_p * len(w) / c_max) / m
        fused = (token_s + decode_base + a_p * m) / m
        kinds: dict[tuple, list[int]] = {}
        for k, inst in enumerate(problem.instances):
            kinds.setdefault((inst.profile.latency, inst.clients), []).append(k)
        if len(kinds) > 1:
            # instances differ: the fractional assignment bound (module docstring), by its dual
            first = [ks[0] for ks in kinds.values()]
            count = np.array([len(ks) for ks in kinds.values()], dtype=np.float64)
            clients = np.array([problem.instances[k].clients for k in first], dtype=np.float64)
            fixed_d = np.array([lats[k].decode_base_s for k in first])[:, None] * o[None, :] / clients[:, None]
            v_fused = per_inst[first] + fixed_d
            v = v_fused + np.array([lats[k].prefill_base_s for k in first])[:, None] / clients[:, None]
            total = max(total, fractional_assignment_bound(v, count))
            fused = max(fused, fractional_assignment_bound(v_fused, count))
    # separate-iteration schedules are fused schedules too, so the fused bound holds for them
    total = max(total, fused)
    single = float(np.max(w.arrival_s + per_req + min(a_p, a_d) + a_d * o))
    return LowerBound(total_s=max(total, single), fused_s=max(fused, single), token_s=token_s,
                      decode_base_s=float(decode_base), prefill_base_s=float(a_p * prefills),
                      single_request_s=single, decode_steps=int(steps), prefill_iterations=int(prefills))
