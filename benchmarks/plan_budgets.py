"""How much of their work budgets the online plans use, and what a budget costs in wall time.

The rolling plan (:mod:`lloptim.runtime.rolling`: :data:`~lloptim.runtime.rolling.PLAN_WORK` for
the first plan, :data:`~lloptim.runtime.rolling.REVISION_WORK` per revision) and the hybrid's end
game on a fleet (:data:`~lloptim.runtime.endgame.ENDGAME_WORK`) stop their local searches on work,
elements touched (:class:`lloptim.solvers.greedy.WorkBudget`), not on the clock, so that a run
gives the same schedule on an idle and on a loaded machine. This script runs the plan variants
and the hybrid on the benchmark classes where those searches run (mixed fleets at time 0, Poisson
arrivals on one instance and on fleets, heavy-tailed and GSM8K lengths) and prints, per run: the
searches, the most elements one of them touched and its share of its budget, how many ran out of
budget (the budgets are sized so that none does: then the schedule is the one an unlimited search
gives), and the measured throughput (elements per second of the largest search), from which a
budget's wall time on this machine follows.

Run: ``python benchmarks/plan_budgets.py [--quick] [--seeds 0,1]`` (about 2 minutes; ``--quick``
one seed and the fleets at time 0 only). Prints only; nothing is written.
"""

from __future__ import annotations

import argparse
import time

from lloptim import Instance, Problem, load_profile, run_policy, workloads
from lloptim.arrivals import at_load
from lloptim.runtime.endgame import ENDGAME_WORK
from lloptim.runtime.rolling import PLAN_WORK, REVISION_WORK
from lloptim.solvers import greedy

POLICIES = ("hybrid-plan", "hybrid-fused-plan", "hybrid")


class _Recorder:
    """Wraps :class:`~lloptim.solvers.greedy.WorkBudget` to keep every budget of a run and its wall time."""

    def __init__(self) -> None:
        self.budgets: list = []
        self._init = greedy.WorkBudget.__init__
        self._exhausted = greedy.WorkBudget.exhausted
        recorder = self

        def init(budget, work_limit=None, deadline=None):
            recorder._init(budget, work_limit, deadline)
            budget.t0 = budget.t1 = time.perf_counter()
            recorder.budgets.append(budget)

        def exhausted(budget):
            budget.t1 = time.perf_counter()
            return recorder._exhausted(budget)

        greedy.WorkBudget.__init__ = init
        greedy.WorkBudget.exhausted = exhausted

    def take(self) -> list:
        out, self.budgets = self.budgets, []
        return out


def _fleet(n_fast: int, n_slow: int, slow: float, clients: int = 40):
    base = load_profile("llama-65b")
    slower = base.with_latency(base.latency.scaled(slow, slow))
    return tuple(Instance.from_profile(p, clients=clients, kv_capacity_tokens=163_840, name=f"i{k}")
                 for k, p in enumerate([base] * n_fast + [slower] * n_slow))


def cases(seed: int, quick: bool):
    """``(label, problem)`` of the runs for ``seed``."""
    heavy = workloads.synthetic(1500, seed=seed, prompt_median=100, output_median=80, sigma=1.2, max_tokens=1500)
    gsm = workloads.gsm8k_case(1 + seed % 2, 1319)
    for wname, wl in (("gsm8k-train", gsm), ("heavy", heavy)):
        for fname, fleet in (("2+2slow", _fleet(2, 2, 1.5)), ("1+3slow", _fleet(1, 3, 1.5))):
            yield f"{wname} on {fname}, time 0", Problem(wl, fleet)
    if quick:
        return
    for load in (1.2, 1.5, 2.0):
        yield f"heavy, 1 instance, load {load}", at_load(Problem.single(heavy, kv_capacity_tokens=163_840), load, seed)
        yield f"heavy on 2+2slow, load {load}", at_load(Problem(heavy, _fleet(2, 2, 1.5)), load, seed)
        yield f"gsm8k test, 1 instance, load {load}", at_load(Problem.single(workloads.gsm8k("test")), load, seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, fleets at time 0 only")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    args = ap.parse_args()
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    print(f"budgets: first plan {PLAN_WORK:,}, revision {REVISION_WORK:,}, end game {ENDGAME_WORK:,} elements")
    print(f"{'case':38s} {'policy':17s} {'seed':>4s} {'searches':>8s} {'most elements':>13s} {'of budget':>9s} "
          f"{'ran out':>7s} {'M elem/s':>8s}")
    rec = _Recorder()
    t_all = time.perf_counter()
    worst, ran_out, rates = 0.0, 0, []
    for seed in seeds:
        for label, problem in cases(seed, args.quick):
            for name in POLICIES:
                run_policy(problem, name)
                budgets = [b for b in rec.take() if b.work_limit]
                if not budgets:
                    print(f"{label:38s} {name:17s} {seed:4d} {0:8d}")
                    continue
                big = max(budgets, key=lambda b: b.spent)
                share = max(b.spent / b.work_limit for b in budgets)
                out = sum(b.spent >= b.work_limit for b in budgets)
                wall = big.t1 - big.t0
                rate = big.spent / wall / 1e6 if wall > 0 and big.spent >= 100_000 else float("nan")
                if rate == rate:
                    rates.append(rate)
                worst, ran_out = max(worst, share), ran_out + out
                print(f"{label:38s} {name:17s} {seed:4d} {len(budgets):8d} {big.spent:13,d} {100 * share:8.2f}% "
                      f"{out:7d} {rate:8.1f}", flush=True)
    print(f"largest share of a budget {100 * worst:.2f} %, searches that ran out {ran_out}; throughput of the "
          f"searches over 100k elements: {min(rates, default=float('nan')):.0f}-{max(rates, default=float('nan')):.0f} "
          f"M elements/s; wall time {time.perf_counter() - t_all:.1f} s")


if __name__ == "__main__":
    main()
