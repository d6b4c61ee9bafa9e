"""Stress: fresh memory-bound workload families, every registered policy, against the memory-aware bound.

Our other memory benchmarks (``memory.py``, ``fleet.py``, the memory-fleet ablation) use one family:
llama-65b, 40 clients, 1000 requests, uniform prompts, lognormal outputs, 16-token blocks. A user's
case will differ; this script draws *fresh* cases from families those benchmarks never vary, several
seeds each, and runs them the way a user would:

* every case through the Python API (:func:`lloptim.run_policy` with ``check=True``, which recounts
  the KV accounting after every iteration and raises if it is ever wrong or over capacity;
  :func:`lloptim.lower_bound`; :func:`lloptim.summarize`), every registered policy;
* a sample (``--cli``: the first seed of each class) also as a TOML spec (its ``[[requests]]``, its
  ``[[instances]]`` with profile files written next to it) through ``lloptim simulate SPEC --policy
  hybrid --kv-mode M --kv-block B --json [--estimator E --train T]``, which must report the same
  makespan as the API.

Classes (each case draws its parameters from the class's ranges with its own seed):

``lognormal``
    prompts lognormal (median 100), outputs lognormal with sigma 1.0-2.0 (median 50-300).
``pareto``
    outputs Pareto (alpha 1.1-1.8), prompts uniform in [20, 400].
``bimodal``
    a chat + long-form mix: 10-30 % of requests long (median 900 tokens), the rest short (median 60).
``rag``
    long-context retrieval: prompts 1-4k tokens (log-uniform), outputs short (median 40).
``reserve-cap``
    reserve KV mode, each request with the ``max_output_tokens`` cap of its app (256-4096) and
    its output truncated at it, lengths unknown to the policies (noisy estimates).
``unknown``
    paged, lengths unknown: noisy estimates (the truth x exp(N(0, 0.5))) or ``bucket-quantile``
    fitted on a fresh draw of the same family.
``fleet``
    mixed fleets of 2-4 instances: profiles, client counts, caches (rho 0.8-4 each) and blocks
    differ per instance; known and unknown lengths.

Across classes: every hardware profile (the shipped ``llama-65b`` and three user profiles written
as TOML files: a faster mid-size model, a small memory-bandwidth-bound one whose per-KV-token
decode cost dominates, a compute-poor one with slow prefills), clients 8-128, blocks of 1, 16 and
32 tokens, 200-5000 requests, caches from barely binding (rho 1.0, the KV-area steps equal to the
client steps) to 4x binding.

Checks per run, reported as flags: an exception, a makespan below the bound (a bound bug), a
request not completed or tokens not conserved, a KV peak over capacity, a run more than 10x
slower than the median policy on its case (and over 5 s). Per case: the hybrids' gaps to the
bound (the fused bound for fused runs, as in ``--json``), their rank among all policies, the best
peer (the non-hybrid policies) and the hybrid's makespan over the best peer's.

Writes ``benchmarks/results/stress_memory.csv`` (a full run; ``--quick`` and partial runs write
nothing unless ``--csv`` is given).

Run: ``python benchmarks/stress_memory.py [--quick] [--seeds 0 1 2] [--classes ...] [--jobs 1] [--no-cli]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from typing import NamedTuple
from pathlib import Path

import numpy as np

from lloptim import Instance, Problem, Workload, load_profile, lower_bound, run_policy, summarize
from lloptim.hardware import HardwareProfile, save_profile
from lloptim.memory import decode_area_tokens
from lloptim.runtime.estimators import estimate
from lloptim.runtime.registry import policy_names

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = ("lognormal", "pareto", "bimodal", "rag", "reserve-cap", "unknown", "fleet")
SEEDS = (0, 1, 2)
HYBRIDS = ("hybrid", "hybrid-fused")
NOISE = 0.5
CAP_TIERS = (256, 512, 1024, 2048, 4096)


def profiles() -> dict[str, HardwareProfile]:
    """The shipped profile and three user profiles of other shapes (stated, not fitted)."""
    base = load_profile("llama-65b")
    lat = base.latency
    mid = replace(base, name="mid-13b", description="stress: a mid-size model, 3x faster everywhere",
                  latency=lat.scaled(prefill=1 / 3, decode=1 / 3), meta={})
    # a small model on a bandwidth-poor GPU: little fixed cost per step, the KV reads dominate
    kvb = replace(base, name="small-kvbound", description="stress: small model, decode dominated by KV reads",
                  latency=replace(lat, prefill_base_s=lat.prefill_base_s / 4, prefill_per_token_s=lat.prefill_per_token_s / 6,
                                  decode_base_s=lat.decode_base_s / 6, decode_per_seq_s=lat.decode_per_seq_s / 4,
                                  decode_per_kv_token_s=lat.decode_per_kv_token_s * 1.5), meta={})
    slowp = replace(base, name="slow-prefill", description="stress: compute-poor GPU, prefill 3x, decode 1.2x",
                    latency=lat.scaled(prefill=3.0, decode=1.2), meta={})
    return {p.name: p for p in (base, mid, kvb, slowp)}


class Case(NamedTuple):
    """One drawn case: its class, seed, workload and instances (and how the policies see lengths)."""

    cls: str
    seed: int
    family: str
    workload: Workload
    instances: tuple
    kv_mode: str
    estimator: str  # oracle, noisy, bucket-quantile
    train: Workload | None = None
    rhos: tuple = ()
    notes: dict = {}

    @property
    def label(self) -> str:
        return f"{self.cls}#{self.seed}"


def _lognormal(rng, n, median, sigma, lo, hi):
    return np.clip(np.rint(rng.lognormal(math.log(median), sigma, n)), lo, hi).astype(np.int64)


def draw_lengths(family: str, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Prompt and output lengths of ``n`` requests of ``family``, tokens, and the drawn parameters."""
    if family == "lognormal":
        sigma = float(rng.uniform(1.0, 2.0))
        median = float(rng.uniform(50, 300))
        return _lognormal(rng, n, 100, 0.8, 4, 2000), _lognormal(rng, n, median, sigma, 1, 4096), \
            {"sigma": round(sigma, 2), "out_median": round(median)}
    if family == "pareto":
        alpha = float(rng.uniform(1.1, 1.8))
        xm = float(rng.uniform(20, 60))
        out = np.clip(np.rint(xm * (1 + rng.pareto(alpha, n))), 1, 4096).astype(np.int64)
        return rng.integers(20, 401, n), out, {"alpha": round(alpha, 2), "xm": round(xm)}
    if family == "bimodal":
        share = float(rng.uniform(0.1, 0.3))
        long = rng.random(n) < share
        out = np.where(long, _lognormal(rng, n, 900, 0.4, 200, 4096), _lognormal(rng, n, 60, 0.6, 1, 400))
        return _lognormal(rng, n, 200, 0.7, 8, 3000), out, {"long_share": round(share, 2)}
    if family == "rag":
        prompt = np.rint(np.exp(rng.uniform(math.log(1000), math.log(4000), n))).astype(np.int64)
        return prompt, _lognormal(rng, n, 40, 0.8, 1, 512), {}
    raise ValueError(family)


def capacity_for(workload: Workload, rho: float, clients: int, block: int, peak: int) -> int:
    """KV capacity (whole blocks) at which the KV-area steps are ``rho`` x the client steps, tokens.

    At least one block more than ``peak``, the largest request's peak need, so every request fits.
    """
    area = float(decode_area_tokens(workload.prompt_tokens, workload.output_tokens, block).sum())
    steps = workload.output_tokens.sum() / clients
    cap = max(int(area / (rho * steps)), peak + block)
    return -(-cap // block) * block


def draw_case(cls: str, seed: int, quick: bool = False) -> Case:
    """The case of class ``cls`` and ``seed`` (deterministic in both)."""
    rng = np.random.default_rng([CLASSES.index(cls), seed, 7919])
    profs = profiles()
    n = int(rng.choice((200, 500, 1000, 2000, 5000), p=(0.15, 0.25, 0.3, 0.2, 0.1)))
    if cls == "fleet":
        n = int(rng.choice((500, 1000, 2000, 3000)))
    if quick:
        n = min(n, 200)
    family = cls if cls in ("lognormal", "pareto", "bimodal", "rag") else \
        str(rng.choice(("lognormal", "pareto", "bimodal", "rag") if cls != "reserve-cap" else ("lognormal", "bimodal")))
    prompt, output, notes = draw_lengths(family, rng, n)
    cap = np.zeros(n, dtype=np.int64)
    kv_mode, estimator, train = "paged", "oracle", None
    if cls == "reserve-cap":
        # each request's app sets max_tokens; the generation stops there
        cap = rng.choice(CAP_TIERS, n)
        output = np.minimum(output, cap)
        kv_mode, estimator = "reserve", "noisy"
    elif cls == "unknown":
        estimator = str(rng.choice(("noisy", "bucket-quantile")))
    elif cls == "fleet":
        estimator = str(rng.choice(("oracle", "noisy")))
    elif rng.random() < 0.25:
        kv_mode = "reserve"  # reserve with known lengths: the oracle reservation
    if estimator == "bucket-quantile":
        tp, to, _ = draw_lengths(family, np.random.default_rng([CLASSES.index(cls), seed, 104729]), 2000)
        train = Workload.from_arrays(tp, to, name=f"{family}-train")
    wl = Workload.from_arrays(prompt, output, max_output_tokens=cap if cap.any() else None,
                              name=f"{family}-{cls}-seed{seed}")
    peak = int((prompt + np.maximum(output, cap)).max())
    m = int(rng.integers(2, 5)) if cls == "fleet" else 1
    names = list(profs)
    insts, rhos = [], []
    for k in range(m):
        prof = profs[str(rng.choice(names))]
        clients = int(rng.choice((8, 16, 32, 48, 64, 96, 128) if m == 1 else (16, 32, 48, 64, 96)))
        block = int(rng.choice((1, 16, 32), p=(0.2, 0.5, 0.3)))
        rho = float(rng.choice((1.0, 1.3, 2.0, 3.0, 4.0) if m == 1 else (0.8, 1.0, 1.5, 2.5, 4.0)))
        kv = capacity_for(wl, rho, clients, block, peak)
        insts.append(Instance(prof, clients, kv, name=f"i{k}-{prof.name}", kv_mode=kv_mode, kv_block_tokens=block))
        rhos.append(rho)
    notes.update(n=n)
    return Case(cls, seed, family, wl, tuple(insts), kv_mode, estimator, train, tuple(rhos), notes)


def case_estimates(case: Case) -> np.ndarray | None:
    """What the policies see of the output lengths (as ``lloptim simulate --estimator`` computes it)."""
    if case.estimator == "oracle":
        return None
    return estimate(case.workload, case.estimator, case.train, sigma=NOISE)


def run_case(task: tuple) -> list[dict]:
    """Every policy in ``task`` on one drawn case: rows of makespan, gap, checks and wall time."""
    cls, seed, quick, policies = task
    case = draw_case(cls, seed, quick)
    problem = Problem(case.workload, case.instances, name=case.label)
    est = case_estimates(case)
    t = time.perf_counter()
    # no registered policy migrates: the bound without migration (the one summarize picks for them)
    bound = lower_bound(problem, kv_mode=case.kv_mode, estimates=est, migration=False)
    bound_wall = time.perf_counter() - t
    wl = case.workload
    rows = []
    for name in policies:
        row = {"class": cls, "seed": seed, "family": case.family, "n": len(wl), "instances": len(case.instances),
               "profiles": "+".join(i.profile.name for i in case.instances),
               "clients": "+".join(str(i.clients) for i in case.instances),
               "kv_capacity": "+".join(str(i.kv_capacity_tokens) for i in case.instances),
               "block": "+".join(str(i.kv_block_tokens) for i in case.instances),
               "rho": "+".join(f"{r:g}" for r in case.rhos), "kv_mode": case.kv_mode, "estimator": case.estimator,
               "params": json.dumps(case.notes, sort_keys=True), "policy": name, "makespan_s": float("nan"),
               "bound_s": float("nan"), "gap": float("nan"), "memory_binds": "", "preemptions": "",
               "kv_peak_tokens": "", "wall_s": float("nan"), "bound_wall_s": bound_wall, "error": "", "flags": ""}
        t = time.perf_counter()
        try:
            res = run_policy(problem, name, estimates=est, check=True)
            row["wall_s"] = time.perf_counter() - t
            m = summarize(res, bound)
        except Exception as exc:  # a crash is a finding: record it, go on
            row["wall_s"] = time.perf_counter() - t
            row["error"] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
            row["traceback"] = traceback.format_exc()[-2000:]
            rows.append(row)
            continue
        flags = []
        if res.migrations.any():
            flags.append("migrated")
        if m.makespan_s < m.lower_bound_s * (1 - 1e-9):
            flags.append("BOUND-ABOVE-MAKESPAN")
        if m.requests_completed != len(wl):
            flags.append(f"incomplete {m.requests_completed}/{len(wl)}")
        if int(res.generated_tokens) != int(wl.output_tokens.sum()):
            flags.append(f"tokens {int(res.generated_tokens)}/{int(wl.output_tokens.sum())}")
        if m.kv_peak_tokens > max(i.kv_capacity_tokens for i in case.instances):
            flags.append("kv-over-capacity")
        row.update(makespan_s=m.makespan_s, bound_s=m.lower_bound_s, gap=m.gap_to_bound,
                   memory_binds=m.memory_binds, preemptions=m.preemptions, kv_peak_tokens=m.kv_peak_tokens,
                   flags=";".join(flags))
        rows.append(row)
    walls = [r["wall_s"] for r in rows if not r["error"]]
    med = float(np.median(walls)) if walls else 0.0
    for r in rows:
        if not r["error"] and r["wall_s"] > max(10 * med, 5.0):
            r["flags"] = ";".join(filter(None, [r["flags"], f"slow {r['wall_s']:.1f}s vs median {med:.2f}s"]))
    _rank(rows)
    return rows


def _rank(rows: list[dict]) -> None:
    """Add each policy's rank (1: the shortest makespan) and the hybrids' comparison with the best peer."""
    ok = [r for r in rows if not r["error"]]
    order = sorted(ok, key=lambda r: r["makespan_s"])
    peers = [r for r in ok if not r["policy"].startswith("hybrid")]
    best_peer = min(peers, key=lambda r: r["makespan_s"]) if peers else None
    for r in rows:
        r["rank"] = 1 + sum(o["makespan_s"] < r["makespan_s"] * (1 - 1e-9) for o in order) if not r["error"] else ""
        r["best_peer"] = best_peer["policy"] if best_peer else ""
        r["vs_best_peer"] = r["makespan_s"] / best_peer["makespan_s"] - 1 if best_peer and not r["error"] else float("nan")


# ---------------------------------------------------------------- the CLI sample


def _toml_value(x) -> str:
    return json.dumps(x) if isinstance(x, str) else repr(x)


def write_spec(case: Case, folder: Path, workload: Workload | None = None, name: str = "spec") -> Path:
    """``case`` as a TOML spec in ``folder`` (profiles other than the shipped one as files beside it).

    With ``workload`` (a ``--train`` spec): those requests and no ``[[instances]]`` (the default
    instance, whose cache holds every training request of these families).
    """
    wl = workload if workload is not None else case.workload
    lines = [f"name = {_toml_value(case.label)}", ""]
    for p, o, c in zip(wl.prompt_tokens, wl.output_tokens, wl.max_output_tokens):
        lines.append("[[requests]]")
        lines.append(f"prompt_tokens = {int(p)}\noutput_tokens = {int(o)}")
        if c:
            lines.append(f"max_output_tokens = {int(c)}")
    for inst in case.instances if workload is None else ():
        prof = inst.profile.name
        if prof != "llama-65b":
            save_profile(inst.profile, folder / f"{prof}.toml")
            prof = f"{prof}.toml"
        lines += ["[[instances]]", f"profile = {_toml_value(prof)}", f"clients = {inst.clients}",
                  f"kv_capacity_tokens = {inst.kv_capacity_tokens}", f"kv_mode = {_toml_value(inst.kv_mode)}",
                  f"kv_block_tokens = {inst.kv_block_tokens}"]
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cli_check(cls: str, seed: int, quick: bool, policy: str = "hybrid") -> dict:
    """Run ``case`` through ``lloptim simulate SPEC --json`` and compare it with the API run."""
    case = draw_case(cls, seed, quick)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec = write_spec(case, folder)
        cmd = [sys.executable, "-c", "import sys; from lloptim.cli import main; sys.exit(main())", "simulate", str(spec), "--policy", policy, "--json",
               "--kv-mode", case.kv_mode]
        if len({i.kv_block_tokens for i in case.instances}) == 1:
            cmd += ["--kv-block", str(case.instances[0].kv_block_tokens)]
        if case.estimator != "oracle":
            cmd += ["--estimator", case.estimator]
        if case.train is not None:
            cmd += ["--train", str(write_spec(case, folder, case.train, "train"))]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t
    out = {"case": case.label, "policy": policy, "rc": proc.returncode, "wall_s": wall}
    if proc.returncode != 0:
        out["error"] = (proc.stderr or proc.stdout).strip()[-500:]
        return out
    d = json.loads(proc.stdout)
    problem = Problem(case.workload, case.instances, name=case.label)
    api = summarize(run_policy(problem, policy, estimates=case_estimates(case)))
    out.update(cli_makespan_s=d["makespan_s"], api_makespan_s=api.makespan_s, cli_gap=d["gap_to_bound"],
               api_gap=api.gap_to_bound, same=bool(abs(d["makespan_s"] - api.makespan_s) <= 1e-6 * api.makespan_s
                                                   and abs(d["gap_to_bound"] - api.gap_to_bound) <= 1e-9))
    return out


# ---------------------------------------------------------------- report


def summary_table(rows: list[dict]) -> str:
    """Per class: the hybrids' mean / worst gap, rank, best peer and the hybrid against it."""
    head = ("class", "cases", "hybrid gap mean / worst", "hybrid-fused gap", "hybrid rank mean / worst",
            "best peer (mean gap)", "hybrid vs best peer mean / worst", "flags")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cls in dict.fromkeys(r["class"] for r in rows):
        rs = [r for r in rows if r["class"] == cls]
        by = lambda p: [r for r in rs if r["policy"] == p and not r["error"]]  # noqa: E731
        hy, hf = by("hybrid"), by("hybrid-fused")
        cases = {(r["seed"]) for r in rs}
        peers = {r["policy"] for r in rs if not r["policy"].startswith("hybrid")}
        peer_gap = {p: np.mean([r["gap"] for r in by(p)]) for p in peers if by(p)}
        best = min(peer_gap, key=peer_gap.get) if peer_gap else "-"
        flags = sum(bool(r["flags"]) or bool(r["error"]) for r in rs)
        g = lambda xs: f"{100 * np.mean(xs):.2f} / {100 * max(xs):.2f} %" if xs else "-"  # noqa: E731
        lines.append("| " + " | ".join([
            cls, str(len(cases)), g([r["gap"] for r in hy]), g([r["gap"] for r in hf]),
            f"{np.mean([r['rank'] for r in hy]):.1f} / {max(r['rank'] for r in hy)}" if hy else "-",
            f"{best} ({100 * peer_gap[best]:.2f} %)" if peer_gap else "-",
            g([r["vs_best_peer"] for r in hy]), str(flags)]) + " |")
    return "\n".join(lines)


def findings(rows: list[dict]) -> list[str]:
    """One line per flagged run and per case where the hybrid is over a point behind the best peer."""
    out = []
    for r in rows:
        if r["error"] or r["flags"]:
            out.append(f"{r['class']}#{r['seed']} {r['policy']}: {r['error'] or r['flags']}")
    for r in rows:
        if r["policy"] == "hybrid" and not r["error"] and r["vs_best_peer"] > 0.01:
            out.append(f"{r['class']}#{r['seed']} hybrid {100 * r['vs_best_peer']:+.2f} % vs {r['best_peer']} "
                       f"(gap {100 * r['gap']:.2f} %; n {r['n']}, {r['profiles']}, clients {r['clients']}, "
                       f"block {r['block']}, rho {r['rho']}, {r['kv_mode']}, {r['estimator']})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="seed 0 only, at most 200 requests, four policies")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--classes", nargs="+", default=list(CLASSES), choices=CLASSES)
    ap.add_argument("--policies", nargs="+", default=None, help="default: every registered policy")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--no-cli", action="store_true", help="skip the lloptim simulate sample")
    ap.add_argument("--progress", action="store_true", help="one line per case as it finishes")
    ap.add_argument("--csv", type=Path, default=None,
                    help="write the rows here (default: results/stress_memory.csv on a full run only)")
    args = ap.parse_args(argv)
    policies = args.policies or list(policy_names())
    seeds = args.seeds
    if args.quick:
        seeds = seeds[:1]
        policies = args.policies or ["hybrid", "hybrid-fused", "vllm", "sarathi"]
    t0 = time.perf_counter()
    tasks = [(c, s, args.quick, policies) for c in args.classes for s in seeds]
    from concurrent.futures import ProcessPoolExecutor
    from contextlib import nullcontext

    pool = ProcessPoolExecutor(args.jobs) if args.jobs > 1 else nullcontext()
    rows = []
    with pool:
        for rs in (pool.map(run_case, tasks) if args.jobs > 1 else map(run_case, tasks)):
            rows += rs
            if args.progress:
                hy = {r["policy"]: r for r in rs}
                h = hy.get("hybrid") or rs[0]
                print(f"  {h['class']}#{h['seed']}: n {h['n']}, {h['profiles']}, hybrid "
                      + ("-" if h["error"] or h["policy"] != "hybrid" else f"{100 * h['gap']:.2f} % "
                         f"({100 * h['vs_best_peer']:+.2f} % vs {h['best_peer']}), {h['wall_s']:.1f} s")
                      + (f"; {sum(bool(r['flags'] or r['error']) for r in rs)} flagged"
                         if any(r["flags"] or r["error"] for r in rs) else ""), flush=True)
    full = not args.quick and args.policies is None and list(seeds) == list(SEEDS) and list(args.classes) == list(CLASSES)
    path = args.csv if args.csv is not None else (RESULTS / "stress_memory.csv" if full else None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = [k for k in rows[0] if k != "traceback"]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    print(summary_table(rows))
    found = findings(rows)
    print("\nfindings:" if found else "\nfindings: none")
    for line in found:
        print("  " + line)
    for r in rows:
        if r.get("traceback"):
            print(f"\n{r['class']}#{r['seed']} {r['policy']}:\n{r['traceback']}")
    bad_cli = 0
    if not args.no_cli:
        print("\nlloptim simulate SPEC --json against the API (first seed of each class):")
        for cls in args.classes:
            c = cli_check(cls, seeds[0], args.quick)
            bad_cli += not c.get("same", False)
            print(f"  {c['case']} {c['policy']}: " + (f"rc {c['rc']}: {c['error']}" if "error" in c else
                  f"CLI {c['cli_makespan_s']:.2f} s ({100 * c['cli_gap']:.2f} %), API {c['api_makespan_s']:.2f} s, "
                  f"{'same' if c['same'] else 'DIFFERENT'} ({c['wall_s']:.1f} s)"))
    print(f"\n{len(tasks)} cases, {len(rows)} runs, {time.perf_counter() - t0:.0f} s"
          + (f"; wrote {path}" if path else ""))
    return 1 if any(r["error"] or "BOUND" in r["flags"] for r in rows) or bad_cli else 0


if __name__ == "__main__":
    sys.exit(main())
