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
from rich.table import Table

from lloptim.cli.app import app
from lloptim.cli.common import console, err_console, load_problem, print_json, user_errors
from lloptim.errors import SpecError

__all__ = ["default_torch_workload", "default_engine_workload", "serve", "calibrate_command"]

BACKENDS = ("torch", "simulated", "vllm", "hf")
ENGINE_BACKENDS = ("vllm", "hf")


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
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Profile prefill and decode of a real model and fit the five latency coefficients (NNLS).

    With --backend vllm or hf the fit uses the engine's own step timings while it serves GSM8K train
    requests under its default scheduler, the baseline and the hybrid.
    """
    from lloptim.calibrate import calibrate
    from lloptim.hardware import save_profile

    with user_errors():
        if backend not in ("torch",) + ENGINE_BACKENDS:
            raise SpecError("backend", f"cannot calibrate the {backend!r} backend",
                            f"use one of {['torch', *ENGINE_BACKENDS]}")
        _set_threads(threads)
        if backend in ENGINE_BACKENDS:
            from lloptim.calibrate import calibrate_engine

            engines = _start_engines(backend, model if model != "tiny-llama" else "mini-llama", clients, 1, kv_blocks,
                                     max_batched_tokens, dtype, device, seed)
            try:
                cal, _ = calibrate_engine(engines, clock=clock, seed=seed)
                kv_capacity = engines[0].kv_layout.capacity_tokens
            finally:
                _close(engines)
        else:
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


#: Clients per engine instance when neither --clients nor a SPEC says.
DEFAULT_ENGINE_CLIENTS = 16


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
    kv_blocks: Optional[int] = typer.Option(None, "--kv-blocks", help="vllm, hf: KV blocks per engine (default: "
                                            "the engine's)"),
    max_batched_tokens: Optional[int] = typer.Option(None, "--max-batched-tokens", help="vllm, hf: tokens per step "
                                                     "(default: the engine's)"),
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

    if backend in ENGINE_BACKENDS:
        _serve_engine_cli(spec, backend, model, policy, profile, clients, instances, requests, device, dtype, seed,
                          threads, clock, verify, json_out, migrate, on_ray, kv_blocks, max_batched_tokens)
        return
    with user_errors():
        _check_backend(backend)
        if kv_blocks is not None or max_batched_tokens is not None:
            raise SpecError("--kv-blocks", "engine options with a backend that is not an engine",
                            f"use them with --backend {' or '.join(ENGINE_BACKENDS)}")
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


def _serve_engine_cli(spec, backend, model, policy, profile, clients, instances, requests, device, dtype, seed,
                      threads, clock, verify, json_out, migrate, on_ray, kv_blocks, max_batched_tokens) -> None:
    """``lloptim run --backend vllm|hf``: serve on the engine, predict with the simulator, report both."""
    from lloptim.calibrate import calibrate_engine
    from lloptim.engines.serve import predict_engine_run, serve_engine
    from lloptim.hardware import load_profile
    from lloptim.metrics import summarize

    with user_errors():
        if migrate or on_ray:
            raise SpecError("--migrate" if migrate else "--ray", f"the {backend} engines run in this process and "
                            "cannot migrate requests", "drop the flag, or use --backend torch")
        if requests is not None and requests < 1:
            raise SpecError("requests", f"must be >= 1, got {requests}", "give how many requests to serve")
        if clients is not None and clients < 1:
            raise SpecError("clients", f"must be >= 1, got {clients}", "give at least one client")
        _set_threads(threads)
        if model == "tiny-llama":
            model = "mini-llama"  # heads of 16 dimensions are rejected by the engines' CPU attention
        if spec is not None and clients is None:
            base = load_problem(spec)
            clients = base.instances[0].clients
            instances = len(base.instances)
        engines = _start_engines(backend, model, clients or DEFAULT_ENGINE_CLIENTS, instances, kv_blocks,
                                 max_batched_tokens, dtype, device, seed)
        try:
            e0 = engines[0]
            cap = [e.kv_layout.capacity_tokens for e in engines]
            if profile is not None:
                prof = load_profile(profile)
            else:
                if not json_out:
                    err_console.print(f"no --profile: calibrating {backend} on its own steps first (save one with "
                                      f"`lloptim calibrate --backend {backend} --out`)")
                cal, _ = calibrate_engine(engines, clock=clock, seed=seed)
                prof = cal.to_profile(name=f"{Path(str(model)).name}-{backend}", kv_capacity_tokens=cap[0],
                                      clients=e0.clients)
            problem = _serving_problem(spec, prof, e0.clients, len(engines), requests, engine=True)
            problem = _with_engine_kv(problem, cap)
            result = serve_engine(problem, policy, engines, seed=seed, clock=clock)
            predicted = predict_engine_run(problem, policy, prof, token_budget=e0.token_budget, kv_capacity_tokens=cap,
                                           seed=seed)
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
    if json_out:
        print_json(d)
        return
    t = Table(title=f"{backend} engine, policy {policy}: {problem.n_requests} requests, {problem.n_clients} clients")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [("workload", problem.workload.name),
            ("requests completed", f"{d['requests_completed']} / {d['requests_total']}"),
            ("output tokens", f"{d['output_tokens']:,}"),
            (f"makespan (measured, {clock})", f"{makespan:.4f} s"), ("makespan (simulated)", f"{pred:.4f} s"),
            ("prediction error", f"{100 * d['prediction_rel_error']:+.1f} %"),
            ("utilization", f"{100 * d['utilization']:.1f} %"), ("tokens/s", f"{d['tokens_per_s']:,.0f}"),
            ("gap to lower bound", f"{100 * d['gap_to_bound']:.2f} %"),
            ("p99 latency", f"{d['latency_p99_s']:.4f} s"), ("wall time", f"{d['wall_s']:.2f} s"),
            ("preemptions", str(d["preemptions"])),
            ("requests with token mismatch", "not checked" if mismatch is None else str(mismatch))]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


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
