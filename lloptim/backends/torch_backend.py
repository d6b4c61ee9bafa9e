"""The torch backend: serves a real causal LM iteration by iteration and measures each iteration.

It is lloptim's own engine and the **exact-token reference**: whatever the schedule, every request
computes what it would compute alone (float64 makes the tokens identical, which the tests check for
every policy, fault and migration), and each iteration is exactly the prefill, decode or mixed step
the engine asked for, so it is where lloptim's scheduling semantics are verified on a real model.
For serving speed use a real engine with lloptim as its scheduler (:mod:`lloptim.engines`: vLLM,
transformers' continuous batching).

Each instance keeps one preallocated KV *pool*: per layer a ``(1, kv_heads, capacity, head_dim)``
keys/values tensor, in which every running request owns a contiguous *segment* (its prompt plus the
larger of its output and cap, allocated first-fit at its first prefill, freed when it finishes or is
preempted; the pool doubles when no segment fits, which copies it once). An iteration runs ONE forward pass over a *packed* batch:

* the new tokens of all requests taking part (a whole prompt, a prompt chunk, or the one token a
  decode step feeds) are concatenated into one row of ``T`` tokens with explicit ``position_ids``,
  so the linear layers cost ``T`` tokens, as the latency model assumes;
* each layer writes the new keys/values in place into their requests' segments (no copy of the
  cache, no cache object rebuilt per iteration);
* attention is computed per request over its own segment only (a registered transformers
  attention function, ``"lloptim_packed"``): the decoding requests as batches of single queries,
  one per octave of context length (a batch is padded to its longest context, so one batch for all
  would cost requests x the longest context, which the latency model's KV term cannot follow on
  heavy-tailed lengths), the prompt chunks as one padded batch with a causal mask, built on the
  model's device from a few index tensors; its cost grows with each request's own context, not
  with the pool;
* only the logits of each request's last new token are computed; greedy sampling takes the argmax.

Token semantics follow the engine: a prefill (or the chunk that completes a prompt) yields the
request's first output token, which each decode step then emits and feeds to the model, producing
the next one. A request with ``o`` output tokens thus takes part in exactly ``o`` decode steps and
emits exactly ``o`` tokens (EOS ignored); its KV cache holds ``prompt + done`` tokens, as the
engine accounts. A request preempted for KV memory (:meth:`TorchBackend.preempt`) keeps the tokens
it emitted; its next prefill feeds its prompt followed by them (its *context*), which recomputes
its cache and yields the token it would have emitted next, so its generation is unchanged. A request
preempted by swapping (``preemption="swap"``, :meth:`TorchBackend.swap_out`) has its cache copied,
every layer's keys and values, to one host tensor and its segment freed; :meth:`TorchBackend.swap_in`
copies it back (whole, or in the chunks the engine resumes it by) into a new segment, and it decodes
on from the token it had reached.

Several instances are several independent replicas: they share the (read-only) weights object and
keep separate pools and running sets. Times are seconds around the whole iteration (host
bookkeeping included), on the wall clock with ``torch.cuda.synchronize`` on CUDA, or on the CPU clock
of the serving thread.

Limits: models whose layers keep sliding-window or recurrent caches are not supported; the
attention function needs transformers >= 5 (it passes its own keyword through the model to the
attention layers). Measured on CPU (``mini-llama``, GSM8K under the hybrid, CPU clock) an iteration
went from 9.2 to 6.5 ms with 16 clients and from 50.6 to 23.4 ms with 64 against the previous
dense-mask version; on a GPU the same changes remove the host-built mask and the pool-wide
attention, but no GPU measurement of this version exists yet.
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

__all__ = ["TorchBackend", "token_mismatches", "reference_generate", "replica_factory"]


class _Req:
    """Execution state of one request: its cache, the next token to emit, what it emitted."""

    __slots__ = ("instance", "length", "pending", "tokens")

    def __init__(self, instance: int) -> None:
        self.instance = instance
        self.length = 0
        self.pending = -1
        self.tokens: list[int] = []


class _Pool:
    """The KV slots of one instance: per-layer tensors allocated once, contiguous segments per request.

    Segments are allocated first fit from a sorted free list; when none fits the tensors double
    (one copy, segments keep their offsets). Slots outside live segments are never read (attention
    gathers each request's own segment), so freed slots need no clearing.
    """

    __slots__ = ("kv", "capacity", "free", "segments")

    def __init__(self) -> None:
        self.kv: list[tuple] = []
        self.capacity = 0
        self.free: list[list[int]] = []  # [start, size], sorted by start, coalesced
        self.segments: dict[int, tuple[int, int]] = {}  # request -> (start, size)

    def _grow(self, model, need: int) -> None:
        import torch

        cfg = model.module.config
        n_layers = int(cfg.num_hidden_layers)
        heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        new_cap = max(1024, 2 * self.capacity, self.capacity + need)
        shape = (1, heads, new_cap, head_dim)
        kv = []
        for j in range(n_layers):
            k = torch.zeros(shape, dtype=model.dtype, device=model.device)
            v = torch.zeros(shape, dtype=model.dtype, device=model.device)
            if self.kv:
                k[:, :, :self.capacity] = self.kv[j][0]
                v[:, :, :self.capacity] = self.kv[j][1]
            kv.append((k, v))
        self.kv = kv
        self._release(self.capacity, new_cap - self.capacity)
        self.capacity = new_cap

    def allocate(self, model, request: int, size: int) -> int:
        """Give ``request`` a segment of ``size`` slots; return its first slot."""
        while True:
            for i, (start, length) in enumerate(self.free):
                if length >= size:
                    if length == size:
                        del self.free[i]
                    else:
                        self.free[i] = [start + size, length - size]
                    self.segments[request] = (start, size)
                    return start
            self._grow(model, size)

    def _release(self, start: int, size: int) -> None:
        free = self.free
        free.append([start, size])
        free.sort()
        merged = [free[0]]
        for seg in free[1:]:
            last = merged[-1]
            if last[0] + last[1] == seg[0]:
                last[1] += seg[1]
            else:
                merged.append(seg)
        self.free = merged

    def kill(self, request: int) -> None:
        """Free ``request``'s segment (no-op if it has none)."""
        seg = self.segments.pop(request, None)
        if seg is not None:
            self._release(*seg)


class _Swapped:
    """A request whose KV cache is in host memory: its state, the copy, and how much of it is back.

    ``host`` is one ``(layers, 2, kv_heads, tokens, head_dim)`` tensor (keys at ``[:, 0]``, values
    at ``[:, 1]``), pinned on CUDA so the copies run at the link's full speed.
    """

    __slots__ = ("state", "host", "restored")

    def __init__(self, state: _Req, host) -> None:
        self.state = state
        self.host = host
        self.restored = 0  # tokens already copied back (a swap-in may come in chunks)


class _PoolCache:
    """What the model's attention layers see as ``past_key_values``: writes new keys/values in place.

    ``update`` stores the iteration's new keys and values at their slots and returns the pool
    tensors; the ``"lloptim_packed"`` attention function reads each request's segment from them.
    """

    def __init__(self, pool: _Pool, write_index) -> None:
        self.pool = pool
        self.write_index = write_index

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """0: positions come from ``position_ids``, and no causal mask is built for this attention."""
        return 0

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        k, v = self.pool.kv[layer_idx]
        k.index_copy_(2, self.write_index, key_states.to(k.dtype))
        v.index_copy_(2, self.write_index, value_states.to(v.dtype))
        return k, v


class _Group:
    """Requests attended together: query rows gathered from the packed batch, key slots from the pool."""

    __slots__ = ("q_index", "q_valid", "q_flat", "k_index", "mask")

    def __init__(self, torch, dev, q_starts, n_new, seg_starts, lengths, max_q: int) -> None:
        q_starts = torch.as_tensor(q_starts, device=dev)
        n_new = torch.as_tensor(n_new, device=dev)
        seg_starts = torch.as_tensor(seg_starts, device=dev)
        lengths = torch.as_tensor(lengths, device=dev)  # keys each request has after this iteration
        qi = torch.arange(max_q, device=dev)
        self.q_valid = qi[None, :] < n_new[:, None]
        q_index = q_starts[:, None] + qi[None, :]
        self.q_index = torch.where(self.q_valid, q_index, q_starts[:, None])
        self.q_flat = self.q_index[self.q_valid]
        max_k = int(lengths.max())
        ki = torch.arange(max_k, device=dev)
        self.k_index = seg_starts[:, None] + torch.minimum(ki[None, :], lengths[:, None] - 1)
        # query j of a request sits at position length - n_new + j and sees keys up to it
        q_pos = (lengths - n_new)[:, None] + qi[None, :]
        self.mask = (ki[None, None, :] <= q_pos[:, :, None])[:, None]


class _Layout:
    """The attention layout of one packed iteration (decode queries, prompt-chunk queries)."""

    __slots__ = ("groups",)

    def __init__(self, groups) -> None:
        self.groups = groups


ATTENTION_NAME = "lloptim_packed"


def _packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Per-request attention of a packed batch over the pool (see the module docstring).

    ``query`` is ``(1, heads, T, head_dim)``; ``key`` and ``value`` are the pool tensors returned by
    :class:`_PoolCache`. Returns ``(1, T, heads, head_dim)`` and no weights, as transformers expects.
    """
    import torch
    import torch.nn.functional as F

    layout = kwargs.get("lloptim_layout")
    if layout is None:
        raise LloptimError("the lloptim_packed attention runs only inside the torch backend's forward")
    q_all, k_all, v_all = query[0], key[0], value[0]
    out = torch.empty_like(q_all)
    gqa = q_all.shape[0] != k_all.shape[0]
    for g in layout.groups:
        q = q_all[:, g.q_index].permute(1, 0, 2, 3)
        k = k_all[:, g.k_index].permute(1, 0, 2, 3)
        v = v_all[:, g.k_index].permute(1, 0, 2, 3)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, scale=scaling, enable_gqa=gqa)
        out[:, g.q_flat] = o.permute(1, 0, 2, 3)[:, g.q_valid]
    return out.transpose(0, 1).unsqueeze(0), None


def _register_attention() -> None:
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise LloptimError(f"the torch backend needs transformers >= 5 (found {transformers.__version__}); "
                           "install it with `pip install lloptim[torch]`")
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _packed_attention)


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
    clock
        ``"wall"`` (default): ``time.perf_counter`` seconds, what a user waits. ``"cpu"``: CPU seconds
        of the serving thread (``time.thread_time``), immune to other processes competing for the
        cores of a shared machine; CPU device with one torch thread only.

    Attributes
    ----------
    generated
        ``request -> list[int]``: the token ids of every request that finished. A request evicted by
        a fault and served again only keeps its final, complete generation.
    counters
        Iteration counts by kind, ``partial_chunks`` (chunks that did not complete a prompt),
        ``evictions``, ``migrations`` (requests moved in from another instance), ``preemptions``
        (recompute), ``swap_outs`` and ``swap_ins`` (copies to and from host memory; a chunked
        swap-in counts once per chunk).
    steps
        Every prefill, decode and mixed iteration it ran, in order, as ``(kind, seconds, prompt
        tokens, decoding requests, KV tokens they held before the step)``, kind 0 prefill, 1 decode,
        2 mixed: what :func:`lloptim.calibrate.calibrate_serving` fits the latency model to.
    """

    name = "torch"

    def __init__(self, problem: Problem, model: str | Path | LoadedModel = "tiny-llama", device: str = "auto",
                 dtype: str | None = None, seed: int = 0, clock: str = "wall") -> None:
        self.torch = require_torch()
        self.model = model if isinstance(model, LoadedModel) else load_model(model, device, dtype, seed)
        if clock not in ("wall", "cpu"):
            raise SpecError("clock", f"unknown clock {clock!r}", "use 'wall' or 'cpu'")
        if clock == "cpu" and (self.model.device != "cpu" or self.torch.get_num_threads() != 1):
            raise SpecError("clock", "the cpu clock needs the CPU device and one torch thread",
                            "use --clock wall, or --device cpu --threads 1")
        self.clock = clock
        self._now = time.perf_counter if clock == "wall" else time.thread_time
        self.problem = problem
        self.seed = seed
        w = problem.workload
        self._prompt_len = w.prompt_tokens.tolist()
        need = w.prompt_tokens + np.maximum(w.output_tokens, w.max_output_tokens)
        too_long = np.flatnonzero(need > self.model.max_positions)
        if too_long.size:
            i = int(too_long[0])
            raise SpecError(f"requests[{i}]", f"needs {int(need[i])} positions (prompt + output) but the model "
                            f"supports {self.model.max_positions}", "shorten the request or use a longer-context model")
        # a request's segment: the KV it can ever hold (its prompt and the larger of its output and cap;
        # a recomputed request's context is its prompt plus part of that output)
        self._segment_size = need.tolist()
        _register_attention()
        self._prompts: dict[int, list[int]] = {}
        self._reqs: dict[int, _Req] = {}
        self._running: list[dict[int, None]] = [{} for _ in problem.instances]
        self._pools = [_Pool() for _ in problem.instances]
        self.generated: dict[int, list[int]] = {}
        self.counters = {"prefill": 0, "decode": 0, "mixed": 0, "partial_chunks": 0, "evictions": 0,
                         "migrations": 0, "preemptions": 0, "swap_outs": 0, "swap_ins": 0}
        self.steps: list[tuple[int, float, int, int, int]] = []
        self._kept: dict[int, list[int]] = {}  # tokens emitted by preempted requests, to recompute
        self._swapped: dict[int, _Swapped] = {}  # requests whose caches are in host memory
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
        old = self._reqs.get(request)
        if old is not None:  # defensive: a restart without a release
            self._pools[old.instance].kill(request)
            self._running[old.instance].pop(request, None)
        self._swapped.pop(request, None)  # a restart forgets a host copy
        st = _Req(instance)
        st.tokens = self._kept.pop(request, [])  # a preempted request resumes with what it emitted
        self._reqs[request] = st
        self.generated.pop(request, None)
        return st

    def _context_ids(self, request: int, st: _Req) -> list[int]:
        """The prompt ids followed by the tokens the request emitted before a preemption."""
        ids = self.prompt_ids(request)
        return ids + st.tokens if st.tokens else ids

    def _forward(self, instance: int, rows: Sequence[tuple[int, _Req, Sequence[int]]]) -> list[int]:
        """One packed forward of ``rows`` = ``(request, state, new token ids)`` on ``instance``'s pool.

        Writes the new keys/values into the requests' segments and returns each row's next (greedy)
        token.
        """
        torch = self.torch
        m = self.model
        dev = m.device
        pool = self._pools[instance]
        n_rows = len(rows)
        lens = np.fromiter((st.length for _, st, _ in rows), dtype=np.int64, count=n_rows)
        news = np.fromiter((len(x) for _, _, x in rows), dtype=np.int64, count=n_rows)
        T = int(news.sum())
        ids = np.fromiter((t for _, _, x in rows for t in x), dtype=np.int64, count=T)
        segs = np.empty(n_rows, dtype=np.int64)
        for i, (r, _, _) in enumerate(rows):
            seg = pool.segments.get(r)
            segs[i] = seg[0] if seg is not None else pool.allocate(m, r, self._segment_size[r])
        new_start = np.cumsum(news) - news
        row_q = np.repeat(np.arange(n_rows), news)
        pos_q = lens[row_q] + (np.arange(T) - new_start[row_q])
        after = lens + news
        groups = []
        # a group's attention is padded to its longest context: decodes go in octaves of context
        # length, so a step costs about its KV tokens (at most twice), not requests x the longest
        octave = np.floor(np.log2(np.maximum(after, 1))).astype(np.int64)
        decoding = news == 1
        for sel in [decoding & (octave == o) for o in np.unique(octave[decoding])] + [news > 1]:
            if sel.any():
                groups.append(_Group(torch, dev, new_start[sel], news[sel], segs[sel], after[sel],
                                     int(news[sel].max())))
        write = torch.from_numpy(segs[row_q] + pos_q).to(dev)
        last = torch.from_numpy(new_start + news - 1)
        kwargs = {"logits_to_keep": last.to(dev)} if self._keep_kw == "logits_to_keep" else {}
        config = m.module.config
        previous = config._attn_implementation
        config._attn_implementation = ATTENTION_NAME
        try:
            with torch.inference_mode():
                out = m.module(input_ids=torch.from_numpy(ids)[None].to(dev),
                               position_ids=torch.from_numpy(pos_q)[None].to(dev),
                               past_key_values=_PoolCache(pool, write), use_cache=True,
                               lloptim_layout=_Layout(groups), **kwargs)
                logits = out.logits[0] if self._keep_kw == "logits_to_keep" else out.logits[0, last.to(dev)]
                nxt = logits.argmax(-1).tolist()
        finally:
            config._attn_implementation = previous
        for (_, st, _), n in zip(rows, news.tolist()):
            st.length += n
        return nxt

    def _timed(self, fn) -> float:
        self.model.synchronize()
        t0 = self._now()
        fn()
        self.model.synchronize()
        return self._now() - t0

    def _decode_rows(self, instance: int, n_running: int, kv_tokens: int) -> list[tuple[_Req, list[int]]]:
        running = self._running[instance]
        if len(running) != n_running:
            raise LloptimError(f"torch backend out of sync with the engine: instance {instance} runs "
                               f"{len(running)} requests, the engine says {n_running}")
        rows = [(r, self._reqs[r], [self._reqs[r].pending]) for r in running]
        kv = sum(st.length for _, st, _ in rows)
        if kv != kv_tokens:
            raise LloptimError(f"torch backend out of sync with the engine: instance {instance} holds {kv} "
                               f"KV tokens, the engine says {kv_tokens}")
        return rows

    @staticmethod
    def _emit(rows: Sequence[tuple[int, _Req, Sequence[int]]], nxt: Sequence[int], n_decode: int) -> None:
        for (_, st, _), t in zip(rows[:n_decode], nxt[:n_decode]):
            st.tokens.append(st.pending)
            st.pending = t

    # -- the Backend protocol --------------------------------------------------------------------
    def prefill(self, instance: int, requests: Sequence[int], prompt_tokens: int) -> float:
        """Prefill the full prompts of ``requests`` in one batched forward; return its seconds.

        Parameters
        ----------
        instance, requests, prompt_tokens
            As in :meth:`Backend.prefill <lloptim.backends.base.Backend.prefill>` (``prompt_tokens``
            in tokens, checked against the synthesized prompts).

        Returns
        -------
        float
            Measured time of the forward on the backend's ``clock``, seconds (device synchronized before
            and after).

        Raises
        ------
        LloptimError
            Unknown instance, or ``prompt_tokens`` differs from the prompts' length.
        """
        self._check_instance(instance)
        starts = [(r, self._start(instance, r)) for r in requests]
        rows = [(r, st, self._context_ids(r, st)) for r, st in starts]
        if sum(len(x) for _, _, x in rows) != prompt_tokens:
            raise LloptimError(f"torch backend: prefill of {prompt_tokens} tokens but the prompts hold "
                               f"{sum(len(x) for _, _, x in rows)}")

        def work() -> None:
            nxt = self._forward(instance, rows)
            for (_, st, _), t in zip(rows, nxt):
                st.pending = t

        dur = self._timed(work)
        for r in requests:
            self._running[instance][r] = None
        self.counters["prefill"] += 1
        self.steps.append((0, dur, prompt_tokens, 0, 0))
        return dur

    def decode(self, instance: int, n_running: int, kv_tokens: int) -> float:
        """One batched decode step of every running request of ``instance``; return its seconds.

        Parameters
        ----------
        instance, n_running, kv_tokens
            As in :meth:`Backend.decode <lloptim.backends.base.Backend.decode>` (count, tokens);
            checked against the backend's own running set and caches.

        Returns
        -------
        float
            Measured time of the forward on the backend's ``clock``, seconds.

        Raises
        ------
        LloptimError
            Unknown instance, or the backend is out of sync with the engine.
        """
        self._check_instance(instance)
        rows = self._decode_rows(instance, n_running, kv_tokens)
        dur = self._timed(lambda: self._emit(rows, self._forward(instance, rows), len(rows)))
        self.counters["decode"] += 1
        self.steps.append((1, dur, 0, n_running, kv_tokens))
        return dur

    def mixed(self, instance: int, n_running: int, kv_tokens: int,
              chunks: Sequence[tuple[int, int, int, bool]]) -> float:
        """A decode step of the running requests fused with prompt chunks in one forward; return its seconds.

        Each chunk ``(request, start, n_tokens, completes)`` appends prompt tokens
        ``[start, start + n_tokens)`` to the request's cache; the chunk that completes the prompt
        yields the first output token and the request joins the running set after this iteration.

        Parameters
        ----------
        instance, n_running, kv_tokens, chunks
            As in :meth:`Backend.mixed <lloptim.backends.base.Backend.mixed>`.

        Returns
        -------
        float
            Measured time of the fused forward on the backend's ``clock``, seconds.

        Raises
        ------
        LloptimError
            Unknown instance, the backend is out of sync with the engine, or a chunk does not
            continue where its request's cache ends.
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
            rows.append((r, st, self._context_ids(r, st)[start:start + n_tok]))
            if completes:
                done.append(r)
            else:
                self.counters["partial_chunks"] += 1

        def work() -> None:
            nxt = self._forward(instance, rows)
            self._emit(rows, nxt, n_dec)
            for (_, st, _), t in zip(rows[n_dec:], nxt[n_dec:]):
                st.pending = t

        dur = self._timed(work)
        for r in done:
            self._running[instance][r] = None
        self.counters["mixed"] += 1
        self.steps.append((2, dur, sum(len(x) for _, _, x in rows[n_dec:]), n_dec, kv_tokens if n_dec else 0))
        return dur

    def migrate(self, source: int, destination: int, request: int, kv_tokens: int) -> float:
        """Copy a running request's KV cache from ``source``'s pool to ``destination``'s; return its seconds.

        The keys and values keep their positions, so the request decodes on exactly as it would have
        on ``source`` (the token-equality tests cover migrated requests).

        Parameters
        ----------
        source, destination, request, kv_tokens
            As in :meth:`SupportsMigration.migrate <lloptim.backends.base.SupportsMigration.migrate>`
            (``kv_tokens`` in tokens, checked against the cache).

        Returns
        -------
        float
            Measured time of the copy on the backend's ``clock``, seconds.

        Raises
        ------
        LloptimError
            Unknown instance, or the request is not running on ``source`` with ``kv_tokens`` tokens.
        """
        self._check_instance(source)
        self._check_instance(destination)
        st = self._reqs.get(request)
        if st is None or request not in self._running[source] or st.length != kv_tokens:
            raise LloptimError(f"torch backend out of sync with the engine: request {request} is not running on "
                               f"instance {source} with {kv_tokens} KV tokens")

        def work() -> None:
            src, dst = self._pools[source], self._pools[destination]
            start, size = src.segments[request]
            at = dst.allocate(self.model, request, size)
            for (sk, sv), (dk, dv) in zip(src.kv, dst.kv):
                dk[:, :, at:at + kv_tokens] = sk[:, :, start:start + kv_tokens]
                dv[:, :, at:at + kv_tokens] = sv[:, :, start:start + kv_tokens]
            src.kill(request)

        dur = self._timed(work)
        del self._running[source][request]
        self._running[destination][request] = None
        st.instance = destination
        self.counters["migrations"] += 1
        return dur

    def swap_out(self, instance: int, request: int, kv_tokens: int) -> float:
        """Copy a running request's KV cache (every layer, keys and values) to host memory; free its slots.

        The request keeps its emitted tokens and the token it emits next; :meth:`swap_in` copies the
        cache back and it decodes on exactly as if never preempted (the token-equality tests cover it).

        Parameters
        ----------
        instance, request, kv_tokens
            As in :meth:`SupportsSwap.swap_out <lloptim.backends.base.SupportsSwap.swap_out>`
            (``kv_tokens`` in tokens, checked against the cache).

        Returns
        -------
        float
            Measured time of the copy (host buffer allocation included) on the backend's ``clock``,
            seconds.

        Raises
        ------
        LloptimError
            Unknown instance, or the request is not running on ``instance`` with ``kv_tokens`` tokens.
        """
        self._check_instance(instance)
        st = self._reqs.get(request)
        if st is None or request not in self._running[instance] or st.length != kv_tokens:
            raise LloptimError(f"torch backend out of sync with the engine: request {request} is not running on "
                               f"instance {instance} with {kv_tokens} KV tokens to swap out")
        torch = self.torch
        pool = self._pools[instance]
        start = pool.segments[request][0]
        holder: list = []

        def work() -> None:
            k0 = pool.kv[0][0]
            shape = (len(pool.kv), 2, k0.shape[1], kv_tokens, k0.shape[3])
            host = torch.empty(shape, dtype=k0.dtype, device="cpu", pin_memory=k0.is_cuda)
            for j, (k, v) in enumerate(pool.kv):
                host[j, 0].copy_(k[0, :, start:start + kv_tokens], non_blocking=True)
                host[j, 1].copy_(v[0, :, start:start + kv_tokens], non_blocking=True)
            holder.append(host)

        dur = self._timed(work)  # synchronizes: the copy is complete before the slots are freed
        pool.kill(request)
        del self._running[instance][request]
        del self._reqs[request]
        self._swapped[request] = _Swapped(st, holder[0])
        self.counters["swap_outs"] += 1
        return dur

    def swap_in(self, instance: int, request: int, kv_tokens: int) -> float:
        """Copy the next ``kv_tokens`` tokens of a swapped-out cache back into ``instance``'s pool.

        The first call allocates the request's segment; the call that completes the cache makes the
        request run again (it decodes at the next step, from the token it had reached).

        Parameters
        ----------
        instance, request, kv_tokens
            As in :meth:`SupportsSwap.swap_in <lloptim.backends.base.SupportsSwap.swap_in>`
            (``kv_tokens``: this call's chunk, tokens).

        Returns
        -------
        float
            Measured time of the copy on the backend's ``clock``, seconds.

        Raises
        ------
        LloptimError
            Unknown instance, the request is not swapped out, or the chunk runs past its cache.
        """
        self._check_instance(instance)
        sw = self._swapped.get(request)
        total = None if sw is None else sw.host.shape[3]
        if sw is None or not (0 < kv_tokens <= total - sw.restored):
            raise LloptimError(f"torch backend out of sync with the engine: swap-in of {kv_tokens} tokens of request "
                               f"{request}, which has " + ("no swapped cache" if sw is None else
                                                           f"{total - sw.restored} tokens left in host memory"))
        pool = self._pools[instance]
        st = sw.state
        begin = sw.restored

        def work() -> None:
            seg = pool.segments.get(request)
            start = seg[0] if seg is not None else pool.allocate(self.model, request, self._segment_size[request])
            lo, hi = start + begin, start + begin + kv_tokens
            for j, (k, v) in enumerate(pool.kv):
                k[0, :, lo:hi].copy_(sw.host[j, 0, :, begin:begin + kv_tokens], non_blocking=True)
                v[0, :, lo:hi].copy_(sw.host[j, 1, :, begin:begin + kv_tokens], non_blocking=True)

        dur = self._timed(work)
        sw.restored += kv_tokens
        if sw.restored == total:
            del self._swapped[request]
            st.instance = instance
            self._reqs[request] = st
            self._running[instance][request] = None
        self.counters["swap_ins"] += 1
        return dur

    def release(self, instance: int, request: int, finished: bool) -> None:
        """Free ``request``'s cache; keep its tokens in :attr:`generated` if it ``finished``.

        Parameters
        ----------
        instance, request, finished
            As in :meth:`Backend.release <lloptim.backends.base.Backend.release>`; an evicted
            request (``finished`` false) loses its generated tokens and counts in ``counters["evictions"]``.
        """
        self._running[instance].pop(request, None)
        self._pools[instance].kill(request)
        st = self._reqs.pop(request, None)
        self._kept.pop(request, None)
        self._swapped.pop(request, None)
        if finished:
            if st is not None:
                self.generated[request] = st.tokens
        else:
            self.counters["evictions"] += 1
            self.generated.pop(request, None)

    def preempt(self, instance: int, request: int) -> None:
        """Drop ``request``'s cache (KV memory ran out) but keep the tokens it emitted, for its recompute.

        Parameters
        ----------
        instance, request
            As in :meth:`SupportsPreemption.preempt <lloptim.backends.base.SupportsPreemption.preempt>`.
        """
        self._running[instance].pop(request, None)
        self._pools[instance].kill(request)
        st = self._reqs.pop(request, None)
        self._kept[request] = list(st.tokens) if st is not None else []
        self.counters["preemptions"] += 1

    # -- verification ----------------------------------------------------------------------------
    def reference(self, request: int) -> list[int]:
        """The one-request-at-a-time greedy generation of ``request`` (its true output length)."""
        n = int(self.problem.workload.output_tokens[request])
        return reference_generate(self.model, self.prompt_ids(request), n)


def token_mismatches(backend: TorchBackend, requests: Sequence[int] | None = None,
                     generated: dict[int, list[int]] | None = None) -> dict[int, int]:
    """Per request, the number of positions where its generation differs from the reference.

    A missing or short generation counts every missing position as a mismatch. Scheduling must
    never change what the model says, so every value should be 0.

    Parameters
    ----------
    backend
        The backend after a run.
    requests
        Request rows to check; default: all.
    generated
        Generations to check instead of ``backend.generated`` (e.g. gathered from Ray replicas by
        :meth:`~lloptim.distributed.RayBackend.collect_generated`); ``backend`` then only supplies
        the references.

    Returns
    -------
    dict[int, int]
        ``request -> mismatching positions`` (tokens).
    """
    rows = range(backend.problem.n_requests) if requests is None else requests
    gen = backend.generated if generated is None else generated
    out = {}
    for r in rows:
        ref = backend.reference(r)
        got = gen.get(r, [])
        diff = sum(a != b for a, b in zip(got, ref)) + abs(len(got) - len(ref))
        out[int(r)] = int(diff)
    return out


def _build_replica(problem: Problem, model: str, device: str, dtype: str | None, seed: int, clock: str,
                   threads: int) -> TorchBackend:
    torch = require_torch()
    if threads > 0:
        torch.set_num_threads(threads)
    return TorchBackend(problem, model, device=device, dtype=dtype, seed=seed, clock=clock)


def replica_factory(model: str | Path = "tiny-llama", device: str = "auto", dtype: str | None = None, seed: int = 0,
                    clock: str = "wall", threads: int = 1):
    """A picklable ``factory(problem) -> TorchBackend`` that builds one model replica where it runs.

    For :class:`~lloptim.distributed.RayBackend`: each actor loads (or, for ``tiny-llama``, builds
    from its seeded config) its own copy of the model, so every replica computes the same tokens.

    Parameters
    ----------
    model
        ``"tiny-llama"`` or a local model directory (it must exist on every node that hosts a replica).
    device, dtype, seed, clock
        As in :class:`TorchBackend`.
    threads
        Torch CPU threads per replica (0: torch's default).

    Returns
    -------
    functools.partial
        The factory.
    """
    import functools

    return functools.partial(_build_replica, model=str(model), device=device, dtype=dtype, seed=seed, clock=clock,
                             threads=threads)
