"""Named policies. ``make_policy("hybrid")`` builds a fresh :class:`~lloptim.runtime.policy.Policy`.

Register your own with :func:`register_policy`::

    register_policy("mine", lambda **opts: Policy("mine", MyRequests(), PrefillFirst()))
"""

from __future__ import annotations

from typing import Callable

from lloptim.errors import SpecError
from lloptim.runtime.iteration_schedulers import ChunkedPrefill, PrefillFirst
from lloptim.runtime.policy import Policy
from lloptim.runtime.request_schedulers import GlobalQueue, RoundRobinQueues

__all__ = ["make_policy", "register_policy", "policy_names"]

_FACTORIES: dict[str, Callable[..., Policy]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_policy(name: str, factory: Callable[..., Policy], description: str = "") -> None:
    """Make ``factory(**options)`` available as ``make_policy(name, **options)``.

    Parameters
    ----------
    name
        Policy name; registering a name again replaces its factory.
    factory
        Builds a fresh :class:`~lloptim.runtime.policy.Policy` from keyword options.
    description
        One line for :func:`policy_names` and the CLI's policy list.
    """
    _FACTORIES[name] = factory
    _DESCRIPTIONS[name] = description


def policy_names() -> dict[str, str]:
    """Registered policy names and their one-line descriptions."""
    _load_builtin()
    return dict(_DESCRIPTIONS)


def make_policy(name: str, **options) -> Policy:
    """A new policy by name; ``options`` go to its factory.

    Raises
    ------
    SpecError
        If the name is unknown or an option is not accepted.
    """
    _load_builtin()
    if name not in _FACTORIES:
        raise SpecError("policy", f"unknown policy {name!r}", f"use one of {sorted(_FACTORIES)}")
    try:
        return _FACTORIES[name](**options)
    except TypeError as exc:
        raise SpecError(f"policy.{name}", f"bad option: {exc}", "see the policy's documented options") from None


_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    register_policy("baseline", lambda: Policy("baseline", RoundRobinQueues(), PrefillFirst()),
                    "round-robin dealing in arrival order, no re-assignment, prefill-first (the paper's baseline)")
    register_policy("vllm", lambda token_budget=2048: Policy("vllm", GlobalQueue("fcfs"),
                                                             PrefillFirst(token_budget, head_of_line=True)),
                    "FCFS global queue, prefill-first under a token budget, no request overtaking one waiting for "
                    "KV memory (vLLM's default scheduler)")
    register_policy("sarathi", lambda token_budget=None: Policy("sarathi", GlobalQueue("fcfs"),
                                                               ChunkedPrefill(token_budget)),
                    "FCFS, chunked prefill fused with decodes under a token budget (Sarathi-Serve)")
    register_policy("sorted-f", lambda: Policy("sorted-f", GlobalQueue("shortest"), PrefillFirst()),
                    "shortest estimated output first, global queue, prefill-first")
    register_policy("lpt", lambda: Policy("lpt", GlobalQueue("longest"), PrefillFirst()),
                    "longest estimated output first (online LPT list scheduling), prefill-first")
    register_policy("mcsf", _mcsf,
                    "MC-SF (Jaillet et al. 2025): shortest estimated output first, admitted only while the projected "
                    "KV memory fits at every future completion; prompts fused into decodes")
    register_policy("wait", _wait,
                    "WAIT (Ao et al. 2025): fluid-model admission rates per output-length type, paced per decode "
                    "step to fit the KV memory; prompts fused into decodes")
    try:  # policies that need the offline solvers
        from lloptim.runtime import hybrid  # noqa: F401  (registers offline, hybrid)
    except ImportError:  # pragma: no cover - solvers not built yet
        pass


def _mcsf(start_delay: int = 1) -> Policy:
    from lloptim.runtime.lagrangian import LagrangianIterations
    from lloptim.runtime.memory_schedulers import MemoryAwareQueue

    return Policy("mcsf", MemoryAwareQueue("shortest", "prefix", start_delay=start_delay),
                  LagrangianIterations(fused=True))


def _wait(types: int = 4, headroom: float = 0.95) -> Policy:
    from lloptim.runtime.lagrangian import LagrangianIterations
    from lloptim.runtime.memory_schedulers import FluidPacedQueue

    return Policy("wait", FluidPacedQueue(types, headroom), LagrangianIterations(fused=True))
