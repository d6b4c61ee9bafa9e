"""Where is the rho 1.0 memory gap: the bound, or the schedules? Exact decode-step optima on small cases.

On :mod:`benchmarks.memory`'s workloads with KV memory at rho 1.0 (the KV-area steps equal the client
steps), the hybrids stay 4-6 % above :func:`lloptim.lower_bound`, whose decode steps are
``max(client steps, memory steps)``. This study measures, on small memory-bound cases of the same
shape, what the *optimum* number of decode steps is, so the gap can be blamed on the bound or on
the schedules:

* **workloads** scaled down from ``benchmarks/memory.py``: ``n`` requests, prompts uniform in
  ``[m/5, 2m]`` tokens, outputs lognormal with median ``m`` and ``sigma`` in {1.0, 1.2, 1.5}, clipped
  to ``[1, 20 m]`` (the full benchmark: ``m = 100``; here ``m = 5`` with 1-token blocks, so the ratios
  prompt / output / block stay those of the benchmark's 16-token blocks), ``C`` clients and a KV
  capacity at which memory binds at ``rho`` (same definition as the benchmark);
* **the bound's decode steps**: ``LowerBound.decode_steps`` (clients, memory with its ramp-up);
* **policies**: every registered policy run by the simulator (paged KV, preemption by recompute),
  decode steps counted as the iterations that advance running requests;
* **upper: a non-preemptive optimum**, a time-indexed MIP (binary ``start[r, t]``: request ``r``
  runs its ``o_r`` decode steps from step ``t`` on, holding ``p_r + k`` KV tokens at its ``k``-th;
  per step at most ``C`` running and ``M`` tokens held), written with :class:`lloptim.Model` and
  solved by HiGHS under a time limit, started from a memory-projecting greedy list schedule. Every
  solution is a schedule the engine could run, so its steps are *achievable*;
* **lower: a preemptive relaxation**, the time-indexed MIP over tokens (``done[j, t]``: token ``j``
  finished by step ``t``; token ``k`` of a request after token ``k - 1``, at most one per step; a
  request that does not decode in a step holds no memory, as a preempted one; recompute costs
  nothing; per step at most ``C`` tokens and ``M`` KV tokens, where ``M`` counts the steps open), its
  *dual bound* at the time limit. Since it relaxes every schedule the engine can run (preemptions
  included), no schedule can do with fewer decode steps.

So ``lower <= OPT <= upper`` and ``bound <= OPT``: if ``upper`` is close to the bound the bound is
tight on those cases and the schedules are at fault; if ``lower`` is well above it, the bound is
loose. All figures are decode steps (the only schedule-dependent term of the bound besides the
prefill iterations: each decode step costs ``decode_base_s``, 0.031 s of llama-65b's ~0.057 s step).

Run: ``python benchmarks/memory_optimum.py [--quick] [--time-limit 60] [--seeds 3]``.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

import lloptim
from lloptim import Problem, Workload, lower_bound, run_policy
from lloptim.memory import decode_area_tokens
from lloptim.runtime.registry import policy_names

MEDIAN = 5
SIGMAS = (1.0, 1.2, 1.5)
RHOS = (1.0, 1.4)


def small_workload(sigma: float, seed: int, n: int, median: int = MEDIAN) -> Workload:
    """``n`` requests: prompts uniform in ``[median/5, 2 median]``, outputs lognormal(``median``, ``sigma``) in ``[1, 20 median]``."""
    rng = np.random.default_rng([seed, int(round(sigma * 100)), n])
    prompt = rng.integers(max(1, median // 5), 2 * median + 1, n)
    output = np.clip(np.rint(rng.lognormal(np.log(median), sigma, n)), 1, 20 * median).astype(np.int64)
    return Workload.from_arrays(prompt, output, name=f"small-s{sigma}-seed{seed}")


def capacity_for(workload: Workload, rho: float, clients: int) -> int:
    """KV capacity (1-token blocks) at which the KV-area steps are ``rho`` times the client steps, tokens."""
    area = float(decode_area_tokens(workload.prompt_tokens, workload.output_tokens, 1).sum())
    cap = int(area / (rho * workload.output_tokens.sum() / clients))
    return max(cap, int((workload.prompt_tokens + workload.output_tokens).max()) + 1)


def decode_steps(res) -> int:
    """Iterations of a run that advance running requests (decode steps and mixed ones with a decode)."""
    kind, running = res.trace_kind, res.trace_running
    return int(((kind == 1) | ((kind == 2) & (running > 0))).sum())


def greedy_nonpreemptive(p: np.ndarray, o: np.ndarray, C: int, M: int, order: np.ndarray) -> np.ndarray:
    """Start steps of a list schedule that never preempts: each step, start waiting requests in ``order``
    while a client is free and the KV memory they will hold fits at every future step (lengths known)."""
    H = 2 * int(o.sum()) + 2  # a serial schedule fits, with room for the last request
    mem = np.zeros(H, dtype=np.int64)
    run = np.zeros(H, dtype=np.int64)
    start = np.full(len(p), -1, dtype=np.int64)
    waiting = list(order)
    t = 0
    while waiting:
        for r in list(waiting):
            if run[t] >= C:
                break
            hold = p[r] + np.arange(1, o[r] + 1)
            if np.all(mem[t:t + o[r]] + hold <= M):
                mem[t:t + o[r]] += hold
                run[t:t + o[r]] += 1
                start[r] = t
                waiting.remove(r)
        t += 1
    return start


def nonpreemptive_mip(p: np.ndarray, o: np.ndarray, C: int, M: int, time_limit_s: float):
    """Minimal decode steps of a schedule without preemption (time-indexed MIP), from the best greedy start.

    Returns ``(steps of the best schedule found, dual bound of the non-preemptive problem, solver
    status, start step of each request in that schedule)``.
    """
    R = len(p)
    rng = np.random.default_rng(0)
    orders = [np.argsort(-o, kind="stable"), np.argsort(o, kind="stable"), np.argsort(-(p + o), kind="stable")]
    orders += [rng.permutation(R) for _ in range(5)]
    starts = [greedy_nonpreemptive(p, o, C, M, order) for order in orders]
    spans = [int(np.max(s + o)) for s in starts]
    best = starts[int(np.argmin(spans))]
    H = min(spans)
    valid = np.arange(H)[None, :] <= (H - o)[:, None]
    # KV held and clients busy at step tau by a request started at t: rows tau, columns (r, t)
    rows, cols, vals = [], [], []
    for r in range(R):
        t = np.arange(H - o[r] + 1)
        k = np.arange(o[r])
        tau = (t[:, None] + k[None, :]).ravel()
        rows.append(tau)
        cols.append(np.repeat(r * H + t, o[r]))
        vals.append(np.tile(p[r] + k + 1, t.size))
    rows, cols, vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals).astype(np.float64)
    A_mem = sp.csr_matrix((vals, (rows, cols)), shape=(H, R * H))
    A_run = sp.csr_matrix((np.ones_like(vals), (rows, cols)), shape=(H, R * H))
    m = lloptim.Model("kv_nonpreemptive")
    s = m.add_variables("start", coords={"request": R, "step": H}, integer=True, upper=valid.astype(float))
    T = m.add_variables("T")
    m.add_constraints("once", s.sum("step") == 1)
    flat = s.flatten()
    m.add_constraints("clients", A_run @ flat <= C)
    m.add_constraints("kv", A_mem @ flat <= M)
    m.add_constraints("finish", ((np.arange(H)[None, :] + o[:, None]) * s).sum("step") <= T)
    m.minimize(T)
    x0 = np.zeros((R, H))
    x0[np.arange(R), best] = 1
    res = lloptim.solve(m, "highs", lloptim.SolveParams(time_limit_s=time_limit_s, rel_gap=1e-9),
                        start={"start": x0, "T": float(H)})
    start = best
    if res.primal_bound is not None and res.primal_bound < H - 0.5:
        start = np.asarray(res.value(s)).argmax(axis=1)
    dual = float(res.dual_bound) if res.dual_bound is not None else float("nan")
    return int(np.max(start + o)), dual, _status(res), start


def preemptive_lower_lp(p: np.ndarray, o: np.ndarray, C: int, M: int, H: int, time_limit_s: float) -> float:
    """A lower bound on the decode steps of every schedule, preemptive ones included: the LP relaxation of
    the time-indexed model over tokens.

    ``done[j, t]`` = token ``j`` finished by the end of step ``t`` (monotone in ``t``, all done by
    ``H - 1``); token ``k`` of a request finished by ``t`` only if token ``k - 1`` was by ``t - 1``
    (one token per request per step). Token ``j`` of a request with prompt ``p`` is its ``k``-th
    and is computed holding ``p + k`` KV tokens; a request holds nothing in a step where it does not
    decode (preempted, or not started), so per step the tokens computed are at most ``C u[t]`` and
    their holdings at most ``M u[t]``, with ``u[t]`` whether step ``t`` runs (non-increasing: a
    schedule's empty steps can be dropped) and ``u[t] = 1`` while a request is unfinished. Every
    engine schedule (recompute costs nothing here) is a 0/1 solution, so the LP optimum bounds them
    all. ``H`` must be at least the optimum (any feasible schedule's steps). Returns the LP optimum,
    or NaN if the solve did not finish.
    """
    R = len(p)
    owner = np.repeat(np.arange(R), o)
    k = np.concatenate([np.arange(1, oi + 1) for oi in o])
    hold = (p[owner] + k).astype(np.float64)
    N = k.size
    first = k == 1
    last = np.r_[first[1:], True]
    m = lloptim.Model("kv_preemptive_bound")
    # token k cannot finish before step k - 1 (0-based)
    ub = (np.arange(H)[None, :] >= (k - 1)[:, None]).astype(float)
    done = m.add_variables("done", coords={"token": N, "step": H}, upper=ub)
    u = m.add_variables("u", coords={"step": H}, upper=1.0)
    m.add_constraints("all_done", done[:, H - 1] == 1)
    m.add_constraints("monotone", done[:, 1:] - done[:, :-1] >= 0)
    nf = np.flatnonzero(~first)
    m.add_constraints("order", done[nf, 1:] - done[nf - 1, :-1] <= 0)
    comp = done - done.shift(1, "step")  # tokens computed at step t
    m.add_constraints("clients", comp.sum("token") - C * u <= 0)
    m.add_constraints("kv", (hold[:, None] * comp).sum("token") - M * u <= 0)
    m.add_constraints("open", u[1:] - u[:-1] <= 0)
    m.add_constraints("busy", u[None, 1:] + done[np.flatnonzero(last), :-1] >= 1)
    m.minimize(u.sum())
    # the time-indexed LP is degenerate: dual simplex crawls, the interior point method finishes
    res = lloptim.solve(m, "highs", lloptim.SolveParams(time_limit_s=time_limit_s,
                                                        solver_options={"solver": "ipm"}))
    return float(res.primal_bound) if _status(res) == "optimal" else float("nan")


def _status(res) -> str:
    return str(getattr(res.status, "value", res.status))


def study_case(sigma: float, rho: float, seed: int, n: int, clients: int, time_limit_s: float,
               policies: list[str], lower_lp: bool = False) -> dict:
    """One small case: the bound, every policy, the non-preemptive MIP and (``lower_lp``) the time-indexed LP, steps."""
    wl = small_workload(sigma, seed, n)
    M = capacity_for(wl, rho, clients)
    problem = Problem.single(wl, "llama-65b", clients=clients, kv_capacity_tokens=M, kv_block_tokens=1)
    lb = lower_bound(problem)
    steps = {name: decode_steps(run_policy(problem, name)) for name in policies}
    p, o = wl.prompt_tokens.astype(np.int64), wl.output_tokens.astype(np.int64)
    t0 = time.perf_counter()
    mip, mip_dual, mip_status, _ = nonpreemptive_mip(p, o, clients, M, time_limit_s)
    best_policy = min(steps, key=steps.get)
    upper = min(mip, steps[best_policy])
    lp = preemptive_lower_lp(p, o, clients, M, upper, max(10 * time_limit_s, 300.0)) if lower_lp else float("nan")
    return {"sigma": sigma, "rho": rho, "seed": seed, "n": n, "clients": clients, "capacity": M,
            "peak": int((p + o).max()), "bound": lb.decode_steps, "bound_clients": lb.decode_steps_clients,
            "bound_memory": lb.decode_steps_memory, "lower_lp": lp, "mip": mip, "mip_dual": mip_dual,
            "mip_status": mip_status,
            "upper": upper, "best_policy": best_policy, "policies": steps, "solve_s": time.perf_counter() - t0}


def refill_deficit(prompt: np.ndarray, output: np.ndarray, capacity: int) -> float:
    """The memory a schedule that keeps every client busy leaves unused on average, fraction of ``capacity``.

    With all ``C`` clients busy, a request that finishes is replaced by one new request: the cache
    drops by ``d = p + o - p_new`` tokens at once, and refills only as the running requests grow, at
    most ``C`` tokens per step. Even with finishes timed perfectly (each one just as the cache is full
    again), the cache is short of ``d / 2`` on average for ``d / C`` steps after it, so the time
    average is ``sum d^2 / (2 sum d)`` (``p_new`` taken as the mean prompt). An estimate of what
    keeping *both* resources full costs (a yardstick for the optimum), not a proven bound: a schedule
    may keep clients idle to refill faster, or park a long request (preempt, recompute) to plug a drop.
    """
    p = np.asarray(prompt, dtype=np.float64)
    d = np.maximum(p + np.asarray(output, dtype=np.float64) - p.mean(), 0.0)
    return float((d ** 2).sum() / (2.0 * d.sum()) / capacity)


def full_scale_case(sigma: float, rho: float, seed: int, policy: str = "hybrid-fused") -> dict:
    """``benchmarks/memory.py``'s workload (1000 requests, 40 clients): the policy's decode steps over the
    bound's, its average use of the clients and of the cache, and :func:`refill_deficit`."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from memory import BLOCK, CLIENTS, capacity_for as full_capacity, memory_workload

    wl = memory_workload(sigma, seed)
    cap = full_capacity(wl, rho)
    M = (cap // BLOCK) * BLOCK
    problem = Problem.single(wl, "llama-65b", clients=CLIENTS, kv_capacity_tokens=cap, kv_block_tokens=BLOCK)
    lb = lower_bound(problem)
    res = run_policy(problem, policy)
    kind, running = res.trace_kind, res.trace_running
    dec = (kind == 1) | ((kind == 2) & (running > 0))
    n, h = running[dec] / CLIENTS, res.trace_kv_tokens[dec] / M
    return {"sigma": sigma, "rho": rho, "seed": seed, "bound": lb.decode_steps, "steps": int(dec.sum()),
            "excess_pct": 100 * (dec.sum() / lb.decode_steps - 1), "clients_used": float(n.mean()),
            "cache_used": float(h.mean()), "refill_pct": 100 * refill_deficit(wl.prompt_tokens, wl.output_tokens, M)}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="sigma 1.0 and 1.5 at rho 1.0, one seed, 10 s limits")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per class (default 3)")
    ap.add_argument("--n", type=int, default=48, help="requests per case (default 48)")
    ap.add_argument("--clients", type=int, default=8, help="clients (default 8)")
    ap.add_argument("--time-limit", type=float, default=20.0, help="seconds for the non-preemptive MIP (default 20)")
    ap.add_argument("--lower-lp", action="store_true",
                    help="also solve the time-indexed preemptive LP (minutes per case; '-' where not solved)")
    ap.add_argument("--full-scale", action="store_true",
                    help="also the benchmark's own 1000-request workloads at rho 1.0: the hybrid's use of both "
                         "resources and the refill yardstick")
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "memory_optimum.csv"),
                    help="where to write the rows (default benchmarks/results/memory_optimum.csv)")
    args = ap.parse_args(argv)
    sigmas, rhos, seeds, tl = SIGMAS, RHOS, range(args.seeds), args.time_limit
    if args.quick:
        sigmas, rhos, seeds, tl = (1.0, 1.5), (1.0,), range(1), min(tl, 10.0)
    policies = list(policy_names())
    print(f"{args.n} requests, {args.clients} clients, outputs median {MEDIAN}, 1-token blocks; decode steps.")
    print("bound: lloptim.lower_bound; upper: best schedule known (non-preemptive MIP, "
          f"{tl:.0f} s, or a policy); OPT lies in [bound, upper]")
    print(f"{'sigma':>5} {'rho':>4} {'seed':>4} {'M':>4} {'peak':>4} {'bound':>5} {'LP':>6} {'upper':>5} "
          f"{'best policy':>17} {'hybrid':>6} {'h-fused':>7} {'up/bnd':>6} {'hf/up':>6}")
    rows = []
    for sigma in sigmas:
        for rho in rhos:
            for seed in seeds:
                row = study_case(sigma, rho, seed, args.n, args.clients, tl, policies, args.lower_lp)
                rows.append(row)
                pol = row["policies"]
                best = row["best_policy"]
                print(f"{sigma:>5} {rho:>4} {seed:>4} {row['capacity']:>4} {row['peak']:>4} {row['bound']:>5} "
                      f"{'-' if np.isnan(row['lower_lp']) else format(row['lower_lp'], '.1f'):>6} {row['upper']:>5} {best[:11]:>11} {pol[best]:>5} {pol['hybrid']:>6} "
                      f"{pol['hybrid-fused']:>7} {row['upper'] / row['bound']:>6.3f} "
                      f"{pol['hybrid-fused'] / row['upper']:>6.3f}", flush=True)
    if rows:
        up = np.array([r["upper"] / r["bound"] for r in rows])
        hf = np.array([r["policies"]["hybrid-fused"] / r["upper"] for r in rows])
        print(f"mean upper/bound {up.mean():.3f} (max {up.max():.3f}); mean hybrid-fused/upper {hf.mean():.3f} "
              f"(max {hf.max():.3f}); upper below every policy in {sum(r['mip'] < min(r['policies'].values()) for r in rows)}"
              f" of {len(rows)} cases")
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as fh:
            out = csv.DictWriter(fh, fieldnames=[k for k in rows[0] if k != "policies"] + policies)
            out.writeheader()
            for r in rows:
                out.writerow({**{k: v for k, v in r.items() if k != "policies"}, **r["policies"]})
    if args.full_scale:
        print("\n1000 requests, 40 clients (benchmarks/memory.py), hybrid-fused, decode steps; refill: the cache a "
              "schedule with every client busy leaves unused (refill_deficit, an estimate)")
        print(f"{'sigma':>5} {'rho':>4} {'seed':>4} {'bound':>6} {'steps':>6} {'excess':>7} {'clients':>7} "
              f"{'cache':>6} {'refill':>6}")
        for sigma in sigmas:
            for rho in (1.0,):
                for seed in seeds:
                    f = full_scale_case(sigma, rho, seed)
                    print(f"{sigma:>5} {rho:>4} {seed:>4} {f['bound']:>6} {f['steps']:>6} {f['excess_pct']:>6.2f}% "
                          f"{f['clients_used']:>7.3f} {f['cache_used']:>6.3f} {f['refill_pct']:>5.2f}%", flush=True)
    return rows


if __name__ == "__main__":
    main()
