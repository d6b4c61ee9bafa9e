"""Real serving engines with lloptim as their scheduler: makespan, tokens/s, and how well the simulator predicts them.

For each engine (vLLM, transformers' continuous batching) the script starts the engine once and,
``--repeats`` times, fits a profile to its own steps on GSM8K *train* requests
(:func:`lloptim.calibrate.calibrate_engine`) and then serves the first ``--requests`` GSM8K *test*
requests (true token counts) under the engine's own scheduler (``engine-default``) and lloptim's
``hybrid`` and ``hybrid-fused``, each run simulated with that round's profile (so calibration and
run see the same state of a shared machine). The run with the median makespan is reported, with
its prediction; the JSON keeps every run's prediction error. Two references serve the
same requests: lloptim's own torch backend (the exact-token reference, under the hybrid; calibrated
on its own serving steps like the engines, predicted by the simulator; the JSON adds the
prediction from the older grid calibration, ``rel_error_grid``) and transformers' ``generate`` with static batches of
``--clients`` requests in arrival order (each batch runs until its longest request is done; the
tokens counted are the requested ones).

Prints one row per (engine, scheduler): measured makespan (median, min-max), tokens/s, predicted
makespan and the relative error ``(predicted - measured) / measured``, and whether the hybrid beats
the engine's default; writes ``benchmarks/results/engines.json`` and a figure
``benchmarks/results/engines.png``.

Usage::

    python benchmarks/engines.py [--engines vllm,hf,torch,generate] [--requests 128] [--clients 16]
        [--repeats 3] [--model mini-llama] [--device auto] [--dtype float32] [--clock cpu|wall]
        [--kv-blocks N] [--json]

On this project's CPU machines use ``--clock cpu`` (the default on CPU): step times are the CPU
seconds of the serving process, which other processes on a shared machine cannot inflate. On a GPU
machine (torch and transformers >= 5.16, no vLLM needed)::

    python benchmarks/engines.py --engines hf,torch,generate --device cuda --dtype bfloat16 \\
        --model random-llama-1b --requests 1319 --clients 128

runs the issue's H100 comparison (the clock defaults to wall seconds on CUDA).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ENGINE_POLICIES = ("engine-default", "hybrid", "hybrid-fused")


def engine_names(flag: str | None, default: tuple[str, ...]) -> list[str]:
    """The engines of ``--engines`` (comma-separated), or ``default`` with vLLM first where it is installed.

    Raises ``SystemExit`` naming the flag for a name outside ``default`` and vLLM.
    """
    if flag is None:
        names = list(default)
        try:
            import vllm  # noqa: F401

            names.insert(0, "vllm")
        except ImportError:
            pass
        return names
    names = [n for n in flag.split(",") if n]
    allowed = ("vllm", *default)
    bad = sorted(set(names) - set(allowed))
    if bad:
        raise SystemExit(f"--engines: unknown {bad}; use {', '.join(allowed)}")
    return names


def _engine(name: str, args, clients: int):
    if name == "vllm":
        from lloptim.engines.vllm import VllmEngine

        return VllmEngine(args.model, clients=clients, kv_blocks=args.kv_blocks, dtype=args.dtype, seed=args.seed)
    from lloptim.engines.hf import HFEngine

    return HFEngine(args.model, clients=clients, kv_blocks=args.kv_blocks, dtype=args.dtype, device=args.device,
                    seed=args.seed)


def _calibration_workload(args):
    """``--calibration-requests`` GSM8K train requests, or None: the calibration's default (3 waves of clients)."""
    n = getattr(args, "calibration_requests", None)
    if not n:
        return None
    from lloptim.calibrate import calibration_workload

    return calibration_workload(n, seed=args.seed)


def bench_engine(name: str, problem, args) -> list[dict]:
    """Default scheduler vs the hybrids on one engine, each run predicted by the engine's own calibration.

    Every repeat round first re-fits the profile to the engine's steps on the train requests, then
    serves each scheduler once; a run is predicted with its round's profile, so calibration and run
    see the same machine state.
    """
    from lloptim.calibrate import calibrate_engine
    from lloptim.engines.serve import predict_engine_run, serve_engine, with_profile
    from lloptim.metrics import summarize

    policies = tuple(getattr(args, "policies", None) or ENGINE_POLICIES)
    eng = _engine(name, args, args.clients)
    try:
        cap = eng.kv_layout.capacity_tokens
        runs: dict[str, list] = {p: [] for p in policies}
        cal_s, cal_err = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            cal, _ = calibrate_engine([eng], workload=_calibration_workload(args), clock=args.clock, seed=args.seed)
            cal_s.append(time.perf_counter() - t0)
            cal_err.append(cal.extra["step_median_rel_error"])
            profile = cal.to_profile(kv_capacity_tokens=cap, clients=args.clients)
            prob = with_profile(problem, profile, [cap])
            for pol in policies:
                res = serve_engine(prob, pol, [eng], clock=args.clock, seed=args.seed)
                pred = predict_engine_run(prob, pol, profile, token_budget=eng.token_budget, seed=args.seed,
                                          like=res).makespan_s
                runs[pol].append((res, pred))
        tokens = {pol: runs[pol][0][0].extra["tokens"] for pol in policies}
        rows = []
        for pol in policies:
            spans = [r.makespan_s for r, _ in runs[pol]]
            errors = [(p - r.makespan_s) / r.makespan_s for r, p in runs[pol]]
            mid = int(np.argsort(spans)[len(spans) // 2])
            med, pred = runs[pol][mid]
            m = summarize(med)
            rows.append({"engine": name, "scheduler": pol, "makespan_s": m.makespan_s, "min_s": min(spans),
                         "max_s": max(spans), "tokens_per_s": m.throughput_tokens_per_s,
                         "utilization": m.utilization, "steps": int(len(med.trace_kind)),
                         "predicted_s": pred, "rel_error": (pred - m.makespan_s) / m.makespan_s,
                         "rel_errors": errors, "preemptions": int(med.extra["preemptions"]),
                         "plan_deviations": int(med.extra["plan_deviations"]),
                         "same_tokens_as_default": all(runs[pol][i][0].extra["tokens"] == tokens[policies[0]]
                                                       for i in range(len(spans))),
                         "calibration_s": float(np.median(cal_s)),
                         "calibration_step_median_rel_error": float(np.median(cal_err))})
        return rows
    finally:
        eng.close()


def bench_torch(problem, args) -> list[dict]:
    """lloptim's own torch backend under the hybrid, predicted from a profile fitted to its serving steps.

    The profile comes from :func:`lloptim.calibrate.calibrate_serving` (the backend's own steps on
    GSM8K train requests, as the engines are calibrated); the grid calibration
    (:func:`lloptim.calibrate.calibrate`) is kept for comparison (``rel_error_grid``).
    """
    from lloptim.backends.models import load_model
    from lloptim.backends.torch_backend import TorchBackend
    from lloptim.calibrate import calibrate, calibrate_serving
    from lloptim.engines.serve import with_profile
    from lloptim.metrics import summarize
    from lloptim.simulator import run_policy

    clock = args.clock if args.device != "cuda" else "wall"
    model = load_model(args.model, args.device, args.dtype, args.seed)
    t0 = time.perf_counter()
    cal, _ = calibrate_serving(model, clients=args.clients, clock=clock, seed=args.seed,
                               workload=_calibration_workload(args))
    cal_s = time.perf_counter() - t0
    grid = None
    if getattr(args, "grid", True):
        grid = calibrate(model, clock=clock, prefill_batches=(1, 4, 16), prefill_lengths=(32, 96, 192),
                         decode_batches=(1, 4, 16, 32), decode_contexts=(64, 192, 320), repeats=3)
    profile = cal.to_profile(kv_capacity_tokens=1 << 22, clients=args.clients)
    prob = with_profile(problem, profile, [1 << 22])
    spans, results = [], []
    for _ in range(args.repeats):
        res = run_policy(prob, "hybrid", backend=TorchBackend(prob, model, clock=clock))
        spans.append(res.makespan_s)
        results.append(res)
    med = results[int(np.argsort(spans)[len(spans) // 2])]
    m = summarize(med)
    pred = run_policy(prob, "hybrid").makespan_s
    pred_grid = None
    if grid is not None:
        pred_grid = run_policy(with_profile(problem, grid.to_profile(kv_capacity_tokens=1 << 22,
                                                                     clients=args.clients), [1 << 22]),
                               "hybrid").makespan_s
    return [{"engine": "torch", "scheduler": "hybrid", "makespan_s": m.makespan_s, "min_s": min(spans),
             "max_s": max(spans), "tokens_per_s": m.throughput_tokens_per_s, "utilization": m.utilization,
             "steps": int(len(med.trace_kind)), "predicted_s": pred, "rel_error": (pred - m.makespan_s) / m.makespan_s,
             "rel_errors": [(pred - s) / s for s in spans], "predicted_grid_s": pred_grid,
             "rel_error_grid": None if pred_grid is None else (pred_grid - m.makespan_s) / m.makespan_s,
             "calibration_s": cal_s,
             "calibration_step_median_rel_error": cal.extra["step_median_rel_error"],
             "preemptions": 0, "plan_deviations": 0, "same_tokens_as_default": None}]


def bench_generate(problem, args) -> list[dict]:
    """transformers' ``generate``: static batches of ``clients`` requests in arrival order, left-padded."""
    import torch

    from lloptim.backends.models import ModelInfo, resolve_device, resolve_model_dir
    from lloptim.engines.common import CLOCKS

    dev = resolve_device(args.device)
    clock = CLOCKS["wall" if dev.startswith("cuda") else args.clock]
    path = resolve_model_dir(args.model, args.seed)
    info = ModelInfo.from_dir(path)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa").to(dev).eval()
    w = problem.workload
    order = np.argsort(w.arrival_s, kind="stable")
    with torch.inference_mode():  # untimed: first kernels, allocator, (on CUDA) the context
        model.generate(input_ids=torch.ones((2, 8), dtype=torch.long, device=dev), max_new_tokens=2,
                       min_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    spans = []
    for _ in range(args.repeats):
        total = 0.0
        for b in range(0, len(order), args.clients):
            rows = order[b:b + args.clients]
            prompts = [info.prompt_ids(int(r), int(w.prompt_tokens[r]), args.seed) for r in rows]
            longest = max(map(len, prompts))
            ids = torch.zeros((len(rows), longest), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompts):
                ids[i, longest - len(p):] = torch.tensor(p)
                mask[i, longest - len(p):] = 1
            n_new = int(w.output_tokens[rows].max())
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = clock()
            with torch.inference_mode():
                model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=n_new,
                               min_new_tokens=n_new, do_sample=False, pad_token_id=0, eos_token_id=None)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            total += clock() - t0
        spans.append(total)
    med = float(np.median(spans))
    return [{"engine": "generate", "scheduler": f"static batches of {args.clients}", "makespan_s": med,
             "min_s": min(spans), "max_s": max(spans), "tokens_per_s": int(w.output_tokens.sum()) / med,
             "utilization": None, "steps": None, "predicted_s": None, "rel_error": None, "preemptions": 0,
             "plan_deviations": 0, "same_tokens_as_default": None}]


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [f"{r['engine']}\n{r['scheduler'].replace('static batches of ', 'static ')}" for r in rows]
    x = np.arange(len(rows))
    colors = {"engine-default": "#9e9e9e", "hybrid": "#1f77b4", "hybrid-fused": "#2ca02c"}
    c = [colors.get(r["scheduler"], "#ff7f0e") for r in rows]
    ax1.bar(x, [r["makespan_s"] for r in rows], color=c)
    lo = [r["makespan_s"] - r["min_s"] for r in rows]
    hi = [r["max_s"] - r["makespan_s"] for r in rows]
    ax1.errorbar(x, [r["makespan_s"] for r in rows], yerr=[lo, hi], fmt="none", ecolor="black", capsize=3)
    pred = [(i, r["predicted_s"]) for i, r in enumerate(rows) if r["predicted_s"] is not None]
    ax1.scatter([i for i, _ in pred], [p for _, p in pred], marker="D", color="red", zorder=3,
                label="simulator's prediction")
    ax1.set_ylabel("makespan (s)")
    ax1.set_xticks(x, labels, fontsize=7)
    ax1.legend(fontsize=8)
    ax2.bar(x, [r["tokens_per_s"] for r in rows], color=c)
    ax2.set_ylabel("output tokens / s")
    ax2.set_xticks(x, labels, fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default=None, help="comma list of vllm, hf, torch, generate (default: all available)")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="mini-llama")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--clock", default=None, choices=["wall", "cpu"], help="default cpu on CPU, wall on CUDA")
    ap.add_argument("--kv-blocks", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibration-requests", type=int, default=None,
                    help="GSM8K train requests per calibration (default: three waves of the clients, at least 48)")
    ap.add_argument("--out", type=Path, default=RESULTS / "engines.json")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from lloptim import Problem
    from lloptim.backends.models import resolve_device
    from lloptim.cli.serve import default_engine_workload
    from lloptim.hardware import HardwareProfile, LatencyModel

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.clock = args.clock or ("wall" if cuda else "cpu")
    names = engine_names(args.engines, ("hf", "torch", "generate"))
    placeholder = HardwareProfile("placeholder", LatencyModel(1e-3, 1e-5, 1e-3, 1e-5, 1e-7),
                                  kv_capacity_tokens=1 << 22, clients=args.clients)
    problem = Problem.single(default_engine_workload(args.requests), placeholder, clients=args.clients)
    t_all = time.perf_counter()
    rows: list[dict] = []
    for name in names:
        if name in ("vllm", "hf"):
            rows += bench_engine(name, problem, args)
        elif name == "torch":
            rows += bench_torch(problem, args)
        elif name == "generate":
            rows += bench_generate(problem, args)
        else:
            raise SystemExit(f"unknown engine {name!r}: use vllm, hf, torch, generate")
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({args.threads} torch thread(s))"
    out = {"model": args.model, "device": device, "dtype": args.dtype, "clock": args.clock, "requests": args.requests,
           "clients": args.clients, "repeats": args.repeats, "output_tokens": int(problem.workload.output_tokens.sum()),
           "wall_s": time.perf_counter() - t_all, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    title = (f"GSM8K test[{args.requests}] on {args.model}, {args.clients} clients, {device}, {args.clock} clock")
    plot(rows, args.out.with_suffix(".png"), title)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(title)
    print(f"{'engine':9s} {'scheduler':16s} {'makespan s':>10s} {'(min-max)':>15s} {'tok/s':>8s} {'pred s':>8s} "
          f"{'error':>7s} {'every run':>15s}")
    for r in rows:
        pred = f"{r['predicted_s']:8.3f}" if r["predicted_s"] is not None else f"{'n/a':>8s}"
        err = f"{100 * r['rel_error']:+6.1f}%" if r["rel_error"] is not None else f"{'':>7s}"
        errs = r.get("rel_errors") or []
        spread = f"{100 * min(errs):+5.1f}..{100 * max(errs):+5.1f}%" if errs else ""
        print(f"{r['engine']:9s} {r['scheduler'][:16]:16s} {r['makespan_s']:10.3f} "
              f"({r['min_s']:6.3f}-{r['max_s']:6.3f}) {r['tokens_per_s']:8.0f} {pred} {err} {spread:>15s}")
    for name in ("vllm", "hf"):
        by = {r["scheduler"]: r for r in rows if r["engine"] == name}
        if by:
            d, h = by["engine-default"]["makespan_s"], by["hybrid"]["makespan_s"]
            print(f"{name}: hybrid / default makespan = {h / d:.3f} ({'<=' if h <= d else '>'} 1); "
                  f"same tokens as the default: {all(r['same_tokens_as_default'] for r in by.values())}")
    print(f"results: {args.out} and {args.out.with_suffix('.png')} ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
