"""Four-instance mixed fleets: the hybrid against the exact fleet bound, and the ablation of its parts.

Target (issue 12): on a 4-instance mixed fleet the hybrid within 1 % of the exact fleet bound
(:func:`lloptim.lower_bound`: on instances that differ, the fractional assignment LP of
:mod:`lloptim.bounds`), on several fleets, workloads and seeds.

Fleets (llama-65b, 40 clients, unless said): ``4x`` identical (for reference, not mixed);
``2+2slow`` (two 1.5x slower in prefill and decode); ``3+1slow`` (one 2x slower); ``1+3slow`` (three
1.5x slower); ``2+2dslow`` (two with 0.6x prefill and 1.6x decode time: a different accelerator,
strong in compute, weak in memory bandwidth, so requests differ in where they are cheap);
``2x40+2x20`` (two servers with 20 clients); ``3kinds`` (two base, one 1.5x slower, one 0.6x/1.6x).

Workloads, all at time 0: GSM8K test; GSM8K-train cases 1 and 2 (1319 requests each,
:func:`lloptim.workloads.gsm8k_case`); ``heavy`` seeds 1-3 (lognormal prompts and outputs, sigma
1.2, medians 100 and 80 tokens, 1500 requests; 163,840 KV tokens per instance so that memory
does not bind). The end game's threshold was chosen on :data:`TRAINING` (GSM8K case 1, heavy
seed 1); the other workloads are held out.

Policies (columns): ``hyb`` (``hybrid``, the default: least-slack dispatch steered by the LP fleet prices
of :mod:`lloptim.runtime.fleet`, the end-game plan of :mod:`lloptim.runtime.endgame`, fused prompt
chunks, which ``fused="auto"`` picks on a fleet); ablations: ``no-EG`` (no end game), ``separ``
(separate prefill iterations, the paper's model), ``ect`` (earliest completion without prices),
``none`` (no fleet prices: any idle client takes the head of the queue), ``unif`` (fixed prices
1/m: a request belongs only where it is cheapest; GSM8K test only, slow to simulate because slow
instances idle); peers: ``plan`` (``hybrid-fused-plan``, the rolling bin-packing plan) and
``srthi`` (Sarathi-Serve).

Run: ``python benchmarks/fleet.py [--quick]`` (about 6-12 minutes on 2 busy cores); prints an
80-column table and writes ``benchmarks/results/fleet.csv`` (one row per fleet, workload and
policy); ``--from-csv benchmarks/results/fleet.csv`` prints the tables of a previous run again.
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
    "heavy-s3": (lambda: workloads.synthetic(1500, seed=3, prompt_median=100, output_median=80, sigma=1.2,
                                             max_tokens=1500), HEAVY_KV),
}


#: The workloads the end game's threshold (:data:`lloptim.runtime.dispatch.TAIL_PLAN`) was chosen on;
#: the others are held out.
TRAINING = ("gsm8k-case1", "heavy-s1")

#: ``label -> (policy factory, header)``; the headers are the table's 5-character columns.
POLICIES = {
    "hybrid": (lambda: hybrid_policy(), "hyb"),
    "no end game": (lambda: hybrid_policy(tail_plan=None), "no-EG"),
    "separate": (lambda: hybrid_policy(fused=False), "separ"),
    "prices ect": (lambda: hybrid_policy(prices="ect"), "ect"),
    "prices none": (lambda: hybrid_policy(prices="none"), "none"),
    "prices uniform": (lambda: hybrid_policy(prices="uniform"), "unif"),
    "hybrid-fused-plan": (lambda: make_policy("hybrid-fused-plan"), "plan"),
    "sarathi": (lambda: make_policy("sarathi"), "srthi"),
}


def policies(with_uniform: bool) -> dict:
    """``label -> policy factory`` of one case (uniform prices only where asked: slow to simulate)."""
    return {k: f for k, (f, _) in POLICIES.items() if with_uniform or k != "prices uniform"}


def _cell(gap: float | None) -> str:
    """A gap (fraction) as a 5-character percent cell."""
    if gap is None:
        return f"{'':5s}"
    g = 100 * gap
    return f"{g:5.2f}" if g < 10 else f"{g:5.1f}"


def _header() -> None:
    heads = [h for _, h in POLICIES.values()]
    print("gap to the exact fleet bound, % (makespan / bound - 1); fused bound, s")
    print(f"{'fleet':9s} {'workload':11s} {'bound':>5s} " + " ".join(f"{h:>5s}" for h in heads))


def _case_line(fname: str, wname: str, bound_s: float, gaps: dict[str, float]) -> str:
    return f"{fname:9s} {wname:11s} {bound_s:5.1f} " + " ".join(_cell(gaps.get(p)) for p in POLICIES)


def _summary(rows: list[dict]) -> None:
    """The per-group means, worsts and counts within 1 % (80 columns)."""
    labels = list(POLICIES)
    heads = [h for _, h in POLICIES.values()]
    by_case: dict[tuple, dict] = {}
    for r in rows:
        by_case.setdefault((r["fleet"], r["workload"]), {})[r["policy"]] = r
    groups = {"mixed": lambda f, w: f != "4x", " held-out": lambda f, w: f != "4x" and w not in TRAINING,
              " GSM8K": lambda f, w: f != "4x" and w.startswith("gsm8k"),
              " heavy": lambda f, w: f != "4x" and w.startswith("heavy"),
              "4x same": lambda f, w: f == "4x"}

    def gaps_of(keep, p) -> list[float]:
        return [100 * float(c[p]["gap"]) for (f, w), c in by_case.items() if keep(f, w) and p in c]

    def fmt(gaps: list[float]) -> str:
        if not gaps:
            return ""
        return f"{np.mean(gaps):.1f}/{np.max(gaps):.0f}" if np.max(gaps) >= 10 else \
            f"{np.mean(gaps):.2f}/{np.max(gaps):.2f}"

    print("\nsummary: mean / worst gap %, cases within 1 %")
    print(f"{'':13s}" + " ".join(f"{h:>10s}" for h in heads[:6]))
    for gname, keep in groups.items():
        print(f"{gname:13s}" + " ".join(f"{fmt(gaps_of(keep, p)):>10s}" for p in labels[:6]))
    for gname, keep in groups.items():
        cells = [f"{sum(g <= 1 for g in gaps)}/{len(gaps)}" if (gaps := gaps_of(keep, p)) else "" for p in labels[:6]]
        print(f"{gname + ' <1%':13s}" + " ".join(f"{c:>10s}" for c in cells))
    mixed = groups["mixed"]
    for p in labels[6:]:
        gaps = gaps_of(mixed, p)
        print(f"{p} on mixed fleets: mean {np.mean(gaps):.2f} %, worst {np.max(gaps):.2f} %, "
              f"within 1 %: {sum(g <= 1 for g in gaps)}/{len(gaps)}")
    steered = [int(float(r["steered"])) for r in rows if r["policy"] == "hybrid" and r["fleet"] != "4x"]
    print(f"hybrid: decisions the prices steered off the queue's head per run: median {np.median(steered):.0f}")


def _reprint(path: Path) -> None:
    """The tables of a previous run, from its CSV."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    _header()
    cases: dict[tuple, dict] = {}
    for r in rows:
        cases.setdefault((r["fleet"], r["workload"]), {})[r["policy"]] = r
    for (fname, wname), case in cases.items():
        bound = min(float(r["bound_s"]) for r in case.values())
        print(_case_line(fname, wname, bound, {p: float(r["gap"]) for p, r in case.items()}))
    _summary(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="GSM8K test and heavy-s1 only")
    ap.add_argument("--from-csv", type=Path, default=None, metavar="PATH",
                    help="only print the tables of a previous run's CSV (e.g. benchmarks/results/fleet.csv)")
    args = ap.parse_args()
    if args.from_csv is not None:
        _reprint(args.from_csv)
        return
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    rows = []
    t_all = time.perf_counter()
    names = ["gsm8k-test", "heavy-s1"] if args.quick else list(WORKLOADS)
    _header()
    for fname, kinds in fleets().items():
        for wname in names:
            make, kv = WORKLOADS[wname]
            prob = Problem(make(), build(kinds, kv), f"{wname} on {fname}")
            bound = lower_bound(prob)
            pols = policies(with_uniform=wname == "gsm8k-test" and fname != "4x")
            case = {}
            for label, factory in pols.items():
                pol = factory()
                t0 = time.perf_counter()
                res = run_policy(prob, pol)
                wall = time.perf_counter() - t0
                m = summarize(res, bound)
                fleet = getattr(pol.requests, "fleet", None)
                active = fleet is not None and getattr(fleet, "active", False)
                case[label] = m.gap_to_bound
                rows.append({"fleet": fname, "workload": wname, "policy": label, "bound_s": m.lower_bound_s,
                             "makespan_s": m.makespan_s, "gap": m.gap_to_bound,
                             "steered": fleet.steered if active else 0,
                             "lp_solves": fleet.solves if active else 0,
                             "end_game_at_s": getattr(pol.requests, "tail_at_s", None),
                             "run_wall_s": wall})
            print(_case_line(fname, wname, bound.fused_s, case), flush=True)
    with open(out / "fleet.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _summary(rows)
    print(f"wall time {time.perf_counter() - t_all:.1f} s")


if __name__ == "__main__":
    main()
