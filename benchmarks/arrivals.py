"""Requests arriving over time: the hybrid against Sarathi-Serve and vLLM at 80 % and 120 % load.

Targets (issue 12): with Poisson arrivals at 80 % and 120 % of the fleet's capacity, and on real
arrivals, the hybrid's p99 end-to-end latency <= Sarathi's *and* its makespan <= Sarathi's, on every
case; no policy reads a request before it arrives.

Workload classes, several seeds each (never tuned to one):

* ``gsm8k``: GSM8K test (1319 requests), Poisson arrivals (:func:`lloptim.arrivals.at_load`);
* ``heavy``: synthetic, lognormal prompts and outputs with sigma 1.2 (medians 100 and 80 tokens,
  clipped to 1500), 1500 requests, lengths and arrivals drawn per seed;
* ``conv`` / ``code``: windows of 1500 consecutive requests of the Azure LLM inference traces 2023
  (:func:`lloptim.workloads.azure_trace`; seed ``s`` is the window starting at request
  ``1500 s``), with the trace's own arrival pattern sped up or slowed down to the load
  (:func:`lloptim.arrivals.scale_to_load`).

The load is the arrival rate over the fleet's capacity, requests / T^LB of the same requests all
at time 0 (:mod:`lloptim.arrivals`). Instance: llama-65b with 40 clients; ``gsm8k`` keeps the
profile's 20,480 KV tokens (the paper's configuration), the others get 163,840 (what an 8 x 80 GB
server holds for LLaMA-65B in fp16 after the weights: 2 x 80 layers x 8192 x 2 bytes = 2.6 MB per
token), since their prompts reach 14k tokens and KV memory is not what this benchmark measures.

Policies: ``hybrid`` (least-slack dispatch, fused prompts once requests arrive), ``hybrid-lpt``
(the same with the old longest-first dispatch, ``slack_weight=1e9``: the starvation the issue
found), ``hybrid-wc`` (the latency objective: Smith's rule of the ``weighted_completion``
formulation, shortest estimated service first), ``hybrid-fused``, ``hybrid-fused-plan`` (the rolling bin-packing plan, whose revisions
are timed), ``sarathi``, ``vllm``.

Run: ``python benchmarks/arrivals.py [--seeds 3] [--classes gsm8k,heavy,conv,code]``; writes
``benchmarks/results/arrivals.csv`` and the latency figure ``benchmarks/results/arrivals.png``.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from lloptim import Problem, lower_bound, workloads
from lloptim.arrivals import at_load, scale_to_load
from lloptim.metrics import summarize
from lloptim.runtime.hybrid import hybrid_policy
from lloptim.runtime.registry import make_policy
from lloptim.simulator import run_policy

CLASSES = ("gsm8k", "heavy", "conv", "code")
LOADS = (0.8, 1.2)
TRACE_KV = 163_840
POLICIES = ("hybrid", "hybrid-lpt", "hybrid-wc", "hybrid-fused", "hybrid-fused-plan", "sarathi", "vllm")


def problem(kind: str, load: float, seed: int) -> Problem:
    """The benchmark case ``kind`` at ``load`` for ``seed``."""
    if kind == "gsm8k":
        return at_load(Problem.single(workloads.gsm8k("test")), load, seed)
    if kind == "heavy":
        w = workloads.synthetic(1500, seed=seed, prompt_median=100, output_median=80, sigma=1.2, max_tokens=1500)
        return at_load(Problem.single(w, kv_capacity_tokens=TRACE_KV), load, seed)
    w = workloads.azure_trace(kind, limit=1500, start=1500 * seed)
    return scale_to_load(Problem.single(w, kv_capacity_tokens=TRACE_KV), load)


def policy(name: str):
    """A fresh policy of the benchmark by name."""
    if name == "hybrid-lpt":
        pol = hybrid_policy(slack_weight=1e9)
        pol.name = "hybrid-lpt"
        return pol
    if name == "hybrid-wc":
        pol = hybrid_policy(objective="weighted-completion")
        pol.name = "hybrid-wc"
        return pol
    return make_policy(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--classes", default=",".join(CLASSES))
    args = ap.parse_args()
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    rows, misses, revisions = [], [], []
    figure = None
    t_all = time.perf_counter()
    for kind in args.classes.split(","):
        for load in LOADS:
            for seed in range(args.seeds):
                prob = problem(kind, load, seed)
                bound = lower_bound(prob)
                runs = {}
                for name in POLICIES:
                    pol = policy(name)
                    res = run_policy(prob, pol)
                    runs[name] = res
                    m = summarize(res, bound)
                    rows.append({"class": kind, "load": load, "seed": seed, "policy": name,
                                 "bound_s": m.lower_bound_s, "makespan_s": m.makespan_s, "gap": m.gap_to_bound,
                                 "latency_mean_s": m.latency_mean_s, "latency_p99_s": m.latency_p99_s,
                                 "ttft_mean_s": m.ttft_mean_s, "ttft_p99_s": m.ttft_p99_s, "wall_s": m.wall_s})
                    if name == "hybrid-fused-plan":
                        revisions.extend(pol.requests.plan.revision_s)
                case = {r["policy"]: r for r in rows[-len(POLICIES):]}
                h, s = case["hybrid"], case["sarathi"]
                # equal schedules differ by float round-off (1e-13 s): compare with a relative 1e-9
                ok = (h["latency_p99_s"] <= s["latency_p99_s"] * (1 + 1e-9)
                      and h["makespan_s"] <= s["makespan_s"] * (1 + 1e-9))
                if not ok:
                    misses.append((kind, load, seed, h["makespan_s"] / s["makespan_s"],
                                   h["latency_p99_s"] / s["latency_p99_s"]))
                print(f"{kind:5s} load {load:.1f} seed {seed}: bound {case['hybrid']['bound_s']:8.2f} s | "
                      + " | ".join(f"{n} {c['makespan_s']:8.2f} s p99 {c['latency_p99_s']:7.2f}"
                                   for n, c in case.items() if n in ("hybrid", "sarathi", "vllm"))
                      + ("" if ok else "   <- target missed"), flush=True)
                if figure is None and kind == "gsm8k" and load > 1:
                    from lloptim.plots import plot_latency_comparison

                    figure = plot_latency_comparison({n: runs[n] for n in ("hybrid", "hybrid-lpt", "sarathi", "vllm")},
                                                     out / "arrivals.png",
                                                     f"GSM8K test, Poisson arrivals at {load:.0%} load, seed {seed}")
    with open(out / "arrivals.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print()
    print("| class | load | seed | bound s | " + " | ".join(f"{p} makespan s / mean / p99 latency s"
                                                          for p in POLICIES) + " | hybrid gap |")
    print("|---|---|---|---|" + "---|" * len(POLICIES) + "---|")
    for i in range(0, len(rows), len(POLICIES)):
        case = rows[i:i + len(POLICIES)]
        first = case[0]
        cells = [f"{c['makespan_s']:.1f} / {c['latency_mean_s']:.1f} / {c['latency_p99_s']:.1f}" for c in case]
        print(f"| {first['class']} | {first['load']:.1f} | {first['seed']} | {first['bound_s']:.1f} | "
              + " | ".join(cells) + f" | {100 * case[0]['gap']:.2f} % |")
    n_cases = len(rows) // len(POLICIES)
    print(f"\nhybrid p99 <= sarathi p99 and makespan <= sarathi makespan (to float round-off): "
          f"{n_cases - len(misses)}/{n_cases} cases")
    for kind, load, seed, mk, p99 in misses:
        print(f"  missed: {kind} load {load} seed {seed}: makespan x{mk:.4f}, p99 x{p99:.4f} of sarathi's")
    rev = np.asarray(revisions) * 1e3
    if rev.size:
        print(f"rolling plan (hybrid-fused-plan): {rev.size} revisions, median {np.median(rev):.2f} ms, "
              f"p99 {np.percentile(rev, 99):.2f} ms, max {rev.max():.2f} ms")
    print(f"wall time {time.perf_counter() - t_all:.1f} s")


if __name__ == "__main__":
    main()
