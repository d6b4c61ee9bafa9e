"""Iteration schedulers: what the next model iteration of an instance runs.

* :class:`PrefillFirst`: prefill as soon as any client waits (the paper's baseline, vLLM's
  default), optionally under a token budget per prefill (vLLM's ``max_num_batched_tokens``).
* :class:`ChunkedPrefill`: Sarathi-Serve's stall-free batching; every iteration decodes all running
  clients and adds prompt chunks up to a token budget.

The hybrid's Lagrangian scheduler lives in :mod:`lloptim.runtime.lagrangian`.
"""

from __future__ import annotations

from lloptim.errors import PolicyError
from lloptim.runtime.policy import DECODE, Decision, IterationScheduler, Mixed, Prefill

__all__ = ["PrefillFirst", "ChunkedPrefill", "admissible", "prompt_chunks", "chunk_that_fits", "kv_room",
           "DEFAULT_CHUNK_TOKENS"]

#: Prompt-chunk tokens per fused iteration of :class:`ChunkedPrefill` by default (Sarathi's 512).
DEFAULT_CHUNK_TOKENS = 512


def kv_room(state) -> int:
    """Free KV blocks once the next decode step of the running requests has its new blocks (count).

    Admitting into less than this would make that step preempt a request right away.
    """
    return state.kv_free_blocks - (state.growth_blocks() if state.n_running else 0)


def admissible(state, clients, token_budget: int | None = None, max_batch: int | None = None,
               head_of_line: bool = False) -> list[int]:
    """The longest prefix-greedy subset of ``clients`` whose prefills fit the free KV cache and the budgets.

    Clients are taken in the given order; one whose request does not fit the KV cache is skipped
    (a later, smaller one may still fit) or, with ``head_of_line``, ends the choice (vLLM's FCFS
    admission: nobody overtakes a request waiting for memory, a preempted one first of all). The first client is always admitted under the token
    budget so a long prompt cannot starve. A request fits when the blocks of its context plus
    one decode token (its reservation, in reserve mode) fit in :func:`kv_room`.

    Parameters
    ----------
    state
        The instance (:class:`~lloptim.runtime.engine.InstanceState`).
    clients
        Waiting clients (global indices) in order of preference; partly prefilled ones are skipped.
    token_budget
        Most prompt (context) tokens in the prefill, tokens; None for no limit.
    max_batch
        Most clients in the prefill (count); None for no limit.
    head_of_line
        Stop at the first client that does not fit instead of skipping it.

    Returns
    -------
    list of int
        The chosen clients, in the given order.
    """
    unbound = state.kv_unbound  # every request fits at its peak: no KV check can fail
    free = 0 if unbound else kv_room(state)
    engine = state.engine
    context = engine.context
    prefilled = state.prefilled
    chosen: list[int] = []
    tokens = 0
    for c in clients:
        if c in prefilled:
            continue
        need = 0 if unbound else state.admission_blocks(c)
        if need > free:
            if head_of_line:
                break
            continue
        p = context[engine.client_request[c]]
        if token_budget is not None and chosen and tokens + p > token_budget:
            continue
        chosen.append(c)
        free -= need
        tokens += p
        if max_batch is not None and len(chosen) >= max_batch:
            break
    return chosen


def chunk_that_fits(state, client: int, tokens: int, free_blocks: int) -> tuple[int, int]:
    """The largest prompt chunk of at most ``tokens`` tokens for ``client`` within ``free_blocks`` blocks.

    A chunk that completes the prompt also needs room for the first decode token; a request whose
    prefill has not started needs its whole reservation in reserve mode.

    Parameters
    ----------
    state
        The instance.
    client
        A waiting client (global index).
    tokens
        Most tokens wanted in the chunk, tokens.
    free_blocks
        Blocks the chunk may take (count).

    Returns
    -------
    tuple of int
        ``(chunk tokens, blocks it takes)``; ``(0, 0)`` when nothing fits.
    """
    engine = state.engine
    r = engine.client_request[client]
    ctx = engine.context[r]
    done = state.prefilled.get(client, 0)
    have = state.held_blocks(r, done) if client in state.prefilled else 0
    k = min(tokens, ctx - done)

    def need(k_: int) -> int:
        return state.held_blocks(r, done + k_ + (1 if done + k_ == ctx else 0)) - have

    if k <= 0 or need(1 if k > 1 else k) > free_blocks:
        return 0, 0
    if need(k) <= free_blocks:
        return k, need(k)
    k = min(k, (have + free_blocks) * state.kv_block - done)
    while k > 0 and need(k) > free_blocks:
        k -= 1 if done + k == ctx else max(1, (need(k) - free_blocks) * state.kv_block)
    return (k, need(k)) if k > 0 else (0, 0)


def prompt_chunks(state, budget: int | None = None) -> dict[int, int]:
    """Prompt chunks of the waiting clients, in order, for a fused iteration.

    Each waiting client gets the rest of its prompt (its context, for a preempted request), or
    what is left of ``budget`` or of the KV room (:func:`kv_room`, see :func:`chunk_that_fits`).
    A prompt starts only when the blocks to complete it (and take its first decode step) fit
    beside what the partly prefilled prompts still need: chunking splits compute, never memory,
    so partly prefilled prompts cannot fill the cache and wait on each other for ever.

    Parameters
    ----------
    state
        The instance (:class:`~lloptim.runtime.engine.InstanceState`).
    budget
        Most prompt tokens in the iteration, tokens; None for no limit.

    Returns
    -------
    dict
        ``client -> prompt tokens to process`` (empty when nothing fits).
    """
    prefilled = state.prefilled
    chunks: dict[int, int] = {}
    if state.kv_unbound:  # every request fits at its peak: no KV check can fail
        context, request_of = state.engine.context, state.engine.client_request
        for c in state.waiting:
            if budget is not None and budget <= 0:
                break
            k = context[request_of[c]] - prefilled.get(c, 0)
            if budget is not None:
                k = min(budget, k)
                budget -= k
            chunks[c] = k
        return chunks
    free = kv_room(state)
    # blocks the partly prefilled prompts still need to complete
    promised = sum(state.admission_blocks(c) for c in prefilled)
    for c in state.waiting:
        if budget is not None and budget <= 0:
            break
        want = state.context(c) - prefilled.get(c, 0)
        if budget is not None:
            want = min(budget, want)
        if c in prefilled:
            k, need = chunk_that_fits(state, c, want, free)
            promised -= need
        else:
            full = state.admission_blocks(c)
            if full > free - promised:
                continue
            k, need = chunk_that_fits(state, c, want, free)
            promised += full - need
        if k <= 0:
            continue
        free -= need
        if budget is not None:
            budget -= k
        chunks[c] = k
    return chunks


class PrefillFirst(IterationScheduler):
    """Prefill every waiting client that fits as soon as one waits; decode otherwise.

    Parameters
    ----------
    token_budget
        Most prompt tokens in one prefill iteration (``None``: unlimited).
    max_batch
        Most requests in one prefill iteration (``None``: unlimited).
    head_of_line
        Admit in queue order and stop at the first request that does not fit (vLLM), instead of
        letting smaller ones overtake it.
    """

    def __init__(self, token_budget: int | None = None, max_batch: int | None = None,
                 head_of_line: bool = False) -> None:
        self.token_budget = token_budget
        self.max_batch = max_batch
        self.head_of_line = head_of_line

    def decide(self, state) -> Decision:
        if state.waiting:
            chosen = admissible(state, state.waiting, self.token_budget, self.max_batch, self.head_of_line)
            if chosen:
                return Prefill(chosen)
            if not state.n_running:
                raise PolicyError(f"instance {state.index}: no waiting request fits the free KV cache "
                                  "and nothing runs to free it")
        return DECODE


class ChunkedPrefill(IterationScheduler):
    """Sarathi-Serve-style stall-free batching with a per-iteration token budget.

    Every iteration decodes all running clients (one token each, counted against the budget) and
    fills the rest of the budget with prompt chunks of waiting clients in FCFS order.

    Parameters
    ----------
    token_budget
        Tokens per iteration (decode tokens + prompt-chunk tokens). ``None``: 512 prompt-chunk
        tokens on top of one decode token per client of the instance, so a full batch never
        starves the prefills (a fixed budget below the client count would stop admitting work).
    """

    def __init__(self, token_budget: int | None = None) -> None:
        if token_budget is not None and token_budget < 1:
            raise ValueError("token_budget must be >= 1")
        self.token_budget = token_budget

    def decide(self, state) -> Decision:
        if not state.waiting:
            return DECODE
        total = self.token_budget if self.token_budget is not None else DEFAULT_CHUNK_TOKENS + len(state.clients)
        budget = total - state.n_running
        if budget <= 0:
            return DECODE if state.n_running else Mixed({next(iter(state.waiting)): 1})
        chunks = prompt_chunks(state, budget)
        if not chunks:
            if state.n_running:
                return DECODE
            raise PolicyError(f"instance {state.index}: no waiting request fits the free KV cache")
        return Mixed(chunks)
