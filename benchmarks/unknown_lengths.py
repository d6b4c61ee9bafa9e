"""Unknown output lengths: how close the hybrids get to the bound, and what limits them.

Part 1 (no test-split selection): on ``--cases`` cases of 1319 requests drawn from GSM8K *train*
(seed 1000, as ``tune_hybrid.py``), the mean and worst gap to the lower bound of ``hybrid``
(separate prefill iterations, the paper's model) and ``hybrid-fused`` (prompts fused into decode
iterations as chunks), with the true lengths and with each estimator (fitted on the train split
minus the case's own requests).

Part 2 (anatomy, on the GSM8K test case): the separate-iteration hybrid's gap splits exactly into
extra prefill iterations (``prefill_base_s`` each above the bound's count), idle client slots while
work remains (``decode_base_s / C`` per idle slot-step) and idle slots after the last prefill (the
tail). Diagnostic oracles swap in the truth for one decision at a time: the dispatch order
(longest first by the truth) or the iteration forecast (finish steps from the truth).

Writes ``benchmarks/results/unknown_lengths.csv``. Run: ``python benchmarks/unknown_lengths.py [--cases 8]``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from lloptim import Problem, lower_bound, run_policy, summarize, workloads
from lloptim.runtime.estimators import estimate
from lloptim.runtime.lagrangian import LagrangianIterations
from lloptim.runtime.policy import Policy
from lloptim.runtime.request_schedulers import GlobalQueue

POLICIES = ("hybrid", "hybrid-fused")
ESTIMATORS = ("oracle", "mean", "regression", "bucket-quantile")


class _TruthForecast(LagrangianIterations):
    """Oracle: the lookahead forecasts finishes from the true lengths (diagnostic only)."""

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.estimates = ctx.problem.workload.output_tokens.astype(float).tolist()
        self.mode = "exact"


class _OrderedBy(GlobalQueue):
    """Longest first by a given key, whatever the run's estimates (diagnostic only)."""

    def __init__(self, key: np.ndarray) -> None:
        super().__init__("longest")
        self._by = np.asarray(key, dtype=np.float64)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.key = (-self._by).tolist()


def anatomy(result, bound) -> dict:
    """Split a separate-iteration run's gap to the bound into its three parts, seconds."""
    problem = result.problem
    lat = problem.instances[0].profile.latency
    c = problem.n_clients
    kind, start = result.trace_kind, result.trace_start_s
    decode = kind == 1
    idle = (c - result.trace_participants[decode]).astype(np.float64)
    tail = start[decode] > start[kind == 0].max()
    return {"extra_prefills_s": (int((kind == 0).sum()) - bound.prefill_iterations) * lat.prefill_base_s,
            "idle_midrun_s": idle[~tail].sum() / c * lat.decode_base_s,
            "idle_tail_s": idle[tail].sum() / c * lat.decode_base_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1000)
    args = ap.parse_args()
    train = workloads.gsm8k("train")
    rows = []
    gaps = {(p, e): [] for p in POLICIES for e in ESTIMATORS}
    for k in range(args.cases):
        wl = workloads.gsm8k_case(k, 1319, seed=args.seed)
        problem = Problem.single(wl, "llama-65b")
        bound = lower_bound(problem)
        for e in ESTIMATORS:
            est = estimate(wl, e, train=train)
            for p in POLICIES:
                gaps[(p, e)].append(summarize(run_policy(problem, p, estimates=est), bound).gap_to_bound)
    print(f"Part 1: gap to the lower bound on {args.cases} GSM8K-train cases (mean / worst)")
    for p in POLICIES:
        for e in ESTIMATORS:
            g = np.array(gaps[(p, e)])
            print(f"  {p:13s} {e:16s} {100 * g.mean():6.2f} % / {100 * g.max():6.2f} %")
            rows.append({"part": "train cases", "policy": p, "estimator": e, "mean_gap_pct": 100 * g.mean(),
                         "max_gap_pct": 100 * g.max()})

    wl = workloads.gsm8k("test")
    problem = Problem.single(wl, "llama-65b")
    bound = lower_bound(problem)
    est = estimate(wl, "bucket-quantile", train=train)
    truth = wl.output_tokens
    variants = [
        ("bucket-quantile order, accrual rule (the hybrid)", _OrderedBy(est), LagrangianIterations(forecast="none")),
        ("bucket-quantile order, oracle forecast", _OrderedBy(est), _TruthForecast()),
        ("random order, accrual rule", _OrderedBy(np.random.default_rng(0).random(len(wl))),
         LagrangianIterations(forecast="none")),
        ("oracle order, accrual rule", _OrderedBy(truth), LagrangianIterations(forecast="none")),
        ("oracle order, oracle forecast", _OrderedBy(truth), _TruthForecast()),
    ]
    print(f"\nPart 2: anatomy of the separate-iteration hybrid's gap on GSM8K test "
          f"(bound {bound.total_s:.2f} s; bucket-quantile estimates)")
    for name, requests, iterations in variants:
        res = run_policy(problem, Policy(name, requests, iterations), estimates=est)
        m = summarize(res, bound)
        parts = anatomy(res, bound)
        print(f"  {name:50s} gap {100 * m.gap_to_bound:5.2f} %  = extra prefills {parts['extra_prefills_s']:.2f} s"
              f" + mid-run idle {parts['idle_midrun_s']:.2f} s + tail idle {parts['idle_tail_s']:.2f} s")
        rows.append({"part": "anatomy (test)", "policy": name, "estimator": "bucket-quantile",
                     "mean_gap_pct": 100 * m.gap_to_bound, **parts})
    fused = summarize(run_policy(problem, "hybrid-fused", estimates=est), bound)
    print(f"  {'hybrid-fused (prompts fused into decodes, C_p = 0)':50s} gap {100 * fused.gap_to_bound:5.2f} %"
          f" (to the fused bound {bound.fused_s:.2f} s)")
    rows.append({"part": "anatomy (test)", "policy": "hybrid-fused (fused bound)", "estimator": "bucket-quantile",
                 "mean_gap_pct": 100 * fused.gap_to_bound})
    out = Path(__file__).resolve().parent / "results" / "unknown_lengths.csv"
    out.parent.mkdir(exist_ok=True)
    keys = ["part", "policy", "estimator", "mean_gap_pct", "max_gap_pct", "extra_prefills_s", "idle_midrun_s",
            "idle_tail_s"]
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows([{k: f"{v:.2f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows])
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
