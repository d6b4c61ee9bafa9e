"""The backend interface the runtime engine drives.

A backend executes model iterations and says how long each took, in seconds. The simulated
backend computes the time from the latency model; the torch backend runs a real model and
measures it. The engine owns all scheduling state; a backend only keeps what executing needs
(KV caches, generated tokens).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

__all__ = ["Backend", "ChunkWork", "InstanceLost"]


class InstanceLost(Exception):
    """Raised by a backend when an instance (a model replica, e.g. a Ray actor) died mid-call.

    The engine treats it as a fault of the whole instance at the current time: the instance's
    unfinished requests go back to the request scheduler and complete elsewhere.
    """

    def __init__(self, instance: int, reason: str = "") -> None:
        self.instance = instance
        self.reason = reason
        super().__init__(f"instance {instance} lost" + (f": {reason}" if reason else ""))

    def __reduce__(self):
        return (type(self), (self.instance, self.reason))


class ChunkWork(tuple):
    """``(request, start_token, n_tokens, completes)`` of one prefill chunk in a mixed iteration."""

    __slots__ = ()


@runtime_checkable
class Backend(Protocol):
    """What the engine calls. Times are seconds; ``instance`` is the instance index."""

    name: str

    def prefill(self, instance: int, requests: Sequence[int], prompt_tokens: int) -> float:
        """Prefill the full prompts of ``requests`` (``prompt_tokens`` tokens in all); return the time."""

    def decode(self, instance: int, n_running: int, kv_tokens: int) -> float:
        """One decode step of every running request of ``instance``; return the time.

        ``n_running`` and ``kv_tokens`` (tokens held in their KV caches before the step) let a
        cost-model backend price the step without tracking requests itself.
        """

    def mixed(self, instance: int, n_running: int, kv_tokens: int,
              chunks: Sequence[tuple[int, int, int, bool]]) -> float:
        """A fused decode step plus prompt chunks ``(request, start, n_tokens, completes)``; return the time."""

    def release(self, instance: int, request: int, finished: bool) -> None:
        """Free ``request``'s KV cache: it finished (``finished``) or was evicted by a fault."""
