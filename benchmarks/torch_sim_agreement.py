"""Does the simulator predict a real run? Calibrate tiny-llama, serve a workload for real, compare.

Steps, all in one process (so calibration and runs see the same machine state):

1. ``lloptim.calibrate.calibrate`` fits the five latency coefficients on the torch backend;
2. for every policy, the workload is served ``--repeats`` times on the torch backend (measured
   makespan: median over repeats) and simulated once with the fitted profile;
3. prints, per policy, measured and predicted makespan and the relative error
   ``(predicted - measured) / measured``, plus tokens/s and the token mismatch (must be 0).

Usage::

    python benchmarks/torch_sim_agreement.py [--requests 64] [--clients 8] [--instances 1]
        [--policies baseline,vllm,sarathi,hybrid,hybrid-fused] [--repeats 3] [--threads 1] [--clock wall|cpu] [--json]

The workload is :func:`lloptim.cli.serve.default_torch_workload` (GSM8K test lengths / 4, clipped
to 64 tokens).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--policies", default="baseline,vllm,sarathi,hybrid,hybrid-fused")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall seconds, or CPU seconds of the serving thread (steady on a shared machine)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from lloptim import Problem
    from lloptim.backends.models import load_model
    from lloptim.backends.torch_backend import TorchBackend, token_mismatches
    from lloptim.calibrate import calibrate
    from lloptim.cli.serve import default_torch_workload
    from lloptim.runtime.registry import policy_names
    from lloptim.simulator import run_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    cal = calibrate(model, clock=args.clock)
    profile = cal.to_profile(clients=args.clients)
    problem = Problem.single(default_torch_workload(args.requests), profile, clients=args.clients,
                             instances=args.instances)
    rows = []
    for pol in [p for p in args.policies.split(",") if p]:
        if pol not in policy_names():
            print(f"skipping {pol}: not registered")
            continue
        predicted = run_policy(problem, pol).makespan_s
        measured, tps, mismatch = [], [], 0
        for _ in range(args.repeats):
            be = TorchBackend(problem, model, clock=args.clock)
            t0 = time.perf_counter()
            res = run_policy(problem, pol, backend=be)
            wall = time.perf_counter() - t0
            measured.append(res.makespan_s)
            tps.append(res.generated_tokens / res.makespan_s)
            mismatch = max(mismatch, max(token_mismatches(be).values()))
        m = float(np.median(measured))
        rows.append({"policy": pol, "measured_makespan_s": m, "measured_min_s": min(measured),
                     "measured_max_s": max(measured), "predicted_makespan_s": predicted,
                     "rel_error": (predicted - m) / m, "tokens_per_s": float(np.median(tps)),
                     "run_wall_s": wall, "max_token_mismatch": mismatch})
    out = {"model": args.model, "device": model.device, "clock": args.clock, "threads": torch.get_num_threads(),
           "requests": args.requests, "clients": args.clients, "instances": args.instances,
           "calibration": {k: v for k, v in cal.to_dict().items() if k != "points"}, "runs": rows}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    lat = cal.latency
    print(f"clock: {args.clock}; calibration ({cal.wall_s:.1f} s): prefill {1e3 * lat.prefill_base_s:.3f} ms + "
          f"{1e6 * lat.prefill_per_token_s:.2f} us/tok (R^2 {cal.r2_prefill:.3f}); decode "
          f"{1e3 * lat.decode_base_s:.3f} ms + {1e6 * lat.decode_per_seq_s:.2f} us/seq + "
          f"{1e6 * lat.decode_per_kv_token_s:.3f} us/kv (R^2 {cal.r2_decode:.3f}); "
          f"rel. error mean {100 * cal.mean_rel_error:.1f} % max {100 * cal.max_rel_error:.1f} %")
    print(f"{'policy':10s} {'measured s':>11s} {'[min, max]':>18s} {'predicted s':>12s} {'rel err':>8s} "
          f"{'tokens/s':>9s} {'mismatch':>8s}")
    for r in rows:
        print(f"{r['policy']:10s} {r['measured_makespan_s']:11.4f} [{r['measured_min_s']:.4f}, "
              f"{r['measured_max_s']:.4f}] {r['predicted_makespan_s']:12.4f} {100 * r['rel_error']:+7.1f}% "
              f"{r['tokens_per_s']:9.0f} {r['max_token_mismatch']:8d}")


if __name__ == "__main__":
    main()
