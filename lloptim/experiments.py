"""The paper reproduction: baseline vs offline vs hybrid (and peers), the 100-case study, and the
degradation of the hybrid as output-length forecasts get noisier.

Everything here is a pure function of its arguments and seeds, so results are identical whatever
executor runs the cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lloptim import workloads
from lloptim.bounds import lower_bound
from lloptim.executors import map_tasks
from lloptim.metrics import summarize
from lloptim.problem import Problem
from lloptim.runtime.estimators import estimate
from lloptim.runtime.engine import RunResult
from lloptim.simulator import run_policy

__all__ = ["PAPER", "MAIN_POLICIES", "compare_policies", "run_case", "case_study", "noise_sweep", "reproduce"]

#: The paper's figures (arXiv 2502.15763, LLaMA-65B on GSM8K).
PAPER = {"baseline": {"makespan_s": 201.00, "utilization": 0.802},
         "hybrid": {"makespan_s": 190.58, "utilization": 0.891},
         "lower_bound_s": 180.0, "cases_mean_utilization_gain": 0.080}

#: Policies of the main comparison, in report order.
MAIN_POLICIES = ("baseline", "offline", "hybrid", "hybrid-plan", "vllm", "sarathi", "sorted-f", "lpt")


def _row(result: RunResult) -> dict:
    m = summarize(result).to_dict()
    return m


def compare_policies(problem: Problem, policies: Sequence[str] = MAIN_POLICIES, estimator: str = "bucket-quantile",
                     train=None, seed: int = 0) -> tuple[dict[str, dict], dict[str, RunResult]]:
    """Run each policy with known lengths, and the hybrid with estimated lengths.

    Returns
    -------
    rows, results
        Metrics dictionaries and full run results keyed by policy name; the unknown-lengths run is
        ``"hybrid_unknown_lengths"``.
    """
    rows: dict[str, dict] = {}
    results: dict[str, RunResult] = {}
    for name in policies:
        results[name] = run_policy(problem, name, seed=seed)
        rows[name] = _row(results[name])
    if "hybrid" in policies:
        train = workloads.gsm8k("train") if train is None else train
        est = estimate(problem.workload, estimator, train=train, seed=seed)
        r = run_policy(problem, "hybrid", estimates=est, seed=seed)
        results["hybrid_unknown_lengths"] = r
        rows["hybrid_unknown_lengths"] = {**_row(r), "estimator": estimator}
    return rows, results


@dataclass(frozen=True)
class CaseTask:
    """One case of the case study: ``n_requests`` drawn from GSM8K ``split`` with ``(seed, index)``."""

    index: int
    n_requests: int = 1319
    seed: int = 0
    split: str = "train"
    profile: str = "llama-65b"
    policies: tuple[str, ...] = ("baseline", "hybrid")


def run_case(task: CaseTask) -> dict:
    """Run every policy of ``task`` on its case; return per-policy makespan, utilization and the bound."""
    wl = workloads.gsm8k_case(task.index, task.n_requests, task.seed, task.split)
    problem = Problem.single(wl, task.profile)
    bound = lower_bound(problem)
    out = {"case": task.index, "lower_bound_s": bound.total_s}
    for name in task.policies:
        m = summarize(run_policy(problem, name, seed=task.seed), bound)
        out[name] = {"makespan_s": m.makespan_s, "utilization": m.utilization, "gap_to_bound": m.gap_to_bound}
    return out


def case_study(n_cases: int = 100, n_requests: int = 1319, seed: int = 0, executor: str = "local",
               address: str | None = None, progress: bool = True) -> dict:
    """Baseline vs hybrid on ``n_cases`` GSM8K-train cases; per-case figures and a summary."""
    tasks = [CaseTask(k, n_requests, seed) for k in range(n_cases)]
    cases = map_tasks(run_case, tasks, executor=executor, progress=progress, desc="cases", address=address)
    gain = np.array([c["hybrid"]["utilization"] - c["baseline"]["utilization"] for c in cases])
    wins = int(sum(c["hybrid"]["makespan_s"] < c["baseline"]["makespan_s"] for c in cases))
    return {"n": n_cases, "hybrid_wins": wins, "mean_utilization_gain": float(gain.mean()) if cases else 0.0,
            "mean_gap_hybrid": float(np.mean([c["hybrid"]["gap_to_bound"] for c in cases])) if cases else 0.0,
            "mean_gap_baseline": float(np.mean([c["baseline"]["gap_to_bound"] for c in cases])) if cases else 0.0,
            "per_case": cases}


def noise_sweep(problem: Problem, sigmas: Sequence[float] = (0.0, 0.1, 0.2, 0.4, 0.8, 1.2), seed: int = 0) -> list[dict]:
    """Hybrid gap to the bound when estimates are the truth times ``exp(N(0, sigma))``."""
    bound = lower_bound(problem)
    out = []
    for s in sigmas:
        est = estimate(problem.workload, "noisy", sigma=s, seed=seed)
        m = summarize(run_policy(problem, "hybrid", estimates=est, seed=seed), bound)
        out.append({"sigma": float(s), "makespan_s": m.makespan_s, "utilization": m.utilization,
                    "gap_to_bound": m.gap_to_bound})
    return out


def reproduce(problem: Problem, cases: int = 100, executor: str = "local", address: str | None = None,
              estimator: str = "bucket-quantile", progress: bool = True, seed: int = 0) -> tuple[dict, dict]:
    """The whole reproduction; returns the JSON-ready report and the main runs (for plots)."""
    rows, results = compare_policies(problem, estimator=estimator, seed=seed)
    bound = lower_bound(problem)
    dec = results["hybrid"].decision_ns / 1e3
    report = {
        "problem": {"name": problem.name, "requests": problem.n_requests, "clients": problem.n_clients},
        "lower_bound_s": bound.total_s,
        "lower_bound": bound.to_dict(),
        "policies": {k: {"makespan_s": v["makespan_s"], "utilization": v["utilization"],
                         "gap_to_bound": v["gap_to_bound"], "prefill_iterations": v["prefill_iterations"],
                         "decode_iterations": v["decode_iterations"], "lower_bound_s": v["lower_bound_s"]}
                     for k, v in rows.items()},
        "decision_latency_us": {"p50": float(np.percentile(dec, 50)) if dec.size else 0.0,
                                "p99": float(np.percentile(dec, 99)) if dec.size else 0.0},
        "estimator": estimator,
        "noise": noise_sweep(problem, seed=seed),
        "paper": PAPER,
    }
    report["cases"] = case_study(cases, seed=seed, executor=executor, address=address, progress=progress) \
        if cases > 0 else {"n": 0, "hybrid_wins": 0, "mean_utilization_gain": 0.0, "per_case": []}
    return report, results
