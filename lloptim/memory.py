"""The KV-cache memory model: how much memory a request holds, in each KV mode.

A request with prompt ``p`` and ``o`` output tokens holds its prompt's keys and values after its
prefill and one more token per decode step: during its ``k``-th decode step (``k = 1 .. o``) its
cache holds ``p + k`` tokens (the step writes the key and value of the token it feeds), so its peak
is ``p + o``. Two ways of managing that memory are modelled (the *KV mode* of an instance):

``"paged"`` (vLLM's PagedAttention, the default)
    The cache is cut into blocks of ``block_tokens`` tokens; a request holds
    ``ceil(tokens / block_tokens)`` blocks and gets a new block when its tokens cross a block
    boundary, as it generates. Nothing is reserved ahead: when a decode step needs more blocks than
    are free, running requests are *preempted* (recompute: the victim loses its cache and is
    prefilled again later with its prompt followed by the tokens it had generated).
``"reserve"``
    At admission a request reserves ``prompt + R`` tokens (rounded up to blocks), where ``R`` is
    what a server knows of its output: the user's cap ``max_output_tokens`` when one was given,
    otherwise the scheduler's *estimate* (never the true length). A request whose output outgrows an
    estimated reservation grows block by block, as in paged mode, and may preempt others.

A request holds ``blocks(max(tokens, floor))`` blocks, with ``floor = 0`` in paged mode and the
reservation in reserve mode; an instance of capacity ``M`` tokens has ``floor(M / block_tokens)``
blocks. The functions here are pure (numbers and numpy arrays), shared by the problem validation,
the bound (:mod:`lloptim.bounds`) and the runtime (:mod:`lloptim.runtime.kv`).
"""

from __future__ import annotations

import numpy as np

from lloptim.errors import SpecError

__all__ = ["KV_MODES", "DEFAULT_KV_MODE", "DEFAULT_BLOCK_TOKENS", "blocks", "check_kv_mode", "check_block_tokens",
           "reservation_tokens", "decode_area_tokens", "peak_tokens"]

#: The KV modes (see the module docstring).
KV_MODES = ("paged", "reserve")
#: What an instance uses unless its spec or the run says otherwise: vLLM's behaviour.
DEFAULT_KV_MODE = "paged"
#: Tokens per KV block by default (vLLM's default block size).
DEFAULT_BLOCK_TOKENS = 16


def blocks(tokens: int, block_tokens: int) -> int:
    """Blocks that hold ``tokens`` tokens: ``ceil(tokens / block_tokens)`` (count).

    Parameters
    ----------
    tokens
        Tokens to hold (a count >= 0; an int64 array works elementwise).
    block_tokens
        Tokens per KV block (>= 1).

    Returns
    -------
    int
        Blocks needed (count).
    """
    return -(-tokens // block_tokens)


def check_kv_mode(mode: str, field: str = "kv_mode") -> str:
    """``mode`` if it names a KV mode, else a :class:`~lloptim.errors.SpecError` naming ``field``.

    Parameters
    ----------
    mode
        The KV mode to check: one of :data:`KV_MODES` (``"paged"`` or ``"reserve"``).
    field
        The spec field or flag the error names.

    Returns
    -------
    str
        ``mode``.

    Raises
    ------
    SpecError
        ``mode`` is not a KV mode.
    """
    if mode not in KV_MODES:
        raise SpecError(field, f"unknown KV mode {mode!r}", f"use one of {list(KV_MODES)}")
    return mode


def check_block_tokens(block_tokens, capacity_tokens: int | None = None, field: str = "kv_block_tokens") -> int:
    """``block_tokens`` as an int if it is a positive whole number (at most the capacity), else a SpecError.

    Parameters
    ----------
    block_tokens
        Tokens per KV block to check (a positive integer; ``bool`` is refused).
    capacity_tokens
        The KV capacity the block must fit in, tokens (``None``: no upper limit).
    field
        The spec field or flag the error names.

    Returns
    -------
    int
        ``block_tokens``, tokens per block.

    Raises
    ------
    SpecError
        Not a positive integer, or larger than ``capacity_tokens``.
    """
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, (int, np.integer)) or block_tokens < 1:
        raise SpecError(field, f"must be a positive integer, got {block_tokens!r}",
                        f"give the tokens per KV block, e.g. {DEFAULT_BLOCK_TOKENS}")
    if capacity_tokens is not None and block_tokens > capacity_tokens:
        raise SpecError(field, f"{block_tokens} tokens per block exceed the KV capacity of {capacity_tokens}",
                        "use a smaller block or a larger kv_capacity_tokens")
    return int(block_tokens)


def reservation_tokens(prompt_tokens, max_output_tokens, estimates) -> np.ndarray:
    """Tokens a reserve-mode server reserves per request: prompt + (cap if given, else the estimate).

    Parameters
    ----------
    prompt_tokens
        Prompt length of each request, tokens.
    max_output_tokens
        The user's cap of each request, tokens; 0 where none was given.
    estimates
        The scheduler's output-length estimate of each request, tokens (rounded up).

    Returns
    -------
    numpy.ndarray
        ``prompt + cap`` where capped, ``prompt + ceil(estimate)`` elsewhere (int64, tokens).
    """
    p = np.asarray(prompt_tokens, dtype=np.int64)
    cap = np.asarray(max_output_tokens, dtype=np.int64)
    est = np.maximum(np.ceil(np.asarray(estimates, dtype=np.float64)), 1).astype(np.int64)
    return p + np.where(cap > 0, cap, est)


def peak_tokens(prompt_tokens, output_tokens) -> np.ndarray:
    """Tokens each request holds during its last decode step, ``prompt + output`` (int64).

    Parameters
    ----------
    prompt_tokens
        Prompt length of each request, tokens.
    output_tokens
        Output length of each request, tokens.

    Returns
    -------
    numpy.ndarray
        Peak KV tokens of each request (int64, tokens).
    """
    return np.asarray(prompt_tokens, dtype=np.int64) + np.asarray(output_tokens, dtype=np.int64)


def decode_area_tokens(prompt_tokens, output_tokens, block_tokens: int = 1, floor_tokens=None) -> np.ndarray:
    """Memory each request holds summed over its decode steps, token-steps (float64).

    During its ``k``-th decode step (``k = 1 .. o``) a request holds ``blocks(max(p + k, floor))``
    blocks of ``block_tokens`` tokens; the sum over ``k`` is its *KV area*. With ``block_tokens = 1``
    and no floor it is ``o p + o (o + 1) / 2``. Whatever the schedule (preemption included: a
    recomputed request resumes with the same context, a swapped one with the same cache copied
    back; host memory does not count, and the copies only add time), a decode step holds at most the capacity,
    so the areas summed over requests divided by the capacity bound the number of decode steps
    (:mod:`lloptim.bounds`).

    Parameters
    ----------
    prompt_tokens, output_tokens
        Per request, tokens.
    block_tokens
        Tokens per block (1: token granularity).
    floor_tokens
        Reserve mode: the tokens reserved per request (its holding never drops below them);
        None for paged mode.

    Returns
    -------
    numpy.ndarray
        The area of each request, token-steps (tokens held x decode steps).
    """
    p = np.asarray(prompt_tokens, dtype=np.int64)
    o = np.asarray(output_tokens, dtype=np.int64)
    B = int(block_tokens)
    if floor_tokens is None:
        floor = np.zeros_like(p)
    else:
        floor = np.asarray(floor_tokens, dtype=np.int64)
    # steps with p + k <= floor hold the floor (rounded up to blocks); the rest hold p + k
    k_floor = np.clip(floor - p, 0, o)  # decode steps spent at the floor
    area = k_floor * (B * -(-floor // B))
    # sum over t in (p + k_floor, p + o] of B * ceil(t / B), in closed form per request
    area = area + _block_sum(p + o, B) - _block_sum(p + k_floor, B)
    return area.astype(np.float64)


def _block_sum(n: np.ndarray, B: int) -> np.ndarray:
    """``sum_{t=1..n} B * ceil(t / B)`` per entry of ``n`` (int64 arithmetic)."""
    n = np.asarray(n, dtype=np.int64)
    q, r = n // B, n % B
    # full blocks j = 1..q each contribute B tokens of value B*j; the partial block r tokens of B*(q+1)
    return B * B * q * (q + 1) // 2 + r * B * (q + 1)
