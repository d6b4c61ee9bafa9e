"""Estimated processing time of each request on a client: the weights of the offline bin packing.

A client serving request ``r`` is busy for about ``o_r`` decode steps plus its prefill. We price a
decode step at its typical length when every client is busy (``step_s``) and add the prefill time
of ``r`` as if it shared a prefill iteration with ``prefill_batch`` others. The absolute scale only
matters for reporting; the assignment depends on the relative sizes.
"""

from __future__ import annotations

import numpy as np

from lloptim.hardware import LatencyModel
from lloptim.problem import Problem

__all__ = ["typical_step_s", "request_work_s", "instance_seconds", "request_instance_seconds"]


def typical_step_s(latency: LatencyModel, clients: int, mean_prompt: float, mean_output: float) -> float:
    """Seconds of a decode step with all ``clients`` busy, each holding a request half-way through.

    Parameters
    ----------
    latency
        The instance's latency model.
    clients
        Clients decoding (count).
    mean_prompt
        Mean prompt length, tokens.
    mean_output
        Mean output length, tokens.
    """
    return latency.decode_time(clients, clients * (mean_prompt + mean_output / 2.0))


def request_work_s(problem: Problem, output_tokens: np.ndarray | None = None, instance: int = 0,
                   prefill_batch: float | None = None, rows: np.ndarray | None = None,
                   means: tuple[float, float] | None = None) -> np.ndarray:
    """Estimated client-time of each request on ``instance``, seconds.

    Parameters
    ----------
    problem
        The problem.
    output_tokens
        Output lengths to use (true or estimated), tokens; default: the workload's.
    instance
        Instance whose latency model prices the work.
    prefill_batch
        Requests sharing a prefill iteration (spreads its fixed cost); default: a tenth of the clients.
    rows
        Only these requests (row indices; ``output_tokens`` then has one entry per row): their
        means set the typical step, so an online plan prices the requests it knows without
        reading the others. Default: every request.
    means
        Mean prompt and mean output length that set the typical step, tokens (default: those of
        the requests priced). An online plan that prices requests as they become known passes the
        means of every request known so far.

    Returns
    -------
    numpy.ndarray
        Client-seconds of each request (of each of ``rows``), seconds.
    """
    w = problem.workload
    prompt = w.prompt_tokens if rows is None else w.prompt_tokens[np.asarray(rows, dtype=np.int64)]
    o = (w.output_tokens if output_tokens is None else np.asarray(output_tokens)).astype(np.float64)
    if rows is not None and output_tokens is None:
        o = o[np.asarray(rows, dtype=np.int64)]
    inst = problem.instances[instance]
    lat = inst.profile.latency
    mean_prompt, mean_output = (float(prompt.mean()), float(o.mean())) if means is None else means
    step = typical_step_s(lat, inst.clients, mean_prompt, mean_output)
    batch = max(1.0, inst.clients / 10.0) if prefill_batch is None else float(prefill_batch)
    return step * o + lat.prefill_base_s / batch + lat.prefill_per_token_s * prompt


def instance_seconds(problem: Problem, rows: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
    """Instance-seconds each request takes on a full instance of each kind, ``(len(rows), m)``, seconds.

    The per-request weights of the fleet bound (:mod:`lloptim.bounds`): request ``r``'s per-token
    terms on instance ``k`` (``prefill_per_token_s * p + decode_per_seq_s * o + decode_per_kv_token_s
    * (o p + o (o - 1) / 2)``, the last because it holds ``p + j`` KV tokens at its ``j``-th step)
    plus its share of the fixed costs when the instance's ``C_k`` clients are all busy
    (``decode_base_s * o / C_k + prefill_base_s / C_k``). Each request's weight depends on itself
    alone; ``C_k`` times it is the client-seconds it holds a client of ``k``.

    Parameters
    ----------
    problem
        The problem (prompts and instances are read).
    rows
        Row indices of the requests.
    output_tokens
        Their output lengths (true or estimated), tokens, one per row.

    Returns
    -------
    numpy.ndarray
        ``(len(rows), m)`` instance-seconds, float64.
    """
    p = problem.workload.prompt_tokens[np.asarray(rows, dtype=np.int64)].astype(np.float64)
    o = np.asarray(output_tokens, dtype=np.float64)
    out = np.empty((p.size, len(problem.instances)))
    for k, inst in enumerate(problem.instances):
        out[:, k] = request_instance_seconds(inst, p, o)
    return out


def request_instance_seconds(inst, p, o):
    """:func:`instance_seconds` on one instance, for prompts ``p`` and outputs ``o`` (arrays or floats), seconds.

    The same operations in the same order on numpy arrays or on Python floats, so one request's
    weight as floats equals its entry of the arrays to the bit: a policy that prices requests one
    at a time as they arrive (:class:`~lloptim.runtime.fleet.FleetPrices`) calls it with floats,
    a few microseconds where numpy's per-call overhead on one-element arrays took tens.

    Parameters
    ----------
    inst : lloptim.problem.Instance
        The instance (its latency model and client count are read).
    p, o
        Prompt and output lengths, tokens (float64 arrays of one shape, or floats).
    """
    lat = inst.profile.latency
    return (lat.prefill_per_token_s * p + lat.decode_per_seq_s * o
            + lat.decode_per_kv_token_s * (o * p + o * (o - 1) / 2)
            + (lat.decode_base_s * o + lat.prefill_base_s) / inst.clients)
