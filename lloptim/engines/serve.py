"""One call from a problem and a policy to an engine run, and the simulator's prediction of it.

:func:`serve_engine` attaches a fresh :class:`~lloptim.engines.common.EngineRun` to already started
engines (one per instance), drives them, and detaches, so engines can be reused across runs (one
engine start for many policies). :func:`engine_policy` builds the policy an engine run uses, with the
engine's token budget; :func:`predict_engine_run` simulates the same policy on the same work
(:func:`~lloptim.engines.common.engine_problem`) with a profile, which is what ``lloptim run``
compares against the measured run.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lloptim.engines.common import ENGINE_DEFAULT, EngineRun, drive, engine_problem
from lloptim.errors import SpecError
from lloptim.hardware import HardwareProfile
from lloptim.problem import Instance, Problem
from lloptim.runtime.engine import RunResult
from lloptim.runtime.policy import Policy

__all__ = ["serve_engine", "engine_policy", "predict_engine_run", "with_profile", "DEFAULT_POLICY_TWIN"]

#: The lloptim policy that models an engine's own scheduler: FCFS with decodes first and prompt
#: chunks filling the step's token budget (vLLM v1's chunked prefill, transformers' FIFO scheduler).
DEFAULT_POLICY_TWIN = "sarathi"


def engine_policy(name: str | Policy, token_budget: int | None = None, clients: int = 0,
                  **options) -> Policy | None:
    """The policy for an engine run: ``None`` for :data:`ENGINE_DEFAULT`, else the named policy.

    Policies that take a ``token_budget`` get the engine's step budget minus one decode token per
    client, so what they ask of a step always fits it.

    Parameters
    ----------
    name
        A registered policy name, :data:`ENGINE_DEFAULT`, or a :class:`Policy`.
    token_budget
        The engine's tokens per step (``None``: none given).
    clients
        Clients per instance (decode tokens a step may carry).
    **options
        Further options of the policy's factory.

    Raises
    ------
    SpecError
        Unknown policy or option.
    """
    from lloptim.runtime.registry import make_policy

    if isinstance(name, Policy):
        return name
    if name == ENGINE_DEFAULT:
        if options:
            raise SpecError("policy", f"{ENGINE_DEFAULT} takes no options, got {sorted(options)}",
                            "configure the engine instead")
        return None
    if token_budget is not None and "token_budget" not in options:
        try:
            return make_policy(name, token_budget=max(1, int(token_budget) - int(clients)), **options)
        except SpecError as exc:
            if "bad option" not in exc.problem:
                raise
    return make_policy(name, **options)


def serve_engine(problem: Problem, policy: str | Policy, engines: Sequence, estimates: np.ndarray | None = None,
                 seed: int = 0, clock: str = "wall", kv_mode: str | None = None, **policy_options) -> RunResult:
    """Serve ``problem`` on ``engines`` (one started engine per instance) under ``policy``.

    Parameters
    ----------
    problem
        What to serve (true output lengths); its instances' clients must match the engines'.
    policy
        A policy name (see ``lloptim policies``), :data:`ENGINE_DEFAULT` (the engine's own
        scheduler), or a :class:`Policy`.
    engines
        :class:`~lloptim.engines.vllm.VllmEngine` or :class:`~lloptim.engines.hf.HFEngine` objects.
    estimates
        Output-length estimates the policy sees, tokens; ``None``: the truth.
    seed
        Seed handed to the policy.
    clock
        ``"wall"`` or ``"cpu"`` seconds per step (see :class:`~lloptim.engines.common.EngineRun`).
    kv_mode
        ``"paged"`` or ``"reserve"`` for every instance (None: each instance's own; an engine that
        cannot recompute preempted requests, transformers', is always steered in reserve mode).
    **policy_options
        Options of the named policy.

    Returns
    -------
    RunResult
        Over :func:`~lloptim.engines.common.engine_problem` of ``problem``; ``extra["tokens"]`` holds
        each request's generated token ids, ``extra["dense_attention"]`` whether the engine's
        attention is one dense matrix over the batch (what calibration then fits).

    Raises
    ------
    SpecError
        Engines and instances do not match.
    PolicyError, EngineError
        From the run (engines are detached and left clean either way).
    """
    if len(engines) != len(problem.instances):
        raise SpecError("instances", f"{len(problem.instances)} instances for {len(engines)} engines",
                        "start one engine per instance")
    for k, (inst, eng) in enumerate(zip(problem.instances, engines)):
        if inst.clients != eng.clients:
            raise SpecError(f"instances[{k}].clients", f"{inst.clients} clients but the engine runs {eng.clients} "
                            "requests at most", "start the engine with as many slots as the instance has clients")
    pol = engine_policy(policy, engines[0].token_budget, engines[0].clients, **policy_options)
    # an engine that cannot recompute a preempted request is steered by reservation
    if not getattr(engines[0], "preempts", True):
        kv_mode = "reserve"
    run = EngineRun(problem, pol, [e.kv_layout for e in engines], engine=engines[0].name, estimates=estimates,
                    seed=seed, clock=clock, kv_mode=kv_mode)
    attached = []
    try:
        for k, e in enumerate(engines):
            e.attach(run, k)
            attached.append(e)
        result = drive(run, engines)
    finally:
        for e in attached:
            e.detach()
    result.extra["tokens"] = run.tokens
    # how the engine's attention scales, for calibration (see LatencyModel.dense_attention_per_pair_s)
    result.extra["dense_attention"] = bool(getattr(engines[0], "dense_attention", False))
    return result


def with_profile(problem: Problem, profile: HardwareProfile,
                 kv_capacity_tokens: Sequence[int] | None = None, kv_block_tokens: int | None = None) -> Problem:
    """``problem`` with every instance priced by ``profile`` (clients and KV mode kept; KV pool optionally set).

    Parameters
    ----------
    problem
        The problem.
    profile
        Latency model for every instance (e.g. a calibration of the engine).
    kv_capacity_tokens
        Each instance's KV capacity, tokens (e.g. the engines' pools); ``None``: keep.
    kv_block_tokens
        Tokens per KV block of every instance (the engine's); ``None``: keep.
    """
    insts = []
    for k, inst in enumerate(problem.instances):
        kv = inst.kv_capacity_tokens if kv_capacity_tokens is None else int(kv_capacity_tokens[k])
        block = inst.kv_block_tokens if kv_block_tokens is None else int(kv_block_tokens)
        insts.append(Instance.from_profile(profile, inst.clients, kv, name=inst.name, kv_mode=inst.kv_mode,
                                           kv_block_tokens=min(block, kv)))
    return Problem(problem.workload, tuple(insts), name=problem.name)


def predict_engine_run(problem: Problem, policy: str | Policy, profile: HardwareProfile,
                       token_budget: int | None = None, kv_capacity_tokens: Sequence[int] | None = None,
                       estimates: np.ndarray | None = None, seed: int = 0, kv_block_tokens: int | None = None,
                       kv_mode: str | None = None, like: RunResult | None = None, **policy_options) -> RunResult:
    """Simulate an engine run: the same policy on the engine's work (:func:`engine_problem`), priced by ``profile``.

    :data:`ENGINE_DEFAULT` is simulated by :data:`DEFAULT_POLICY_TWIN` under the engine's token budget.

    Parameters
    ----------
    problem
        What the engine serves (true output lengths).
    policy
        As for :func:`serve_engine`.
    profile
        The engine's calibrated profile.
    token_budget
        The engine's tokens per step.
    kv_capacity_tokens
        The engines' KV pools, tokens per instance.
    estimates
        Output-length estimates (true tokens), as the engine run got them.
    seed
        Seed handed to the policy.
    kv_block_tokens
        The engines' KV block, tokens (None: the instances' own).
    kv_mode
        ``"paged"`` or ``"reserve"`` as the run saw its engines (None: the instances' own; the
        engine's own scheduler is simulated paged, as vLLM manages memory).
    like
        An engine run of this problem: its KV pools, block size and mode (``extra``) replace
        ``kv_capacity_tokens``, ``kv_block_tokens`` and ``kv_mode``.
    **policy_options
        Options of the named policy.

    Returns
    -------
    RunResult
        The simulated run (vLLM's victim rule, the newest request, where the policy names none).
    """
    from lloptim.simulator import run_policy

    if like is not None:
        kv_capacity_tokens = like.extra["kv_capacity_tokens"]
        kv_block_tokens = like.extra["kv_block_tokens"][0]
        kv_mode = like.extra["kv_mode"][0]
    steps = engine_problem(with_profile(problem, profile, kv_capacity_tokens, kv_block_tokens))
    clients = steps.instances[0].clients
    if policy == ENGINE_DEFAULT:
        # the twin's budget counts decode tokens too, as the engine's does
        pol = engine_policy(DEFAULT_POLICY_TWIN, token_budget, 0)
    else:
        pol = engine_policy(policy, token_budget, clients, **policy_options)
    est = None if estimates is None else np.maximum(np.asarray(estimates, dtype=np.float64) - 1.0, 1.0)
    if policy == ENGINE_DEFAULT and kv_mode is None:
        kv_mode = "paged"
    return run_policy(steps, pol, estimates=est, seed=seed, kv_mode=kv_mode)
