"""Where the hybrid's decode steps above the memory-aware bound go, decile by decile of one run.

``benchmarks/memory.py`` splits the excess of a run's decode steps over the bound's into underuse
and imbalance; this script says *when* in the run it happens. One run per case (1000 requests of
``benchmarks/memory.py``: prompts uniform in [20, 200], outputs lognormal with median 100, one
llama-65b instance, 40 clients, paged KV of 16-token blocks at ``rho``), its decode steps cut
into tenths, and per tenth (with ``n`` the busy clients over ``C`` and ``h`` the KV memory held
over ``M`` in each decode step; a resource is *full* in a step when it is at least
:data:`FULL` used):

* the steps with the clients full and the cache not, the cache full and the clients not, both,
  neither;
* the idle client-steps ``sum(1 - n)`` and idle memory-steps ``sum(1 - h)``;
* the requests started in it and their mean output (the dispatch order at work);
* the work left at its start, in decode steps by clients (output tokens left over ``C``) and by
  memory (KV area left over ``M``), against the run's steps left: their difference, the
  *balance*, says which resource the rest of the run needs more of, and the run's steps above
  the larger are the excess still to come (runs without preemptions only).

Since the KV area is the same in every schedule, a run's decode steps are ``A / M`` plus its idle
memory-steps, and the bound's are ``A / M`` plus its ramp-up from an empty cache (``R``, the
bound's memory steps minus ``A / M``): where memory sets the bound, the excess over it is the idle
memory-steps of the run minus ``R``, and the table says in which tenth they are (the fill-up of
the first tenth, the end game of the last, the rest in between).

Run: ``python benchmarks/memory_gap.py [--sigmas 1.0,1.2,1.5] [--seeds 0] [--rho 1.0]
[--unknown] [--policy hybrid-fused] [--no-fill-ramp]``; rows in ``benchmarks/results/memory_gap.csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_csv  # noqa: E402
from memory import BLOCK, CLIENTS, NOISE, capacity_for, memory_workload  # noqa: E402

from lloptim import Problem, lower_bound, run_policy, summarize  # noqa: E402
from lloptim.memory import decode_area_tokens  # noqa: E402
from lloptim.runtime.estimators import noisy_estimates  # noqa: E402

#: A resource counts as full in a decode step when at least this fraction of it is used.
FULL = 0.97
#: Tenths of the run.
PARTS = 10


def gap_by_part(problem: Problem, result, parts: int = PARTS, full: float = FULL) -> tuple[list[dict], dict]:
    """The run's decode steps cut into ``parts`` equal spans: how busy each resource was in each (one instance).

    Parameters
    ----------
    problem
        The problem the run solved (one instance).
    result
        Its :class:`~lloptim.runtime.engine.RunResult` (with ``trace_kv_tokens``).
    parts
        Number of spans (count).
    full
        Fraction of a resource at which it counts as full (dimensionless).

    Returns
    -------
    tuple
        ``(rows, totals)``: one dict per span (``steps``, ``clients_used``, ``memory_used`` (means,
        fractions), ``clients_full_only``, ``memory_full_only``, ``both_full``, ``neither_full``
        (steps), ``idle_client_steps``, ``idle_memory_steps`` (steps), ``started``, ``started_mean_output``
        (requests, tokens), ``steps_left`` (the run's decode steps from the span's start on),
        ``work_left_clients`` and ``work_left_memory`` (the decode steps the work left at the span's
        start needs by clients, its output tokens over ``C``, and by memory, its KV area over
        ``M``; NaN when the run preempted), ``lost`` (the span's steps minus the work they did of
        the larger of the two: the run's steps above the work left grow by it; it sums to the
        run's steps above ``max(output / C, area / M)``), ``lost_too_thin`` (of it, in steps
        where memory is the larger need and the clients are full: the running requests hold too
        little) and ``lost_too_fat`` (where the clients are the larger need and memory is full:
        they hold too much), steps; and the run's totals: ``decode_steps``, ``bound_steps``,
        ``bound_steps_clients``, ``bound_steps_memory``, ``area_steps`` (the KV area over the
        capacity, steps), ``bound_ramp_steps`` (the bound's memory steps minus ``area_steps``),
        ``idle_client_steps``, ``idle_memory_steps`` (steps), ``last_start_step`` (the decode step
        in which the last request started).
    """
    inst = problem.instances[0]
    C = inst.clients
    M = inst.kv_blocks * inst.kv_block_tokens
    lb = lower_bound(problem)
    dec = (result.trace_kind == 1) | (result.trace_kind == 2)  # decode and fused steps (not migrations, swaps)
    n = result.trace_participants[dec] / C
    h = result.trace_kv_tokens[dec] / M
    S = int(dec.sum())
    starts = result.trace_start_s[dec]
    # the decode step in which each request began decoding (its prefill ends there, or is fused into it)
    first = np.clip(np.searchsorted(starts, result.prefill_end_s, side="right") - 1, 0, S - 1)
    out = problem.workload.output_tokens
    edges = np.linspace(0, S, parts + 1).round().astype(int)
    # the work left at a span's start, from when each request began (exact only when none was
    # preempted: a recomputed request's progress is not its decode steps since it first began)
    exact = result.preemptions is None or int(np.sum(result.preemptions)) == 0
    left_c, left_m = _work_left(problem, first, S) if exact else (np.full(S + 1, np.nan), np.full(S + 1, np.nan))
    # the run's steps above the larger work left shrink by 1 minus what a step did of it: that is the
    # step's loss (the larger term's resource idle), and it sums to the run's steps above the work
    need = np.maximum(left_c, left_m)
    lost = 1.0 - (need[:-1] - need[1:])
    memory_critical = left_m[:-1] >= left_c[:-1]
    thin = memory_critical & (n >= full)   # memory needed most, clients full: the running set holds too little
    fat = ~memory_critical & (h >= full)   # clients needed most, memory full: it holds too much
    rows = []
    for a, b in zip(edges[:-1], edges[1:]):
        nn, hh = n[a:b], h[a:b]
        cf, mf = nn >= full, hh >= full
        began = (first >= a) & (first < b)
        rows.append({"from_step": int(a), "to_step": int(b), "steps": int(b - a),
                     "clients_used": float(nn.mean()) if b > a else 0.0, "memory_used": float(hh.mean()) if b > a else 0.0,
                     "clients_full_only": int(np.sum(cf & ~mf)), "memory_full_only": int(np.sum(mf & ~cf)),
                     "both_full": int(np.sum(cf & mf)), "neither_full": int(np.sum(~cf & ~mf)),
                     "idle_client_steps": float(np.sum(1 - nn)), "idle_memory_steps": float(np.sum(1 - hh)),
                     "started": int(began.sum()),
                     "started_mean_output": float(out[began].mean()) if began.any() else 0.0,
                     "steps_left": int(S - a), "work_left_clients": float(left_c[a]),
                     "work_left_memory": float(left_m[a]), "lost": float(lost[a:b].sum()),
                     "lost_too_thin": float(lost[a:b][thin[a:b]].sum()) if exact else float("nan"),
                     "lost_too_fat": float(lost[a:b][fat[a:b]].sum()) if exact else float("nan")})
    area_steps = float(lb.kv_area_token_steps) / M
    totals = {"decode_steps": S, "bound_steps": max(lb.decode_steps_clients, lb.decode_steps_memory),
              "bound_steps_clients": int(lb.decode_steps_clients), "bound_steps_memory": int(lb.decode_steps_memory),
              "area_steps": area_steps, "bound_ramp_steps": float(lb.decode_steps_memory - area_steps),
              "idle_client_steps": float(np.sum(1 - n)), "idle_memory_steps": float(np.sum(1 - h)),
              "last_start_step": int(first.max())}
    return rows, totals


def _work_left(problem: Problem, first: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The work left before each decode step ``0 .. steps`` of a run without preemptions, decode steps.

    Request ``r`` generates its ``k``-th token in decode step ``first[r] + k - 1`` and holds
    ``B ceil((p_r + k) / B)`` tokens then. Returns ``(output tokens left / C, KV area left / M)``,
    each ``steps + 1`` long (the last is 0).
    """
    inst = problem.instances[0]
    w = problem.workload
    p, o = w.prompt_tokens.astype(np.int64), w.output_tokens.astype(np.int64)
    B, C, M = inst.kv_block_tokens, inst.clients, inst.kv_blocks * inst.kv_block_tokens
    k = np.arange(int(o.sum())) - np.repeat(np.cumsum(o) - o, o) + 1  # token number within its request
    step = np.repeat(first, o) + k - 1
    tokens = np.bincount(step, minlength=steps)[:steps].astype(np.float64)
    area = np.bincount(step, weights=B * -(-(np.repeat(p, o) + k) // B), minlength=steps)[:steps]
    left_c = (o.sum() - np.concatenate([[0.0], np.cumsum(tokens)])) / C
    left_m = (decode_area_tokens(p, o, B).sum() - np.concatenate([[0.0], np.cumsum(area)])) / M
    return left_c, left_m


def case(sigma: float, seed: int, rho: float, known: bool, policy: str,
         fill_ramp: bool = True) -> tuple[list[dict], dict, float]:
    """One run of ``policy`` on the ``benchmarks/memory.py`` workload: its spans, totals and gap to the bound.

    ``fill_ramp=False`` runs a hybrid without its fill-up rule (the order of the plan from the first request).
    """
    wl = memory_workload(sigma, seed)
    problem = Problem.single(wl, "llama-65b", clients=CLIENTS, kv_capacity_tokens=capacity_for(wl, rho),
                             kv_block_tokens=BLOCK)
    est = None if known else noisy_estimates(wl, NOISE, seed=seed)
    opts = {} if fill_ramp or not policy.startswith("hybrid") else {"fill_ramp": False}
    res = run_policy(problem, policy, estimates=est, **opts)
    rows, totals = gap_by_part(problem, res)
    return rows, totals, summarize(res).gap_to_bound


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sigmas", default="1.0,1.2,1.5", help="output sigmas, comma-separated")
    ap.add_argument("--seeds", default="0", help="seeds, comma-separated")
    ap.add_argument("--rho", type=float, default=1.0, help="memory steps over client steps of the cache")
    ap.add_argument("--unknown", action="store_true", help="noisy estimates instead of the true lengths")
    ap.add_argument("--policy", default="hybrid-fused")
    ap.add_argument("--no-fill-ramp", action="store_true", help="a hybrid without its fill-up rule (as before it)")
    args = ap.parse_args()
    csv_rows = []
    for sigma in (float(s) for s in args.sigmas.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows, tot, gap = case(sigma, seed, args.rho, not args.unknown, args.policy, not args.no_fill_ramp)
            excess = tot["decode_steps"] - tot["bound_steps"]
            print(f"\nsigma {sigma}, seed {seed}, rho {args.rho}, {args.policy}: {100 * gap:.2f} % above the bound; "
                  f"{tot['decode_steps']} decode steps, bound {tot['bound_steps']} (clients "
                  f"{tot['bound_steps_clients']}, memory {tot['bound_steps_memory']} = area "
                  f"{tot['area_steps']:.0f} + ramp-up {tot['bound_ramp_steps']:.0f}): {excess} over "
                  f"({100 * excess / tot['bound_steps']:.1f} %)")
            print("tenth  steps  clients  memory  clients  memory  both  neither  idle client  idle memory  started"
                  "  mean output")
            print("              used     used    full     full                   steps        steps        "
                  "requests  of started")
            for i, r in enumerate(rows):
                print(f"{i + 1:>5}  {r['steps']:>5}  {r['clients_used']:7.3f}  {r['memory_used']:6.3f}  "
                      f"{r['clients_full_only']:>7}  {r['memory_full_only']:>6}  {r['both_full']:>4}  "
                      f"{r['neither_full']:>7}  {r['idle_client_steps']:11.1f}  {r['idle_memory_steps']:11.1f}  "
                      f"{r['started']:>8}  {r['started_mean_output']:10.0f}")
                csv_rows.append({"sigma": sigma, "seed": seed, "rho": args.rho, "lengths":
                                 "unknown" if args.unknown else "known", "policy": args.policy,
                                 "fill_ramp": not args.no_fill_ramp, "tenth": i + 1,
                                 **r, "gap": gap, **{f"run_{k}": v for k, v in tot.items()}})
            print("work left at the start of each tenth (decode steps: the run's, by clients, by memory, memory\n"
                  "minus clients) and the steps lost in it (above the work done of the larger need; too thin:\n"
                  "memory needed most, clients full; too fat: clients needed most, memory full)")
            print("tenth  run left  clients  memory  balance   lost  too thin  too fat")
            for i, r in enumerate(rows):
                print(f"{i + 1:>5}  {r['steps_left']:>8}  {r['work_left_clients']:7.0f}  {r['work_left_memory']:6.0f}  "
                      f"{r['work_left_memory'] - r['work_left_clients']:+7.0f}  {r['lost']:5.0f}  "
                      f"{r['lost_too_thin']:8.0f}  {r['lost_too_fat']:7.0f}")
            mid = sum(r["idle_memory_steps"] for r in rows[1:-1])
            print(f"idle memory-steps: first tenth {rows[0]['idle_memory_steps']:.0f} (the bound's ramp-up "
                  f"{tot['bound_ramp_steps']:.0f}), tenths 2-{PARTS - 1} {mid:.0f}, last tenth "
                  f"{rows[-1]['idle_memory_steps']:.0f}; the last request started in step {tot['last_start_step']}")
    default = (args.sigmas, args.seeds, args.rho, args.unknown, args.policy, args.no_fill_ramp) == \
        ("1.0,1.2,1.5", "0", 1.0, False, "hybrid-fused", False)
    write_csv("memory_gap.csv", csv_rows, partial=not default)


if __name__ == "__main__":
    main()
