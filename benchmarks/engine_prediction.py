"""How well the simulator predicts every engine run, and how much of the miss is the machine's own noise.

For each engine (``vllm`` and ``hf``: lloptim as the scheduler of vLLM and of transformers'
continuous batching; ``torch``: lloptim's own backend) the script repeats ``--repeats`` rounds of:

1. calibrate: fit a profile to the engine's own steps on GSM8K *train* requests
   (:func:`lloptim.calibrate.calibrate_engine`, or :func:`~lloptim.calibrate.calibrate_serving` for
   the torch backend);
2. serve every workload -- GSM8K *test* cases and heavy-tailed synthetic requests (lognormal lengths,
   sigma 1), for every ``--seeds`` and ``--sizes`` -- under every policy (the engine's own scheduler,
   ``hybrid``, ``hybrid-fused``; the torch backend has no scheduler of its own and runs ``sarathi``,
   the simulator's twin of the engines' defaults), and predict each run with the round's profile.

Beside every run it measures where a miss comes from:

* **schedule error** ``predicted / replay - 1``: ``replay`` prices the steps the engine actually ran
  with the same profile (:func:`lloptim.calibrate.price_steps`), so this is the simulator taking
  other steps than the engine;
* **cost error** ``replay / measured - 1``: the profile pricing the engine's own steps wrongly;
* **machine drift**: a fixed small run on the same engine (``--clients`` requests of 64 prompt and
  24 output tokens under the baseline) just after calibrating and just before and after each run;
  the median step time of the run's probes over the calibration's is how much faster or slower the
  machine was then (a probe lasts a tenth of a run, so it samples the machine's state, not all of it).
  ``corrected error`` is the prediction scaled by that drift against the measurement.

The rounds serve identical runs, so the spread of one run's makespan over the rounds,
``(max - min) / median``, is the machine's noise floor for that run, measured. Prints, per engine
and policy, the prediction error of every run (median and largest ``|error|``, share within 10 %),
the largest schedule error, the cost error, the speed-corrected error, and per engine the noise
floor, and the errors of runs started on a quiet and on a busy machine (1-minute load average
against the cores; the load and the CPU pressure are recorded with every run); writes
``benchmarks/results/engine_prediction.json`` with every run.

Usage::

    python benchmarks/engine_prediction.py [--engines vllm,hf,torch] [--repeats 3] [--seeds 0,1]
        [--sizes 64,128] [--clients 16] [--quick] [--update]

``--quick`` is one seed, one size (64), two rounds; ``--update`` reruns only ``--engines`` and keeps
the other engines' runs in ``--out``. Times are CPU seconds of the serving process
(``--clock cpu``, the default on CPU), each engine with one torch thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ENGINE_POLICIES = ("engine-default", "hybrid", "hybrid-fused")
TORCH_POLICIES = ("sarathi", "hybrid", "hybrid-fused")
PROBE_PROMPT, PROBE_OUTPUT = 64, 24


def workloads_for(seeds, sizes):
    """GSM8K test cases and heavy-tailed synthetic workloads, one of each per (seed, size)."""
    from lloptim import workloads

    out = []
    for size in sizes:
        for seed in seeds:
            out.append(("gsm8k", seed, size, workloads.gsm8k_case(seed, size, seed=7, split="test")))
            out.append(("heavy-tailed", seed, size, workloads.synthetic(size, seed=seed, prompt_median=60,
                                                                        output_median=60, sigma=1.0,
                                                                        max_tokens=600)))
    return out


def _problem(workload, clients: int):
    from lloptim import Problem
    from lloptim.hardware import HardwareProfile, LatencyModel

    placeholder = HardwareProfile("placeholder", LatencyModel(1e-3, 1e-5, 1e-3, 1e-5, 1e-7),
                                  kv_capacity_tokens=1 << 22, clients=clients)
    return Problem.single(workload, placeholder, clients=clients)


class EngineSubject:
    """A started vLLM or transformers engine: calibrate, probe, serve and predict."""

    def __init__(self, name: str, args) -> None:
        if name == "vllm":
            from lloptim.engines.vllm import VllmEngine

            self.engine = VllmEngine(args.model, clients=args.clients, seed=args.seed)
        else:
            from lloptim.engines.hf import HFEngine

            self.engine = HFEngine(args.model, clients=args.clients, seed=args.seed)
        self.name, self.args = name, args
        self.policies = ENGINE_POLICIES
        self.cap = self.engine.kv_layout.capacity_tokens
        from lloptim import Workload

        self.probe_problem = _problem(Workload.from_arrays([PROBE_PROMPT] * args.clients,
                                                           [PROBE_OUTPUT] * args.clients), args.clients)

    def calibrate(self):
        from lloptim.calibrate import calibrate_engine

        cal, _ = calibrate_engine([self.engine], clock=self.args.clock, seed=self.args.seed)
        return cal, cal.to_profile(kv_capacity_tokens=self.cap, clients=self.args.clients)

    def probe(self) -> float:
        from lloptim.engines.serve import serve_engine

        res = serve_engine(self.probe_problem, "baseline", [self.engine], clock=self.args.clock)
        return float(np.median(res.trace_duration_s))

    def serve(self, problem, policy: str, profile):
        """Measured makespan, predicted makespan, and the run's own steps priced by ``profile``."""
        from lloptim.calibrate import engine_steps, price_steps
        from lloptim.engines.serve import predict_engine_run, serve_engine, with_profile

        prob = with_profile(problem, profile, [self.cap])
        res = serve_engine(prob, policy, [self.engine], clock=self.args.clock, seed=self.args.seed)
        pred = predict_engine_run(prob, policy, profile, token_budget=self.engine.token_budget, seed=self.args.seed,
                                  like=res)
        st = engine_steps(res)
        replay = float(price_steps(profile.latency, st["kind"], st["prompt_tokens"], st["decodes"],
                                   st["kv_tokens"], st["prefix_tokens"]).sum())
        return res.makespan_s, pred.makespan_s, replay, len(res.trace_kind), len(pred.trace_kind)

    def close(self) -> None:
        self.engine.close()


class TorchSubject:
    """lloptim's torch backend (the exact-token reference), calibrated from its own serving steps."""

    def __init__(self, args) -> None:
        from lloptim import Workload
        from lloptim.backends.models import load_model

        self.name, self.args = "torch", args
        self.policies = TORCH_POLICIES
        self.model = load_model(args.model, "cpu", "float32", args.seed)
        self.probe_problem = _problem(Workload.from_arrays([PROBE_PROMPT] * args.clients,
                                                           [PROBE_OUTPUT] * args.clients), args.clients)

    def calibrate(self):
        from lloptim.calibrate import calibrate_serving

        cal, _ = calibrate_serving(self.model, clients=self.args.clients, clock=self.args.clock, seed=self.args.seed)
        return cal, cal.to_profile(kv_capacity_tokens=1 << 22, clients=self.args.clients)

    def _run(self, problem, policy: str):
        from lloptim.backends.torch_backend import TorchBackend
        from lloptim.simulator import run_policy

        backend = TorchBackend(problem, self.model, clock=self.args.clock)
        return run_policy(problem, policy, backend=backend, seed=self.args.seed), backend

    def probe(self) -> float:
        return float(np.median(self._run(self.probe_problem, "baseline")[0].trace_duration_s))

    def serve(self, problem, policy: str, profile):
        from lloptim.calibrate import price_steps
        from lloptim.engines.serve import with_profile
        from lloptim.simulator import run_policy

        prob = with_profile(problem, profile, [1 << 22])
        res, backend = self._run(prob, policy)
        pred = run_policy(prob, policy, seed=self.args.seed)
        kind, _, tok, dec, kv = (np.array(c) for c in zip(*backend.steps))
        replay = float(price_steps(profile.latency, kind, tok, dec, kv).sum())
        return res.makespan_s, pred.makespan_s, replay, len(res.trace_kind), len(pred.trace_kind)

    def close(self) -> None:
        self.model = None


def machine_load() -> dict:
    """The machine's load when a run starts: 1-minute load average and CPU pressure (share of time waiting)."""
    import os

    out = {"loadavg_1m": os.getloadavg()[0], "cpu_pressure_avg10": None}
    try:  # Linux pressure stall information: "some avg10=12.34 ..."
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        out["cpu_pressure_avg10"] = float(first.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        pass
    return out


def study(subject, workloads, repeats: int, log) -> list[dict]:
    """Every (round, workload, policy) run of ``subject`` with its prediction, decomposition and drift."""
    rows = []
    for rnd in range(repeats):
        t0 = time.perf_counter()
        cal, profile = subject.calibrate()
        probe_cal = float(np.mean([subject.probe() for _ in range(2)]))
        log(f"{subject.name} round {rnd}: calibrated in {time.perf_counter() - t0:.0f} s, step median "
            f"|error| {100 * cal.extra['step_median_rel_error']:.1f} %, probe step {1e3 * probe_cal:.2f} ms")
        for kind, seed, size, w in workloads:
            problem = _problem(w, subject.args.clients)
            for policy in subject.policies:
                load = machine_load()
                before = subject.probe()
                measured, predicted, replay, steps, sim_steps = subject.serve(problem, policy, profile)
                after = subject.probe()
                drift = 0.5 * (before + after) / probe_cal
                row = {"engine": subject.name, "policy": policy, "round": rnd, "workload": kind, "seed": seed,
                       "size": size, "measured_s": measured, "predicted_s": predicted, "replay_s": replay,
                       "error": predicted / measured - 1, "schedule_error": predicted / replay - 1,
                       "cost_error": replay / measured - 1, "drift": drift,
                       "corrected_error": predicted * drift / measured - 1, "steps": steps, "sim_steps": sim_steps,
                       "calibration_step_median_rel_error": cal.extra["step_median_rel_error"],
                       "latency": profile.latency.coefficients(), **load}
                rows.append(row)
                log(f"  {kind:12s} s{seed} n{size:<4d} {policy:14s} measured {measured:6.3f} s predicted "
                    f"{predicted:6.3f} s error {100 * row['error']:+6.1f} % (schedule "
                    f"{100 * row['schedule_error']:+5.1f}, cost {100 * row['cost_error']:+5.1f}) drift {drift:.3f} "
                    f"corrected {100 * row['corrected_error']:+6.1f} %")
    return rows


def summarize_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per (engine, policy) error statistics, and per engine the measured run-to-run noise floor."""
    table, noise = [], []
    for eng in dict.fromkeys(r["engine"] for r in rows):
        mine = [r for r in rows if r["engine"] == eng]
        for pol in dict.fromkeys(r["policy"] for r in mine):
            rs = [r for r in mine if r["policy"] == pol]
            err = np.abs([r["error"] for r in rs])
            cor = np.abs([r["corrected_error"] for r in rs])
            table.append({"engine": eng, "policy": pol, "runs": len(rs), "median_abs_error": float(np.median(err)),
                          "max_abs_error": float(err.max()), "within_10pct": float(np.mean(err <= 0.10)),
                          "max_abs_schedule_error": float(np.max(np.abs([r["schedule_error"] for r in rs]))),
                          "median_abs_cost_error": float(np.median(np.abs([r["cost_error"] for r in rs]))),
                          "median_abs_corrected_error": float(np.median(cor)), "max_abs_corrected_error": float(cor.max()),
                          "corrected_within_10pct": float(np.mean(cor <= 0.10))})
        # the same run served in every round: its spread is the machine's noise, measured
        spreads = []
        for key in dict.fromkeys((r["workload"], r["seed"], r["size"], r["policy"]) for r in mine):
            m = [r["measured_s"] for r in mine if (r["workload"], r["seed"], r["size"], r["policy"]) == key]
            if len(m) > 1:
                spreads.append((max(m) - min(m)) / float(np.median(m)))
        drift = [r["drift"] for r in mine]
        loads = [r.get("loadavg_1m") for r in mine if r.get("loadavg_1m") is not None]
        noise.append({"engine": eng, "configurations": len(spreads),
                      "median_spread": float(np.median(spreads)) if spreads else None,
                      "max_spread": float(np.max(spreads)) if spreads else None,
                      "drift_min": float(min(drift)), "drift_max": float(max(drift)),
                      "loadavg_min": float(min(loads)) if loads else None,
                      "loadavg_max": float(max(loads)) if loads else None})
    return table, noise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default=None, help="comma list of vllm, hf, torch (default: all available)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (each recalibrates and serves everything)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--sizes", default="64,128")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--model", default="mini-llama")
    ap.add_argument("--clock", default="cpu", choices=["wall", "cpu"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="one seed, size 64, two rounds")
    ap.add_argument("--out", type=Path, default=RESULTS / "engine_prediction.json")
    ap.add_argument("--update", action="store_true",
                    help="keep the runs of the other engines already in --out (same settings), replace these")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.sizes, args.repeats = "0", "64", 2
    if args.repeats < 2:
        raise SystemExit("--repeats: need at least 2 rounds to measure the run-to-run noise floor")

    import torch

    torch.set_num_threads(1)
    from engines import engine_names  # benchmarks/engines.py, beside this script

    names = engine_names(args.engines, ("hf", "torch"))
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    wls = workloads_for(seeds, sizes)
    t_all = time.perf_counter()
    rows: list[dict] = []
    for name in names:
        subject = TorchSubject(args) if name == "torch" else EngineSubject(name, args)
        try:
            rows += study(subject, wls, args.repeats, lambda s: print(s, flush=True))
        finally:
            subject.close()
    if args.update and args.out.is_file():
        old = json.loads(args.out.read_text())
        same = all(old.get(k) == v for k, v in (("model", args.model), ("clients", args.clients),
                                                 ("clock", args.clock), ("repeats", args.repeats),
                                                 ("seeds", seeds), ("sizes", sizes)))
        if not same:
            raise SystemExit(f"--update: {args.out} was written with other settings; rerun every engine")
        rows = [r for r in old["runs"] if r["engine"] not in names] + rows
    table, noise = summarize_rows(rows)
    out = {"model": args.model, "clients": args.clients, "clock": args.clock, "repeats": args.repeats,
           "seeds": seeds, "sizes": sizes, "wall_s": time.perf_counter() - t_all, "summary": table,
           "noise_floor": noise, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"\nprediction error per run ({len(rows)} runs; |error| median / max, share within 10 %; "
          "schedule and cost parts; corrected for the measured machine drift)")
    print(f"{'engine':6s} {'policy':14s} {'runs':>4s} {'med':>6s} {'max':>6s} {'<=10%':>6s} {'sched':>6s} "
          f"{'cost':>6s} {'c.med':>6s} {'c.max':>6s} {'c<=10%':>6s}")
    for r in table:
        print(f"{r['engine']:6s} {r['policy']:14s} {r['runs']:4d} {100 * r['median_abs_error']:5.1f}% "
              f"{100 * r['max_abs_error']:5.1f}% {100 * r['within_10pct']:5.0f}% "
              f"{100 * r['max_abs_schedule_error']:5.1f}% {100 * r['median_abs_cost_error']:5.1f}% "
              f"{100 * r['median_abs_corrected_error']:5.1f}% {100 * r['max_abs_corrected_error']:5.1f}% "
              f"{100 * r['corrected_within_10pct']:5.0f}%")
    print("\nmachine noise floor: spread (max - min) / median of the same run's makespan over the rounds")
    for n in noise:
        if n["median_spread"] is not None:
            print(f"{n['engine']:6s} {n['configurations']} runs repeated: median spread "
                  f"{100 * n['median_spread']:.1f} %, largest {100 * n['max_spread']:.1f} %; probe drift "
                  f"{n['drift_min']:.2f}-{n['drift_max']:.2f}x")
    loaded = [r for r in rows if r.get("loadavg_1m") is not None]
    if loaded:
        import os

        cores = os.cpu_count() or 1
        for name, sel in (("quiet", [r for r in loaded if r["loadavg_1m"] <= cores]),
                          ("busy", [r for r in loaded if r["loadavg_1m"] > cores])):
            if sel:
                e = np.abs([r["error"] for r in sel])
                print(f"{name} machine (1-minute load {'<=' if name == 'quiet' else '>'} {cores} cores): {len(sel)} runs, "
                      f"|error| median {100 * np.median(e):.1f} %, max {100 * e.max():.1f} %, "
                      f"within 10 % {100 * np.mean(e <= 0.1):.0f} %")
    print(f"results: {args.out} ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
