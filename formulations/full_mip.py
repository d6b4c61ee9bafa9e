"""The full serving MIP (paper.md formulation 1), time-indexed over iterations; small instances only.

What it models, for **one instance** (the paper's case), exactly as lloptim's engine runs it:

* a horizon of ``K`` iteration slots; slot ``k`` is a prefill (``y[k] = 1``), a decode
  (``v[k] = 1``) or unused (both 0, zero time; unused slots come last, which breaks symmetry);
* request ``r`` is prefilled in exactly one prefill slot (``s[r, k]``), then takes part in **every**
  decode slot until it has produced ``o_r`` tokens (``d[r, k]``; no pausing, as in the engine), the
  last of them marked ``e[r, k]``; ``q[r, k]`` (continuous, forced 0/1) says ``r`` occupies a
  client in slot ``k`` (from its prefill slot to its last decode, inclusive);
* at most ``C`` requests occupy clients and their KV reservations (``p_r + max_output_r``) fit the
  KV capacity in every slot;
* slot durations follow the latency model: prefill ``a_p + b_p sum p_r s[r, k]``; decode
  ``a_d + b_d |D_k| + c_d sum kv[r, k]``. The KV term is modelled **exactly** with auxiliary
  continuous ``kv[r, k] >= (p_r + o_r) d[r, k] + dc[r, k-1] - o_r`` (``dc`` = decodes done so far),
  a big-M linearization of ``(p_r + dc[r, k-1]) d[r, k]`` with ``M = o_r``; minimizing the makespan
  drives it to equality wherever it matters;
* slot start times ``t[k]``: ``t[k+1] >= t[k] + duration_k``, ``t[k] >= arrival_r`` when ``r`` is
  prefilled in slot ``k``; the objective is ``t[K]``, the makespan, seconds.

**Clients.** There are no assignment variables: the clients of an instance are identical and each
request occupies one contiguous interval of slots, so a schedule with at most ``C`` intervals
overlapping in every slot can always be dealt to ``C`` clients (interval graphs are perfect);
:func:`decode_schedule` recovers the assignment and the per-client order by interval colouring.
Dropping ``R * C`` binaries and their symmetry is what lets HiGHS solve 4-6 request instances.

**Horizon.** Every prefill serves at least one request and every decode advances at least one, so
``K = R + sum(o_r)`` slots hold every schedule and the optimum over them is the true optimum; a
smaller ``horizon`` gives an upper bound only. Size grows like ``K * R``: keep ``sum(o)`` small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lloptim.errors import SpecError
from lloptim.formulations.model import LinearModel, ModelBuilder
from lloptim.problem import Problem

__all__ = ["build_full_mip", "FullMipSchedule", "decode_schedule", "start_from_run", "MAX_FULL_MIP_CELLS"]

#: Largest model :func:`build_full_mip` accepts, in request-slot cells (count of ``R * K``: requests
#: times iteration slots); beyond it branch and bound takes hours, so the build refuses early.
MAX_FULL_MIP_CELLS = 20_000


def build_full_mip(problem: Problem, horizon: int | None = None, makespan_lower: float | None = None) -> LinearModel:
    """The full MIP of ``problem`` (one instance) as a :class:`LinearModel`; objective = makespan, s.

    Parameters
    ----------
    problem
        A single-instance problem with few requests and short outputs.
    horizon
        Iteration slots ``K``; default ``R + sum(output_tokens)`` (exact; see the module docstring).
    makespan_lower
        A valid lower bound on the makespan, seconds (e.g. ``lower_bound(problem).total_s``), put on
        ``t[K]`` so branch and bound stops as soon as an incumbent reaches it.

    Raises
    ------
    SpecError
        Several instances, a horizon too short to serve every request, or a model too large.
    """
    if len(problem.instances) != 1:
        raise SpecError("instances", "the full MIP models one instance", "solve each instance separately")
    w = problem.workload
    R = problem.n_requests
    p = w.prompt_tokens.astype(np.float64)
    o = w.output_tokens.astype(np.float64)
    # hindsight reservations: the cap where the user set one, the true length otherwise (0 means no cap)
    need = (w.prompt_tokens + np.maximum(w.max_output_tokens, w.output_tokens)).astype(np.float64)
    inst = problem.instances[0]
    lat = inst.profile.latency
    K = int(R + o.sum()) if horizon is None else int(horizon)
    if K < int(-(-R // inst.clients)) + int(o.max()):
        raise SpecError("horizon", f"{K} slots cannot serve {R} requests", "raise the horizon or leave it unset")
    if R * K > MAX_FULL_MIP_CELLS:
        raise SpecError("problem", f"full MIP would have {R}x{K} request-slot cells (> {MAX_FULL_MIP_CELLS})",
                        "use the bin-packing formulation, fewer requests or shorter outputs")

    RK = R * K
    rk_r = np.repeat(np.arange(R), K)          # request of cell (r, k), r-major
    rk_k = np.tile(np.arange(K), R)            # slot of cell (r, k)
    cell = np.arange(RK)
    prev = cell - 1                            # cell (r, k-1); invalid where k == 0
    has_prev = rk_k > 0

    b = ModelBuilder("full_mip")
    b.add_block("y", K, 0, 1, integer=True)
    b.add_block("v", K, 0, 1, integer=True)
    b.add_block("s", RK, 0, 1, integer=True)
    b.add_block("d", RK, 0, 1, integer=True)
    b.add_block("e", RK, 0, 1, integer=True)
    b.add_block("q", RK, 0, 1)
    b.add_block("dc", RK, 0, np.repeat(o, K))
    b.add_block("kv", RK, 0, np.inf)
    t_lo = np.zeros(K + 1)
    if makespan_lower is not None:
        t_lo[K] = float(makespan_lower)
    b.add_block("t", K + 1, t_lo, np.inf)

    ones = np.ones(RK)
    b.add_group("prefill_once", R, {"s": (rk_r, cell, ones)}, 1, 1)
    b.add_group("decode_count", R, {"d": (rk_r, cell, ones)}, o, o)
    b.add_group("finish_once", R, {"e": (rk_r, cell, ones)}, 1, 1)
    b.add_group("kind", K, {"y": (np.arange(K), np.arange(K), 1.0), "v": (np.arange(K), np.arange(K), 1.0)}, hi=1)
    b.add_group("prefill_kind", RK, {"s": (cell, cell, 1.0), "y": (cell, rk_k, -1.0)}, hi=0)
    b.add_group("decode_kind", RK, {"d": (cell, cell, 1.0), "v": (cell, rk_k, -1.0)}, hi=0)
    # q[r,k] = q[r,k-1] + s[r,k] - e[r,k-1]: occupancy from the prefill slot to the last decode
    pr = cell[has_prev]
    b.add_group("active", RK, {"q": (np.concatenate([cell, pr]), np.concatenate([cell, prev[has_prev]]),
                                     np.concatenate([ones, -np.ones(pr.size)])),
                               "s": (cell, cell, -1.0), "e": (pr, prev[has_prev], 1.0)}, 0, 0)
    b.add_group("decode_active", RK, {"d": (cell, cell, 1.0), "q": (cell, cell, -1.0)}, hi=0)
    # an occupied client decodes in every decode slot: d >= q - y (no pausing, no empty slot mid-run)
    b.add_group("decode_forced", RK, {"d": (cell, cell, 1.0), "q": (cell, cell, -1.0), "y": (cell, rk_k, 1.0)}, lo=0)
    b.add_group("finish_on_decode", RK, {"e": (cell, cell, 1.0), "d": (cell, cell, -1.0)}, hi=0)
    b.add_group("decode_cumsum", RK, {"dc": (np.concatenate([cell, pr]), np.concatenate([cell, prev[has_prev]]),
                                             np.concatenate([ones, -np.ones(pr.size)])),
                                      "d": (cell, cell, -1.0)}, 0, 0)
    # kv[r,k] >= (p_r + o_r) d[r,k] + dc[r,k-1] - o_r   (exact big-M form of (p_r + dc) * d)
    b.add_group("kv_tokens", RK, {"kv": (cell, cell, 1.0), "d": (cell, cell, -(p + o)[rk_r]),
                                  "dc": (pr, prev[has_prev], -1.0)}, lo=-o[rk_r])
    b.add_group("clients", K, {"q": (rk_k, cell, ones)}, hi=inst.clients)
    b.add_group("kv_capacity", K, {"q": (rk_k, cell, need[rk_r])}, hi=inst.kv_capacity_tokens)
    ks = np.arange(K)
    b.add_group("duration", K, {
        "t": (np.concatenate([ks, ks]), np.concatenate([ks + 1, ks]), np.concatenate([np.ones(K), -np.ones(K)])),
        "y": (ks, ks, -lat.prefill_base_s), "v": (ks, ks, -lat.decode_base_s),
        "s": (rk_k, cell, -lat.prefill_per_token_s * p[rk_r]), "d": (rk_k, cell, -lat.decode_per_seq_s),
        "kv": (rk_k, cell, -lat.decode_per_kv_token_s)}, lo=0)
    b.add_group("arrival", RK, {"t": (cell, rk_k, 1.0), "s": (cell, cell, -w.arrival_s[rk_r])}, lo=0)
    b.add_group("used_first", K - 1, {"y": (np.r_[ks[:-1], ks[:-1]], np.r_[ks[:-1], ks[1:]],
                                            np.r_[np.ones(K - 1), -np.ones(K - 1)]),
                                      "v": (np.r_[ks[:-1], ks[:-1]], np.r_[ks[:-1], ks[1:]],
                                            np.r_[np.ones(K - 1), -np.ones(K - 1)])}, lo=0)
    # valid counting cuts (they tighten the LP): at least ceil(R / C) prefills and as many decode
    # slots as the P||Cmax bound on decode steps (lloptim.bounds.decode_steps_lower_bound)
    from lloptim.bounds import decode_steps_lower_bound

    b.add_group("min_prefills", 1, {"y": (np.zeros(K, np.int64), ks, 1.0)}, lo=-(-R // inst.clients))
    b.add_group("min_decodes", 1, {"v": (np.zeros(K, np.int64), ks, 1.0)},
                lo=decode_steps_lower_bound(w.output_tokens, inst.clients))
    cost = np.zeros(b.n_cols)
    cost[b._blocks["t"].stop - 1] = 1.0
    return b.build(cost, meta={"R": R, "K": K, "C": inst.clients})


@dataclass(frozen=True)
class FullMipSchedule:
    """A schedule read off a full-MIP solution.

    Attributes
    ----------
    kinds
        ``"prefill"`` / ``"decode"`` per used slot.
    prefill_slot, finish_slot
        Slot of each request's prefill and of its last decode.
    assignment
        Client (0..C-1) of each request, from interval colouring.
    client_order
        For each client, its requests in the order it serves them.
    makespan_s
        Makespan replayed through the latency model (independent of the MIP's ``t``), seconds.
    """

    kinds: list[str]
    prefill_slot: np.ndarray
    finish_slot: np.ndarray
    assignment: np.ndarray
    client_order: list[list[int]]
    makespan_s: float


def decode_schedule(problem: Problem, model: LinearModel, x: np.ndarray) -> FullMipSchedule:
    """Read the schedule from the column vector ``x`` of :func:`build_full_mip` and replay it.

    The replay recomputes every slot's duration from the latency model (true KV tokens) and the
    arrival waits, so ``makespan_s`` checks the MIP's ``t`` rather than trusting it.

    Parameters
    ----------
    problem : Problem
        The single-instance problem the model was built from (its latency model, prompt and
        output tokens and arrival times, seconds, drive the replay).
    model : LinearModel
        The model of :func:`build_full_mip` (its ``meta`` gives ``R``, ``K`` and ``C``).
    x : numpy.ndarray
        A column vector of ``model``, shape ``(n_cols,)``; the binary blocks are rounded to 0/1.

    Returns
    -------
    FullMipSchedule
        Slot kinds, prefill and finish slots, client assignment and order, and the replayed
        makespan, seconds.
    """
    R, K, C = model.meta["R"], model.meta["K"], model.meta["C"]
    blk = lambda n: np.round(model.block(x, n)).astype(np.int64)  # noqa: E731
    y, v = blk("y"), blk("v")
    s, d, e = (blk(n).reshape(R, K) for n in ("s", "d", "e"))
    start, finish = s.argmax(axis=1), e.argmax(axis=1)
    lat = problem.instances[0].profile.latency
    w = problem.workload
    kinds, t = [], 0.0
    done = np.zeros(R, dtype=np.int64)
    for k in range(K):
        if y[k]:
            rs = np.flatnonzero(s[:, k])
            t = max(t, float(w.arrival_s[rs].max(initial=0.0)))
            t += lat.prefill_time(float(w.prompt_tokens[rs].sum()))
            kinds.append("prefill")
        elif v[k]:
            rs = np.flatnonzero(d[:, k])
            t += lat.decode_time(rs.size, float((w.prompt_tokens[rs] + done[rs]).sum()))
            done[rs] += 1
            kinds.append("decode")
    # interval colouring: serve requests in prefill order, each on a client whose last request ended
    free_at = np.full(C, -1)
    assignment = np.full(R, -1, dtype=np.int64)
    order: list[list[int]] = [[] for _ in range(C)]
    for r in np.argsort(start, kind="stable"):
        c = int(np.flatnonzero(free_at < start[r])[0])
        assignment[r] = c
        free_at[c] = finish[r]
        order[c].append(int(r))
    return FullMipSchedule(kinds, start, finish, assignment, order, t)


def start_from_run(model: LinearModel, run) -> np.ndarray:
    """A feasible column vector of :func:`build_full_mip` from a simulator run (a MIP start).

    ``run`` is a :class:`lloptim.runtime.engine.RunResult` of a prefill/decode policy (no fused
    iterations) on the same one-instance problem; its iterations become the first slots.

    Parameters
    ----------
    model : LinearModel
        The model of :func:`build_full_mip` (its ``meta`` gives ``R`` and ``K``).
    run : lloptim.runtime.engine.RunResult
        The simulator run: its iteration trace (kinds and start times, seconds), per-request
        prefill and finish times (seconds) and problem (prompt and output tokens) are read.

    Returns
    -------
    numpy.ndarray
        Column vector of ``model``, shape ``(n_cols,)``, float64: the run's slots, occupancy,
        decode counts, KV tokens and slot start times (seconds; slots after the run start at its
        makespan).

    Raises
    ------
    SpecError
        If the run used fused iterations or more slots than the horizon.
    """
    R, K = model.meta["R"], model.meta["K"]
    kinds = np.asarray(run.trace_kind)
    starts = np.asarray(run.trace_start_s)
    n_it = kinds.size
    if n_it > K or np.any(kinds > 1):
        raise SpecError("run", "the run does not fit the full MIP (fused iterations or too many)",
                        "simulate with a prefill/decode policy such as 'lpt'")
    x = np.zeros(model.n_cols)
    put = lambda n, vals: x.__setitem__(model.var_blocks[n], vals)  # noqa: E731
    y, v = np.zeros(K), np.zeros(K)
    y[:n_it] = kinds == 0
    v[:n_it] = kinds == 1
    s, d, e, q = (np.zeros((R, K)) for _ in range(4))
    prob = run.problem
    p = prob.workload.prompt_tokens
    kv = np.zeros((R, K))
    for r in range(R):
        kp = int(np.flatnonzero((kinds == 0) & (starts == run.prefill_start_s[r]))[0])
        dec = np.flatnonzero((kinds == 1) & (starts >= run.prefill_end_s[r]) & (starts < run.done_s[r]))
        s[r, kp] = 1
        d[r, dec] = 1
        e[r, dec[-1]] = 1
        q[r, kp: dec[-1] + 1] = 1
        kv[r, dec] = p[r] + np.arange(dec.size)
    dc = np.cumsum(d, axis=1)
    t = np.zeros(K + 1)
    t[:n_it] = starts
    t[n_it:] = run.makespan_s
    for name, val in (("y", y), ("v", v), ("s", s), ("d", d), ("e", e), ("q", q), ("dc", dc), ("kv", kv), ("t", t)):
        put(name, np.ravel(val))
    return x
