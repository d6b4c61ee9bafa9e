"""The issue's GPU comparison in one run: static ``generate``, transformers' continuous batching (its own
scheduler and lloptim's hybrid) and lloptim's torch backend, with the simulator's prediction of each.

Run it through ``benchmarks/gpu_check.sh``, which prepares an environment without a package index
(lloptim on ``PYTHONPATH``, missing wheels unpacked from a local folder) and then calls this script.
On a GPU (``--device cuda``, the default) it serves a TinyLlama-1.1B-shaped LLaMA with seeded random
weights (``random-llama-1b``, written on first use, no download) in bfloat16 on GSM8K test lengths;
``--tiny`` swaps in the built-in ``mini-llama`` in float32 and a few requests, a dry run that fits a
CPU (``--device cpu --tiny``, what the test suite runs).

Stages, each written to the JSON as soon as it ends (a run cut short keeps what it finished):

1. ``generate``: transformers' ``generate`` with static batches of ``--clients`` requests in arrival
   order (each batch runs until its longest request is done);
2. ``hf``: transformers' continuous batching, calibrated on its own steps (GSM8K train requests,
   three waves of the clients), serving under its own scheduler (``engine-default``), ``hybrid``
   and ``hybrid-fused``; each run predicted by the simulator with that profile;
3. ``torch``: lloptim's torch backend under the hybrid, calibrated on its own serving steps.

A stage is skipped (and says so) when the time spent so far leaves less than it needs by the
estimate of ``--budget-s``. The JSON holds, per row: wall (or CPU) seconds of the makespan, output
tokens/s, predicted seconds and the relative error ``(predicted - measured) / measured``, and the
environment (device, versions, where lloptim was imported from).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="mini-llama in float32, few requests: a dry run")
    ap.add_argument("--requests", type=int, default=None, help="GSM8K test requests (default 512; --tiny 24)")
    ap.add_argument("--clients", type=int, default=None, help="concurrent requests (default 128; --tiny 8)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting stages after this, seconds")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu_check.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.requests is not None and args.requests < 1:
        ap.error("--requests: give at least 1")
    if args.clients is not None and args.clients < 1:
        ap.error("--clients: give at least 1")
    tiny = args.tiny
    args.requests = args.requests or (24 if tiny else 512)
    args.clients = args.clients or (8 if tiny else 128)
    args.model = "mini-llama" if tiny else "random-llama-1b"
    args.dtype = "float32" if tiny or args.device == "cpu" else "bfloat16"
    args.clock = "wall" if args.device.startswith("cuda") else "cpu"
    # what benchmarks/engines.py's stage functions read
    args.kv_blocks, args.repeats, args.grid, args.threads = None, 1, False, 1
    args.calibration_requests = 16 if tiny else None  # None: three waves of the clients
    return args


def environment(args) -> dict:
    """Device, versions and where lloptim was imported from (the staged copy, not an install)."""
    import lloptim
    import torch
    import transformers

    cuda = args.device.startswith("cuda")
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "lloptim_path": str(Path(lloptim.__file__).parent),
            "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or 'cpu'})",
            "device_kind": args.device, "model": args.model, "dtype": args.dtype, "clock": args.clock,
            "requests": args.requests, "clients": args.clients}


def main(argv=None) -> int:
    args = _args(argv)
    t_start = time.perf_counter()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: torch sees no GPU here; use --device cpu --tiny for a dry run", file=sys.stderr)
        return 2
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    sys.path.insert(0, str(HERE))
    import engines as bench  # benchmarks/engines.py: one implementation of every stage

    from lloptim import Problem
    from lloptim.backends.models import resolve_model_dir
    from lloptim.cli.serve import default_engine_workload
    from lloptim.hardware import HardwareProfile, LatencyModel

    out = {"environment": environment(args), "stages": {}, "rows": [], "skipped": [], "errors": {}}

    def save() -> None:
        out["wall_s"] = time.perf_counter() - t_start
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))

    t0 = time.perf_counter()
    resolve_model_dir(args.model, args.seed)  # written once here, not inside a timed stage
    out["stages"]["model_s"] = time.perf_counter() - t0
    save()
    placeholder = HardwareProfile("placeholder", LatencyModel(1e-3, 1e-5, 1e-3, 1e-5, 1e-7),
                                  kv_capacity_tokens=1 << 22, clients=args.clients)
    problem = Problem.single(default_engine_workload(args.requests), placeholder, clients=args.clients)
    out["environment"]["output_tokens"] = int(problem.workload.output_tokens.sum())
    # stage -> (what it runs, share of the budget it needs to start)
    stages = [
        ("generate", lambda: bench.bench_generate(problem, args), 0.85),
        ("hf", lambda: bench.bench_engine("hf", problem, args), 0.6),
        ("torch", lambda: bench.bench_torch(problem, args), 0.75),
    ]
    for name, run, share in stages:
        spent = time.perf_counter() - t_start
        if spent > share * args.budget_s:
            out["skipped"].append(f"{name}: {spent:.0f} s spent of a {args.budget_s:.0f} s budget")
            save()
            continue
        t0 = time.perf_counter()
        try:
            rows = run()
        except Exception as exc:  # one stage failing must not lose the others
            out["errors"][name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            traceback.print_exc()
        else:
            out["rows"] += rows
        out["stages"][f"{name}_s"] = time.perf_counter() - t0
        save()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    gen = [r for r in out["rows"] if r["engine"] == "generate"]
    for r in out["rows"]:
        if gen and r["engine"] != "generate":
            r["speedup_vs_generate"] = r["tokens_per_s"] / gen[0]["tokens_per_s"]
    save()
    _print(out)
    return 1 if out["errors"] else 0


def _print(out: dict) -> None:
    env = out["environment"]
    print(f"{env['model']} ({env['dtype']}) on {env['device']}, {env['requests']} GSM8K test requests, "
          f"{env['output_tokens']} output tokens, {env['clients']} clients, {env['clock']} clock")
    print(f"{'engine':9s} {'scheduler':22s} {'makespan s':>10s} {'tok/s':>8s} {'pred s':>8s} {'error':>7s}")
    for r in out["rows"]:
        pred = f"{r['predicted_s']:8.2f}" if r.get("predicted_s") is not None else f"{'':>8s}"
        err = f"{100 * r['rel_error']:+6.1f}%" if r.get("rel_error") is not None else ""
        print(f"{r['engine']:9s} {r['scheduler'][:22]:22s} {r['makespan_s']:10.2f} {r['tokens_per_s']:8.0f} {pred} {err}")
    for r in out["rows"]:
        if "speedup_vs_generate" in r:
            print(f"{r['engine']} {r['scheduler']}: {r['speedup_vs_generate']:.2f}x generate's tokens/s")
    for s in out["skipped"]:
        print(f"skipped {s}")
    for k, v in out["errors"].items():
        print(f"error in {k}: {v}")
    print(f"{out['wall_s']:.0f} s in all")


if __name__ == "__main__":
    sys.exit(main())
