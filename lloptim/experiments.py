"""The paper reproduction: baseline vs offline vs hybrid (and peers), the 100-case study, and the
degradation of the hybrid as output-length forecasts get noisier.

Everything here is a pure function of its arguments and seeds, so results are identical whatever
executor runs the cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from lloptim import guards, workloads
from lloptim.bounds import lower_bound
from lloptim.executors import EXECUTORS, map_tasks
from lloptim.metrics import summarize
from lloptim.problem import Problem, as_problem
from lloptim.runtime.estimators import ESTIMATORS, estimate
from lloptim.runtime.engine import RunResult
from lloptim.simulator import run_policy
from lloptim.progress import DELAY_S
from lloptim.validation import check_choice, check_int, check_seed

__all__ = ["PAPER", "MAIN_POLICIES", "UNKNOWN_LENGTH_POLICIES", "unknown_lengths_key", "compare_policies", "CaseTask", "run_case", "case_study", "noise_sweep",
           "reproduce", "ESTIMATOR_NAMES", "check_reproduction"]

#: Estimators :func:`reproduce` accepts for its unknown-lengths runs.
ESTIMATOR_NAMES = tuple(sorted(ESTIMATORS)) + ("oracle", "noisy")

#: The paper's figures (arXiv 2502.15763, LLaMA-65B on GSM8K).
PAPER = {"baseline": {"makespan_s": 201.00, "utilization": 0.802},
         "hybrid": {"makespan_s": 190.58, "utilization": 0.891},
         "lower_bound_s": 180.0, "cases_mean_utilization_gain": 0.080}

#: Policies of the main comparison, in report order.
MAIN_POLICIES = ("baseline", "offline", "hybrid", "hybrid-fused", "hybrid-plan", "vllm", "sarathi", "sorted-f", "lpt")
#: Policies also run with estimated output lengths, reported as ``<name>_unknown_lengths`` (hyphens
#: become underscores: ``hybrid_unknown_lengths``, ``hybrid_fused_unknown_lengths``).
UNKNOWN_LENGTH_POLICIES = ("hybrid", "hybrid-fused")


def unknown_lengths_key(policy: str) -> str:
    """Report key of ``policy``'s run with estimated output lengths, e.g. ``hybrid_unknown_lengths``."""
    return policy.replace("-", "_") + "_unknown_lengths"


def _row(result: RunResult) -> dict:
    m = summarize(result).to_dict()
    return m


def compare_policies(problem: Problem, policies: Sequence[str] = MAIN_POLICIES, estimator: str = "bucket-quantile",
                     train=None, seed: int = 0, progress: bool = False) -> tuple[dict[str, dict], dict[str, RunResult]]:
    """Run each policy with known lengths, and the hybrids with estimated lengths.

    Parameters
    ----------
    problem
        The problem every policy serves.
    policies
        Registered policy names, run with the true output lengths.
    estimator
        Estimator of the extra unknown-lengths runs (see
        :func:`~lloptim.runtime.estimators.estimate`) of each policy of
        :data:`UNKNOWN_LENGTH_POLICIES` that is in ``policies``.
    train
        Training workload of the estimator; default: the GSM8K train split.
    seed
        Seed of every run and of the estimator.
    progress
        Show a progress bar over the runs on stderr (once they last over a second).

    Returns
    -------
    rows, results
        Metrics dictionaries and full run results keyed by policy name; the unknown-lengths runs
        are keyed by :func:`unknown_lengths_key` (``"hybrid_unknown_lengths"``, ...).
    """
    rows: dict[str, dict] = {}
    results: dict[str, RunResult] = {}
    for name in tqdm(policies, desc="policies", disable=not progress, leave=False, delay=DELAY_S):
        results[name] = run_policy(problem, name, seed=seed)
        rows[name] = _row(results[name])
    unknown = [name for name in UNKNOWN_LENGTH_POLICIES if name in policies]
    if unknown:
        train = workloads.gsm8k("train") if train is None else train
        est = estimate(problem.workload, estimator, train=train, seed=seed)
        for name in unknown:
            r = run_policy(problem, name, estimates=est, seed=seed)
            results[unknown_lengths_key(name)] = r
            rows[unknown_lengths_key(name)] = {**_row(r), "estimator": estimator}
    return rows, results


@dataclass(frozen=True)
class CaseTask:
    """One case of the case study: ``n_requests`` drawn from GSM8K ``split`` with ``(seed, index)``.

    Attributes
    ----------
    index
        Case index (see :func:`~lloptim.workloads.gsm8k_case`).
    n_requests
        Requests in the case (count).
    seed
        Seed of the draw and of every run.
    split
        GSM8K split the requests are drawn from.
    profile
        Hardware profile of the single instance that serves the case.
    policies
        Registered policy names to run, with the true output lengths.
    """

    index: int
    n_requests: int = 1319
    seed: int = 0
    split: str = "train"
    profile: str = "llama-65b"
    policies: tuple[str, ...] = ("baseline", "hybrid")


def run_case(task: CaseTask) -> dict:
    """Run every policy of ``task`` on its case; return per-policy makespan, utilization and the bound.

    Parameters
    ----------
    task
        The case and the policies to run.

    Returns
    -------
    dict
        ``"case"`` (the index), ``"lower_bound_s"`` (seconds) and, per policy name,
        ``{"makespan_s": seconds, "utilization": fraction, "gap_to_bound": relative}``.
    """
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
    """Baseline vs hybrid on ``n_cases`` GSM8K-train cases; per-case figures and a summary.

    Parameters
    ----------
    n_cases
        Number of cases.
    n_requests
        Requests per case (count).
    seed
        Seed of the draws and the runs.
    executor
        ``"local"`` or ``"ray"`` (see :func:`~lloptim.executors.map_tasks`).
    address
        Ray cluster address; only with ``executor="ray"``.
    progress
        Show a progress bar over the cases.

    Returns
    -------
    dict
        ``"n"``, ``"hybrid_wins"`` (cases with a shorter makespan, count),
        ``"mean_utilization_gain"`` (fraction), ``"mean_gap_hybrid"`` and ``"mean_gap_baseline"``
        (relative gap to the bound), and ``"per_case"`` (the :func:`run_case` results).
    """
    tasks = [CaseTask(k, n_requests, seed) for k in range(n_cases)]
    cases = map_tasks(run_case, tasks, executor=executor, progress=progress, desc="cases", address=address)
    gain = np.array([c["hybrid"]["utilization"] - c["baseline"]["utilization"] for c in cases])
    wins = int(sum(c["hybrid"]["makespan_s"] < c["baseline"]["makespan_s"] for c in cases))
    return {"n": n_cases, "hybrid_wins": wins, "mean_utilization_gain": float(gain.mean()) if cases else 0.0,
            "mean_gap_hybrid": float(np.mean([c["hybrid"]["gap_to_bound"] for c in cases])) if cases else 0.0,
            "mean_gap_baseline": float(np.mean([c["baseline"]["gap_to_bound"] for c in cases])) if cases else 0.0,
            "per_case": cases}


def noise_sweep(problem: Problem, sigmas: Sequence[float] = (0.0, 0.1, 0.2, 0.4, 0.8, 1.2), seed: int = 0,
                policies: Sequence[str] = UNKNOWN_LENGTH_POLICIES) -> list[dict]:
    """Gap to the bound of each policy when estimates are the truth times ``exp(N(0, sigma))``.

    Parameters
    ----------
    problem
        The problem the policies serve.
    sigmas
        Log-scale standard deviations of the noise, one run per policy each.
    seed
        Seed of the noise and the runs.
    policies
        Registered policy names.

    Returns
    -------
    list of dict
        Per policy and sigma: ``"policy"``, ``"sigma"``, ``"makespan_s"`` (seconds),
        ``"utilization"`` (fraction) and ``"gap_to_bound"`` (relative, to the bound that holds for
        the policy's iterations; see :class:`~lloptim.metrics.RunMetrics`).
    """
    bound = lower_bound(problem)
    out = []
    forecasts = [(float(s), estimate(problem.workload, "noisy", sigma=s, seed=seed)) for s in sigmas]
    for name in policies:
        for s, est in forecasts:
            m = summarize(run_policy(problem, name, estimates=est, seed=seed), bound)
            out.append({"policy": name, "sigma": s, "makespan_s": m.makespan_s, "utilization": m.utilization,
                        "gap_to_bound": m.gap_to_bound})
    return out


def check_reproduction(problem: Problem, cases: int = 100, executor: str = "local", address: str | None = None,
                       estimator: str = "bucket-quantile", seed: int = 0) -> guards.Estimate:
    """Check the arguments of :func:`reproduce` and its estimated cost, before any work.

    Parameters
    ----------
    problem, cases, executor, address, estimator, seed
        As for :func:`reproduce`.

    Returns
    -------
    lloptim.guards.Estimate
        The estimated cost (memory in bytes, time in seconds).

    Raises
    ------
    SpecError
        A bad argument, named.
    TooLargeError
        The cost exceeds the limits (:func:`lloptim.guards.check`).
    """
    import os

    problem = as_problem(problem)
    cases = check_int("cases", cases, lo=0, example=100)
    check_seed("seed", seed)
    check_choice("executor", executor, EXECUTORS, "executor")
    check_choice("estimator", estimator, ESTIMATOR_NAMES, "estimator")
    if address is not None and executor != "ray":
        from lloptim.errors import SpecError

        raise SpecError("address", "a Ray address needs executor 'ray'", "use the ray executor, or drop the address")
    # a local Ray runs a case per CPU; a cluster's size is unknown here, so only memory is checked
    workers = 1 if executor == "local" else (os.cpu_count() or 1) if address is None else 10**9
    size = guards.RunSize.of(problem)
    return guards.check(guards.reproduction_cost(size, cases, workers=workers), lower={
        "cases": (cases, lambda x: guards.reproduction_cost(size, int(x), workers=workers))})


def reproduce(problem: Problem, cases: int = 100, executor: str = "local", address: str | None = None,
              estimator: str = "bucket-quantile", progress: bool = True, seed: int = 0) -> tuple[dict, dict]:
    """The whole reproduction; returns the JSON-ready report and the main runs (for plots).

    Parameters
    ----------
    problem
        The problem of the main comparison and the noise sweep.
    cases
        Cases of the case study (count); 0 skips it.
    executor, address, progress
        How the case study runs (see :func:`case_study`).
    estimator
        Estimator of the unknown-lengths runs (see :func:`compare_policies`).
    seed
        Seed of every run.

    Returns
    -------
    report, results
        The report (times in seconds, decision latency in microseconds) and the
        :class:`~lloptim.runtime.engine.RunResult` of each main run, keyed by policy name.

    Raises
    ------
    SpecError
        A bad argument (named: ``cases``, ``seed``, ``executor``, ``address``, ``estimator``),
        checked before any run.
    TooLargeError
        The whole reproduction is estimated to need more memory than is available (or more time
        than the limit set by :func:`lloptim.guards.guard_settings`).
    """
    check_reproduction(problem, cases, executor, address, estimator, seed)
    rows, results = compare_policies(problem, estimator=estimator, seed=seed, progress=progress)
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
