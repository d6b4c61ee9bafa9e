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
instances pooled), gives a valid bound for *any* ``lambda``, so it is maximized numerically (golden
section for two kinds of instance, exponentiated-gradient ascent for more) and never overstates.
A request can never finish before ``arrival + its own minimal time``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from lloptim.problem import Problem, as_problem

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


def fractional_assignment_bound(work: np.ndarray, count: np.ndarray, iterations: int = 400) -> float:
    """Lower bound on ``min T s.t. sum_r work[j, r] y[j, r] <= count[j] T, sum_j y[j, r] = 1, y >= 0``, seconds.

    The fractional assignment of requests to ``count[j]`` identical machines of kind ``j``. By
    weak duality every ``mu`` in the simplex gives ``g(mu) = sum_r min_j (mu_j / count[j]) work[j, r]
    <= T*``; ``g`` is concave, so it is maximized by golden-section search for two kinds and by
    exponentiated-gradient ascent for more, and the best value seen is returned (never above
    the optimum).

    Parameters
    ----------
    work
        ``(J, R)`` seconds of machine time of request ``r`` on a machine of kind ``j``.
    count
        ``(J,)`` machines of each kind (count).
    iterations
        Iterations of the search.

    Returns
    -------
    float
        The bound, seconds.
    """
    work = np.asarray(work, dtype=np.float64)
    count = np.asarray(count, dtype=np.float64)
    scaled = work / count[:, None]

    def g(mu: np.ndarray) -> float:
        return float((mu[:, None] * scaled).min(axis=0).sum())

    J = work.shape[0]
    if J == 1:
        return g(np.ones(1))
    if J == 2:
        lo, hi = 0.0, 1.0
        ratio = (np.sqrt(5.0) - 1.0) / 2.0
        best = max(g(np.array([0.0, 1.0])), g(np.array([1.0, 0.0])))
        for _ in range(min(iterations, 80)):
            a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
            ga, gb = g(np.array([a, 1.0 - a])), g(np.array([b, 1.0 - b]))
            best = max(best, ga, gb)
            if ga < gb:
                lo = a
            else:
                hi = b
        return best
    mu = np.full(J, 1.0 / J)
    best = g(mu)
    for t in range(1, iterations + 1):
        arg = np.argmin(mu[:, None] * scaled, axis=0)
        grad = np.bincount(arg, weights=scaled[arg, np.arange(scaled.shape[1])], minlength=J)
        step = 1.0 / np.sqrt(t)
        mu = mu * np.exp(step * (grad - grad.max()) / max(float(np.abs(grad).max()), 1e-300))
        mu /= mu.sum()
        best = max(best, g(mu))
    return best


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

    Raises
    ------
    SpecError
        ``problem`` is not a :class:`~lloptim.problem.Problem`.
    """
    problem = as_problem(problem)
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
