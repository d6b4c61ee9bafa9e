"""Four-instance mixed fleets: the hybrid against the fleet bound, and the ablation of its prices.

Target (issue 12): on a 4-instance mixed fleet the hybrid within 1 % of the exact fleet bound
(:func:`lloptim.lower_bound`: on instances that differ, the fractional assignment of
:mod:`lloptim.bounds`), on several fleets, workloads and seeds.

Fleets (llama-65b, 40 clients, unless said): ``4x`` identical; ``2+2slow`` (two 1.5x slower in
prefill and decode); ``3+1slow`` (one 2x slower); ``2+2dslow`` (two with 0.6x prefill and 1.6x
decode time: a different accelerator, strong in compute, weak in memory bandwidth, so requests
differ in where they are cheap); ``2x40+2x20`` (two servers with 20 clients).

Workloads, all at time 0: GSM8K test; GSM8K-train cases 1 and 2 (1319 requests each,
:func:`lloptim.workloads.gsm8k_case`); ``heavy`` seeds 1 and 2 (lognormal prompts and outputs,
sigma 1.2, medians 100 and 80 tokens, 1500 requests; 163,840 KV tokens per instance so that memory
does not bind).

Policies: ``hybrid`` (separate iterations) and ``hybrid-fused`` with the fleet prices of
:mod:`lloptim.runtime.fleet` (``lp``: LP duals with online updates, and earliest-completion
dispatch among the instances where a request belongs), the ablation ``ect`` (earliest completion,
no prices), ``none`` (any idle client takes the head of the queue: the dispatch before prices
steered), ``uniform`` (prices 1/m: every request belongs only where it is cheapest; GSM8K test only,
it is slow to simulate because slow instances idle), ``hybrid-fused-plan`` (the rolling bin-packing
plan, per-client balance), ``sarathi``. ``steered`` counts the decisions where the prices or the
earliest-completion rule made an idle client pass over the head of the queue.

Run: ``python benchmarks/fleet.py [--quick]``; writes ``benchmarks/results/fleet.csv``.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from lloptim import Instance, Problem, load_profile, lower_bound, workloads
from lloptim.metrics import summarize
from lloptim.runtime.hybrid import hybrid_policy
from lloptim.runtime.registry import make_policy
from lloptim.simulator import run_policy

HEAVY_KV = 163_840


def fleets() -> dict[str, list[tuple]]:
    """``name -> [(profile, count, clients)]`` of the benchmark fleets."""
    base = load_profile("llama-65b")

    def scaled(prefill: float, decode: float):
        return base.with_latency(base.latency.scaled(prefill, decode))

    return {"4x": [(base, 4, None)], "2+2slow": [(base, 2, None), (scaled(1.5, 1.5), 2, None)],
            "3+1slow": [(base, 3, None), (scaled(2.0, 2.0), 1, None)],
            "2+2dslow": [(base, 2, None), (scaled(0.6, 1.6), 2, None)],
            "1+3slow": [(base, 1, None), (scaled(1.5, 1.5), 3, None)],
            "2x40+2x20": [(base, 2, None), (base, 2, 20)],
            "3kinds": [(base, 2, None), (scaled(1.5, 1.5), 1, None), (scaled(0.6, 1.6), 1, None)]}


def build(kinds: list[tuple], kv: int | None) -> tuple[Instance, ...]:
    """The instances of a fleet description."""
    out = []
    for profile, count, clients in kinds:
        for _ in range(count):
            out.append(Instance.from_profile(profile, clients=clients, kv_capacity_tokens=kv,
                                             name=f"instance-{len(out)}"))
    return tuple(out)


WORKLOADS = {
    "gsm8k-test": (lambda: workloads.gsm8k("test"), None),
    "gsm8k-case1": (lambda: workloads.gsm8k_case(1, 1319), None),
    "gsm8k-case2": (lambda: workloads.gsm8k_case(2, 1319), None),
    "heavy-s1": (lambda: workloads.synthetic(1500, seed=1, prompt_median=100, output_median=80, sigma=1.2,
                                             max_tokens=1500), HEAVY_KV),
    "heavy-s2": (lambda: workloads.synthetic(1500, seed=2, prompt_median=100, output_median=80, sigma=1.2,
                                             max_tokens=1500), HEAVY_KV),
}


def policies(with_uniform: bool) -> dict:
    """``label -> policy factory`` of the benchmark."""
    out = {
        "hybrid": lambda: hybrid_policy(),
        "hybrid none": lambda: hybrid_policy(prices="none"),
        "hybrid-fused": lambda: make_policy("hybrid-fused"),
        "fused ect": lambda: hybrid_policy(fused=True, prices="ect"),
        "fused none": lambda: hybrid_policy(fused=True, prices="none"),
        "hybrid-fused-plan": lambda: make_policy("hybrid-fused-plan"),
        "sarathi": lambda: make_policy("sarathi"),
    }
    if with_uniform:
        out["fused uniform"] = lambda: hybrid_policy(fused=True, prices="uniform")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="GSM8K test and heavy-s1 only")
    args = ap.parse_args()
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    rows = []
    t_all = time.perf_counter()
    names = ["gsm8k-test", "heavy-s1"] if args.quick else list(WORKLOADS)
    labels = None
    for fname, kinds in fleets().items():
        for wname in names:
            make, kv = WORKLOADS[wname]
            prob = Problem(make(), build(kinds, kv), f"{wname} on {fname}")
            bound = lower_bound(prob)
            pols = policies(with_uniform=wname == "gsm8k-test" and fname != "4x")
            labels = labels or list(policies(True))
            case = {}
            for label, factory in pols.items():
                pol = factory()
                res = run_policy(prob, pol)
                m = summarize(res, bound)
                fleet = getattr(pol.requests, "fleet", None)
                case[label] = m
                rows.append({"fleet": fname, "workload": wname, "policy": label, "bound_s": m.lower_bound_s,
                             "makespan_s": m.makespan_s, "gap": m.gap_to_bound,
                             "steered": fleet.steered if fleet is not None and fleet.active else 0,
                             "lp_solves": fleet.solves if fleet is not None and fleet.active else 0,
                             "wall_s": m.wall_s})
            print(f"{fname:10s} {wname:12s} bound {bound.total_s:7.2f}/{bound.fused_s:7.2f} s | "
                  + " | ".join(f"{k} {100 * m.gap_to_bound:.2f} %" for k, m in case.items()), flush=True)
    with open(out / "fleet.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print()
    print("| fleet | workload | bound s | " + " | ".join(f"{p}" for p in labels) + " |")
    print("|---|---|---|" + "---|" * len(labels))
    by_case: dict[tuple, dict] = {}
    for r in rows:
        by_case.setdefault((r["fleet"], r["workload"]), {})[r["policy"]] = r
    for (fname, wname), case in by_case.items():
        first = next(iter(case.values()))
        cells = [f"{case[p]['makespan_s']:.2f} s ({100 * case[p]['gap']:.2f} %)" if p in case else "" for p in labels]
        print(f"| {fname} | {wname} | {first['bound_s']:.2f} | " + " | ".join(cells) + " |")
    print("\nmean gap to the bound over the cases (all fleets):")
    for p in labels:
        gaps = [case[p]["gap"] for case in by_case.values() if p in case]
        within = sum(g <= 0.01 for g in gaps)
        print(f"  {p:18s} mean {100 * np.mean(gaps):5.2f} %, worst {100 * np.max(gaps):5.2f} %, "
              f"within 1 %: {within}/{len(gaps)}")
    steered = [r["steered"] for r in rows if r["policy"] == "hybrid-fused"]
    print(f"hybrid-fused: decisions steered away from the head of the queue per run: median {np.median(steered):.0f}")
    print(f"wall time {time.perf_counter() - t_all:.1f} s")


if __name__ == "__main__":
    main()
