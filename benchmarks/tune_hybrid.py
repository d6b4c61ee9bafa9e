"""Choose the hybrid's setup weight on GSM8K *train* cases (never on the test split we report).

For each candidate weight, run the hybrid on ``--cases`` cases of 1319 requests drawn from the
train split, with known lengths and with bucket-quantile estimates (fitted on the train split minus
the case's own requests), and print the mean gap to the lower bound. The winners are the
defaults in ``lloptim.runtime.lagrangian.SETUP_WEIGHT``.

Run: ``python benchmarks/tune_hybrid.py [--cases 8]``.
"""

from __future__ import annotations

import argparse

import numpy as np

from lloptim import Problem, lower_bound, run_policy, summarize, workloads
from lloptim.runtime.estimators import estimate
from lloptim.runtime.hybrid import hybrid_policy

WEIGHTS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1000, help="case seed (distinct from the case study's 0)")
    args = ap.parse_args()
    train = workloads.gsm8k("train")
    gaps = {("known", w): [] for w in WEIGHTS} | {("unknown", w): [] for w in WEIGHTS}
    for k in range(args.cases):
        wl = workloads.gsm8k_case(k, 1319, seed=args.seed)
        problem = Problem.single(wl, "llama-65b")
        bound = lower_bound(problem)
        est = estimate(wl, "bucket-quantile", train=train)
        for w in WEIGHTS:
            gaps[("known", w)].append(summarize(run_policy(problem, hybrid_policy(setup_weight=w)), bound).gap_to_bound)
            gaps[("unknown", w)].append(
                summarize(run_policy(problem, hybrid_policy(setup_weight=w), estimates=est), bound).gap_to_bound)
    for mode in ("known", "unknown"):
        row = {w: float(np.mean(gaps[(mode, w)])) for w in WEIGHTS}
        best = min(row, key=row.get)
        print(f"{mode:8s} " + "  ".join(f"w={w}: {100 * g:.3f} %" for w, g in row.items()) + f"   best w={best}")


if __name__ == "__main__":
    main()
