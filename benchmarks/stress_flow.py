"""Stress test on fresh flow families: Poisson overload, bursty arrivals and request DAGs.

Our other benchmarks (``arrivals.py``, ``workflows.py``) use a few families: GSM8K lengths or one
heavy-tailed synthetic, llama-65b, 40 or 2 x 20 clients, chains / fan-in / layered DAGs at given
rates. This script generates families they never vary, several seeds each, and runs *every
registered policy* on each, checking what must always hold and recording how the hybrid compares:

Arrival classes (independent requests; the load is the arrival rate over the fleet's capacity,
:mod:`lloptim.arrivals`):

* ``poisson-heavy``: lognormal lengths with sigma 1.4 (medians drawn per seed), Poisson at 110, 150,
  200 and 300 % load, 8 to 128 clients on llama-65b with a large KV cache;
* ``bursty``: on-off arrivals (a quarter of each period on, at four times the mean rate), 150 %
  mean load;
* ``hw-7b`` / ``hw-fast70b``: other hardware (a 7B model on one A100 with 128 clients and a
  LLaMA-70B-class server twice as fast as llama-65b with 64 clients; stated coefficients, not
  fitted), 150 and 200 % load;
* ``kv-paged``: KV memory binding under arrivals (long outputs, 20,480 paged KV tokens, 40
  clients), 110 and 150 % load;
* ``fleet-mixed``: 2 to 4 instances of different speeds (1x, 1.6x, 2.5x, 1.3x slower) and clients,
  150 and 200 % load;
* ``fleet-kv``: a mixed fleet of 2 with its KV memory binding, 150 % load;
* ``unknown``: ``poisson-heavy`` at 150 % with the policies seeing noisy estimates
  (truth x exp(N(0, 0.5)));

DAG classes (every request of a workflow arrives with it; follow-up prompts carry their
predecessors' answers, capped at 768 tokens):

* ``dag-diamond``: a -> (2 to 4 parallel) -> d;
* ``dag-fanout``: 1 -> 16 to 32 -> 1;
* ``dag-deep``: chains of 10 to 30 steps;
* ``dag-random``: random DAGs of 6 to 20 requests whose branches are long (outputs ~ 400 tokens)
  or short (~ 30);
* ``dag-huge``: three random DAGs of 120 requests beside 60 two-step chains;
* ``dag-online``: the random DAGs arriving as a Poisson process at 110 and 200 % load;
* ``dag-fleet``: random and fan-out DAGs on a mixed fleet (1x and 1.5x slower), at 0 and online;
* ``dag-kv``: diamonds and random DAGs with 20,480 paged KV tokens;
* ``dag-unknown``: random DAGs with noisy estimates.

Checks on every run (a failure is printed and counted in the ``errors`` column): no exception;
every request finished and every output token decoded; no request started before it arrived or
before a predecessor finished; no makespan below the lower bound that holds for the run
(:func:`~lloptim.lower_bound` with ``migration=False``: no policy here migrates). On a sample
(``--cli``, default on the first seed of a few classes) the case is also written as a spec TOML and
run through ``lloptim simulate SPEC --policy hybrid --json --trace``, whose makespan must equal the
Python API's and whose trace must respect arrivals and precedence.

Recorded per case: the hybrid's makespan over the bound, its rank by makespan among every policy,
its p99 and mean latency and p99 TTFT over Sarathi's and vLLM's, the best peer's gap, each run's
wall time (the hybrid's over Sarathi's), and errors. ``scale`` (not in ``--quick``): 4,000
requests (:data:`SCALE_REQUESTS`) at 150 % load on a mixed fleet of 4, hybrid and Sarathi only, for
the wall time.

Run: ``python benchmarks/stress_flow.py [--seeds 2] [--first-seed 0] [--classes a,b] [--quick] [--no-cli]``; writes
``benchmarks/results/stress_flow.csv`` (one row per case and policy) unless ``--csv`` says where.
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
from pathlib import Path

import networkx as nx
import numpy as np

from lloptim import Problem, lower_bound
from lloptim.arrivals import capacity_rps, poisson_arrivals
from lloptim.hardware import LatencyModel, load_profile, save_profile
from lloptim.metrics import summarize
from lloptim.problem import Instance, Workload
from lloptim.runtime.estimators import estimate
from lloptim.runtime.registry import policy_names
from lloptim.simulator import run_policy

HYBRIDS = ("hybrid", "hybrid-fused")
BIG_KV = 163_840
DAG_KV = 81_920
#: Requests of the ``scale`` case (hybrid and Sarathi only, for the wall time).
SCALE_REQUESTS = 4000
MAX_CONTEXT = 768

BASE = load_profile("llama-65b")
#: A 7B model on one A100-80GB (stated, not fitted): 14 GFLOP per prompt token at ~150 TFLOP/s,
#: 14 GB of weights read per decode step at ~2 TB/s, 0.5 MB of KV per token.
PROFILE_7B = replace(BASE, name="7b-a100", clients=128, kv_capacity_tokens=120_000, description="stress: 7B on A100",
                     meta={}, latency=LatencyModel(0.003, 9.0e-5, 0.008, 1.2e-4, 2.6e-7))
#: A LLaMA-70B-class server twice as fast as the llama-65b profile (decode), prefill 2.5x.
PROFILE_FAST = replace(BASE, name="fast-70b", clients=64, kv_capacity_tokens=BIG_KV, meta={},
                       description="stress: llama-65b x0.5 decode",
                       latency=BASE.latency.scaled(prefill=0.4, decode=0.5))


def slower(factor: float):
    """llama-65b with every iteration ``factor`` times slower (a different GPU generation)."""
    if factor == 1.0:
        return BASE
    return replace(BASE, name=f"llama-65b-x{factor:g}", meta={}, description=f"stress: llama-65b x{factor:g}",
                   latency=BASE.latency.scaled(prefill=factor, decode=factor))


def fleet(speeds, clients, kv: int, kv_mode: str | None = None) -> tuple[Instance, ...]:
    """One instance per (speed, clients), named i0, i1, ..."""
    return tuple(Instance.from_profile(slower(s), c, kv, name=f"i{k}", kv_mode=kv_mode)
                 for k, (s, c) in enumerate(zip(speeds, clients)))


# ---------------------------------------------------------------------------- arrivals


def lengths(rng: np.random.Generator, n: int, prompt_median: float, output_median: float, sigma: float,
            max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Lognormal prompt and output lengths, tokens, clipped to ``[1, max_tokens]``."""
    p = np.clip(np.rint(rng.lognormal(np.log(prompt_median), sigma, n)), 1, max_tokens).astype(np.int64)
    o = np.clip(np.rint(rng.lognormal(np.log(output_median), sigma, n)), 1, max_tokens).astype(np.int64)
    return p, o


def on_off_arrivals(n: int, rate: float, period_s: float, on_share: float, rng: np.random.Generator) -> np.ndarray:
    """Bursty arrivals, seconds: Poisson at ``rate / on_share`` during the first ``on_share`` of each period."""
    burst = rate / on_share
    t = np.cumsum(rng.exponential(1.0 / burst, n))  # time measured in "on" seconds
    on = on_share * period_s
    return np.floor(t / on) * period_s + np.mod(t, on)


def with_load(problem: Problem, load: float, seed: int, bursty: bool = False) -> Problem:
    """``problem`` with Poisson (or on-off) arrivals at ``load`` x capacity."""
    cap = capacity_rps(problem)
    n = problem.n_requests
    if bursty:
        period = 0.2 * n / cap  # five on-off periods over the run's nominal length
        arr = on_off_arrivals(n, load * cap, period, 0.25, np.random.default_rng([0xB0B, seed]))
    else:
        arr = poisson_arrivals(n, load * cap, seed)
    return Problem(problem.workload.with_arrivals(arr), problem.instances, problem.name, dict(problem.meta, load=load))


def heavy(n: int, seed: int) -> Workload:
    """Heavy-tailed lengths, medians drawn per seed."""
    rng = np.random.default_rng([0x57E55, seed])
    p, o = lengths(rng, n, rng.uniform(60, 400), rng.uniform(40, 200), 1.4, 4000)
    return Workload.from_arrays(p, o, name=f"heavy-s{seed}")


def arrival_cases(cls: str, seed: int, quick: bool) -> list[tuple[str, Problem, str | None]]:
    """``(label, problem, estimator)`` of arrival class ``cls`` for ``seed``."""
    n = 300 if quick else 800
    rng = np.random.default_rng([0xC1A55, seed])
    out = []
    if cls in ("poisson-heavy", "unknown"):
        loads = (1.5,) if quick or cls == "unknown" else (1.1, 1.5, 2.0, 3.0)
        for load in loads:
            clients = int(rng.choice([8, 16, 40, 64, 128]))
            prob = Problem.single(heavy(n, seed), "llama-65b", clients=clients, kv_capacity_tokens=BIG_KV)
            out.append((f"load {load:.1f} c{clients}", with_load(prob, load, seed),
                        "noisy" if cls == "unknown" else None))
    elif cls == "bursty":
        prob = Problem.single(heavy(n, seed), "llama-65b", clients=40, kv_capacity_tokens=BIG_KV)
        out.append(("on-off 1.5", with_load(prob, 1.5, seed, bursty=True), None))
    elif cls in ("hw-7b", "hw-fast70b"):
        prof = PROFILE_7B if cls == "hw-7b" else PROFILE_FAST
        for load in ((1.5,) if quick else (1.5, 2.0)):
            prob = Problem.single(heavy(n, seed), prof)
            out.append((f"load {load:.1f}", with_load(prob, load, seed), None))
    elif cls == "kv-paged":
        r = np.random.default_rng([0x4B56, seed])
        p, o = lengths(r, n, 150, 300, 1.0, 3000)
        w = Workload.from_arrays(p, o, name=f"kv-s{seed}")
        prob = Problem.single(w, "llama-65b", clients=40, kv_capacity_tokens=20_480)
        for load in ((1.5,) if quick else (1.1, 1.5)):
            out.append((f"load {load:.1f}", with_load(prob, load, seed), None))
    elif cls == "fleet-mixed":
        k = int(rng.integers(2, 5))
        speeds = (1.0, 1.6, 2.5, 1.3)[:k]
        clients = tuple(int(c) for c in rng.choice([16, 24, 40, 64], k))
        prob = Problem(heavy(n, seed), fleet(speeds, clients, BIG_KV))
        for load in ((1.5,) if quick else (1.5, 2.0)):
            out.append((f"{k} inst c{'/'.join(map(str, clients))} load {load:.1f}", with_load(prob, load, seed),
                        None))
    elif cls == "fleet-kv":
        r = np.random.default_rng([0x4B57, seed])
        p, o = lengths(r, n, 150, 300, 1.0, 3000)
        w = Workload.from_arrays(p, o, name=f"fkv-s{seed}")
        prob = Problem(w, fleet((1.0, 1.6), (40, 24), 20_480))
        out.append(("2 inst kv 20480 load 1.5", with_load(prob, 1.5, seed), None))
    elif cls == "scale":
        prob = Problem(heavy(SCALE_REQUESTS, seed), fleet((1.0, 1.6, 1.0, 2.5), (64, 40, 64, 40), BIG_KV))
        out.append((f"{SCALE_REQUESTS} requests, 4 inst, load 1.5", with_load(prob, 1.5, seed), None))
    return out


# ---------------------------------------------------------------------------- DAGs


class _Builder:
    """Accumulates the requests of generated workflows."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.prompt: list[int] = []
        self.output: list[int] = []
        self.arrival: list[float] = []
        self.ids: list[str] = []
        self.after: list[list[str]] = []

    def add(self, rid: str, out_median: float, preds: list[str], t: float, sigma: float = 0.8) -> None:
        """One request: its own prompt plus its predecessors' answers (capped), a lognormal output."""
        own = int(np.clip(np.rint(self.rng.lognormal(np.log(100), 0.8)), 8, 2000))
        inherited = sum(self.output[self.ids.index(q)] for q in preds[:8])  # answers it reads
        self.prompt.append(int(min(own + inherited, MAX_CONTEXT)) if preds else own)
        self.output.append(int(np.clip(np.rint(self.rng.lognormal(np.log(out_median), sigma)), 1, 2000)))
        self.arrival.append(t)
        self.ids.append(rid)
        self.after.append(list(preds))


def _random_dag(b: _Builder, tag: str, size: int, t: float) -> None:
    """A random DAG: each request after 1-2 earlier ones; a branch is long (400) or short (30)."""
    long_branch = b.rng.random(size) < 0.3
    for k in range(size):
        preds = []
        if k:
            m = min(k, int(b.rng.integers(1, 3)))
            preds = [f"{tag}-{int(q)}" for q in b.rng.choice(k, m, replace=False)]
        b.add(f"{tag}-{k}", 400 if long_branch[k] else 30, preds, t)


def dag_workload(shape: str, seed: int, quick: bool) -> Workload:
    """Workflows of ``shape`` for ``seed``, all at time 0 (arrivals are set by :func:`dag_cases`)."""
    rng = np.random.default_rng([0xDA6, ("diamond", "fanout", "deep", "random", "huge").index(shape), seed])
    b = _Builder(rng)
    few = quick
    if shape == "diamond":
        for w in range(40 if few else 150):
            k = int(rng.integers(2, 5))
            b.add(f"d{w}-a", 60, [], 0.0)
            for j in range(k):
                b.add(f"d{w}-b{j}", 150, [f"d{w}-a"], 0.0, 1.1)
            b.add(f"d{w}-z", 80, [f"d{w}-b{j}" for j in range(k)], 0.0)
    elif shape == "fanout":
        for w in range(4 if few else 12):
            k = int(rng.integers(16, 33))
            b.add(f"f{w}-root", 120, [], 0.0)
            for j in range(k):
                b.add(f"f{w}-m{j}", 120, [f"f{w}-root"], 0.0, 1.2)
            b.add(f"f{w}-reduce", 200, [f"f{w}-m{j}" for j in range(k)], 0.0)
    elif shape == "deep":
        for w in range(8 if few else 30):
            depth = int(rng.integers(10, 31))
            for j in range(depth):
                b.add(f"c{w}-{j}", 60, [f"c{w}-{j - 1}"] if j else [], 0.0, 1.0)
    elif shape == "random":
        for w in range(15 if few else 60):
            _random_dag(b, f"r{w}", int(rng.integers(6, 21)), 0.0)
    elif shape == "huge":
        for w in range(1 if few else 3):
            _random_dag(b, f"H{w}", 40 if few else 120, 0.0)
        for w in range(20 if few else 60):
            b.add(f"s{w}-0", 90, [], 0.0)
            b.add(f"s{w}-1", 90, [f"s{w}-0"], 0.0)
    else:
        raise ValueError(shape)
    return Workload.from_arrays(b.prompt, b.output, np.zeros(len(b.ids)), ids=b.ids, after=b.after,
                                name=f"dag-{shape}-s{seed}")


def workflow_arrivals(problem: Problem, load: float, seed: int) -> Problem:
    """Whole workflows (the weakly connected components) arriving as a Poisson process at ``load``."""
    w = problem.workload
    cap = capacity_rps(problem)  # requests per second
    g = w.precedence.graph()
    comps = sorted((sorted(c) for c in nx.weakly_connected_components(g)), key=lambda c: c[0])
    rate = load * cap * len(comps) / len(w)
    times = poisson_arrivals(len(comps), rate, seed)
    arr = np.zeros(len(w))
    for c, t in zip(comps, times):
        arr[c] = t
    return Problem(w.with_arrivals(arr), problem.instances, problem.name, dict(problem.meta, load=load))


def dag_cases(cls: str, seed: int, quick: bool) -> list[tuple[str, Problem, str | None]]:
    """``(label, problem, estimator)`` of DAG class ``cls`` for ``seed``."""
    one = lambda w, kv=DAG_KV: Problem.single(w, "llama-65b", clients=40, kv_capacity_tokens=kv)  # noqa: E731
    out = []
    if cls.startswith("dag-") and cls[4:] in ("diamond", "fanout", "deep", "random", "huge"):
        out.append(("at 0", one(dag_workload(cls[4:], seed, quick)), None))
    elif cls == "dag-online":
        for load in ((1.5,) if quick else (1.1, 2.0)):
            out.append((f"random, load {load:.1f}", workflow_arrivals(one(dag_workload("random", seed, quick)),
                                                                      load, seed), None))
    elif cls == "dag-fleet":
        for shape in ("random", "fanout"):
            prob = Problem(dag_workload(shape, seed, quick), fleet((1.0, 1.5), (20, 20), DAG_KV))
            out.append((f"{shape}, 1x+1.5x at 0", prob, None))
        if not quick:
            prob = Problem(dag_workload("random", seed, quick), fleet((1.0, 1.5), (20, 20), DAG_KV))
            out.append(("random, 1x+1.5x load 1.5", workflow_arrivals(prob, 1.5, seed), None))
    elif cls == "dag-kv":
        for shape in (("random",) if quick else ("diamond", "random")):
            out.append((f"{shape}, kv 20480", one(dag_workload(shape, seed, quick), 20_480), None))
    elif cls == "dag-unknown":
        out.append(("random, noisy", one(dag_workload("random", seed, quick)), "noisy"))
    return out


ARRIVAL_CLASSES = ("poisson-heavy", "bursty", "hw-7b", "hw-fast70b", "kv-paged", "fleet-mixed", "fleet-kv",
                   "unknown")
DAG_CLASSES = ("dag-diamond", "dag-fanout", "dag-deep", "dag-random", "dag-huge", "dag-online", "dag-fleet",
               "dag-kv", "dag-unknown")
CLASSES = ARRIVAL_CLASSES + DAG_CLASSES
QUICK_CLASSES = ("poisson-heavy", "fleet-kv", "dag-random", "dag-fleet")


def cases(cls: str, seed: int, quick: bool):
    """The cases of class ``cls`` for ``seed``."""
    return dag_cases(cls, seed, quick) if cls.startswith("dag-") else arrival_cases(cls, seed, quick)


# ---------------------------------------------------------------------------- checks


def check_run(problem: Problem, res, makespan: float, bound_s: float) -> list[str]:
    """What must hold of every run: conservation, arrivals, precedence, the bound."""
    w = problem.workload
    errs = []
    done = np.asarray(res.done_s)
    if np.isnan(done).any():
        errs.append(f"{int(np.isnan(done).sum())} requests not finished")
    start = np.asarray(res.prefill_start_s)
    eps = 1e-9
    if np.any(start < w.arrival_s - eps):
        errs.append(f"{int(np.sum(start < w.arrival_s - eps))} requests started before arriving")
    if w.precedence is not None:
        for v, preds in enumerate(w.precedence.predecessors()):
            if preds and start[v] < max(done[q] for q in preds) - eps:
                errs.append(f"request {w.ids[v]} started before a predecessor finished")
                break
    if makespan < bound_s * (1 - 1e-9):
        errs.append(f"makespan {makespan:.3f} s below the bound {bound_s:.3f} s")
    return errs


def check_trace(problem: Problem, path: Path) -> list[str]:
    """The CLI's trace CSV respects arrivals and precedence."""
    with open(path) as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    w = problem.workload
    errs = []
    if len(rows) != len(w):
        errs.append(f"trace has {len(rows)} rows for {len(w)} requests")
    for i, rid in enumerate(w.ids):
        r = rows.get(rid)
        if r is None or r["finish_s"] == "":
            errs.append(f"trace: {rid} did not finish")
            break
        if float(r["start_s"]) < float(r["arrival_s"]) - 1e-6:
            errs.append(f"trace: {rid} started before it arrived")
            break
    if w.precedence is not None:
        for v, preds in enumerate(w.precedence.predecessors()):
            s = float(rows[w.ids[v]]["start_s"])
            if preds and s < max(float(rows[w.ids[q]]["finish_s"]) for q in preds) - 1e-6:
                errs.append(f"trace: {w.ids[v]} started before a predecessor finished")
                break
    return errs


def write_spec(problem: Problem, folder: Path) -> Path:
    """``problem`` as a spec TOML (``[[requests]]`` with ``arrival_s`` and ``after``, profile files)."""
    lines = [f'name = "{problem.name}"', ""]
    w = problem.workload
    after = w.after_ids()
    for i in range(len(w)):
        lines += ["[[requests]]", f'id = "{w.ids[i]}"', f"prompt_tokens = {int(w.prompt_tokens[i])}",
                  f"output_tokens = {int(w.output_tokens[i])}", f"arrival_s = {float(w.arrival_s[i])!r}"]
        if after[i]:
            lines.append("after = [" + ", ".join(f'"{q}"' for q in after[i]) + "]")
        lines.append("")
    for k, inst in enumerate(problem.instances):
        prof = folder / f"profile-{k}.toml"
        save_profile(inst.profile, prof)
        lines += ["[[instances]]", f'profile = "{prof.name}"', f"clients = {inst.clients}",
                  f"kv_capacity_tokens = {inst.kv_capacity_tokens}", f'kv_mode = "{inst.kv_mode}"', ""]
    path = folder / "spec.toml"
    path.write_text("\n".join(lines))
    return path


def run_cli(problem: Problem, estimator: str | None, api_makespan: float) -> tuple[list[str], float]:
    """Run the hybrid through ``lloptim simulate SPEC --json --trace``; errors and wall time, s."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec = write_spec(problem, folder)
        cmd = [sys.executable, "-c", "import sys; from lloptim.cli import main; sys.exit(main())", "simulate", str(spec), "--policy", "hybrid", "--json",
               "--trace", str(folder / "trace.csv")]
        if estimator:
            cmd += ["--estimator", estimator]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            return [f"cli exit {proc.returncode}: {(proc.stderr or proc.stdout)[-300:]}"], wall
        out = json.loads(proc.stdout)
        errs = check_trace(problem, folder / "trace.csv")
        mk = out.get("makespan_s")
        if estimator is None and (mk is None or abs(mk - api_makespan) > 1e-6 * api_makespan):
            errs.append(f"cli makespan {mk} != api {api_makespan}")
        return errs, wall


# ---------------------------------------------------------------------------- running


def run_case(cls: str, label: str, seed: int, problem: Problem, estimator: str | None, policies,
             cli: bool) -> list[dict]:
    """Every policy on one case; one row each."""
    est = estimate(problem.workload, estimator, sigma=0.5, seed=seed) if estimator else None
    t = time.perf_counter()
    try:
        bound = lower_bound(problem, migration=False, estimates=est)
        bound_err = ""
    except Exception as exc:  # a crash of the bound is a finding, not a stop
        bound, bound_err = None, f"bound: {type(exc).__name__}: {exc}"
    bound_wall = time.perf_counter() - t
    rows = []
    for name in policies:
        row = {"class": cls, "case": label, "seed": seed, "requests": problem.n_requests,
               "instances": len(problem.instances), "policy": name, "bound_s": math.nan, "makespan_s": math.nan,
               "gap": math.nan, "latency_mean_s": math.nan, "latency_p99_s": math.nan, "ttft_p99_s": math.nan,
               "preemptions": 0, "wall_s": math.nan, "bound_wall_s": bound_wall, "errors": bound_err}
        t = time.perf_counter()
        try:
            res = run_policy(problem, name, estimates=est)
            m = summarize(res, bound)
            errs = check_run(problem, res, m.makespan_s, m.lower_bound_s) if bound is not None else []
            if m.requests_completed != problem.n_requests or m.output_tokens != problem.workload.total_output_tokens:
                errs.append(f"completed {m.requests_completed}/{problem.n_requests}, tokens {m.output_tokens}")
            row.update(bound_s=m.lower_bound_s, makespan_s=m.makespan_s, gap=m.gap_to_bound,
                       latency_mean_s=m.latency_mean_s, latency_p99_s=m.latency_p99_s, ttft_p99_s=m.ttft_p99_s,
                       preemptions=m.preemptions, wall_s=time.perf_counter() - t)
            if cli and name == "hybrid":
                cli_errs, _ = run_cli(problem, estimator, m.makespan_s)
                errs += cli_errs
        except Exception as exc:
            errs = [f"{type(exc).__name__}: {exc}"]
            traceback.print_exc()
        row["errors"] = "; ".join(filter(None, [row["errors"]] + errs))
        if row["errors"]:
            print(f"  !! {cls} {label} seed {seed} {name}: {row['errors']}", flush=True)
        rows.append(row)
    return rows


def summarize_case(rows: list[dict]) -> dict:
    """The hybrid against its peers on one case."""
    by = {r["policy"]: r for r in rows}
    h = by["hybrid"]
    peers = [r for r in rows if r["policy"] not in HYBRIDS and not math.isnan(r["makespan_s"])]
    mk = sorted(r["makespan_s"] for r in rows if not math.isnan(r["makespan_s"]))
    rank = 1 + sum(m < h["makespan_s"] * (1 - 1e-9) for m in mk)
    best_peer = min(peers, key=lambda r: r["makespan_s"]) if peers else None

    def ratio(key: str, other: str) -> float:
        o = by.get(other)
        return h[key] / o[key] if o and o[key] > 0 else math.nan

    return {"class": h["class"], "case": h["case"], "seed": h["seed"], "gap": h["gap"], "rank": rank,
            "of": len(mk), "best_peer": best_peer["policy"] if best_peer else "",
            "best_peer_gap": best_peer["gap"] if best_peer else math.nan,
            "vs_best_peer": h["makespan_s"] / best_peer["makespan_s"] - 1 if best_peer else math.nan,
            "mk_vs_sarathi": ratio("makespan_s", "sarathi"), "p99_vs_sarathi": ratio("latency_p99_s", "sarathi"),
            "mean_vs_sarathi": ratio("latency_mean_s", "sarathi"), "ttft99_vs_sarathi": ratio("ttft_p99_s", "sarathi"),
            "p99_vs_vllm": ratio("latency_p99_s", "vllm"), "wall_vs_sarathi": ratio("wall_s", "sarathi"),
            "errors": sum(bool(r["errors"]) for r in rows)}


def table(summaries: list[dict]) -> str:
    """Per class: hybrid mean / worst gap, worst vs best peer, p99 and makespan vs Sarathi, rank."""
    head = (f"{'class':14s} {'n':>2s} {'gap mean':>8s} {'worst':>6s} {'vs peer':>7s} {'mk/sar':>6s} "
            f"{'p99/sar':>7s} {'rank':>5s} {'err':>3s}")
    lines = [head, "-" * len(head)]
    for cls in dict.fromkeys(s["class"] for s in summaries):
        ss = [s for s in summaries if s["class"] == cls]
        gaps = np.array([s["gap"] for s in ss], dtype=float)
        lines.append(f"{cls:14s} {len(ss):2d} {100 * np.nanmean(gaps):7.2f}% {100 * np.nanmax(gaps):5.1f}% "
                     f"{100 * max(s['vs_best_peer'] for s in ss):+6.1f}% "
                     f"{max(s['mk_vs_sarathi'] for s in ss):6.3f} {max(s['p99_vs_sarathi'] for s in ss):7.3f} "
                     f"{max(s['rank'] for s in ss):2d}/{ss[0]['of']:<2d} {sum(s['errors'] for s in ss):3d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2, help="seeds per class (default 2)")
    ap.add_argument("--first-seed", type=int, default=0, help="first seed (held-out checks: >= 100)")
    ap.add_argument("--classes", default=None, help=f"comma-separated subset of {','.join(CLASSES)},scale")
    ap.add_argument("--policies", default=None, help="comma-separated policies (default: every registered one)")
    ap.add_argument("--quick", action="store_true", help="small cases, one seed, a few classes (smoke test)")
    ap.add_argument("--no-cli", action="store_true", help="skip the `lloptim simulate` sample runs")
    ap.add_argument("--csv", default=None, help="where to write the rows (default benchmarks/results/stress_flow.csv)")
    args = ap.parse_args(argv)
    classes = (args.classes.split(",") if args.classes else
               list(QUICK_CLASSES) if args.quick else list(CLASSES) + ["scale"])
    unknown = sorted(set(classes) - set(CLASSES) - {"scale"})
    if unknown:
        ap.error(f"--classes: unknown {unknown}; use some of {', '.join(CLASSES)}, scale")
    policies = tuple(args.policies.split(",")) if args.policies else tuple(policy_names())
    for p in ("hybrid", "sarathi", "vllm"):
        if p not in policies:
            policies += (p,)
    seeds = range(args.first_seed, args.first_seed + (1 if args.quick else args.seeds))
    rows, summaries = [], []
    t_all = time.perf_counter()
    for cls in classes:
        for seed in seeds:
            if cls == "scale" and seed != args.first_seed:
                continue
            for k, (label, problem, estimator) in enumerate(cases(cls, seed, args.quick)):
                pols = ("hybrid", "sarathi") if cls == "scale" else policies
                cli = not args.no_cli and seed == args.first_seed and k == 0 and cls != "scale"
                case_rows = run_case(cls, label, seed, problem, estimator, pols, cli)
                rows += case_rows
                if cls == "scale":
                    h, s = case_rows
                    print(f"scale: {problem.n_requests} requests: hybrid {h['wall_s']:.1f} s wall, sarathi "
                          f"{s['wall_s']:.1f} s; makespan hybrid {h['makespan_s']:.1f} s sarathi {s['makespan_s']:.1f} s "
                          f"bound {h['bound_s']:.1f} s (bound {h['bound_wall_s']:.1f} s wall)", flush=True)
                    continue
                s = summarize_case(case_rows)
                summaries.append(s)
                print(f"{cls:14s} s{seed} {label:28s} n={problem.n_requests:5d} gap {100 * s['gap']:6.2f}% "
                      f"rank {s['rank']:2d}/{s['of']} best peer {s['best_peer']} {100 * s['best_peer_gap']:6.2f}% | "
                      f"vs sarathi mk {s['mk_vs_sarathi']:.3f} p99 {s['p99_vs_sarathi']:.3f} "
                      f"mean {s['mean_vs_sarathi']:.3f} ttft99 {s['ttft99_vs_sarathi']:.3f} | "
                      f"p99/vllm {s['p99_vs_vllm']:.3f} wall/sar {s['wall_vs_sarathi']:.1f}", flush=True)
    print()
    if summaries:
        print(table(summaries))
    out = Path(args.csv) if args.csv else Path(__file__).resolve().parent / "results" / "stress_flow.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    n_err = sum(bool(r["errors"]) for r in rows)
    print(f"\n{len(rows)} runs, {n_err} with errors; wall time {time.perf_counter() - t_all:.1f} s; wrote {out}")
    return 1 if n_err else 0


if __name__ == "__main__":
    raise SystemExit(main())
