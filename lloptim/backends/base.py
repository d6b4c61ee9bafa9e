"""The backend interface the runtime engine drives.

A backend executes model iterations and says how long each took, in seconds. The simulated
backend computes the time from the latency model; the torch backend runs a real model and
measures it. The engine owns all scheduling state; a backend only keeps what executing needs
(KV caches, generated tokens).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

__all__ = ["Backend", "SupportsMigration", "SupportsPreemption", "SupportsSwap", "ChunkWork", "InstanceLost"]


class InstanceLost(Exception):
    """Raised by a backend when an instance (a model replica, e.g. a Ray actor) died mid-call.

    The engine treats it as a fault of the whole instance at the current time: the instance's
    unfinished requests go back to the request scheduler and complete elsewhere.

    Parameters
    ----------
    instance
        Index of the lost instance.
    reason
        What the backend saw (e.g. the actor error), for the message; may be empty.
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
        """Prefill the full prompts of ``requests`` (``prompt_tokens`` tokens in all); return the time.

        The "prompt" of a request preempted before (:class:`SupportsPreemption`) is its *context*:
        its prompt followed by the output tokens it had generated; the prefill recomputes their
        cache and yields the next output token, and the request decodes on from there.

        Parameters
        ----------
        instance
            Instance index.
        requests
            Row indices of the requests whose prompts (contexts) are prefilled.
        prompt_tokens
            Their prompt (context) lengths summed, tokens.

        Returns
        -------
        float
            Duration of the iteration, seconds.

        Raises
        ------
        InstanceLost
            The instance died during the call (nothing of the iteration counts).
        """

    def decode(self, instance: int, n_running: int, kv_tokens: int) -> float:
        """One decode step of every running request of ``instance``; return the time.

        ``n_running`` and ``kv_tokens`` (tokens held in their KV caches before the step) let a
        cost-model backend price the step without tracking requests itself.

        Parameters
        ----------
        instance
            Instance index.
        n_running
            Requests decoding (count).
        kv_tokens
            Tokens held in their KV caches before the step, tokens.

        Returns
        -------
        float
            Duration of the step, seconds.

        Raises
        ------
        InstanceLost
            The instance died during the call.
        """

    def mixed(self, instance: int, n_running: int, kv_tokens: int,
              chunks: Sequence[tuple[int, int, int, bool]]) -> float:
        """A fused decode step plus prompt chunks ``(request, start, n_tokens, completes)``; return the time.

        Parameters
        ----------
        instance
            Instance index.
        n_running
            Requests decoding in this iteration (count; may be 0).
        kv_tokens
            Tokens held in the KV caches of the decoding requests before the step, tokens.
        chunks
            One :class:`ChunkWork`-shaped tuple per chunk: request row, prompt tokens already
            prefilled before the chunk (tokens), tokens in the chunk, and whether it completes the
            prompt (the context, for a preempted request, as in :meth:`prefill`).

        Returns
        -------
        float
            Duration of the iteration, seconds.

        Raises
        ------
        InstanceLost
            The instance died during the call.
        """

    def release(self, instance: int, request: int, finished: bool) -> None:
        """Free ``request``'s KV cache: it finished (``finished``) or was evicted by a fault.

        Parameters
        ----------
        instance
            Instance index.
        request
            Row index of the request.
        finished
            True if it completed; False if a fault took it back (it restarts from its prefill).
        """


@runtime_checkable
class SupportsPreemption(Protocol):
    """A backend that can preempt a running request for KV memory and later recompute it (vLLM's recompute).

    The engine preempts when a paged KV cache runs out of blocks (:mod:`lloptim.memory`). With a
    backend that lacks :meth:`preempt` it releases the victim instead (:meth:`Backend.release`
    with ``finished`` false) and restarts it from its prompt, its generated tokens wasted.
    """

    def preempt(self, instance: int, request: int) -> bool | None:
        """Free ``request``'s KV cache but keep the output tokens it generated.

        Its next prefill (whole or in chunks) processes its context, the prompt followed by those
        tokens, and yields the token it would have produced next; it then decodes its remaining
        tokens. A later :meth:`Backend.release` with ``finished`` false (a fault) forgets them.

        Parameters
        ----------
        instance
            Instance index the request runs on.
        request
            Row index of the request.

        Returns
        -------
        bool or None
            False if the backend could not keep the tokens after all (the engine then restarts the
            request from its prompt); None or True otherwise.
        """


@runtime_checkable
class SupportsSwap(Protocol):
    """A backend that can preempt by swapping a request's KV cache to host memory and back (vLLM's ``swap``).

    The engine asks for it only with ``preemption="swap"``: :meth:`swap_out` when a running request
    is preempted and the instance's host swap space holds its cache, :meth:`swap_in` when the
    policy resumes it (a prefill or chunk of a swapped request copies its cache back instead of
    computing it). A backend without these methods refuses ``preemption="swap"`` before the run.
    """

    def swap_out(self, instance: int, request: int, kv_tokens: int) -> float:
        """Copy ``request``'s KV cache (``kv_tokens`` tokens) to host memory and free it; return the seconds.

        Parameters
        ----------
        instance
            Instance index the request runs on.
        request
            Row index of the request.
        kv_tokens
            Tokens in its cache (prompt + generated), tokens.

        Returns
        -------
        float
            Duration of the copy, seconds (the instance stalls for it).
        """

    def swap_in(self, instance: int, request: int, kv_tokens: int) -> float:
        """Copy ``kv_tokens`` tokens of ``request``'s swapped cache back to the instance; return the seconds.

        Parameters
        ----------
        instance
            Instance index the request resumes on.
        request
            Row index of the request.
        kv_tokens
            Tokens copied back by this call (all of them, or one chunk), tokens.

        Returns
        -------
        float
            Duration of the copy, seconds (added to the iteration that resumes the request).
        """


@runtime_checkable
class SupportsMigration(Protocol):
    """A backend that can move a running request's KV cache between instances (opt-in capability).

    The engine asks for it only when the policy enables migration
    (:mod:`lloptim.runtime.migration`); a backend without :meth:`migrate` serves every other policy.
    """

    def migrate(self, source: int, destination: int, request: int, kv_tokens: int) -> float:
        """Move ``request`` (running on ``source``) with its KV cache to ``destination``; return the time.

        After the call the request decodes on ``destination`` from the token it had reached.

        Parameters
        ----------
        source
            Instance index the request runs on.
        destination
            Instance index it moves to.
        request
            Row index of the request.
        kv_tokens
            Tokens in its KV cache (prompt + generated), tokens.

        Returns
        -------
        float
            Duration of the transfer, seconds; the destination instance stalls for it.
        """
