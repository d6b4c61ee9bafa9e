"""Wall time of :func:`lloptim.lower_bound` on mixed fleets with precedence and arrivals.

With precedence or arrivals the bound adds the window bound (``_window_bound`` in
:mod:`lloptim.bounds`): one work bound per (head, tail) threshold window, and on a fleet of several
instance kinds each work bound solves the fractional assignment LP
(:func:`~lloptim.bounds.fractional_assignment_bound`). This script times ``lower_bound`` on DAG,
fan-in and chain workflows (all at 0 and Poisson-arriving) and on Poisson-arriving independent
requests, each on an identical fleet of 4 LLaMA-65B instances and on mixed fleets of 2, 3 and 4
kinds (different speeds via ``latency.scaled``, clients and KV capacities), and prints each case's
wall time and its ratio to the identical fleet of the same workload (same run, so machine noise
mostly cancels).

Without migration on a mixed fleet the bound also solves the chain-coupling LP over instance
kinds (``_chain_coupling_lp``), by column generation. ``--reference`` also times the paths before
the speed-ups (every window's cutting planes from scratch, ``lloptim.bounds._WINDOW_FAST = False``;
the chain-coupling LP built whole for ``linprog``, ``lloptim.bounds._CHAIN_LP_FAST = False``),
prints the speed-up, and checks that both give the same bound (relative 1e-9); ``--reference
chain-lp`` turns off only the chain-coupling LP's fast path. Above
``CHAIN_LP_MAX_COLUMNS`` (instance kinds x requests) the path before skips the LP, so there the
fast bound may be higher: such rows say ``lifted`` instead of comparing.

``--requests 10000,50000`` runs cases of about that many requests instead (DAG, fan-in and chain
workflows with as many workflows as that takes, at 0 and Poisson-arriving, and Poisson-arriving
independent requests), on the mixed fleets only unless ``--fleets`` says otherwise.

Run: ``python benchmarks/bound_speed.py [--sizes 14,100,1000 | --requests 10000,50000]
[--reference [all|chain-lp]]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lloptim import Instance, Problem, load_profile, lower_bound, workloads
from lloptim import bounds as _bounds


def fleets() -> dict[str, list[Instance]]:
    """``name -> instances``: an identical fleet and mixed fleets of 2, 3 and 4 kinds."""
    base = load_profile("llama-65b")

    def kind(prefill: float, decode: float):
        return base.with_latency(base.latency.scaled(prefill, decode))

    spec = {
        "4x": [(base, 4, 40, 81_920)],
        "2kinds": [(base, 2, 40, 81_920), (kind(1.5, 1.5), 2, 40, 81_920)],
        "3kinds": [(base, 2, 40, 81_920), (kind(1.5, 1.5), 1, 30, 65_536), (kind(0.6, 1.6), 1, 40, 81_920)],
        "4kinds": [(base, 1, 40, 81_920), (kind(1.5, 1.5), 1, 30, 65_536), (kind(0.6, 1.6), 1, 40, 81_920),
                   (kind(2.0, 1.2), 1, 20, 40_960)],
    }
    out = {}
    for name, kinds in spec.items():
        insts = []
        for profile, count, clients, kv in kinds:
            for _ in range(count):
                insts.append(Instance.from_profile(profile, clients=clients, kv_capacity_tokens=kv,
                                                   name=f"i{len(insts)}"))
        out[name] = insts
    return out


#: Mean requests per workflow of each shape (``workloads.workflows`` defaults), for ``--requests``.
PER_WORKFLOW = {"dag": 10, "fan-in": 5, "chain": 3}


def cases(sizes: list[int], requests: bool = False) -> dict[str, object]:
    """``name -> workload``: workflows of each shape (at 0 and arriving) and arriving requests.

    ``sizes`` are workflows per shape, or with ``requests`` about that many requests per case.
    """
    out = {}
    for n in sizes:
        for shape in ("dag", "fan-in", "chain"):
            k = max(1, round(n / PER_WORKFLOW[shape])) if requests else n
            out[f"{shape}-{k}"] = workloads.workflows(shape, k, seed=1)
            out[f"{shape}-{k}-poisson"] = workloads.workflows(shape, k, seed=2, arrival_rate=1.0)
        m = n if requests else 3 * n
        wl = workloads.synthetic(m, seed=3)
        rng = np.random.default_rng(3)
        out[f"requests-{m}-poisson"] = wl.with_arrivals(np.cumsum(rng.exponential(1 / 8.0, len(wl))))
    return out


def timed(problem: Problem, fast: bool, paths: str = "all") -> tuple[float, float, float]:
    """``(seconds, total_s, fused_s)`` of one ``lower_bound`` (no migration, as the policies run).

    ``fast=False`` runs the paths before the speed-ups: ``paths="all"`` both, ``"chain-lp"`` only
    the chain-coupling LP's (the window bound's fast path stays on).
    """
    old = _bounds._WINDOW_FAST, _bounds._CHAIN_LP_FAST
    _bounds._WINDOW_FAST = fast or paths == "chain-lp"
    _bounds._CHAIN_LP_FAST = fast
    try:
        t = time.perf_counter()
        lb = lower_bound(problem, migration=False)
        return time.perf_counter() - t, lb.total_s, lb.fused_s
    finally:
        _bounds._WINDOW_FAST, _bounds._CHAIN_LP_FAST = old


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="14,100,1000", help="workflows per case, comma-separated")
    parser.add_argument("--requests", default=None, help="about this many requests per case, comma-separated "
                                                         "(instead of --sizes; mixed fleets unless --fleets)")
    parser.add_argument("--reference", nargs="?", const="all", default=None, choices=("all", "chain-lp"),
                        help="also time the paths before the speed-ups: all (default) or only the chain-coupling "
                             "LP's")
    parser.add_argument("--fleets", default=None, help="fleet names, comma-separated (default: all)")
    args = parser.parse_args(argv)
    by_requests = args.requests is not None
    sizes = [int(s) for s in (args.requests if by_requests else args.sizes).split(",")]
    all_fleets = fleets()
    names = ([n for n in all_fleets if n != "4x" or not by_requests] if args.fleets is None
             else args.fleets.split(","))
    # imports and first-call set-up (scipy, HiGHS) are paid here, not by the first case timed
    warm = Problem(workloads.workflows("dag", 2, seed=0), tuple(all_fleets["4kinds"]))
    timed(warm, True), timed(warm, False)
    head = f"{'case':<24}{'requests':>9}{'fleet':>8}{'bound s':>10}{'wall s':>9}{'x 4x':>7}"
    print(head + (f"{'old s':>9}{'speedup':>9}" if args.reference else ""))
    worst_speedup, mismatches, total_new, total_old = np.inf, 0, 0.0, 0.0
    lifted = 0
    for case, wl in cases(sizes, by_requests).items():
        ref = None
        for fleet in names:
            problem = Problem(wl, tuple(all_fleets[fleet]))
            wall, total, fused = timed(problem, True)
            total_new += wall
            ref = wall if fleet == "4x" else ref
            ratio = f"{wall / ref:7.2f}" if ref else f"{'':>7}"
            line = f"{case:<24}{len(wl):>9}{fleet:>8}{total:>10.2f}{wall:>9.3f}{ratio}"
            if args.reference:
                old_wall, old_total, old_fused = timed(problem, False, args.reference)
                total_old += old_wall
                same = (abs(total - old_total) <= 1e-9 * max(1.0, old_total)
                        and abs(fused - old_fused) <= 1e-9 * max(1.0, old_fused))
                # above CHAIN_LP_MAX_COLUMNS the path before skips the chain-coupling LP: only ">=" holds
                skipped = len(wl) * len({(i.profile.latency, i.clients) for i in problem.instances}) \
                    > _bounds.CHAIN_LP_MAX_COLUMNS
                higher = skipped and total >= old_total * (1 - 1e-9) and fused >= old_fused * (1 - 1e-9)
                lifted += higher and not same
                mismatches += not (same or higher)
                worst_speedup = min(worst_speedup, old_wall / wall) if old_wall > 0.5 else worst_speedup
                line += f"{old_wall:>9.3f}{old_wall / wall:>9.1f}" + ("" if same else "  lifted" if higher
                                                                      else "  MISMATCH")
            print(line, flush=True)
    print(f"total wall {total_new:.1f} s" + (f" (before: {total_old:.1f} s; slowest-case speed-up over cases "
                                              f"> 0.5 s: {worst_speedup:.1f}x; bound mismatches: {mismatches}; "
                                              f"lifted above the path before's skipped LP: {lifted})"
                                              if args.reference else ""))


if __name__ == "__main__":
    main()
