"""``lloptim run`` (serve a workload on a real model) and ``lloptim calibrate`` (fit a profile to it).

``lloptim run`` without a SPEC serves :func:`default_torch_workload`: the first 32 GSM8K test
requests with their LLaMA token counts divided by 4 and clipped to 64 tokens (prompts 11-50
tokens, outputs 10-64), which tiny-llama serves in well under a second on one CPU core.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.table import Table

from lloptim.cli.app import app
from lloptim.cli.common import console, err_console, load_problem, print_json, user_errors
from lloptim.errors import SpecError

__all__ = ["default_torch_workload", "serve", "calibrate_command"]

BACKENDS = ("torch", "simulated")


def default_torch_workload(limit: int = 32, scale: float = 4.0, max_tokens: int = 64):
    """The first ``limit`` GSM8K test requests, lengths divided by ``scale`` and clipped to ``max_tokens``.

    Parameters
    ----------
    limit
        Number of requests (dataset order).
    scale
        Divisor of the LLaMA prompt and output lengths (rounded up), so a tiny model serves them fast.
    max_tokens
        Upper clip of both lengths, tokens.

    Returns
    -------
    Workload
        All requests arrive at time 0.
    """
    from lloptim.problem import Workload
    from lloptim.workloads import gsm8k

    if not scale > 0 or max_tokens < 1:
        raise SpecError("scale", f"need scale > 0 and max_tokens >= 1, got {scale}, {max_tokens}",
                        "give a positive divisor and clip")
    base = gsm8k("test", limit=limit)
    prompt = np.clip(np.ceil(base.prompt_tokens / scale), 1, max_tokens).astype(np.int64)
    output = np.clip(np.ceil(base.output_tokens / scale), 1, max_tokens).astype(np.int64)
    return Workload.from_arrays(prompt, output, ids=base.ids, name=f"gsm8k-test-{limit}/{scale:g}")


def _ints(name: str, text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecError(name, f"{text!r} is not a comma-separated list of integers", "write e.g. 1,2,4,8") from None
    if not vals or min(vals) < 1:
        raise SpecError(name, f"{text!r} needs positive integers", "write e.g. 1,2,4,8")
    return vals


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise SpecError("backend", f"unknown backend {backend!r}", f"use one of {list(BACKENDS)}")


def _set_threads(threads: int) -> None:
    """Set torch's intra-op CPU threads (0 keeps torch's default)."""
    if threads < 0:
        raise SpecError("threads", f"must be >= 0, got {threads}", "give a thread count, or 0 for torch's default")
    if threads:
        from lloptim.backends.models import require_torch

        require_torch().set_num_threads(threads)


def _fit_table(cal) -> Table:
    t = Table(title=f"calibration of {cal.model} on {cal.device} ({cal.dtype}), {cal.wall_s:.1f} s")
    for head in ("kind", "batch", "tokens", "measured ms", "fitted ms", "rel. error"):
        t.add_column(head, justify="left" if head == "kind" else "right")
    for p in cal.points:
        t.add_row(p.kind, str(p.batch), f"{p.tokens:g}", f"{1e3 * p.seconds:.3f}", f"{1e3 * p.predicted_s:.3f}",
                  f"{100 * p.rel_error:+.1f} %")
    return t


@app.command("calibrate")
def calibrate_command(
    backend: str = typer.Option("torch", "--backend", help="backend to measure (torch)"),
    model: str = typer.Option("tiny-llama", "--model", "-m", help="'tiny-llama' or a local model directory"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float64, float32, float16, bfloat16"),
    seed: int = typer.Option(0, "--seed", help="seed of the built-in model's weights"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write the profile TOML here"),
    kv_capacity: int = typer.Option(16384, "--kv-capacity", help="KV capacity written to the profile, tokens"),
    clients: int = typer.Option(8, "--clients", help="clients per instance written to the profile"),
    prefill_batches: str = typer.Option("1,2,4,8", help="prefill grid: prompts per iteration"),
    prefill_lengths: str = typer.Option("4,16,32,64", help="prefill grid: tokens per prompt"),
    decode_batches: str = typer.Option("1,2,4,8,16", help="decode grid: running requests"),
    decode_contexts: str = typer.Option("8,32,96", help="decode grid: tokens per cache"),
    repeats: int = typer.Option(5, "--repeats", help="timed repetitions per grid point (median kept)"),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads (0: torch's default); 1 times steadiest"),
    clock: str = typer.Option("wall", "--clock", help="wall seconds, or cpu seconds of the serving thread"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Profile prefill and decode of a real model and fit the five latency coefficients (NNLS)."""
    from lloptim.calibrate import calibrate
    from lloptim.hardware import save_profile

    with user_errors():
        if backend != "torch":
            raise SpecError("backend", f"cannot calibrate the {backend!r} backend", "use --backend torch")
        _set_threads(threads)
        cal = calibrate(model, device, dtype, seed, _ints("prefill_batches", prefill_batches),
                        _ints("prefill_lengths", prefill_lengths), _ints("decode_batches", decode_batches),
                        _ints("decode_contexts", decode_contexts), repeats=repeats, clock=clock)
        profile = cal.to_profile(kv_capacity_tokens=kv_capacity, clients=clients)
        path = save_profile(profile, out) if out is not None else None
    if json_out:
        d = cal.to_dict()
        d["profile_path"] = str(path) if path else None
        print_json(d)
        return
    console.print(_fit_table(cal))
    lat = cal.latency
    console.print(f"prefill: {1e3 * lat.prefill_base_s:.4f} ms + {1e6 * lat.prefill_per_token_s:.4f} us/token "
                  f"(R^2 {cal.r2_prefill:.3f})")
    console.print(f"decode:  {1e3 * lat.decode_base_s:.4f} ms + {1e6 * lat.decode_per_seq_s:.4f} us/request + "
                  f"{1e6 * lat.decode_per_kv_token_s:.5f} us/KV token (R^2 {cal.r2_decode:.3f})")
    console.print(f"relative error: mean {100 * cal.mean_rel_error:.1f} %, max {100 * cal.max_rel_error:.1f} %")
    if path:
        console.print(f"profile written to {path}")


def _serving_problem(spec, profile, clients, instances, requests):
    """The problem to serve: SPEC's workload and instance layout (or the default) on ``profile``'s latency."""
    from lloptim.problem import Instance, Problem

    if spec is None:
        workload = default_torch_workload(limit=requests or 32)
        return Problem.single(workload, profile, clients=clients, instances=instances,
                              name=f"{workload.name} on {profile.name}")
    base = load_problem(spec)
    workload = base.workload
    if requests is not None:
        workload = workload.subset(np.arange(min(requests, len(workload))))
    insts = tuple(replace(i, profile=replace(i.profile, latency=profile.latency),
                          clients=clients or i.clients) for i in base.instances)
    for k, i in enumerate(insts):  # validates clients
        Instance.from_profile(i.profile, i.clients, i.kv_capacity_tokens, name=f"instances[{k}]")
    return Problem(workload, insts, name=base.name)


@app.command("run")
def serve(
    spec: Optional[Path] = typer.Argument(None, help="TOML spec; default: 32 GSM8K requests scaled for tiny-llama"),
    backend: str = typer.Option("torch", "--backend", help="torch (real model) or simulated"),
    model: str = typer.Option("tiny-llama", "--model", "-m", help="'tiny-llama' or a local model directory"),
    policy: str = typer.Option("baseline", "--policy", "-p", help="policy name (see `lloptim policies`)"),
    profile: Optional[Path] = typer.Option(None, "--profile", help="calibrated profile TOML; default: calibrate now"),
    clients: Optional[int] = typer.Option(None, "--clients", help="clients per instance"),
    instances: int = typer.Option(1, "--instances", help="model replicas (without SPEC)"),
    requests: Optional[int] = typer.Option(None, "--requests", "-n", help="serve only the first N requests"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float64, float32, float16, bfloat16"),
    seed: int = typer.Option(0, "--seed", help="seed of the model weights and prompt ids"),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads (0: torch's default); 1 times steadiest"),
    clock: str = typer.Option("wall", "--clock", help="wall seconds, or cpu seconds of the serving thread "
                              "(steady on a shared machine)"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="compare every generation with the reference"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    migrate: bool = typer.Option(False, "--migrate", help="let idle replicas take over running requests with their "
                                 "KV caches in the end game (several instances only)"),
    on_ray: bool = typer.Option(False, "--ray", help="run each instance as a Ray actor holding its own backend "
                                "(a model replica); a replica that dies has its requests served by the others"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (with --ray); default: a "
                                          "local Ray"),
) -> None:
    """Serve a workload on a real model under a policy; report the simulator's metrics and its prediction.

    The latency model of every instance (what policies plan with, and what the prediction uses) is
    the calibrated profile: --profile, or a quick calibration run first. SPEC supplies the workload
    and the instances' clients and KV capacity.
    """
    from lloptim.backends.models import load_model
    from lloptim.backends.torch_backend import TorchBackend, replica_factory, token_mismatches
    from lloptim.calibrate import DEFAULT_CLIENTS, calibrate
    from lloptim.hardware import load_profile
    from lloptim.metrics import summarize
    from lloptim.runtime.migration import with_migration
    from lloptim.runtime.registry import make_policy
    from lloptim.simulator import run_policy

    with user_errors():
        _check_backend(backend)
        if address is not None and not on_ray:
            raise SpecError("--address", "a Ray address without --ray", "add --ray, or drop --address")
        if requests is not None and requests < 1:
            raise SpecError("requests", f"must be >= 1, got {requests}", "give how many requests to serve")
        if backend == "torch":
            _set_threads(threads)
        loaded = load_model(model, device, dtype, seed) if backend == "torch" else None
        if profile is not None:
            prof = load_profile(profile)
        elif loaded is not None:
            if not json_out:
                err_console.print("no --profile: calibrating first (save one with `lloptim calibrate --out`)")
            prof = calibrate(loaded, seed=seed, repeats=3, clock=clock).to_profile(clients=clients or DEFAULT_CLIENTS)
        else:
            prof = load_profile("llama-65b")
        problem = _serving_problem(spec, prof, clients, instances, requests)
        def make():
            return with_migration(policy) if migrate else make_policy(policy)

        predicted = run_policy(problem, make())
        if on_ray:
            from lloptim.backends.simulated import SimulatedBackend
            from lloptim.distributed import RayBackend

            factory = (replica_factory(model, device=loaded.device, dtype=dtype, seed=seed, clock=clock,
                                       threads=threads) if backend == "torch" else SimulatedBackend)
            with RayBackend(problem, factory, address=address) as be:
                result = run_policy(problem, make(), backend=be)
                generated = be.collect_generated() if backend == "torch" and verify else None
            # the replicas' generations against references computed here, from the same weights
            mismatch = (max(token_mismatches(TorchBackend(problem, loaded, seed=seed), generated=generated).values())
                        if generated is not None else None)
        elif backend == "torch":
            be = TorchBackend(problem, loaded, seed=seed, clock=clock)
            result = run_policy(problem, make(), backend=be)
            mismatch = max(token_mismatches(be).values()) if verify else None
        else:
            result, mismatch = predicted, None
    d = summarize(result).to_dict()
    makespan = d["makespan_s"]
    pred = predicted.makespan_s
    d.update(
        backend=backend, ray=on_ray, lost_instances=int(result.extra.get("lost_instances", 0)), model=model,
        policy=policy, profile=str(profile) if profile else "calibrated",
        device=loaded.device if loaded else None, clock=clock, tokens_per_s=result.generated_tokens / makespan if makespan else 0.0,
        max_token_mismatch=mismatch, predicted_makespan_s=pred,
        prediction_rel_error=(pred - makespan) / makespan if makespan else math.nan,
    )
    if json_out:
        print_json(d)
        return
    t = Table(title=f"{problem.name}: {problem.n_requests} requests, {problem.n_clients} clients, "
                    f"{backend} backend, policy {policy}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [("requests completed", f"{d['requests_completed']} / {d['requests_total']}"),
            ("makespan (measured)", f"{makespan:.4f} s"), ("makespan (simulated)", f"{pred:.4f} s"),
            ("prediction error", f"{100 * d['prediction_rel_error']:+.1f} %"),
            ("utilization", f"{100 * d['utilization']:.1f} %"), ("tokens/s", f"{d['tokens_per_s']:,.0f}"),
            ("p99 latency", f"{d['latency_p99_s']:.4f} s"), ("wall time", f"{d['wall_s']:.2f} s"),
            ("max token mismatch", str(mismatch))]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
