"""The torch backend: serves a real causal LM iteration by iteration and measures each iteration.

Every request keeps its own KV cache (one ``(keys, values)`` pair per layer, shape
``(1, kv_heads, tokens, head_dim)``). An iteration gathers the caches of the requests taking part
into one padded batch and runs ONE forward pass:

* row ``i`` holds ``[pad, past_i | pad, new_i]``: the cached tokens left-padded to the longest
  cache ``P``, then the new tokens (a whole prompt, a prompt chunk, or the one token a decode step
  feeds) left-padded to the longest new segment ``N``;
* an attention mask hides the padding and explicit ``position_ids`` give every token its true
  position, so each row computes exactly what the request would compute alone;
* the last position of every row is a real token, so only its logits are needed; greedy sampling
  takes their argmax;
* afterwards each request's cache is cut back out of the batch (``past_i`` followed by ``new_i``).

Token semantics follow the engine: a prefill (or the chunk that completes a prompt) yields the
request's first output token, which each decode step then emits and feeds to the model, producing
the next one. A request with ``o`` output tokens thus takes part in exactly ``o`` decode steps and
emits exactly ``o`` tokens (EOS ignored); its KV cache holds ``prompt + done`` tokens, as the
engine accounts.

Several instances are several independent replicas: they share the (read-only) weights object and
keep separate running sets and caches. Times are wall-clock seconds (``time.perf_counter``) around
the whole iteration, cache gathering included, with ``torch.cuda.synchronize`` on CUDA.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from lloptim.backends.models import LoadedModel, load_model, prompt_token_ids, reference_generate, require_torch
from lloptim.errors import LloptimError, SpecError
from lloptim.problem import Problem

__all__ = ["TorchBackend", "token_mismatches", "reference_generate"]


class _Req:
    """Execution state of one request: its cache, the next token to emit, what it emitted."""

    __slots__ = ("instance", "cache", "length", "pending", "tokens")

    def __init__(self, instance: int) -> None:
        self.instance = instance
        self.cache: list[tuple] | None = None
        self.length = 0
        self.pending = -1
        self.tokens: list[int] = []


def _layer_kv(cache, j: int):
    """``(keys, values)`` of layer ``j`` of a transformers cache (4.x and 5.x layouts)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[j].keys, layers[j].values
    return cache.key_cache[j], cache.value_cache[j]  # pragma: no cover - transformers 4.x


class TorchBackend:
    """A :class:`~lloptim.backends.base.Backend` that runs a real causal LM.

    Parameters
    ----------
    problem
        The problem the engine serves: prompt lengths (tokens) and the number of instances.
    model
        ``"tiny-llama"``, a local model directory, or an already :class:`LoadedModel`.
    device
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    dtype
        Weight dtype name; ``None``: the model's default (float64 for tiny-llama).
    seed
        Seeds the built-in model's weights and the synthetic prompt ids.

    Attributes
    ----------
    generated
        ``request -> list[int]``: the token ids of every request that finished. A request evicted by
        a fault and served again only keeps its final, complete generation.
    counters
        Iteration counts by kind and ``partial_chunks`` (chunks that did not complete a prompt).
    """

    name = "torch"

    def __init__(self, problem: Problem, model: str | Path | LoadedModel = "tiny-llama", device: str = "auto",
                 dtype: str | None = None, seed: int = 0) -> None:
        self.torch = require_torch()
        self.model = model if isinstance(model, LoadedModel) else load_model(model, device, dtype, seed)
        self.problem = problem
        self.seed = seed
        w = problem.workload
        self._prompt_len = w.prompt_tokens.tolist()
        need = w.prompt_tokens + w.max_output_tokens
        too_long = np.flatnonzero(need > self.model.max_positions)
        if too_long.size:
            i = int(too_long[0])
            raise SpecError(f"requests[{i}]", f"needs {int(need[i])} positions (prompt + output) but the model "
                            f"supports {self.model.max_positions}", "shorten the request or use a longer-context model")
        self._prompts: dict[int, list[int]] = {}
        self._reqs: dict[int, _Req] = {}
        self._running: list[dict[int, None]] = [{} for _ in problem.instances]
        self.generated: dict[int, list[int]] = {}
        self.counters = {"prefill": 0, "decode": 0, "mixed": 0, "partial_chunks": 0, "evictions": 0}
        params = inspect.signature(self.model.module.forward).parameters
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)

    # -- helpers ---------------------------------------------------------------------------------
    def prompt_ids(self, request: int) -> list[int]:
        """The synthesized prompt token ids of request row ``request`` (deterministic)."""
        ids = self._prompts.get(request)
        if ids is None:
            ids = prompt_token_ids(self.model, request, self._prompt_len[request], self.seed)
            self._prompts[request] = ids
        return ids

    def _check_instance(self, instance: int) -> None:
        if not (0 <= instance < len(self._running)):
            raise LloptimError(f"torch backend: no instance {instance} (the problem has {len(self._running)})")

    def _start(self, instance: int, request: int) -> _Req:
        st = _Req(instance)
        self._reqs[request] = st
        self.generated.pop(request, None)
        return st

    def _forward(self, rows: Sequence[tuple[_Req, Sequence[int]]]) -> list[int]:
        """One forward over ``rows`` = ``(state, new token ids)``; extend caches, return next tokens."""
        torch = self.torch
        m = self.model
        dev = m.device
        lens = [st.length for st, _ in rows]
        news = [len(x) for _, x in rows]
        B, P, N = len(rows), max(lens), max(news)
        ids = np.zeros((B, N), dtype=np.int64)
        pos = np.zeros((B, N), dtype=np.int64)
        mask = np.zeros((B, P + N), dtype=np.int64)
        for i, ((st, new), l, n) in enumerate(zip(rows, lens, news)):
            ids[i, N - n:] = new
            pos[i, N - n:] = np.arange(l, l + n)
            mask[i, P - l:P] = 1
            mask[i, P + N - n:] = 1
        kwargs = {}
        if P > 0:
            from transformers.cache_utils import DynamicCache

            cache = DynamicCache()
            ref = next(st.cache for st, _ in rows if st.length > 0)
            for j, (k0, v0) in enumerate(ref):
                ks, vs = [], []
                for st, l in zip((s for s, _ in rows), lens):
                    if l == 0:
                        shape = (1, k0.shape[1], P, k0.shape[3])
                        ks.append(k0.new_zeros(shape))
                        vs.append(v0.new_zeros((1, v0.shape[1], P, v0.shape[3])))
                    else:
                        k, v = st.cache[j]
                        if l < P:
                            k = torch.nn.functional.pad(k, (0, 0, P - l, 0))
                            v = torch.nn.functional.pad(v, (0, 0, P - l, 0))
                        ks.append(k)
                        vs.append(v)
                cache.update(torch.cat(ks) if B > 1 else ks[0], torch.cat(vs) if B > 1 else vs[0], j)
            kwargs["past_key_values"] = cache
        if self._keep_kw:
            kwargs[self._keep_kw] = 1
        with torch.inference_mode():
            out = m.module(input_ids=torch.from_numpy(ids).to(dev), attention_mask=torch.from_numpy(mask).to(dev),
                           position_ids=torch.from_numpy(pos).to(dev), use_cache=True, **kwargs)
            nxt = out.logits[:, -1].argmax(-1).tolist()
        pkv = out.past_key_values
        n_layers = len(pkv.layers) if hasattr(pkv, "layers") else len(pkv.key_cache)
        layers = [_layer_kv(pkv, j) for j in range(n_layers)]
        for i, ((st, _), l, n) in enumerate(zip(rows, lens, news)):
            new_cache = []
            for k, v in layers:
                if l == 0 or n == N:  # contiguous: [P - l, P + N) or [P + N - n, P + N)
                    a = P + N - n if l == 0 else P - l
                    new_cache.append((k[i:i + 1, :, a:], v[i:i + 1, :, a:]))
                else:
                    new_cache.append((torch.cat((k[i:i + 1, :, P - l:P], k[i:i + 1, :, P + N - n:]), 2),
                                      torch.cat((v[i:i + 1, :, P - l:P], v[i:i + 1, :, P + N - n:]), 2)))
            st.cache = new_cache
            st.length = l + n
        return nxt

    def _timed(self, fn) -> float:
        self.model.synchronize()
        t0 = time.perf_counter()
        fn()
        self.model.synchronize()
        return time.perf_counter() - t0

    def _decode_rows(self, instance: int, n_running: int, kv_tokens: int) -> list[tuple[_Req, list[int]]]:
        running = self._running[instance]
        if len(running) != n_running:
            raise LloptimError(f"torch backend out of sync with the engine: instance {instance} runs "
                               f"{len(running)} requests, the engine says {n_running}")
        rows = [(self._reqs[r], [self._reqs[r].pending]) for r in running]
        kv = sum(st.length for st, _ in rows)
        if kv != kv_tokens:
            raise LloptimError(f"torch backend out of sync with the engine: instance {instance} holds {kv} "
                               f"KV tokens, the engine says {kv_tokens}")
        return rows

    @staticmethod
    def _emit(rows: Sequence[tuple[_Req, Sequence[int]]], nxt: Sequence[int], n_decode: int) -> None:
        for (st, _), t in zip(rows[:n_decode], nxt[:n_decode]):
            st.tokens.append(st.pending)
            st.pending = t

    # -- the Backend protocol --------------------------------------------------------------------
    def prefill(self, instance: int, requests: Sequence[int], prompt_tokens: int) -> float:
        """Prefill the full prompts of ``requests`` in one batched forward; return its seconds."""
        self._check_instance(instance)
        rows = [(self._start(instance, r), self.prompt_ids(r)) for r in requests]
        if sum(len(x) for _, x in rows) != prompt_tokens:
            raise LloptimError(f"torch backend: prefill of {prompt_tokens} tokens but the prompts hold "
                               f"{sum(len(x) for _, x in rows)}")

        def work() -> None:
            nxt = self._forward(rows)
            for (st, _), t in zip(rows, nxt):
                st.pending = t

        dur = self._timed(work)
        for r in requests:
            self._running[instance][r] = None
        self.counters["prefill"] += 1
        return dur

    def decode(self, instance: int, n_running: int, kv_tokens: int) -> float:
        """One batched decode step of every running request of ``instance``; return its seconds."""
        self._check_instance(instance)
        rows = self._decode_rows(instance, n_running, kv_tokens)
        dur = self._timed(lambda: self._emit(rows, self._forward(rows), len(rows)))
        self.counters["decode"] += 1
        return dur

    def mixed(self, instance: int, n_running: int, kv_tokens: int,
              chunks: Sequence[tuple[int, int, int, bool]]) -> float:
        """A decode step of the running requests fused with prompt chunks in one forward; return its seconds.

        Each chunk ``(request, start, n_tokens, completes)`` appends prompt tokens
        ``[start, start + n_tokens)`` to the request's cache; the chunk that completes the prompt
        yields the first output token and the request joins the running set after this iteration.
        """
        self._check_instance(instance)
        rows = self._decode_rows(instance, n_running, kv_tokens) if n_running else []
        n_dec = len(rows)
        done = []
        for r, start, n_tok, completes in chunks:
            if start == 0:
                st = self._start(instance, r)
            else:
                st = self._reqs.get(r)
                if st is None or st.instance != instance or st.length != start:
                    have = None if st is None else st.length
                    raise LloptimError(f"torch backend: chunk of request {r} starts at token {start} but its "
                                       f"cache holds {have} tokens on this instance")
            rows.append((st, self.prompt_ids(r)[start:start + n_tok]))
            if completes:
                done.append(r)
            else:
                self.counters["partial_chunks"] += 1

        def work() -> None:
            nxt = self._forward(rows)
            self._emit(rows, nxt, n_dec)
            for (st, _), t in zip(rows[n_dec:], nxt[n_dec:]):
                st.pending = t

        dur = self._timed(work)
        for r in done:
            self._running[instance][r] = None
        self.counters["mixed"] += 1
        return dur

    def release(self, instance: int, request: int, finished: bool) -> None:
        """Free ``request``'s cache; keep its tokens in :attr:`generated` if it ``finished``."""
        self._running[instance].pop(request, None)
        st = self._reqs.pop(request, None)
        if finished:
            if st is not None:
                self.generated[request] = st.tokens
        else:
            self.counters["evictions"] += 1
            self.generated.pop(request, None)

    # -- verification ----------------------------------------------------------------------------
    def reference(self, request: int) -> list[int]:
        """The one-request-at-a-time greedy generation of ``request`` (its true output length)."""
        n = int(self.problem.workload.output_tokens[request])
        return reference_generate(self.model, self.prompt_ids(request), n)


def token_mismatches(backend: TorchBackend, requests: Sequence[int] | None = None) -> dict[int, int]:
    """Per request, the number of positions where its generation differs from the reference.

    A missing or short generation counts every missing position as a mismatch. Scheduling must
    never change what the model says, so every value should be 0.

    Parameters
    ----------
    backend
        The backend after a run.
    requests
        Request rows to check; default: all.

    Returns
    -------
    dict[int, int]
        ``request -> mismatching positions`` (tokens).
    """
    rows = range(backend.problem.n_requests) if requests is None else requests
    out = {}
    for r in rows:
        ref = backend.reference(r)
        got = backend.generated.get(r, [])
        diff = sum(a != b for a, b in zip(got, ref)) + abs(len(got) - len(ref))
        out[int(r)] = int(diff)
    return out
