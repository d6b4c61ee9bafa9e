"""Is the bound loose or are the schedules bad? Small mixed fleets under Poisson overload.

On mixed fleets under 150-200 % load every policy ended 26-120 % above ``lower_bound`` (the
``fleet-mixed`` class of ``benchmarks/stress_flow.py``). This script measures, on small cases of
that class (30 and 60 heavy-tailed requests, 2 or 3 instances of speeds 1x / 1.6x / 2.5x with 2-8
clients, loads 1.5 and 2.0), a chain

    old bound <= lower_bound <= integer bound <= optimum <= best schedule found

* ``old``: :func:`~lloptim.lower_bound` without the release-date fleet term (as before it);
* ``lp``: :func:`~lloptim.lower_bound` with ``migration=False`` (the schedules here do not migrate),
  whose new term is :func:`~lloptim.bounds.fleet_release_bound`, the LP relaxation of the
  assignment of requests to instances;
* ``mip``: the same model with 0/1 assignments (written with :class:`lloptim.Model` from
  :func:`~lloptim.bounds.release_terms`, solved by HiGHS with a time limit; its *proven* dual
  bound at each guess, so a valid bound at any limit), the same search over eligibility guesses;
* ``best``: the least makespan of every registered policy, and of *pinned* schedules that run the
  MIP's assignment (each request on its instance, longest first, the hybrid's iteration rule; a
  clairvoyant assignment, but a real schedule of the simulator).

``lp -> mip`` is what integrality adds to the LP; ``mip -> best`` is the gap no bound here closes:
part of it is the schedules', part what the model relaxes (the order of iterations: a request's
steps are charged only their own and their instance's per-token costs).

Run: ``python benchmarks/fleet_release.py [--seeds 3] [--first-seed 0] [--sizes 30,60]
[--time-limit 10]``; prints one line per case and a summary.
"""

from __future__ import annotations

import argparse
import heapq
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stress_flow as S  # noqa: E402

import lloptim  # noqa: E402
from lloptim import bounds as B  # noqa: E402
from lloptim import Problem, lower_bound, run_policy  # noqa: E402
from lloptim.runtime.lagrangian import LagrangianIterations  # noqa: E402
from lloptim.runtime.policy import Policy, RequestScheduler  # noqa: E402
from lloptim.runtime.registry import policy_names  # noqa: E402


@contextmanager
def without_release_term():
    """``lower_bound`` as it was before the release-date fleet term (the term skipped by its size guard)."""
    kept = B.FLEET_RELEASE_MAX_COLUMNS
    B.FLEET_RELEASE_MAX_COLUMNS = 0
    try:
        yield
    finally:
        B.FLEET_RELEASE_MAX_COLUMNS = kept


def mip_bound(problem: Problem, start: float, time_limit_s: float) -> tuple[float, np.ndarray | None, int]:
    """The release-date model with 0/1 assignments: bound, s, the assignment at the last guess, MIP solves.

    The search of :func:`~lloptim.bounds.fleet_release_bound` over eligibility guesses, each
    guess a MIP solved by HiGHS (its proven dual bound is used: valid at any limit).
    """
    terms = B.release_terms(problem)
    if terms is None:
        return 0.0, None, 0
    head, alone, th = terms["head"], terms["alone"], terms["thresholds"]
    cost, rem, base, clients = terms["cost"], terms["remaining"], terms["base"], terms["clients"]
    m, R = alone.shape
    nt = th.size
    finish = head[None, :] + alone

    def solve(guess: float) -> tuple[float, np.ndarray | None]:
        model = lloptim.Model("fleet-release")
        y = model.add_variables("y", coords={"instance": m, "request": R}, integer=True,
                                upper=(finish <= guess).astype(float))
        d = model.add_variables("D", coords={"instance": m, "threshold": nt})
        T = model.add_variables("T")
        model.add_constraints("assign", y.sum("instance") == 1)
        model.add_constraints("finish", (alone * y).sum("instance") + head <= T)
        for k in range(m):
            for j in range(nt):
                model.add_constraints(f"busy_{k}_{j}", (cost[k, j] * y[k]).sum() + base[k] * d[k, j] <= T - th[j])
                model.add_constraints(f"clients_{k}_{j}", (rem[k, j] / clients[k] * y[k]).sum() <= d[k, j])
                model.add_constraints(f"memory_{k}_{j}",
                                      (terms["area"][k, j] / terms["capacity"][k] * y[k]).sum() <= d[k, j])
                top = terms["longest"][k][j]
                if top.size:
                    model.add_constraints(f"longest_{k}_{j}", rem[k, j, top] * y[k][top] <= d[k, j])
            model.add_constraints(f"later_{k}", d[k, 1:] <= d[k, :-1])
        model.minimize(T)
        res = lloptim.solve(model, "highs", lloptim.SolveParams(time_limit_s=time_limit_s, rel_gap=1e-4))
        if res.status == "infeasible":
            return math.inf, None
        if res.dual_bound is None:
            return -math.inf, None
        assign = None if res.primal_bound is None else np.asarray(res.value(y)).argmax(axis=0)
        return float(res.dual_bound), assign

    breaks = np.unique(finish[finish > start])
    guesses = np.r_[start, breaks]
    value, assign = solve(start)
    solves = 1
    if not value > start:
        return start, assign, solves
    guesses = guesses[guesses <= value]

    def following(i: int) -> float:
        return float(guesses[i + 1]) if i + 1 < guesses.size else math.inf

    best, low, high = min(following(0), value), 0, guesses.size - 1
    while low < high:
        mid = (low + high + 1) // 2
        v, a = solve(float(guesses[mid]))
        solves += 1
        if v == -math.inf:
            break
        best = max(best, min(following(mid), v))
        if v > guesses[mid]:
            low, assign = mid, (a if a is not None else assign)
        else:
            high = mid - 1
    return best * (1 - 1e-7), assign, solves


class Pinned(RequestScheduler):
    """Each request on a given instance: an idle client takes its instance's longest ready request."""

    def __init__(self, instance_of: np.ndarray) -> None:
        self.instance_of = np.asarray(instance_of, dtype=np.int64)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.client_instance = ctx.problem.client_instance()
        self.queues = {k: [] for k in range(len(ctx.problem.instances))}
        self.estimates = np.asarray(ctx.estimates, dtype=np.float64)
        self.waiting = 0

    def on_ready(self, request: int, now: float) -> None:
        heapq.heappush(self.queues[int(self.instance_of[request])], (-self.estimates[request], request))
        self.waiting += 1

    def pending(self) -> int:
        return self.waiting

    def next_request(self, state, client: int):
        queue = self.queues[int(self.client_instance[client])]
        if not queue:
            return None
        self.waiting -= 1
        return heapq.heappop(queue)[1]

    def requeue(self, request: int, now: float) -> None:
        self.on_ready(request, now)


def cases(seed: int, sizes: list[int]):
    """``(label, problem)``: heavy-tailed requests on a small mixed fleet at 150 and 200 % load."""
    rng = np.random.default_rng([0xF1EE7, seed])
    for n in sizes:
        k = int(rng.integers(2, 4))
        speeds = (1.0, 1.6, 2.5)[:k]
        clients = tuple(int(c) for c in rng.choice([2, 4, 8], k))
        prob = Problem(S.heavy(n, 1000 + seed), S.fleet(speeds, clients, S.BIG_KV))
        for load in (1.5, 2.0):
            yield f"n{n} {k} inst c{'/'.join(map(str, clients))} load {load:.1f}", S.with_load(prob, load, seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--sizes", default="30,60")
    ap.add_argument("--time-limit", type=float, default=10.0, help="seconds per MIP solve")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    names = [n for n in policy_names() if n not in ("offline",)]
    print(f"{'case':<32} {'old':>7} {'lp':>7} {'mip':>7} {'best':>7}  best by       lp-old  mip-lp best-mip"
          f"  hybrid  best policy")
    rows = []
    t_all = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for label, prob in cases(seed, sizes):
            with without_release_term():
                old = lower_bound(prob, migration=False).total_s
            lb = lower_bound(prob, migration=False)
            lp = lb.total_s
            mip, assign, _ = mip_bound(prob, lp / (1 - 1e-7), args.time_limit)
            mip = max(mip, lp)
            runs = {}
            for name in names:
                res = run_policy(prob, name)
                if not np.any(res.migrations > 0):
                    runs[name] = res.makespan_s
            if assign is not None:
                runs["pinned-mip"] = run_policy(prob, Policy("pinned", Pinned(assign),
                                                             LagrangianIterations(fused=True))).makespan_s
            by = min(runs, key=runs.get)
            best = runs[by]
            peer = min((n for n in runs if n != "pinned-mip"), key=runs.get)
            if min(lp, mip) > best * (1 + 1e-9):
                print(f"!! bound above a makespan: lp {lp} mip {mip} best {best} ({by})")
            rows.append((lp / old - 1, mip / lp - 1, best / mip - 1, runs["hybrid"] / mip - 1, runs[peer] / mip - 1))
            print(f"{seed:>2} {label:<29} {old:7.1f} {lp:7.1f} {mip:7.1f} {best:7.1f}  {by:<12} "
                  f"{100 * rows[-1][0]:+6.1f}% {100 * rows[-1][1]:+6.1f}% {100 * rows[-1][2]:+6.1f}%"
                  f"  {100 * rows[-1][3]:+6.1f}%  {100 * rows[-1][4]:+6.1f}% {peer}", flush=True)
    a = np.array(rows)
    print(f"\n{len(rows)} cases, {time.perf_counter() - t_all:.0f} s: lower_bound over the old bound "
          f"{100 * a[:, 0].mean():+.1f}% mean (max {100 * a[:, 0].max():+.1f}%); integer bound over lower_bound "
          f"{100 * a[:, 1].mean():+.1f}% (max {100 * a[:, 1].max():+.1f}%); best schedule over the integer bound "
          f"{100 * a[:, 2].mean():+.1f}% (min {100 * a[:, 2].min():+.1f}%, max {100 * a[:, 2].max():+.1f}%); the hybrid "
          f"{100 * a[:, 3].mean():+.1f}% and the best policy {100 * a[:, 4].mean():+.1f}% over the integer bound")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
