"""Unknown output lengths on workflows and on memory-bound workloads: where the estimates fail.

A diagnostic (nothing here is a policy of lloptim): it measures what the hybrid loses to
estimated lengths, and what better estimates would buy, so that the next change is chosen by
measurement. Part 1 and part 2 print one table each; every row is a mean / worst gap to the bound
(percent) over the cases.

**Part 1, workflows** (``benchmarks/workflows.py``'s unknown-lengths rows: 100 workflows of each
shape on one LLaMA-65B instance of 40 clients, bucket-quantile estimates fitted on GSM8K train;
seeds 1-5 reported, 41-45 held out). First the estimates' error per DAG level (mean absolute log
error, correlation with the truth): a workflow's later steps read their predecessors' answers, so
the GSM8K-train estimator puts almost all of them in its longest-prompt bucket. Then the hybrid with

* ``estimator``: the estimates as they are (the benchmark's row);
* ``quantile 0.8``, ``mean``: a risk-adjusted estimator (the 0.8 quantile of each bucket) and the
  training mean, everywhere (the rank and the plan then weigh every step by an upper quantile);
* ``learned follow-ups``: the estimates of the later steps learned online as the run goes
  (:class:`_LearnedFollowUps`: per DAG level, a least-squares line in log space from the longest
  answer a step reads to its length, over the finished steps of that level, blended with the prior
  while few have finished), the plan revised when the revisions add up and a step that becomes
  ready slotted into the plan's order by its revised rank (:class:`_RevisingQueue`);
* ``truth at ready x noise s``: the same machinery told each later step's true length, times
  lognormal noise of log-sd ``s``, the moment it becomes ready (hindsight: the accuracy an online
  estimate would need);
* ``oracle roots`` / ``oracle follow-ups``: hindsight, the truth for the first steps only, or for
  the later steps only, from the start.

**Part 2, memory** (``benchmarks/memory.py``'s ``lengths=unknown`` rows: 1000 requests, lognormal
outputs of sigma 1.0/1.2/1.5, rho 1.0/1.4/2.0, estimates the truth times lognormal noise of log-sd
0.5; seeds 0-2 reported, 7-9 held out). First the bias of the KV area and of ``rho`` computed
from the estimates against the truth. Then the default hybrid with

* ``estimates``: the noisy estimates (the benchmark's row), with its preemptions and the tokens it
  recomputes (percent of all output tokens);
* ``posterior``: each estimate replaced by the posterior mean ``E[o | estimate]`` of a lognormal
  prior (fitted from the estimates themselves, knowing the noise's log-sd) and the noise;
* ``true total area`` (hindsight): every memory decision's per-request KV areas rescaled so that
  their total is the true total, i.e. what an unbiased area estimate could at best give;
* ``known``: the true lengths.

Run: ``python benchmarks/unknown_diagnostics.py [--part workflows,memory] [--quick]`` (6 minutes
on a shared 2-core machine: 2.3 for part 1, 4 for part 2; ``--quick``: one seed per set, one
sigma, under a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory as memory_bench  # noqa: E402  (the sibling benchmark's workloads)
import workflows as workflow_bench  # noqa: E402

from lloptim import Problem, lower_bound, run_policy, summarize, workloads  # noqa: E402
from lloptim.memory import decode_area_tokens  # noqa: E402
from lloptim.runtime import memory_schedulers  # noqa: E402
from lloptim.runtime.estimators import BucketQuantileEstimator, MeanEstimator, noisy_estimates  # noqa: E402
from lloptim.runtime.hybrid import hybrid_policy  # noqa: E402
from lloptim.runtime.request_schedulers import WorkflowQueue  # noqa: E402
from lloptim.work import typical_step_s  # noqa: E402

REPORT_WORKFLOW_SEEDS = (1, 2, 3, 4, 5)
HELDOUT_WORKFLOW_SEEDS = (41, 42, 43, 44, 45)
REPORT_MEMORY_SEEDS = (0, 1, 2)
HELDOUT_MEMORY_SEEDS = (7, 8, 9)


# -- part 1: workflows ------------------------------------------------------------------------------

class _LearnedFollowUps:
    """Per-level online estimates of later steps from the longest answer they read (module docstring).

    ``log o = a_k + b_k log m`` on level ``k`` (``m``: the largest predecessor output, the truth of
    finished ones, the current estimate of the others), least squares over the finished steps of
    the level; predicts the lognormal mean, blended with the prior at weight ``2 / (n + 2)``.
    """

    def __init__(self, precedence, prior: np.ndarray, truth: np.ndarray | None = None) -> None:
        self.prior = np.maximum(np.asarray(prior, dtype=np.float64), 1.0)
        self.estimates = self.prior.copy()
        self.level = np.asarray(precedence.level)
        depth = int(self.level.max()) + 1
        self.sums = np.zeros((depth, 6))  # n, sum x, sum y, sum xx, sum xy, sum yy
        self.done = np.zeros(self.prior.size, dtype=bool)
        self.preds = precedence.predecessors()
        e = precedence.edges
        self.by_level = [(e[self.level[e[:, 1]] == k, 0], e[self.level[e[:, 1]] == k, 1],
                          np.flatnonzero(self.level == k)) for k in range(1, depth)]

    def observe(self, request: int, output_tokens: float) -> None:
        o = max(float(output_tokens), 1.0)
        self.done[request] = True
        self.estimates[request] = o
        lv = int(self.level[request])
        if lv > 0 and all(self.done[q] for q in self.preds[request]):
            x, y = np.log(max(self.estimates[q] for q in self.preds[request])), np.log(o)
            self.sums[lv] += (1.0, x, y, x * x, x * y, y * y)

    def revise(self) -> np.ndarray:
        est = self.estimates
        for lv, (pred, succ, rows) in enumerate(self.by_level, start=1):
            n, sx, sy, sxx, sxy, syy = self.sums[lv]
            if n == 0:
                continue
            mx, my = sx / n, sy / n
            vx = sxx / n - mx * mx
            b = (sxy / n - mx * my) / vx if n >= 5 and vx > 1e-6 else 0.0
            a = my - b * mx
            s2 = max(syy / n - my * my - 2.0 * b * (sxy / n - mx * my) + b * b * vx, 0.0)
            m = np.zeros(est.size)
            np.maximum.at(m, succ, est[pred])
            todo = rows[~self.done[rows]]
            w = 2.0 / (n + 2.0)
            est[todo] = np.maximum(1.0, w * self.prior[todo]
                                   + (1.0 - w) * np.exp(a + b * np.log(np.maximum(m[todo], 1.0)) + 0.5 * s2))
        return est


class _TruthAtReady(_LearnedFollowUps):
    """Hindsight: a later step's estimate becomes its truth times fixed lognormal noise once its predecessors end."""

    def __init__(self, precedence, prior: np.ndarray, truth: np.ndarray, noise: float = 0.0) -> None:
        super().__init__(precedence, prior)
        self.revealed = truth * np.exp(np.random.default_rng(0).normal(0.0, noise, truth.size))

    def revise(self) -> np.ndarray:
        ready = np.ones(self.estimates.size, dtype=bool)
        for pred, succ, rows in self.by_level:
            np.logical_and.at(ready, succ, self.done[pred])
            todo = rows[~self.done[rows] & ready[rows]]
            self.estimates[todo] = np.maximum(1.0, self.revealed[todo])
        return self.estimates


class _RevisingQueue(WorkflowQueue):
    """The hybrid's workflow queue with estimates revised during the run by a follow-up model.

    At every finish the model revises the unfinished requests' estimates; their plan weights,
    chains and ranks follow; the known workflows are re-planned once the revisions add up to
    ``revise_fraction`` of the planned work, and a request whose estimate changed after its plan
    is keyed by its revised rank when it becomes ready (as :meth:`WorkflowQueue._append` slots
    new workflows). Diagnostic only (module docstring).
    """

    def __init__(self, model, noise: float = 0.0) -> None:
        super().__init__()
        self.model_kind, self.noise = model, noise

    def setup(self, ctx) -> None:
        super().setup(ctx)
        w = ctx.problem.workload
        truth = w.output_tokens.astype(np.float64)
        self.model = (_TruthAtReady(self.dag, ctx.estimates, truth, self.noise) if self.model_kind == "truth"
                      else _LearnedFollowUps(self.dag, ctx.estimates))
        self.work_est = np.asarray(ctx.estimates, dtype=np.float64).copy()
        self.planned_est = self.work_est.copy()
        self.revised_work = 0.0
        mean_p, mean_o = float(w.prompt_tokens.mean()), float(np.mean(ctx.estimates))
        self.work_per_token = np.array([typical_step_s(i.profile.latency, i.clients, mean_p, mean_o)
                                        for i in ctx.problem.instances])
        self.rank_tail = np.zeros(w.prompt_tokens.size)  # filled as workflows become known (_learn)

    def _learn(self, rows) -> None:
        super()._learn(rows)
        self.rank_tail = self.dag.tails(np.nan_to_num(self.fastest))  # only known rows are read

    def _plan(self, rows, release, free, limit, exact, clients=None, work=None) -> None:
        super()._plan(rows, release, free, limit, exact, clients, work=work)
        self.planned_est[rows] = self.work_est[rows]

    def on_ready(self, request: int, now: float) -> None:
        if int(self.component[request]) in self.known and self.work_est[request] != self.planned_est[request] \
                and self.plan_keys.size:
            rank = self.fastest[request] + self.rank_tail[request]
            pos = int(np.searchsorted(-self.plan_suffix_rank, -rank, side="right"))
            self.key[request] = float(self.plan_keys[pos]) if pos < self.plan_keys.size else self.plan_end
        super().on_ready(request, now)

    def next_request(self, state, client: int):
        if not self.arrived and self.known and self.revised_work > self.revise_fraction * self.planned_work:
            self._plan_all(state.now, False)
            self.revised_work = 0.0
            self.ready = [(self.key[r], r) for r in self.waiting]
            heapq.heapify(self.ready)
        return super().next_request(state, client)

    def on_finish(self, request: int, client: int, output_tokens: int, now: float) -> None:
        super().on_finish(request, client, output_tokens, now)
        self.model.observe(request, output_tokens)
        new = self.model.revise()
        rows = np.flatnonzero(~self.finished & (np.abs(new - self.work_est) > 1e-9))
        if rows.size == 0:
            return
        delta = new[rows] - self.work_est[rows]
        self.work_est[rows] = new[rows]
        self.weights[rows] += np.outer(delta, self.work_per_token)
        self.fastest[rows] = self.weights[rows].min(axis=1)
        self.revised_work += float(np.abs(delta).sum() * self.work_per_token.min())
        steps = np.maximum(np.ceil(new[rows]), 1.0)
        known = np.isin(self.component[rows], list(self.known))
        self.left_steps += float((steps - self.est_steps[rows])[known].sum())
        self.est_steps[rows] = steps
        self.tail_steps = self.dag.tails(self.est_steps)
        self.chain_steps = self.est_steps + self.tail_steps
        self.rank_tail = self.dag.tails(self.fastest)
        self.by_chain = [(-self.chain_steps[r], r) for r in self.waiting]
        heapq.heapify(self.by_chain)
        self.open_chains = [(-self.chain_steps[r], r) for r in np.flatnonzero(~self.finished).tolist()
                            if int(self.component[r]) in self.known]
        heapq.heapify(self.open_chains)


def _revising_hybrid(model: str, noise: float = 0.0):
    policy = hybrid_policy()
    policy.requests = _RevisingQueue(model, noise)
    policy.name = f"hybrid-revising-{model}"
    return policy


WORKFLOW_VARIANTS = ("estimator", "quantile 0.8", "mean", "learned follow-ups", "truth at ready x noise 0.25",
                     "truth at ready x noise 0.1", "oracle roots", "oracle follow-ups")


def workflow_case(shape: str, seed: int, fitted: dict) -> dict:
    """Level errors and the hybrid's gap under every variant of part 1 on one case (gaps in percent)."""
    wl = workloads.workflows(shape, 100, seed=seed)
    problem = workflow_bench.make_problem(wl, 40, 1)
    lb = lower_bound(problem, migration=False)
    truth = wl.output_tokens.astype(np.float64)
    est = fitted["median"].predict(wl)
    later = wl.precedence.in_degree() > 0
    runs = {"estimator": ("hybrid", est), "quantile 0.8": ("hybrid", fitted["q0.8"].predict(wl)),
            "mean": ("hybrid", fitted["mean"].predict(wl)),
            "learned follow-ups": (_revising_hybrid("learned"), est),
            "truth at ready x noise 0.25": (_revising_hybrid("truth", 0.25), est),
            "truth at ready x noise 0.1": (_revising_hybrid("truth", 0.1), est),
            "oracle roots": ("hybrid", np.where(later, est, truth)),
            "oracle follow-ups": ("hybrid", np.where(later, truth, est))}
    row = {f"gap {k}": 100 * summarize(run_policy(problem, p, estimates=e), lb).gap_to_bound
           for k, (p, e) in runs.items()}
    for lv in range(int(wl.precedence.level.max()) + 1):
        sel = wl.precedence.level == lv
        row[f"logerr {lv}"] = float(np.mean(np.abs(np.log(est[sel] / truth[sel]))))
        row[f"est {lv}"], row[f"true {lv}"] = float(est[sel].mean()), float(truth[sel].mean())
    return row


def part_workflows(quick: bool) -> None:
    train = workloads.gsm8k("train")
    fitted = {"median": BucketQuantileEstimator().fit(train), "q0.8": BucketQuantileEstimator(0.8).fit(train),
              "mean": MeanEstimator().fit(train)}
    sets = {"report": REPORT_WORKFLOW_SEEDS, "held-out": HELDOUT_WORKFLOW_SEEDS}
    print("Part 1, workflows (100 workflows, 40 clients, bucket-quantile estimates from GSM8K train)\n")
    for name, seeds in sets.items():
        seeds = seeds[:1] if quick else seeds
        rows = {s: [workflow_case(s, seed, fitted) for seed in seeds] for s in workflow_bench.SHAPES}
        if name == "report":
            print("estimates per DAG level (seeds " + ",".join(map(str, seeds)) + "): mean estimate / mean truth "
                  "tokens, mean |log error|")
            for shape, rs in rows.items():
                levels = sorted({int(k.split()[1]) for k in rs[0] if k.startswith("logerr")})
                print(f"  {shape:7s} " + "; ".join(
                    f"level {lv}: {np.mean([r[f'est {lv}'] for r in rs]):.0f} / "
                    f"{np.mean([r[f'true {lv}'] for r in rs]):.0f}, {np.mean([r[f'logerr {lv}'] for r in rs]):.2f}"
                    for lv in levels))
        print(f"\nhybrid gap to the bound, mean / worst %, seeds {','.join(map(str, seeds))} ({name})")
        print(f"  {'variant':30s}" + "".join(f"{s:>15s}" for s in workflow_bench.SHAPES) + f"{'all':>15s}")
        for v in WORKFLOW_VARIANTS:
            cells = [[r[f"gap {v}"] for r in rows[s]] for s in workflow_bench.SHAPES]
            every = [g for c in cells for g in c]
            print(f"  {v:30s}" + "".join(f"{np.mean(c):8.2f} /{np.max(c):5.2f}" for c in cells)
                  + f"{np.mean(every):8.2f} /{np.max(every):5.2f}")
        print()


# -- part 2: memory ---------------------------------------------------------------------------------

def posterior_mean(estimates: np.ndarray, noise: float) -> np.ndarray:
    """``E[o | estimate]`` for ``estimate = o exp(N(0, noise))`` and a lognormal ``o`` fitted from the estimates, tokens.

    ``log o ~ N(mu, v)`` with ``mu``, ``v + noise^2`` the mean and variance of the log estimates; the
    posterior of ``log o`` is normal with mean ``mu + k (log e - mu)`` and variance ``k noise^2``,
    ``k = v / (v + noise^2)``.
    """
    y = np.log(estimates)
    mu, v = float(y.mean()), max(float(y.var()) - noise ** 2, 1e-9)
    k = v / (v + noise ** 2)
    return np.maximum(1.0, np.exp(mu + k * (y - mu) + 0.5 * k * noise ** 2))


@contextlib.contextmanager
def true_total_area():
    """Hindsight: the per-request KV areas every memory decision reads, rescaled to the true total."""
    original = memory_schedulers.estimated_kv_areas

    def rescaled(ctx, instance):
        areas = original(ctx, instance)
        if ctx.known_lengths:
            return areas
        w, inst = ctx.problem.workload, ctx.problem.instances[instance]
        return areas * (decode_area_tokens(w.prompt_tokens, w.output_tokens, inst.kv_block_tokens).sum() / areas.sum())

    memory_schedulers.estimated_kv_areas = rescaled  # the Lagrangian imports it at call time
    try:
        yield
    finally:
        memory_schedulers.estimated_kv_areas = original


MEMORY_VARIANTS = ("estimates", "posterior", "true total area", "known")


def memory_case(sigma: float, rho: float, seed: int) -> dict:
    """Area and rho bias, and the hybrid's gap, preemptions and recomputed tokens under every variant of part 2."""
    wl = memory_bench.memory_workload(sigma, seed)
    cap = memory_bench.capacity_for(wl, rho)
    problem = Problem.single(wl, "llama-65b", clients=memory_bench.CLIENTS, kv_capacity_tokens=cap,
                             kv_block_tokens=memory_bench.BLOCK)
    lb = lower_bound(problem, kv_mode="paged")
    est = noisy_estimates(wl, memory_bench.NOISE, seed=seed)
    o, p = wl.output_tokens, wl.prompt_tokens
    e = np.maximum(np.ceil(est), 1).astype(np.int64)
    area_true = float(decode_area_tokens(p, o, memory_bench.BLOCK).sum())
    area_est = float(decode_area_tokens(p, e, memory_bench.BLOCK).sum())
    row = {"area_ratio": area_est / area_true, "rho_ratio": (area_est / e.sum()) / (area_true / o.sum())}
    for v in MEMORY_VARIANTS:
        given = {"estimates": est, "true total area": est, "posterior": posterior_mean(est, memory_bench.NOISE),
                 "known": None}[v]
        with true_total_area() if v == "true total area" else contextlib.nullcontext():
            res = run_policy(problem, "hybrid", estimates=given, kv_mode="paged")
        m = summarize(res, lb)
        row[f"gap {v}"] = 100 * m.gap_to_bound
        row[f"preemptions {v}"] = m.preemptions
        row[f"recomputed {v}"] = 100 * m.recomputed_tokens / float(o.sum())
    return row


def part_memory(quick: bool) -> None:
    print("Part 2, memory (1000 requests, 40 clients, paged KV, estimates = truth x lognormal noise 0.5)\n")
    sigmas = memory_bench.SIGMAS[:1] if quick else memory_bench.SIGMAS
    for name, seeds in {"report": REPORT_MEMORY_SEEDS, "held-out": HELDOUT_MEMORY_SEEDS}.items():
        seeds = seeds[:1] if quick else seeds
        print(f"seeds {','.join(map(str, seeds))} ({name}), sigma {','.join(f'{s:g}' for s in sigmas)}: "
              "mean / worst gap %, [preemptions, recomputed % of output tokens]")
        for rho in memory_bench.RHOS:
            rows = [memory_case(s, rho, seed) for s in sigmas for seed in seeds]
            if name == "report" and rho == memory_bench.RHOS[0]:
                ar, rr = [r["area_ratio"] for r in rows], [r["rho_ratio"] for r in rows]
                print(f"  KV area from the estimates / true: {min(ar):.2f}-{max(ar):.2f}; rho from the estimates "
                      f"/ true: {min(rr):.2f}-{max(rr):.2f}")
            print(f"  rho {rho:g}: " + "; ".join(
                f"{v} {np.mean([r[f'gap {v}'] for r in rows]):.2f} / {np.max([r[f'gap {v}'] for r in rows]):.2f} "
                f"[{np.mean([r[f'preemptions {v}'] for r in rows]):.0f}, "
                f"{np.mean([r[f'recomputed {v}'] for r in rows]):.1f}]" for v in MEMORY_VARIANTS), flush=True)
        print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="workflows,memory", help="comma-separated: workflows, memory")
    ap.add_argument("--quick", action="store_true", help="one seed per set (and one sigma for memory)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    for p in parts:
        if p not in ("workflows", "memory"):
            raise SystemExit(f"--part: unknown part {p!r} (fix: use workflows, memory or both)")
    if "workflows" in parts:
        part_workflows(args.quick)
    if "memory" in parts:
        part_memory(args.quick)
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
