"""``lloptim run`` (serve a workload on a real model) and ``lloptim calibrate`` (fit a profile to it).

Backends: ``torch`` (lloptim's own exact-token engine), ``vllm`` and ``hf`` (lloptim's policies as
the scheduler of vLLM or of transformers' continuous batching, :mod:`lloptim.engines`), and
``simulated``.

``lloptim run`` without a SPEC serves :func:`default_torch_workload` on the torch backend (the first
32 GSM8K test requests with their LLaMA token counts divided by 4 and clipped to 64 tokens, which
tiny-llama serves in well under a second on one CPU core) and :func:`default_engine_workload` on
the engines (the first 64 GSM8K test requests with their true token counts).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from lloptim.cli.app import app
from lloptim.cli.common import (NO_SIZE_GUARD, SIZE_GUARD_HELP, console, err_console, load_problem, output_path,
                                print_json, user_errors, write_reporting)
from lloptim.cli.simulate import (check_preemption_options, checked_policy_options, policy_option_option,
                                  preemption_option, swap_space_option)
from lloptim.cli.tables import Column, print_table
from lloptim.errors import SpecError
from lloptim.validation import check_choice, check_int, check_seed

__all__ = ["default_torch_workload", "default_engine_workload", "serve", "calibrate_command", "MODEL_FLAGS"]

BACKENDS = ("torch", "simulated", "vllm", "hf")
#: Backends that are serving engines steered by lloptim (:mod:`lloptim.engines`).
ENGINE_BACKENDS = ("vllm", "hf")
CLOCKS = ("wall", "cpu")
#: API fields raised by model loading and calibration, and the flags of ``run``/``calibrate`` that set them.
MODEL_FLAGS = {"backend": "--backend", "threads": "--threads", "profile": "--profile", "device": "--device",
               "dtype": "--dtype", "model": "--model", "policy": "--policy", "clock": "--clock", "repeats": "--repeats",
               "kv_blocks": "--kv-blocks", "clients": "--clients", "instances": "--instances",
               "preemption": "--preemption", "swap_space_tokens": "--swap-space"}
#: Clients per engine instance when neither --clients nor a SPEC says.
DEFAULT_ENGINE_CLIENTS = 16


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


def default_engine_workload(limit: int = 64):
    """The first ``limit`` GSM8K test requests with their true LLaMA token counts (prompts 29-196, outputs 28-310).

    Parameters
    ----------
    limit
        Number of requests (dataset order).

    Returns
    -------
    Workload
        All requests arrive at time 0.
    """
    from lloptim.workloads import gsm8k

    base = gsm8k("test", limit=limit)
    return base.subset(np.arange(len(base)))


def _ints(name: str, text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecError(name, f"{text!r} is not a comma-separated list of integers", "write e.g. 1,2,4,8") from None
    if not vals or min(vals) < 1:
        raise SpecError(name, f"{text!r} needs positive integers", "write e.g. 1,2,4,8")
    return vals


def _check_common(seed: int, clock: str) -> None:
    """Options ``run`` and ``calibrate`` share, named by flag, before any work."""
    check_seed("--seed", seed)
    check_choice("--clock", clock, CLOCKS, "clock")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise SpecError("--backend", f"unknown backend {backend!r}", f"use one of {list(BACKENDS)}")


def _set_threads(threads: int) -> None:
    """Set torch's intra-op CPU threads (0 keeps torch's default)."""
    if threads < 0:
        raise SpecError("--threads", f"must be >= 0, got {threads}", "give a thread count, or 0 for torch's default")
    if threads:
        from lloptim.backends.models import require_torch

        require_torch().set_num_threads(threads)


def _print_fit(cal) -> None:
    rows = [[p.kind, str(p.batch), f"{p.tokens:g}", f"{1e3 * p.seconds:.3f}", f"{1e3 * p.predicted_s:.3f}",
             f"{100 * p.rel_error:+.1f} %"] for p in cal.points]
    print_table(console, f"calibration of {cal.model} on {cal.device} ({cal.dtype}), {cal.wall_s:.1f} s",
                [Column("kind", numeric=False), Column("batch"), Column("tokens"), Column("measured ms"),
                 Column("fitted ms"), Column("rel. error")], rows)


@app.command("calibrate")
def calibrate_command(
    backend: str = typer.Option("torch", "--backend", help="backend to measure: torch, or an engine (vllm, hf) "
                                "fitted to its own steps on GSM8K train requests"),
    model: str = typer.Option("tiny-llama", "--model", "-m", help="'tiny-llama', 'mini-llama' (the engines' "
                              "default) or a local model directory"),
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
    kv_blocks: Optional[int] = typer.Option(None, "--kv-blocks", help="engines: KV blocks (default: the engine's)"),
    max_batched_tokens: Optional[int] = typer.Option(None, "--max-batched-tokens",
                                                     help="engines: tokens per step (default: the engine's)"),
    serving: bool = typer.Option(False, "--serving", help="torch: fit the backend's own steps while it serves "
                                 "GSM8K train requests (predicts runs better; slower) instead of the grid"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Profile prefill and decode of a real model and fit the five latency coefficients (NNLS).

    With --backend vllm or hf the fit uses the engine's own step timings while it serves GSM8K train
    requests under its default scheduler, the baseline and the hybrid; with --backend torch --serving
    the torch backend's own steps under the baseline, the hybrid and Sarathi.
    """
    from lloptim.calibrate import calibrate
    from lloptim.hardware import save_profile

    with user_errors(MODEL_FLAGS):
        if backend not in ("torch",) + ENGINE_BACKENDS:
            raise SpecError("--backend", f"cannot calibrate the {backend!r} backend",
                            f"use one of {['torch', *ENGINE_BACKENDS]}")
        out_path = output_path("--out", out, (".toml",))
        check_int("--kv-capacity", kv_capacity, 1, 10**12, fix="give the KV capacity in tokens, e.g. --kv-capacity 16384")
        check_int("--clients", clients, 1, 1_000_000, fix="give the clients per instance, e.g. --clients 8")
        check_int("--repeats", repeats, lo=1, fix="give timed repetitions per point, e.g. --repeats 5")
        _check_common(seed, clock)
        grids = [_ints(flag, text) for flag, text in (("--prefill-batches", prefill_batches),
                                                      ("--prefill-lengths", prefill_lengths),
                                                      ("--decode-batches", decode_batches),
                                                      ("--decode-contexts", decode_contexts))]
        _check_engine_flags(backend, kv_blocks, max_batched_tokens)
        _set_threads(threads)
        if backend in ENGINE_BACKENDS:
            from lloptim.calibrate import calibrate_engine

            engines = _start_engines(backend, _engine_model(model), clients, 1, kv_blocks, max_batched_tokens, dtype,
                                     device, seed)
            try:
                cal, _ = calibrate_engine(engines, clock=clock, seed=seed)
                kv_capacity = engines[0].kv_layout.capacity_tokens
            finally:
                _close(engines)
        elif serving:
            from lloptim.calibrate import calibrate_serving

            cal, _ = calibrate_serving(model, device, dtype, seed, clients=clients, clock=clock)
        else:
            cal = calibrate(model, device, dtype, seed, *grids, repeats=repeats, clock=clock)
        profile = cal.to_profile(kv_capacity_tokens=kv_capacity, clients=clients)
    path, failed = write_reporting("--out", out_path, lambda p: save_profile(profile, p)) if out_path else (None, None)
    if json_out:
        d = cal.to_dict()
        d["profile_path"] = str(path) if path else None
        print_json(d)
        if failed is not None:
            raise failed
        return
    _print_fit(cal)
    lat = cal.latency
    console.print(f"prefill: {1e3 * lat.prefill_base_s:.4f} ms + {1e6 * lat.prefill_per_token_s:.4f} us/token "
                  f"(R^2 {cal.r2_prefill:.3f})")
    console.print(f"decode:  {1e3 * lat.decode_base_s:.4f} ms + {1e6 * lat.decode_per_seq_s:.4f} us/request + "
                  f"{1e6 * lat.decode_per_kv_token_s:.5f} us/KV token (R^2 {cal.r2_decode:.3f})")
    if lat.dense_attention_per_pair_s:
        console.print(f"dense batch attention: {1e9 * lat.dense_attention_per_pair_s:.4f} ns per (query, key) pair")
    console.print(f"relative error: mean {100 * cal.mean_rel_error:.1f} %, max {100 * cal.max_rel_error:.1f} %")
    if path:
        console.print(f"profile written to {path}", markup=False)
    if failed is not None:
        raise failed


def _check_instances_flag(spec, instances: int) -> None:
    """Refuse ``--instances`` beside a SPEC, whose ``[[instances]]`` say how many replicas serve."""
    if spec is not None and instances != 1:
        raise SpecError("--instances", f"is {instances}, but with a SPEC its [[instances]] decide the replicas",
                        "set count = N in the spec's [[instances]], or drop --instances")


def _quiet_weight_loading() -> None:
    """Turn off transformers' "Loading weights" progress bar for this CLI process.

    The built-in models load in milliseconds; the bar only interleaves carriage returns with the
    command's table on stderr (and in logs). The library's own users keep transformers' default.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _start_engines(backend, model, clients, instances, kv_blocks, max_batched_tokens, dtype, device, seed):
    """Start ``instances`` engines of ``backend`` (replicas of one configuration)."""
    if clients is None:
        clients = DEFAULT_ENGINE_CLIENTS
    if instances < 1:
        raise SpecError("instances", f"must be >= 1, got {instances}", "give at least one replica")
    engines = []
    try:
        for _ in range(instances):
            if backend == "vllm":
                from lloptim.engines.vllm import VllmEngine

                engines.append(VllmEngine(model, clients=clients, kv_blocks=kv_blocks,
                                          max_num_batched_tokens=max_batched_tokens, dtype=dtype or "float32",
                                          seed=seed))
            else:
                from lloptim.engines.hf import HFEngine

                _quiet_weight_loading()
                shared = engines[0].module if engines else model
                engines.append(HFEngine(shared, clients=clients, kv_blocks=kv_blocks,
                                        max_batch_tokens=max_batched_tokens, dtype=dtype or "float32", device=device,
                                        seed=seed))
    except BaseException:
        _close(engines)
        raise
    return engines


def _close(engines) -> None:
    for e in engines:
        e.close()


def _engine_model(model: str) -> str:
    """The engines' default model: heads of 16 dimensions (tiny-llama) are rejected by their CPU attention."""
    return "mini-llama" if model == "tiny-llama" else model


def _check_engine_flags(backend: str, kv_blocks, max_batched_tokens) -> None:
    """Engine-only flags with another backend, and their ranges, named before any work."""
    if backend not in ENGINE_BACKENDS and (kv_blocks is not None or max_batched_tokens is not None):
        flag = "--kv-blocks" if kv_blocks is not None else "--max-batched-tokens"
        raise SpecError(flag, f"an engine option with --backend {backend}",
                        f"use it with --backend {' or '.join(ENGINE_BACKENDS)}, or drop it")
    if kv_blocks is not None:
        check_int("--kv-blocks", kv_blocks, 2, 10**9, fix="give the engine's KV blocks, e.g. --kv-blocks 256")
    if max_batched_tokens is not None:
        check_int("--max-batched-tokens", max_batched_tokens, 1, 10**9,
                  fix="give the tokens per step, e.g. --max-batched-tokens 2048")


def _serving_problem(spec, profile, clients, instances, requests, engine: bool = False):
    """The problem to serve: SPEC's workload and instance layout (or the default) on ``profile``'s latency."""
    from lloptim.problem import Instance, Problem

    if spec is None:
        workload = (default_engine_workload(limit=requests or 64) if engine
                    else default_torch_workload(limit=requests or 32))
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
    spec: Optional[Path] = typer.Argument(None, help="TOML spec; default: 32 GSM8K requests scaled for tiny-llama "
                                          "(torch) or the first 64 GSM8K test requests (vllm, hf)"),
    backend: str = typer.Option("torch", "--backend", help="torch (lloptim's exact-token engine), vllm or hf "
                                "(lloptim as the engine's scheduler), or simulated"),
    model: str = typer.Option("tiny-llama", "--model", "-m", help="'tiny-llama' (torch), 'mini-llama' (the engines' "
                              "default) or a local model directory"),
    policy: str = typer.Option("baseline", "--policy", "-p", help="policy name (see `lloptim policies`); with vllm "
                               "or hf also 'engine-default', the engine's own scheduler"),
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
    size_guard: bool = typer.Option(True, f"--size-guard/{NO_SIZE_GUARD}", help=SIZE_GUARD_HELP),
    kv_blocks: Optional[int] = typer.Option(None, "--kv-blocks", help="vllm, hf: KV blocks per engine (default: "
                                            "the engine's)"),
    max_batched_tokens: Optional[int] = typer.Option(None, "--max-batched-tokens", help="vllm, hf: tokens per step "
                                                     "(default: the engine's)"),
    preemption: str = preemption_option(),
    swap_space: Optional[int] = swap_space_option(),
    policy_option: list[str] = policy_option_option(),
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
    from lloptim import guards
    from lloptim.cli.simulate import migrate_warning
    from lloptim.runtime.registry import make_policy, policy_names
    from lloptim.simulator import run_policy

    sizes = {"clients": "--clients", "instances": "--instances (or the spec's [[instances]])",
             "requests": "--requests (or the spec's workload)"}
    if backend in ENGINE_BACKENDS:
        if preemption != "recompute" or swap_space is not None:
            with user_errors(MODEL_FLAGS, size_guard, sizes):
                raise SpecError("--preemption" if preemption != "recompute" else "--swap-space",
                                f"the {backend} engine preempts by its own configuration, not lloptim's",
                                "drop the flag, or use --backend torch or simulated")
        _serve_engine_cli(spec, backend, model, policy, profile, clients, instances, requests, device, dtype, seed,
                          threads, clock, verify, json_out, migrate, on_ray, address, kv_blocks, max_batched_tokens,
                          size_guard, sizes, policy_option)
        return
    with user_errors(MODEL_FLAGS, size_guard, sizes):
        _check_backend(backend)
        _check_engine_flags(backend, kv_blocks, max_batched_tokens)
        if address is not None and not on_ray:
            raise SpecError("--address", "a Ray address without --ray", "add --ray, or drop --address")
        if requests is not None:
            check_int("--requests", requests, lo=1, fix="give how many requests to serve, e.g. --requests 32")
        if clients is not None:
            check_int("--clients", clients, 1, 1_000_000, fix="give the clients per instance, e.g. --clients 8")
        check_int("--instances", instances, 1, 100_000, fix="give the model replicas, e.g. --instances 2")
        _check_instances_flag(spec, instances)
        check_choice("--policy", policy, sorted(policy_names()), "policy")
        options = checked_policy_options(policy, policy_option)
        _check_common(seed, clock)
        check_int("--threads", threads, lo=0, fix="give a thread count, or 0 for torch's default")
        check_preemption_options(preemption, swap_space)
        if preemption == "swap" and on_ray:
            raise SpecError("--preemption", "the Ray replicas cannot swap KV caches to host memory yet",
                            "use --preemption recompute, or drop --ray")
        if backend == "torch":
            _set_threads(threads)
        given = load_profile(profile) if profile is not None else None  # before any work: a missing file is named
        if preemption == "swap" and given is not None and not given.latency.can_swap:
            raise SpecError("--profile", f"profile {given.name!r} states no KV swap cost, which --preemption swap "
                            "needs to plan and predict", "add kv_swap_per_token_s to its [latency] table, or "
                            "calibrate a new one (`lloptim calibrate --out`), or use --preemption recompute")
        # the run's size is known before the model loads: check it against the machine now
        sizing = given or load_profile("llama-65b")
        sizing = replace(sizing, clients=clients or (DEFAULT_CLIENTS if backend == "torch" and given is None
                                                     else sizing.clients))
        planned = _serving_problem(spec, sizing, clients, instances, requests)
        guards.check_simulation(planned)
        if migrate:
            migrate_warning(planned)
        loaded = load_model(model, device, dtype, seed) if backend == "torch" else None
        if given is not None:
            prof = given
        elif loaded is not None:
            if not json_out:
                err_console.print("no --profile: calibrating first (save one with `lloptim calibrate --out`)")
            prof = calibrate(loaded, seed=seed, repeats=3, clock=clock).to_profile(clients=clients or DEFAULT_CLIENTS)
        else:
            prof = load_profile("llama-65b")
        problem = _serving_problem(spec, prof, clients, instances, requests)
        def make():
            return with_migration(make_policy(policy, **options)) if migrate else make_policy(policy, **options)

        kv = {"preemption": preemption, "swap_space_tokens": swap_space}
        predicted = run_policy(problem, make(), **kv)
        if on_ray:
            from lloptim.backends.simulated import SimulatedBackend
            from lloptim.distributed import RayBackend

            factory = (replica_factory(model, device=loaded.device, dtype=dtype, seed=seed, clock=clock,
                                       threads=threads) if backend == "torch" else SimulatedBackend)
            with RayBackend(problem, factory, address=address) as be:
                result = run_policy(problem, make(), backend=be, **kv)
                generated = be.collect_generated() if backend == "torch" and verify else None
            # the replicas' generations against references computed here, from the same weights
            mismatch = (max(token_mismatches(TorchBackend(problem, loaded, seed=seed), generated=generated).values())
                        if generated is not None else None)
        elif backend == "torch":
            be = TorchBackend(problem, loaded, seed=seed, clock=clock)
            result = run_policy(problem, make(), backend=be, **kv)
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
        prediction_rel_error=(pred - makespan) / makespan if makespan else math.nan, preemption=preemption,
    )
    if options:
        d["policy_options"] = options
    if json_out:
        print_json(d)
        return
    title = (f"{problem.name}: {problem.n_requests} requests, {problem.n_clients} clients, {backend} backend, "
             f"policy {policy}")
    rows = [("requests completed", f"{d['requests_completed']} / {d['requests_total']}"),
            ("makespan (measured)", f"{makespan:.4f} s"), ("makespan (simulated)", f"{pred:.4f} s"),
            ("prediction error", f"{100 * d['prediction_rel_error']:+.1f} %"),
            ("utilization", f"{100 * d['utilization']:.1f} %"), ("tokens/s", f"{d['tokens_per_s']:,.0f}"),
            ("p99 latency", f"{d['latency_p99_s']:.4f} s"), ("wall time", f"{d['wall_s']:.2f} s"),
            ("preemptions", f"{d['preemptions']} ({preemption}"
                            + (f"; {d['swapped_out_tokens']:,} tokens swapped, {d['swap_s']:.4f} s)"
                               if preemption == "swap" else ")")),
            ("max token mismatch", str(mismatch))]
    print_table(console, title, [Column("metric", numeric=False), Column("value")], [list(r) for r in rows])


def _serve_engine_cli(spec, backend, model, policy, profile, clients, instances, requests, device, dtype, seed,
                      threads, clock, verify, json_out, migrate, on_ray, address, kv_blocks, max_batched_tokens,
                      size_guard, sizes, policy_option) -> None:
    """``lloptim run --backend vllm|hf``: serve on the engine, predict with the simulator, report both."""
    from lloptim import guards
    from lloptim.calibrate import calibrate_engine
    from lloptim.engines.common import ENGINE_DEFAULT
    from lloptim.engines.serve import predict_engine_run, serve_engine
    from lloptim.hardware import load_profile
    from lloptim.metrics import summarize
    from lloptim.runtime.registry import policy_names

    with user_errors(MODEL_FLAGS, size_guard, sizes):
        if migrate or on_ray or address is not None:
            flag = "--migrate" if migrate else ("--ray" if on_ray else "--address")
            raise SpecError(flag, f"the {backend} engines run in this process and cannot migrate requests or run "
                            "on Ray", "drop the flag, or use --backend torch")
        if requests is not None:
            check_int("--requests", requests, lo=1, fix="give how many requests to serve, e.g. --requests 32")
        if clients is not None:
            check_int("--clients", clients, 1, 100_000, fix="give the clients per instance, e.g. --clients 16")
        check_int("--instances", instances, 1, 64, fix="give the engine replicas, e.g. --instances 2")
        _check_instances_flag(spec, instances)
        check_choice("--policy", policy, sorted(policy_names()) + [ENGINE_DEFAULT], "policy")
        if policy == ENGINE_DEFAULT and policy_option:
            raise SpecError("--policy-option", f"{ENGINE_DEFAULT} takes no options", "configure the engine instead "
                            "(--kv-blocks, --max-batched-tokens), or pick a lloptim policy")
        options = checked_policy_options(policy, policy_option) if policy != ENGINE_DEFAULT else {}
        _check_common(seed, clock)
        check_int("--threads", threads, lo=0, fix="give a thread count, or 0 for torch's default")
        _check_engine_flags(backend, kv_blocks, max_batched_tokens)
        given = load_profile(profile) if profile is not None else None  # before any work: a missing file is named
        if spec is not None:  # one engine per instance of the spec, as the problem it is checked against
            base = load_problem(spec)
            instances = len(base.instances)
            clients = clients or base.instances[0].clients
        clients = clients or DEFAULT_ENGINE_CLIENTS
        sizing = replace(given or load_profile("llama-65b"), clients=clients)
        guards.check_simulation(_serving_problem(spec, sizing, clients, instances, requests, engine=True))
        _set_threads(threads)
        model = _engine_model(model)
        engines = _start_engines(backend, model, clients, instances, kv_blocks, max_batched_tokens, dtype, device,
                                 seed)
        try:
            e0 = engines[0]
            cap = [e.kv_layout.capacity_tokens for e in engines]
            if given is not None:
                prof = given
            else:
                if not json_out:
                    err_console.print(f"no --profile: calibrating {backend} on its own steps first (save one with "
                                      f"`lloptim calibrate --backend {backend} --out`)")
                cal, _ = calibrate_engine(engines, clock=clock, seed=seed)
                prof = cal.to_profile(name=f"{Path(str(model)).name}-{backend}", kv_capacity_tokens=cap[0],
                                      clients=e0.clients)
            problem = _with_engine_kv(_serving_problem(spec, prof, e0.clients, len(engines), requests, engine=True),
                                      cap)
            result = serve_engine(problem, policy, engines, seed=seed, clock=clock, **options)
            predicted = predict_engine_run(problem, policy, prof, token_budget=e0.token_budget, seed=seed, like=result,
                                           **options)
            mismatch = _engine_mismatches(e0, problem, result, seed) if verify else None
        finally:
            _close(engines)
    d = summarize(result).to_dict()
    makespan = d["makespan_s"]
    pred = predicted.makespan_s
    d.update(backend=backend, model=str(model), policy=policy, profile=str(profile) if profile else "calibrated",
             clock=clock, tokens_per_s=result.generated_tokens / makespan if makespan else 0.0,
             predicted_makespan_s=pred, prediction_rel_error=(pred - makespan) / makespan if makespan else math.nan,
             preemptions=int(result.extra.get("preemptions", 0)),
             plan_deviations=int(result.extra.get("plan_deviations", 0)), requests_with_token_mismatch=mismatch,
             kv_capacity_tokens=result.extra.get("kv_capacity_tokens"), note=result.extra.get("note"))
    if options:
        d["policy_options"] = options
    if json_out:
        print_json(d)
        return
    title = f"{backend} engine, policy {policy}: {problem.n_requests} requests, {problem.n_clients} clients"
    rows = [("workload", problem.workload.name),
            ("requests completed", f"{d['requests_completed']} / {d['requests_total']}"),
            ("output tokens", f"{d['output_tokens']:,}"),
            (f"makespan (measured, {clock})", f"{makespan:.4f} s"), ("makespan (simulated)", f"{pred:.4f} s"),
            ("prediction error", f"{100 * d['prediction_rel_error']:+.1f} %"),
            ("utilization", f"{100 * d['utilization']:.1f} %"), ("tokens/s", f"{d['tokens_per_s']:,.0f}"),
            ("gap to lower bound", _gap_text(d["gap_to_bound"])),
            ("p99 latency", f"{d['latency_p99_s']:.4f} s"), ("wall time", f"{d['wall_s']:.2f} s"),
            ("preemptions", str(d["preemptions"])),
            ("requests with token mismatch", "not checked" if mismatch is None else str(mismatch))]
    print_table(console, title, [Column("metric", numeric=False), Column("value")], [list(r) for r in rows])


def _gap_text(gap: float) -> str:
    """The gap of a measured run to the model's bound, with the reason when it is negative.

    The bound is the calibrated model's: a real engine whose steps ran faster than the fit (timing
    noise, a warmer cache) can finish below it, which says the model, not the schedule, is off.
    """
    text = f"{100 * gap:.2f} %"
    return text if gap >= 0 else f"{text} (engine ran faster than its calibrated model)"


def _with_engine_kv(problem, capacity_tokens):
    """``problem`` with each instance's KV capacity set to its engine's pool, tokens."""
    from lloptim.engines.serve import with_profile

    return with_profile(problem, problem.instances[0].profile, capacity_tokens)


def _engine_mismatches(engine, problem, result, seed) -> int:
    """Requests whose engine tokens differ from one-at-a-time greedy generation by transformers (float32)."""
    from lloptim.backends.models import load_model, reference_generate

    ref_model = load_model(str(engine.model_dir), device="cpu", dtype="float32", seed=seed)
    tokens = result.extra["tokens"]
    bad = 0
    for r in range(problem.n_requests):
        want = reference_generate(ref_model, engine.info.prompt_ids(r, int(problem.workload.prompt_tokens[r]), seed),
                                  int(problem.workload.output_tokens[r]))
        bad += tokens.get(r) != want
    return bad
