"""lloptim policies as the scheduler of transformers' continuous batching.

transformers (>= 5.16) serves a model with paged attention through a ``ContinuousBatchingManager``
whose background thread asks a :class:`~transformers.generation.continuous_batching.scheduler.Scheduler`
for every batch (``schedule_batch``). :class:`LloptimHFScheduler` is that scheduler: it subclasses the
FIFO scheduler, and attached to an :class:`~lloptim.engines.common.EngineRun` it builds each batch's
candidate list from the policy's decision (the running requests that decode, the waiting requests
to prefill, in the policy's order, under a token budget of exactly what the decision asks) and hands
it to transformers' own candidate processing, which allocates the paged cache and splits prompts as
usual. With a run that has no policy it is transformers' FIFO scheduler, recorded. It is registered
in transformers' scheduler table under a per-run key (``ContinuousBatchingConfig.scheduler_type``).

:class:`HFEngine` loads the model once and, per run, starts a manager whose generation thread steps
only when the driver lets it: the plug-in parks the thread between steps (in
``clear_cancelled_requests``, the first scheduler call of every iteration) and reports the finished
step there. Steps therefore run one at a time in the simulator's event order, each timed from its
``schedule_batch`` to the next park, and several replicas (one manager each, sharing the weights)
are timed as if they ran in parallel. A policy or engine error in the generation thread is stored,
the thread stops, and the driver raises it as a named error.

The scheduler interface used here (``add_waiting_request``, ``schedule_batch``, ``_process_candidates``,
``_cleanup_waiting_queue``, ``finish_request``, ``clear_cancelled_requests``, ``has_pending_requests``)
is the same in transformers 5.16 to 5.23; ``pip install "lloptim[hf]"`` pins that range.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import threading
from typing import Any, Sequence

from lloptim.backends.models import ModelInfo, require_torch, resolve_device, resolve_model_dir
from lloptim.engines.common import EngineError, EngineRun, KVLayout
from lloptim.errors import LloptimError, SpecError
from lloptim.runtime.engine import RUNNING

__all__ = ["LloptimHFScheduler", "HFEngine", "require_continuous_batching", "MIN_TRANSFORMERS", "INSTALL_HINT"]

#: Oldest transformers whose continuous-batching scheduler interface the plug-in uses.
MIN_TRANSFORMERS = (5, 16, 1)
#: How to install transformers with continuous batching for this adapter.
INSTALL_HINT = 'pip install -e ".[hf]"'
#: Seconds the driver waits for one engine step before declaring the engine hung.
STEP_TIMEOUT_S = 600.0


def _version(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def require_continuous_batching():
    """Import transformers' continuous-batching scheduler module, or raise a :class:`LloptimError`."""
    require_torch()
    import transformers

    if _version(transformers.__version__) < MIN_TRANSFORMERS:
        raise LloptimError(f"the hf backend needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} "
                           f"(continuous batching), found {transformers.__version__}; {INSTALL_HINT}")
    from transformers.generation.continuous_batching import scheduler

    return scheduler


try:  # the plug-in must subclass transformers' FIFO scheduler; without it the name still imports
    from transformers.generation.continuous_batching.scheduler import FIFOScheduler as _FIFO
except ImportError:  # pragma: no cover - exercised only without transformers' continuous batching
    class _FIFO:  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs) -> None:
            require_continuous_batching()


def _hf_layout(cache) -> KVLayout:
    """The paged cache as blocks of tokens (transformers 5.19 counts sectors, 5.16-5.17 blocks)."""
    sectors = getattr(cache, "num_sectors", None)
    if sectors:
        return KVLayout(int(sectors), int(cache.tokens_per_sector), slack_blocks=1)
    return KVLayout(int(cache.num_blocks), int(cache.block_size), slack_blocks=1)


class _Link:
    """Rendezvous between the driver thread and one generation thread (one replica)."""

    def __init__(self, steer_default: bool = True) -> None:
        self.cond = threading.Condition()
        self.go = False
        self.exiting = False
        self.parked = False
        self.error: BaseException | None = None
        self.layout: KVLayout | None = None
        self.budget: int | None = None
        self.run: EngineRun | None = None
        self.instance = 0
        self.inbox = None  # the manager's input queue, drained by the scheduler itself
        self.step: tuple | None = None
        self.finished: dict[int, list[int]] = {}
        self.offloads = 0

    # -- generation-thread side --------------------------------------------------------------------
    def park(self) -> None:
        """Report a finished step, then wait until the driver lets the thread step again."""
        run, step = self.run, self.step
        if run is not None and step is not None:
            self.step = None
            t0, work, plan = step
            finished, self.finished = self.finished, {}
            run.observe(self.instance, work, run.clock() - t0, finished, (), plan)
        with self.cond:
            self.parked = True
            self.cond.notify_all()
            while not (self.go or self.exiting):
                self.cond.wait(1.0)
                if not threading.main_thread().is_alive():
                    # the interpreter is exiting with the engine still open: let the thread end
                    self.exiting = True
            self.go = False
            self.parked = False

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = exc
            self.cond.notify_all()

    # -- driver side -------------------------------------------------------------------------------
    def wait_parked(self, alive, timeout: float = STEP_TIMEOUT_S) -> None:
        """Wait until the thread parks again; raise what it failed with if it stops instead."""
        with self.cond:
            waited = 0.0
            while not self.parked and self.error is None:
                if not alive():
                    break
                self.cond.wait(0.1)
                waited += 0.1
                if waited > timeout:
                    raise EngineError("hf", f"a step took longer than {timeout:.0f} s", "check the engine")
        if self.error is not None:
            raise self.error
        if not self.parked:
            raise EngineError("hf", "the generation thread stopped", "see the transformers log above")

    def release(self) -> None:
        with self.cond:
            self.go = True
            self.parked = False
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.exiting = True
            self.cond.notify_all()


class LloptimHFScheduler(_FIFO):
    """transformers' FIFO continuous-batching scheduler, steered (or recorded) for an lloptim run.

    transformers constructs it from its scheduler table with ``cache``, ``safety_margin`` and
    ``max_requests_per_batch``; :class:`HFEngine` registers a version bound to its run. Unbound, it
    is the FIFO scheduler unchanged.

    Parameters
    ----------
    cache
        transformers' paged-attention cache.
    safety_margin
        Share of free blocks under which FIFO stops admitting prefills; a steered run admits by
        the policy's KV reservations instead (margin 0).
    max_requests_per_batch
        Most requests per batch (the instance's clients).
    link
        The rendezvous with the driver (``None``: plain FIFO).
    steer
        Whether the run has a policy (``False``: record FIFO's own decisions).
    """

    def __init__(self, cache, safety_margin, max_requests_per_batch, link: _Link | None = None,
                 steer: bool = False) -> None:
        self._link = link
        self._steer = steer and link is not None
        super().__init__(cache, 0.0 if self._steer else safety_margin, max_requests_per_batch)
        if link is not None:
            link.layout = _hf_layout(cache)
            link.budget = int(cache.max_batch_tokens)

    # -- the loop's hooks ------------------------------------------------------------------------
    def clear_cancelled_requests(self):
        """Park the generation thread between steps (reporting the step that ended), then clear cancellations."""
        link = self._link
        if link is not None:
            try:
                link.park()
            except BaseException as exc:
                link.fail(exc)
                raise
        return super().clear_cancelled_requests()

    def has_pending_requests(self) -> bool:
        """Bound to a run: pending until the driver ends it (the driver knows when work is due)."""
        link = self._link
        if link is None:
            return super().has_pending_requests()
        return not link.exiting

    def schedule_batch(self, token_budget: int, cache_budget: int):
        """The next batch: the policy's decision over transformers' candidate processing (or FIFO's own).

        Parameters
        ----------
        token_budget, cache_budget
            As transformers passes them (query tokens, KV tokens read).

        Returns
        -------
        tuple
            As the FIFO scheduler's: the batch (never ``None`` when steered, so transformers never
            offloads requests on the policy's behalf), the decode fast-path flag, query tokens and KV
            tokens read.
        """
        link = self._link
        if link is None or link.run is None:
            return super().schedule_batch(token_budget, cache_budget)
        try:
            return self._schedule(link, token_budget, cache_budget)
        except BaseException as exc:
            link.fail(exc)
            raise

    def finish_request(self, request_id: str) -> None:
        """Free the request (transformers), and note its tokens for the step report.

        Parameters
        ----------
        request_id
            The finished request.
        """
        state = self.active_requests.get(request_id)
        super().finish_request(request_id)
        link = self._link
        if link is not None and state is not None:
            row = EngineRun.row_of(request_id)
            if row >= 0:
                link.finished[row] = list(state.generated_tokens)

    # -- steering --------------------------------------------------------------------------------
    def _drain(self, link: _Link) -> None:
        """Take the requests the driver submitted for this step (while the thread was parked)."""
        inbox = link.inbox
        while inbox is not None:
            try:
                state = inbox.get_nowait()
            except Exception:  # queue.Empty
                break
            self.add_waiting_request(state)

    def _schedule(self, link: _Link, token_budget: int, cache_budget: int):
        run = link.run
        t0 = run.clock()
        self._drain(link)
        plan = run.plan(link.instance)
        if plan is None:
            batch, fast, n_q, kv_read = super().schedule_batch(token_budget, cache_budget)
            if batch is None:
                # FIFO found the cache full: transformers will offload a request to CPU memory
                link.offloads += 1
                raise EngineError("hf", "the FIFO scheduler ran out of KV blocks and would offload requests",
                                  "give the engine more KV blocks (kv_blocks)")
        else:
            wanted = plan.prompts
            decodes, chunks = [], {}
            for rid, state in self.active_requests.items():
                row = EngineRun.row_of(rid)
                if row < 0:
                    continue
                if run.client_state[int(run.req_client[row])] == RUNNING:
                    if plan.decode:
                        decodes.append(state)
                elif row in wanted:
                    chunks[row] = state
            for rid in self.waiting_requests_order:
                row = EngineRun.row_of(rid)
                if row in wanted and row not in chunks:
                    chunks[row] = self.waiting_requests[rid]
            candidates = decodes + [chunks[row] for row in wanted if row in chunks]
            budget = max(1, min(token_budget, len(decodes) + plan.tokens))
            removed: set[str] = set()
            batch, _, fast, n_q, kv_read = self._process_candidates(candidates, budget, cache_budget, removed)
            self._cleanup_waiting_queue(removed)
        work = {EngineRun.row_of(fs.state.request_id): int(fs.query_length) for fs in batch}
        link.step = (t0, work, plan)
        return batch, fast, n_q, kv_read


class HFEngine:
    """One transformers continuous-batching engine (a model replica) scheduled by :class:`LloptimHFScheduler`.

    Parameters
    ----------
    model
        A built-in model name (``"mini-llama"``) or a local checkpoint folder, or an already loaded
        transformers model (to share weights between replicas).
    clients
        Concurrent request slots (``max_requests_per_batch``).
    kv_blocks
        Blocks of the paged cache; ``None``: enough for four pages per client (at least 64).
    max_batch_tokens
        Tokens per batch; ``None``: 2048.
    dtype
        Weight dtype (``"float32"``, ``"bfloat16"``, ...).
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    seed
        Seed of the built-in model's weights and of the synthetic prompts.
    attn_implementation
        Attention kernel transformers pages (``"sdpa"``; ``"flash_attention_2"`` on a GPU that has it).
    **cb_options
        Further ``ContinuousBatchingConfig`` fields (e.g. ``use_cuda_graph=True`` on a GPU).

    Raises
    ------
    LloptimError
        transformers without continuous batching.
    """

    name = "hf"
    #: transformers offloads instead of recomputing, which a run cannot account for: policies admit by
    #: reservation (reserve mode), so nothing is ever preempted.
    preempts = False
    #: Whether a step's attention is one dense masked matrix over the whole batch (the paged ``sdpa``
    #: and ``eager`` paths; without flash attention transformers has no per-request decode path), so a
    #: step costs a term in (query tokens) x (keys read) that calibration fits
    #: (:attr:`~lloptim.hardware.LatencyModel.dense_attention_per_pair_s`).
    dense_attention = True

    def __init__(self, model: Any = "mini-llama", clients: int = 8, kv_blocks: int | None = None,
                 max_batch_tokens: int | None = None, dtype: str = "float32", device: str = "auto", seed: int = 0,
                 attn_implementation: str = "sdpa", **cb_options: Any) -> None:
        require_continuous_batching()
        torch = require_torch()
        if clients < 1:
            raise SpecError("clients", f"must be >= 1, got {clients}", "give the engine at least one slot")
        if kv_blocks is not None and kv_blocks < 1:
            raise SpecError("kv_blocks", f"must be >= 1, got {kv_blocks}", "give the engine some KV blocks")
        self.clients = int(clients)
        self.seed = seed
        self.dtype = dtype
        self.kv_blocks = int(kv_blocks) if kv_blocks is not None else max(64, 4 * self.clients)
        self.max_batch_tokens = int(max_batch_tokens) if max_batch_tokens is not None else 2048
        self.cb_options = cb_options
        self.dense_attention = "flash" not in str(attn_implementation)
        if hasattr(model, "config") and hasattr(model, "generate"):
            self.module = model
            self.info = ModelInfo.from_config(model.config)
            self.model_dir = None
        else:
            from transformers import AutoModelForCausalLM

            self.model_dir = resolve_model_dir(model, seed)
            self.info = ModelInfo.from_dir(self.model_dir)
            dev = resolve_device(device)
            try:
                self.module = AutoModelForCausalLM.from_pretrained(
                    self.model_dir, local_files_only=True, dtype=getattr(torch, dtype),
                    attn_implementation=attn_implementation).to(dev).eval()
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise SpecError("model", f"cannot load a causal LM from {self.model_dir}: {exc}",
                                "check that the folder holds a complete checkpoint") from None
        self._link: _Link | None = None
        self._manager = None
        self._key: str | None = None
        self._prompts: dict[tuple[int, int], list[int]] = {}

    # -- per-run machinery -----------------------------------------------------------------------
    def _open(self, steer: bool) -> _Link:
        """Start a manager whose generation thread parks at its first step; return its link."""
        if self._link is not None:
            return self._link
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        sched = require_continuous_batching()
        link = _Link()
        key = f"lloptim-{id(link):x}"
        sched.SCHEDULER_MAPPING[key] = functools.partial(LloptimHFScheduler, link=link, steer=steer)
        fields = set(getattr(ContinuousBatchingConfig, "__dataclass_fields__", {}))
        opts = dict(num_blocks=self.kv_blocks, max_batch_tokens=self.max_batch_tokens,
                    max_requests_per_batch=self.clients, scheduler_type=key, use_async_batching=False,
                    allow_block_sharing=False)
        opts.update(self.cb_options)
        unknown = sorted(set(opts) - fields) if fields else []
        if unknown:
            sched.SCHEDULER_MAPPING.pop(key, None)
            raise SpecError("cb_options", f"ContinuousBatchingConfig has no {unknown}", "see transformers' docs")
        gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=1)
        try:
            manager = self.module.init_continuous_batching(generation_config=gen,
                                                           continuous_batching_config=ContinuousBatchingConfig(**opts))
            link.inbox = manager.input_queue
            manager.start()
            link.wait_parked(manager.is_running, timeout=STEP_TIMEOUT_S)
        except BaseException:
            sched.SCHEDULER_MAPPING.pop(key, None)
            link.close()
            raise
        self._link, self._manager, self._key, self._steer = link, manager, key, steer
        return link

    def _shut(self) -> None:
        link, manager, key = self._link, self._manager, self._key
        self._link = self._manager = self._key = None
        if link is None:
            return
        link.run = None
        link.close()
        with contextlib.suppress(Exception):
            manager.stop(block=True, timeout=30)
        with contextlib.suppress(Exception):
            require_continuous_batching().SCHEDULER_MAPPING.pop(key, None)
        gc.collect()

    # -- what the run needs ----------------------------------------------------------------------
    @property
    def kv_layout(self) -> KVLayout:
        """The paged cache as blocks of tokens (starts the engine for a run if needed)."""
        return self._open(steer=True).layout

    @property
    def token_budget(self) -> int:
        """Tokens per batch at most."""
        return int(self._open(steer=True).budget)

    def attach(self, run: EngineRun, instance: int) -> None:
        """Serve ``run`` as instance ``instance`` (restarts the engine if it was opened for another mode).

        Parameters
        ----------
        run
            The run to serve.
        instance
            This engine's instance index in the run.
        """
        steer = run.policy is not None
        if self._link is not None and self._steer != steer:
            self._shut()
        link = self._open(steer)
        link.run = run
        link.instance = instance

    def detach(self) -> None:
        """Stop the run's generation thread and free its cache."""
        self._shut()

    def prompt_ids(self, row: int) -> list[int]:
        """The synthetic prompt token ids of request row ``row`` (those the torch backend uses)."""
        key = (row, int(self._link.run.prompt[row]))
        ids = self._prompts.get(key)
        if ids is None:
            ids = self.info.prompt_ids(row, key[1], self.seed)
            self._prompts[key] = ids
        return ids

    def submit(self, rows: Sequence[int]) -> None:
        """Queue requests ``rows`` for the next step: greedy, EOS ignored, exact length."""
        run = self._link.run
        for r in rows:
            self._manager.add_request(self.prompt_ids(r), request_id=run.request_handle(r),
                                      max_new_tokens=int(run.tokens_wanted[r]), eos_token_id=-1)

    def step(self) -> None:
        """Let the generation thread run one step and wait until it parks again.

        Raises
        ------
        PolicyError, EngineError
            What the step failed with in the generation thread.
        """
        link = self._link
        link.release()
        link.wait_parked(self._manager.is_running)

    def close(self) -> None:
        """Stop any run and drop the model (idempotent)."""
        self._shut()
        self.module = None
        gc.collect()

    def __enter__(self) -> "HFEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
