"""Chains at time 0 on a fleet: how much of the hybrid's gap to the bound is the schedule's.

The chain study (``benchmarks/workflows.py --configs chains``) leaves the hybrid 3-5 % above the
bound where one chain decides the makespan. This script splits that gap on small analogues, where
a search can afford thousands of simulated runs: the bound below, the hybrid, and the best
schedule a local search finds *in the engine itself* (the same step-time model, fused prompts,
the hybrid's iteration scheduler). The best found is a schedule, so it bounds the optimum from
above: at least ``hybrid - best`` of the gap is the schedule's, at most ``best - bound`` the
bound's (the rest is the search's).

Analogues: ``--chains`` three-step GSM8K chains (:func:`lloptim.workloads.workflows`) on two
instances of ``--clients`` clients. A chain's trade-off is a full batch's step against a lone one
(a third slower on LLaMA-65B at 20 clients), so the per-request costs (decode per sequence and per
KV token, prefill per token) are scaled by ``20 / clients``: a full batch of ``clients`` stretches
a step as 20 do on the real instance, and each request weighs on its instance's rate as in the
benchmark.

Schedules searched: request ``r`` goes to instance ``k_r``; an idle client of instance ``k`` takes
its ready request of best priority while ``k`` runs fewer than ``cap_k`` requests (a pacing limit
held for the whole run). Simulated annealing over ``(k, priority, cap)`` starts from the hybrid's
schedule (each request's instance and start order). The client-chain MIP of ``exact_plan`` is not
used here: its requests take fixed times, and what is at stake is how a batch's size slows the
chain.

Run: ``python benchmarks/chain_gap.py [--chains 14] [--clients 4] [--seeds 1-8] [--iters 1500]``
(about 15-30 s per seed on a shared core).
"""

from __future__ import annotations

import argparse
import heapq
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from lloptim import Instance, Problem, lower_bound, run_policy, workloads
from lloptim.hardware import load_profile
from lloptim.runtime.policy import Policy, RequestScheduler
from lloptim.runtime.registry import make_policy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import int_ranges  # noqa: E402


class ScriptedQueues(RequestScheduler):
    """Each request on a given instance, taken there in a given priority order under a batch cap."""

    def __init__(self, instance: np.ndarray, priority: np.ndarray, cap: list[int]) -> None:
        self.instance, self.priority, self.cap = instance, priority, cap

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.queues: list[list] = [[] for _ in ctx.problem.instances]
        self.n_pending = 0

    def on_ready(self, request: int, now: float) -> None:
        heapq.heappush(self.queues[self.instance[request]], (self.priority[request], request))
        self.n_pending += 1

    def pending(self) -> int:
        return self.n_pending

    def next_request(self, state, client: int) -> int | None:
        queue = self.queues[state.index]
        if not queue or state.n_running >= self.cap[state.index]:
            return None
        self.n_pending -= 1
        return heapq.heappop(queue)[1]

    def on_finish(self, request: int, client: int, output_tokens: int, now: float) -> None:
        pass


def analogue(chains: int, clients: int, seed: int, instances: int = 2) -> Problem:
    """``chains`` three-step chains on ``instances`` LLaMA-65B analogues of ``clients`` clients (module docstring)."""
    base = load_profile("llama-65b")
    lat, scale = base.latency, 20.0 / clients
    lat = replace(lat, decode_per_seq_s=lat.decode_per_seq_s * scale,
                  decode_per_kv_token_s=lat.decode_per_kv_token_s * scale,
                  prefill_per_token_s=lat.prefill_per_token_s * scale)
    profile = replace(base, name=f"llama-65b-analogue-{clients}", latency=lat)
    wl = workloads.workflows("chain", chains, seed=seed)
    return Problem(wl, tuple(Instance.from_profile(profile, clients, kv_capacity_tokens=81_920, name=f"i{k}")
                             for k in range(instances)))


def scripted_makespan(problem: Problem, instance: np.ndarray, priority: np.ndarray, cap: list[int]) -> float:
    """Makespan of the scripted schedule in the engine, seconds (inf if it leaves a request unserved)."""
    policy = Policy("scripted", ScriptedQueues(instance, priority, cap), make_policy("hybrid").iterations)
    done = run_policy(problem, policy).done_s
    return float(done.max()) if np.all(np.isfinite(done)) else np.inf


def search(problem: Problem, start, iters: int, rng: np.random.Generator) -> tuple[float, float, list[int]]:
    """Simulated annealing from the hybrid's run ``start``: (its scripted makespan, best found, best caps)."""
    n = problem.n_requests
    clients = [i.clients for i in problem.instances]
    inst = problem.client_instance()[start.client].astype(np.int64)
    prio = np.argsort(np.argsort(start.assign_s, kind="stable")).astype(np.float64)
    cap = list(clients)
    cur = first = best = scripted_makespan(problem, inst, prio, cap)
    best_cap = list(cap)
    temperature = 0.003 * cur
    for it in range(iters):
        ni, npr, nc = inst.copy(), prio.copy(), list(cap)
        u = rng.random()
        if u < 0.35:
            ni[rng.integers(n)] = rng.integers(len(clients))
        elif u < 0.8:
            npr[rng.integers(n)] += rng.normal(0.0, n / 8)
        elif u < 0.9:
            a, b = rng.integers(n, size=2)
            npr[a], npr[b] = npr[b], npr[a]
        else:
            k = int(rng.integers(len(clients)))
            nc[k] = int(np.clip(nc[k] + rng.choice([-1, 1]), 1, clients[k]))
        v = scripted_makespan(problem, ni, npr, nc)
        t = temperature * (1 - it / iters) + 1e-12
        if v <= cur or rng.random() < np.exp(-(v - cur) / t):
            inst, prio, cap, cur = ni, npr, nc, v
            if v < best:
                best, best_cap = v, list(nc)
    return first, best, best_cap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chains", type=int, default=14, help="three-step chains (count)")
    ap.add_argument("--clients", type=int, default=4, help="clients per instance (two instances)")
    ap.add_argument("--seeds", default="1-8", help="seeds, e.g. 1-8 or 100,101")
    ap.add_argument("--iters", type=int, default=1500, help="simulated-annealing steps per seed")
    args = ap.parse_args()
    print(f"{args.chains} chains on 2 x {args.clients} clients (costs scaled by {20 / args.clients:g}); "
          "gaps above the fused bound without migration, %")
    print(f"{'seed':>5} {'path/bound':>10} {'hybrid':>7} {'best':>7} {'schedule>=':>10} {'bound<=':>8} {'caps':>8} {'s':>4}")
    rows = []
    for seed in int_ranges(args.seeds):
        t0 = time.perf_counter()
        problem = analogue(args.chains, args.clients, seed)
        lb = lower_bound(problem, migration=False)
        res = run_policy(problem, "hybrid")
        hybrid = float(res.done_s.max())
        _, best, cap = search(problem, res, args.iters, np.random.default_rng(seed))
        best = min(best, hybrid)
        g_h, g_b = 100 * (hybrid / lb.fused_s - 1), 100 * (best / lb.fused_s - 1)
        ratio = lb.critical_path_fused_s / lb.fused_s
        rows.append((ratio, g_h, g_b))
        print(f"{seed:>5} {ratio:>10.2f} {g_h:>7.2f} {g_b:>7.2f} {g_h - g_b:>10.2f} {g_b:>8.2f} {str(cap):>8} "
              f"{time.perf_counter() - t0:>4.0f}", flush=True)
    a = np.array(rows)
    for name, mask in (("a chain decides (path/bound >= 0.8)", a[:, 0] >= 0.8), ("the others", a[:, 0] < 0.8)):
        if mask.any():
            print(f"{name}: {int(mask.sum())} seeds, hybrid {a[mask, 1].mean():.2f} %, best found "
                  f"{a[mask, 2].mean():.2f} % (schedule's share at least {a[mask, 1].mean() - a[mask, 2].mean():.2f} "
                  f"points)")


if __name__ == "__main__":
    main()
