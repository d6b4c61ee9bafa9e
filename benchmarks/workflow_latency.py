"""Latency of workflows arriving under load: the hybrid with and without its due dates, against its peers.

The hybrid orders the ready requests of workflows by a makespan plan of the workflows known so far
(:class:`~lloptim.runtime.request_schedulers.WorkflowQueue`). A request with slack in that plan (a
short last step, a branch off the critical path) is planned late, and while workflows keep arriving
every revision plans the new workflows' critical paths ahead of it: under load it waits until the
arrivals stop. The hybrid (default ``due_factor``,
:data:`~lloptim.runtime.request_schedulers.DUE_FACTOR`) gives each workflow a due date, its
arrival plus that factor times the fleet's time to serve the work known then, and hands a request
out by the earlier of its planned start and its latest start for that due date (WorkflowQueue
Notes, *Due dates*); ``hybrid-plain`` below is the hybrid without them (``due_factor=None``), and
``--factors`` adds ``hybrid-dueF`` rows for other factors.

Cases (DAG workflows arriving as a Poisson process; every request of a workflow arrives with it):

* ``stress-dag``: ``benchmarks/stress_flow.py``'s ``dag-online`` (random DAGs of 6-20 requests
  with long and short branches on llama-65b, 40 clients) at 110 and 200 % load, and its
  ``dag-fleet`` online case (a fleet of a llama-65b instance and one 1.5x slower, 20 clients each,
  150 % load);
* ``gsm8k-dag``: ``benchmarks/workflows.py``'s layered DAGs on GSM8K lengths (100 workflows at 0.75
  and 1 per second) on 40 clients and on 2 x 20 clients.

Per case and policy: the makespan's gap to the bound (``lower_bound(..., migration=False)``), the
mean and p99 latency of the requests (arrival to finish) and the p99 latency of the workflows
(first arrival to last finish, :func:`~lloptim.metrics.workflow_latency`). The table gives, per
class, the hybrid with due dates against ``hybrid-plain`` (makespan change in points; p99 and mean
ratios; column ``p99/pln``) and against the best peer (lowest p99 of Sarathi, vLLM and LPT; Sarathi's mean), for the default hybrid and
for each ``--factors`` variant.

Run: ``python benchmarks/workflow_latency.py [--seeds 3] [--first-seed 0] [--classes stress-dag,gsm8k-dag]
[--factors 1,1.5]``;
writes ``benchmarks/results/workflow_latency.csv`` unless ``--csv`` says where. About a minute for
three seeds on a quiet machine.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from lloptim import lower_bound, run_policy, summarize, workloads
from lloptim.runtime.hybrid import hybrid_policy
from lloptim.runtime.request_schedulers import DUE_FACTOR

import stress_flow
import workflows as workflow_bench

PEERS = ("sarathi", "vllm", "lpt")
POLICIES = ("hybrid-plain", "hybrid") + PEERS
CLASSES = ("stress-dag", "gsm8k-dag")


def make(name: str):
    """A policy of :data:`POLICIES` or ``hybrid-dueF`` (``hybrid-plain``: the hybrid without due dates)."""
    if name == "hybrid-plain":
        return hybrid_policy(due_factor=None)
    if name.startswith("hybrid-due"):
        return hybrid_policy(due_factor=float(name[len("hybrid-due"):]))
    return name


def cases(cls: str, seed: int) -> list[tuple[str, object]]:
    """``(label, problem)`` of class ``cls`` for ``seed``."""
    if cls == "stress-dag":
        out = [(label, p) for label, p, _ in stress_flow.dag_cases("dag-online", seed, False)]
        out += [(label, p) for label, p, _ in stress_flow.dag_cases("dag-fleet", seed, False) if "load" in label]
        return out
    out = []
    for rate in (0.75, 1.0):
        wl = workloads.workflows("dag", 100, seed=seed, arrival_rate=rate)
        for clients, instances in ((40, 1), (20, 2)):
            out.append((f"dag {rate:g}/s {instances}x{clients}",
                        workflow_bench.make_problem(wl, clients, instances, 1.0)))
    return out


def run_case(cls: str, label: str, seed: int, problem, extra: tuple[str, ...] = ()) -> list[dict]:
    """Every policy (and the ``extra`` ones) on one case; one row each."""
    bound = lower_bound(problem, migration=False)
    rows = []
    for name in POLICIES + tuple(extra):
        t = time.perf_counter()
        res = run_policy(problem, make(name))
        m = summarize(res, bound)
        if m.requests_completed != problem.n_requests:
            raise RuntimeError(f"{cls} {label} seed {seed} {name}: {m.requests_completed}/{problem.n_requests} done")
        rows.append({"class": cls, "case": label, "seed": seed, "requests": problem.n_requests,
                     "workflows": m.workflows, "policy": name, "bound_s": m.lower_bound_s,
                     "makespan_s": m.makespan_s, "gap": m.gap_to_bound, "latency_mean_s": m.latency_mean_s,
                     "latency_p99_s": m.latency_p99_s, "workflow_latency_mean_s": m.workflow_latency_mean_s,
                     "workflow_latency_p99_s": m.workflow_latency_p99_s, "wall_s": time.perf_counter() - t})
    return rows


def compare(rows: list[dict], variant: str = "hybrid") -> dict:
    """The hybrid with due dates (``variant``) against it without them and the best peer on one case."""
    by = {r["policy"]: r for r in rows}
    h, d = by["hybrid-plain"], by[variant]
    best = min((by[p] for p in PEERS), key=lambda r: r["latency_p99_s"])
    return {"class": h["class"], "variant": variant, "gap_change": d["gap"] - h["gap"],
            "p99_vs_plain": d["latency_p99_s"] / h["latency_p99_s"],
            "mean_vs_plain": d["latency_mean_s"] / h["latency_mean_s"],
            "plain_p99_vs_peer": h["latency_p99_s"] / best["latency_p99_s"],
            "p99_vs_peer": d["latency_p99_s"] / best["latency_p99_s"],
            "wf_p99_vs_peer": d["workflow_latency_p99_s"] / min(by[p]["workflow_latency_p99_s"] for p in PEERS),
            "mean_vs_sarathi": d["latency_mean_s"] / by["sarathi"]["latency_mean_s"],
            "mk_vs_peer": d["makespan_s"] / min(by[p]["makespan_s"] for p in PEERS)}


def table(comparisons: list[dict]) -> str:
    """Per class and variant: makespan change (mean / worst, points), p99 and mean ratios (median / worst)."""
    head = (f"{'class':10s} {'variant':>8s} {'n':>2s} {'d gap':>6s} {'worst':>6s} {'p99/pln':>7s} {'pln/peer':>8s} "
            f"{'p99/peer':>8s} {'worst':>6s} {'wf99/pr':>7s} {'mean/sar':>8s} {'mk/peer':>7s}")
    lines = [head, "-" * len(head)]
    for cls, variant in dict.fromkeys((c["class"], c["variant"]) for c in comparisons):
        cs = [c for c in comparisons if c["class"] == cls and c["variant"] == variant]

        def col(key: str) -> np.ndarray:
            return np.array([c[key] for c in cs])

        shown = "default" if variant == "hybrid" else variant[len("hybrid-"):]
        lines.append(f"{cls:10s} {shown:>8s} {len(cs):2d} {100 * col('gap_change').mean():+6.2f} {100 * col('gap_change').max():+6.2f} "
                     f"{np.median(col('p99_vs_plain')):7.2f} {np.median(col('plain_p99_vs_peer')):8.2f} "
                     f"{np.median(col('p99_vs_peer')):8.2f} {col('p99_vs_peer').max():6.2f} "
                     f"{np.median(col('wf_p99_vs_peer')):7.2f} {np.median(col('mean_vs_sarathi')):8.2f} "
                     f"{col('mk_vs_peer').max():7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per class (default 3)")
    ap.add_argument("--first-seed", type=int, default=0, help="first seed (held-out checks: 200 and up)")
    ap.add_argument("--classes", default=",".join(CLASSES), help=f"comma-separated subset of {','.join(CLASSES)}")
    ap.add_argument("--factors", default="",
                    help=f"comma-separated other due factors to compare with the default {DUE_FACTOR:g} (e.g. 1,1.5)")
    ap.add_argument("--csv", default=None,
                    help="where to write the rows (default benchmarks/results/workflow_latency.csv)")
    args = ap.parse_args(argv)
    classes = args.classes.split(",")
    unknown = sorted(set(classes) - set(CLASSES))
    if unknown:
        ap.error(f"--classes: unknown {unknown}; use some of {', '.join(CLASSES)}")
    if args.seeds < 1:
        ap.error("--seeds: at least 1")
    try:
        factors = [float(f) for f in args.factors.split(",") if f.strip()]
    except ValueError:
        ap.error(f"--factors: numbers > 0 separated by commas, not {args.factors!r}")
    if any(not np.isfinite(f) or f <= 0 for f in factors):
        ap.error(f"--factors: numbers > 0 separated by commas, not {args.factors!r}")
    extra = tuple(f"hybrid-due{f:g}" for f in factors)
    rows, comparisons = [], []
    t_all = time.perf_counter()
    for cls in classes:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for label, problem in cases(cls, seed):
                case_rows = run_case(cls, label, seed, problem, extra)
                rows += case_rows
                c = compare(case_rows)
                comparisons += [c] + [compare(case_rows, name) for name in extra]
                by = {r["policy"]: r for r in case_rows}
                print(f"{cls:10s} s{seed:<3d} {label:26s} gap plain {100 * by['hybrid-plain']['gap']:5.2f}% hybrid "
                      f"{100 * by['hybrid']['gap']:5.2f}% | p99 plain {by['hybrid-plain']['latency_p99_s']:6.1f} hybrid "
                      f"{by['hybrid']['latency_p99_s']:6.1f} best peer {min(by[p]['latency_p99_s'] for p in PEERS):6.1f}"
                      f" | mean hybrid/sarathi {c['mean_vs_sarathi']:.2f}", flush=True)
    print()
    print(table(comparisons))
    out = Path(args.csv) if args.csv else Path(__file__).resolve().parent / "results" / "workflow_latency.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{len(rows)} runs; wall time {time.perf_counter() - t_all:.1f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
