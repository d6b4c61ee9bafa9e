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

__all__ = ["PrefillFirst", "ChunkedPrefill", "admissible", "prompt_chunks", "DEFAULT_CHUNK_TOKENS"]

#: Prompt-chunk tokens per fused iteration of :class:`ChunkedPrefill` by default (Sarathi's 512).
DEFAULT_CHUNK_TOKENS = 512


def admissible(state, clients, token_budget: int | None = None, max_batch: int | None = None) -> list[int]:
    """The longest prefix-greedy subset of ``clients`` that fits the free KV cache and the budgets.

    Clients are taken in the given order; one that does not fit is skipped (a later, smaller one
    may still fit), except that the first client is always admitted under the token budget so a
    long prompt cannot starve.

    Parameters
    ----------
    state
        The instance (:class:`~lloptim.runtime.engine.InstanceState`); its ``kv_free`` tokens bound
        the KV reservations (prompt + output cap) of the chosen clients.
    clients
        Waiting clients (global indices) in order of preference.
    token_budget
        Most prompt tokens in the prefill, tokens; None for no limit.
    max_batch
        Most clients in the prefill (count); None for no limit.

    Returns
    -------
    list of int
        The chosen clients, in the given order.
    """
    free = state.kv_free
    engine = state.engine
    prompt = engine.prompt
    chosen: list[int] = []
    tokens = 0
    for c in clients:
        r = engine.client_request[c]
        need = engine.reserve_tokens[r]
        if need > free:
            continue
        p = prompt[r]
        if token_budget is not None and chosen and tokens + p > token_budget:
            continue
        chosen.append(c)
        free -= need
        tokens += p
        if max_batch is not None and len(chosen) >= max_batch:
            break
    return chosen


def prompt_chunks(state, budget: int | None = None) -> dict[int, int]:
    """Prompt chunks of the waiting clients, in order, for a fused iteration.

    Each waiting client gets the rest of its prompt, or what is left of ``budget``; a client whose
    prefill has not started is skipped when its KV reservation (prompt + output cap) does not fit.

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
    engine = state.engine
    free = state.kv_free
    chunks: dict[int, int] = {}
    for c in state.waiting:
        if budget is not None and budget <= 0:
            break
        r = engine.client_request[c]
        done = state.prefilled.get(c, 0)
        if done == 0:
            need = engine.reserve_tokens[r]
            if need > free:
                continue
            free -= need
        k = engine.prompt[r] - done
        if budget is not None:
            k = min(budget, k)
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
    """

    def __init__(self, token_budget: int | None = None, max_batch: int | None = None) -> None:
        self.token_budget = token_budget
        self.max_batch = max_batch

    def decide(self, state) -> Decision:
        if state.waiting:
            chosen = admissible(state, state.waiting, self.token_budget, self.max_batch)
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
