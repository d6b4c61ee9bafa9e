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
        ``M``; NaN when the run preempted), and the run's totals: ``decode_steps``, ``bound_steps``,
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
    prompt, B = problem.workload.prompt_tokens, inst.kv_block_tokens
    rows = []
    for a, b in zip(edges[:-1], edges[1:]):
        done = np.clip(a - first, 0, out)  # tokens each request generated in the decode steps before a
        left_c = float((out - done).sum()) / C if exact else float("nan")
        left_m = float(decode_area_tokens(prompt + done, out - done, B).sum()) / M if exact else float("nan")
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
                     "steps_left": int(S - a), "work_left_clients": left_c, "work_left_memory": left_m})
    area_steps = float(lb.kv_area_token_steps) / M
    totals = {"decode_steps": S, "bound_steps": max(lb.decode_steps_clients, lb.decode_steps_memory),
              "bound_steps_clients": int(lb.decode_steps_clients), "bound_steps_memory": int(lb.decode_steps_memory),
              "area_steps": area_steps, "bound_ramp_steps": float(lb.decode_steps_memory - area_steps),
              "idle_client_steps": float(np.sum(1 - n)), "idle_memory_steps": float(np.sum(1 - h)),
              "last_start_step": int(first.max())}
    return rows, totals


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
            print("work left at the start of each tenth (decode steps): the run's, by clients, by memory;\n"
                  "its balance (memory minus clients) and the run's steps above the larger (to be lost)")
            print("tenth  run left  clients  memory  balance  lost ahead")
            for i, r in enumerate(rows):
                need = max(r["work_left_clients"], r["work_left_memory"])
                print(f"{i + 1:>5}  {r['steps_left']:>8}  {r['work_left_clients']:7.0f}  {r['work_left_memory']:6.0f}  "
                      f"{r['work_left_memory'] - r['work_left_clients']:+7.0f}  {r['steps_left'] - need:10.0f}")
            mid = sum(r["idle_memory_steps"] for r in rows[1:-1])
            print(f"idle memory-steps: first tenth {rows[0]['idle_memory_steps']:.0f} (the bound's ramp-up "
                  f"{tot['bound_ramp_steps']:.0f}), tenths 2-{PARTS - 1} {mid:.0f}, last tenth "
                  f"{rows[-1]['idle_memory_steps']:.0f}; the last request started in step {tot['last_start_step']}")
    default = (args.sigmas, args.seeds, args.rho, args.unknown, args.policy, args.no_fill_ramp) == \
        ("1.0,1.2,1.5", "0", 1.0, False, "hybrid-fused", False)
    write_csv("memory_gap.csv", csv_rows, partial=not default)


if __name__ == "__main__":
    main()
