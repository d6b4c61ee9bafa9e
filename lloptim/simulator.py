"""The discrete-event simulator: the runtime engine on the simulated backend.

>>> from lloptim import workloads, simulate, Problem
>>> result = simulate(Problem.single(workloads.gsm8k("test", limit=50)), "baseline")
>>> result.requests_completed
50
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lloptim import guards
from lloptim.metrics import RunMetrics, summarize
from lloptim.problem import Problem, as_problem
from lloptim.progress import watch
from lloptim.runtime.engine import Engine, Fault, RunResult
from lloptim.runtime.policy import Policy
from lloptim.runtime.registry import make_policy

__all__ = ["simulate", "run_policy"]


def run_policy(problem: Problem, policy: str | Policy = "baseline", estimates: np.ndarray | None = None,
               faults: Sequence[Fault] = (), backend=None, seed: int = 0, *, progress: bool = False,
               kv_mode: str | None = None, kv_block_tokens: int | None = None, victim: str = "newest",
               check: bool = False, preemption: str = "recompute", swap_space_tokens: int | None = None,
               **policy_options) -> RunResult:
    """Run ``problem`` under ``policy`` (a name or a :class:`Policy`) and return the full :class:`RunResult`.

    Parameters
    ----------
    problem
        What to serve.
    policy
        Policy name (see :func:`~lloptim.runtime.registry.policy_names`) or instance.
    estimates
        Output-length estimates the policy sees, tokens; ``None``: the true lengths.
    faults
        Failures to inject.
    backend
        Backend executing the iterations; ``None``: the simulated backend.
    seed
        Seed handed to the policy.
    progress
        Show a progress bar of the requests served on stderr (only once a run lasts over a second).
    kv_mode, kv_block_tokens, victim, check
        KV memory options of the run (see :class:`~lloptim.runtime.engine.Engine`): ``"paged"`` or
        ``"reserve"`` for every instance (None: each instance's spec), tokens per block, the
        preemption victim rule, and the KV accounting check.
    preemption, swap_space_tokens
        What preemption does (``"recompute"`` or ``"swap"``) and each instance's host swap space,
        tokens (None: its KV capacity); see :class:`~lloptim.runtime.engine.Engine`.
    **policy_options
        Options of the named policy's factory (see :func:`~lloptim.runtime.registry.make_policy`).

    Raises
    ------
    SpecError
        ``problem`` is not a :class:`~lloptim.problem.Problem`, an unknown policy, bad estimates or
        faults.
    TooLargeError
        The run is estimated to need more memory than this machine has (:mod:`lloptim.guards`).
    """
    problem = as_problem(problem)
    guards.check_simulation(problem)
    pol = make_policy(policy, **policy_options) if isinstance(policy, str) else policy
    engine = Engine(problem, pol, backend=backend, estimates=estimates, faults=faults, seed=seed, kv_mode=kv_mode,
                    kv_block_tokens=kv_block_tokens, victim=victim, check=check, preemption=preemption,
                    swap_space_tokens=swap_space_tokens)
    with watch(lambda: getattr(engine, "n_done", 0), problem.n_requests, f"{pol.name}", progress, "requests"):
        return engine.run()


def simulate(problem: Problem, policy: str | Policy = "baseline", estimates: np.ndarray | None = None,
             faults: Sequence[Fault] = (), seed: int = 0, *, progress: bool = False, kv_mode: str | None = None,
             kv_block_tokens: int | None = None, victim: str = "newest", preemption: str = "recompute",
             swap_space_tokens: int | None = None, **policy_options) -> RunMetrics:
    """Simulate ``problem`` under ``policy`` and return its :class:`~lloptim.metrics.RunMetrics`.

    Parameters
    ----------
    problem
        What to serve.
    policy
        Policy name (see :func:`~lloptim.runtime.registry.policy_names`) or instance.
    estimates
        Output-length estimates the policy sees, tokens; ``None``: the true lengths.
    faults
        Failures to inject.
    seed
        Seed handed to the policy.
    progress
        Show a progress bar on stderr (see :func:`run_policy`).
    kv_mode, kv_block_tokens, victim, preemption, swap_space_tokens
        KV memory options of the run (see :func:`run_policy`).
    **policy_options
        Options of the named policy's factory (see :func:`~lloptim.runtime.registry.make_policy`).

    Raises
    ------
    SpecError
        As :func:`run_policy`.
    """
    return summarize(run_policy(problem, policy, estimates, faults, None, seed, progress=progress, kv_mode=kv_mode,
                                kv_block_tokens=kv_block_tokens, victim=victim, preemption=preemption,
                                swap_space_tokens=swap_space_tokens, **policy_options))
