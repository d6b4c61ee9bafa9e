"""The simulated backend: iteration times from each instance's latency model."""

from __future__ import annotations

from typing import Sequence

from lloptim.hardware import transfer_time_between
from lloptim.problem import Problem

__all__ = ["SimulatedBackend"]


class SimulatedBackend:
    """Prices iterations with :class:`~lloptim.hardware.LatencyModel` (no model runs).

    Parameters
    ----------
    problem
        Supplies each instance's latency model.
    """

    name = "simulated"

    def __init__(self, problem: Problem) -> None:
        self._latency = [inst.profile.latency for inst in problem.instances]

    def prefill(self, instance: int, requests: Sequence[int], prompt_tokens: int) -> float:
        """Seconds of a prefill over ``prompt_tokens`` tokens.

        Parameters
        ----------
        instance, requests, prompt_tokens
            As in :meth:`Backend.prefill <lloptim.backends.base.Backend.prefill>`; only the
            instance and the token count, tokens, set the time.

        Returns
        -------
        float
            ``LatencyModel.prefill_time(prompt_tokens)``, plus the dense batch attention of the
            prompt tokens (:meth:`~lloptim.hardware.LatencyModel.dense_attention_time`), seconds.
        """
        lat = self._latency[instance]
        return lat.prefill_time(prompt_tokens) + lat.dense_attention_time(prompt_tokens, 0)

    def decode(self, instance: int, n_running: int, kv_tokens: int) -> float:
        """Seconds of a decode step of ``n_running`` requests holding ``kv_tokens`` tokens.

        Parameters
        ----------
        instance, n_running, kv_tokens
            As in :meth:`Backend.decode <lloptim.backends.base.Backend.decode>` (count, tokens).

        Returns
        -------
        float
            ``LatencyModel.decode_time(n_running, kv_tokens)``, plus the dense batch attention of
            one query per request over their caches, seconds.
        """
        lat = self._latency[instance]
        return lat.decode_time(n_running, kv_tokens) + lat.dense_attention_time(n_running, kv_tokens)

    def mixed(self, instance: int, n_running: int, kv_tokens: int,
              chunks: Sequence[tuple[int, int, int, bool]]) -> float:
        """A decode step plus the per-token prefill cost of the chunks (the fixed cost is shared).

        Parameters
        ----------
        instance, n_running, kv_tokens, chunks
            As in :meth:`Backend.mixed <lloptim.backends.base.Backend.mixed>`.

        Returns
        -------
        float
            Duration, seconds: a plain prefill of the chunk tokens when nothing decodes; either way
            plus the dense batch attention of every query (decodes and chunk tokens) over the keys
            cached before (the decodes' caches, the chunks' prefilled parts).
        """
        lat = self._latency[instance]
        chunk_tokens = sum(c[2] for c in chunks)
        dense = lat.dense_attention_time(n_running + chunk_tokens, kv_tokens + sum(c[1] for c in chunks))
        if n_running == 0:
            return lat.prefill_time(chunk_tokens) + dense
        return lat.decode_time(n_running, kv_tokens) + lat.prefill_per_token_s * chunk_tokens + dense

    def migrate(self, source: int, destination: int, request: int, kv_tokens: int) -> float:
        """Seconds to move a running request's KV cache of ``kv_tokens`` tokens between instances.

        Parameters
        ----------
        source, destination, request, kv_tokens
            As in :meth:`SupportsMigration.migrate <lloptim.backends.base.SupportsMigration.migrate>`.

        Returns
        -------
        float
            :func:`~lloptim.hardware.transfer_time_between` of the two profiles, seconds.
        """
        return transfer_time_between(self._latency[source], self._latency[destination], kv_tokens)

    def preempt(self, instance: int, request: int) -> None:
        """Nothing to free in a simulation (the engine prices the recompute as a prefill of the context).

        Parameters
        ----------
        instance, request
            As in :meth:`SupportsPreemption.preempt <lloptim.backends.base.SupportsPreemption.preempt>`; ignored.
        """

    def swap_out(self, instance: int, request: int, kv_tokens: int) -> float:
        """Seconds to copy a preempted request's KV cache to host memory.

        Parameters
        ----------
        instance, request, kv_tokens
            As in :meth:`SupportsSwap.swap_out <lloptim.backends.base.SupportsSwap.swap_out>`.

        Returns
        -------
        float
            :meth:`~lloptim.hardware.LatencyModel.swap_time` of ``kv_tokens`` on the instance, seconds.
        """
        return self._latency[instance].swap_time(kv_tokens)

    def swap_in(self, instance: int, request: int, kv_tokens: int) -> float:
        """Seconds to copy ``kv_tokens`` swapped KV tokens back to the instance.

        Parameters
        ----------
        instance, request, kv_tokens
            As in :meth:`SupportsSwap.swap_in <lloptim.backends.base.SupportsSwap.swap_in>`.

        Returns
        -------
        float
            :meth:`~lloptim.hardware.LatencyModel.swap_time` of ``kv_tokens`` on the instance, seconds.
        """
        return self._latency[instance].swap_time(kv_tokens)

    def release(self, instance: int, request: int, finished: bool) -> None:
        """Nothing to free in a simulation.

        Parameters
        ----------
        instance, request, finished
            As in :meth:`Backend.release <lloptim.backends.base.Backend.release>`; ignored.
        """
