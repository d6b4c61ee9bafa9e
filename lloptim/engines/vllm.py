"""lloptim policies as vLLM's scheduler.

:class:`LloptimScheduler` is a vLLM v1 scheduler class (``SchedulerConfig.scheduler_cls``; give the
class or its qualified name ``"lloptim.engines.vllm.LloptimScheduler"``). Attached to an
:class:`~lloptim.engines.common.EngineRun` it steers every step: before vLLM's own
:meth:`Scheduler.schedule` runs, it asks the run for the policy's decision (the offline plan's order
through the request scheduler, the Lagrangian price rule's prefill-or-decode choice, admission
against the engine's KV blocks) and shows vLLM only what the decision admits:

* **decode**: the waiting requests are held back, so vLLM decodes its running requests;
* **prefill**: the running requests that decode are held back and only the chosen waiting requests
  are offered, in the policy's order, under a token budget of exactly their prompts;
* **mixed** (prompt chunks fused into a decode): running requests and the chosen chunks.

vLLM then does what it always does (allocates KV blocks, builds the batch, chunks a prompt that
exceeds its budget) and :meth:`LloptimScheduler.update_from_output` reports what ran, how long the
step took and which requests finished. Nothing of vLLM's scheduling code is replaced or copied;
detached, the class is vLLM's scheduler unchanged, and :data:`~lloptim.engines.common.ENGINE_DEFAULT`
runs record vLLM's own decisions through the same hooks.

:class:`VllmEngine` runs one engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the
scheduler and the run share memory and a policy error is an ordinary exception, never a hung
engine process) with synchronous scheduling (a step is scheduled, executed, then accounted; vLLM's
asynchronous scheduling overlaps the next schedule with the current step, which leaves nothing to
steer between them). Several :class:`VllmEngine` objects are several replicas.

vLLM is optional: ``pip install "lloptim[vllm]"`` (see the README for the CPU build's install line).
"""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import Any, Sequence

from lloptim.backends.models import ModelInfo, resolve_model_dir
from lloptim.engines.common import EngineError, EngineRun, KVLayout, StepPlan
from lloptim.errors import LloptimError, SpecError
from lloptim.runtime.engine import RUNNING

__all__ = ["LloptimScheduler", "VllmEngine", "require_vllm", "kv_bytes_per_token", "INSTALL_HINT", "KV_HOST_SHARE"]

#: How to install vLLM for this adapter.
INSTALL_HINT = 'pip install -e ".[vllm]" (see the README for the CPU install line)'
#: KV block size the engines are started with, tokens (vLLM's CPU default).
BLOCK_SIZE = 128

# vLLM logs INFO to stdout by default, which would mix with lloptim's tables and JSON: unless the
# user configured it, send its log to stderr and keep warnings only (read when vLLM is imported)
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


#: Share of the host's available memory a KV pool that vLLM sizes itself (``kv_blocks=None``) may take.
KV_HOST_SHARE = 0.25
#: Bytes per element of the KV cache by ``dtype`` (``"auto"`` reads the checkpoint's).
_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}


def kv_bytes_per_token(model_dir: str | Path, dtype: str) -> int | None:
    """KV-cache bytes one token takes in ``model_dir``'s model (K and V, every layer), or None if unknown.

    ``2 x layers x key-value heads x head dim x bytes per element``, from ``config.json`` (the
    ``text_config`` inside it for multimodal checkpoints); None when a field is missing, so that
    the caller falls back to vLLM's own sizing.

    Parameters
    ----------
    model_dir
        Checkpoint folder (its ``config.json`` is read).
    dtype
        The engine's dtype (``"float32"``, ``"bfloat16"``, ``"float16"``, or ``"auto"``: the
        checkpoint's ``dtype`` / ``torch_dtype``).

    Returns
    -------
    int or None
        Bytes per token; None if the config lacks a field or the dtype is unknown.
    """
    import json

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg) if "num_hidden_layers" not in cfg else cfg
    layers, heads = cfg.get("num_hidden_layers"), cfg.get("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or (cfg.get("hidden_size") // heads if heads and cfg.get("hidden_size") else None)
    if dtype == "auto":
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    size = _DTYPE_BYTES.get(str(dtype).replace("torch.", ""))
    if not all(isinstance(v, int) and v > 0 for v in (layers, kv_heads, head_dim)) or size is None:
        return None
    return 2 * layers * kv_heads * head_dim * size


def require_vllm():
    """Import and return :mod:`vllm`, or raise a :class:`LloptimError` saying how to install it."""
    try:
        import vllm
    except ImportError as exc:
        raise LloptimError(f"the vllm backend needs vLLM ({exc.name} is not installed); install it with "
                           f"{INSTALL_HINT}") from None
    return vllm


class _Missing:  # pragma: no cover - placeholder base when vLLM is absent
    def __init__(self, *args, **kwargs) -> None:
        require_vllm()


try:  # the plug-in must subclass vLLM's scheduler; without vLLM the name still imports
    from vllm.v1.core.sched.scheduler import Scheduler as _VllmScheduler
    from vllm.v1.request import RequestStatus as _Status
except ImportError:  # pragma: no cover - exercised only without the extra
    _VllmScheduler = _Missing
    _Status = None


def _row(request) -> int:
    """The lloptim request row a vLLM request carries in ``sampling_params.extra_args``."""
    sp = getattr(request, "sampling_params", None)
    extra = getattr(sp, "extra_args", None) or {}
    row = extra.get("lloptim_row", -1)
    return int(row) if isinstance(row, int) else -1


class LloptimScheduler(_VllmScheduler):
    """vLLM's v1 scheduler, steered step by step by an lloptim policy.

    vLLM constructs it (pass the class, or its qualified name, as ``scheduler_cls``). It behaves
    exactly like vLLM's :class:`~vllm.v1.core.sched.scheduler.Scheduler` until :meth:`attach` hands it
    an :class:`~lloptim.engines.common.EngineRun`; then :meth:`schedule` follows the run's policy (or,
    for a run without a policy, records vLLM's own decisions) and :meth:`update_from_output` reports
    each step.

    Parameters
    ----------
    *args, **kwargs
        What vLLM passes to its scheduler (``vllm_config``, ``kv_cache_config``, ...).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._run: EngineRun | None = None
        self._instance = 0
        self._step: tuple | None = None

    # -- wiring ----------------------------------------------------------------------------------
    def attach(self, run: EngineRun, instance: int) -> None:
        """Steer (or record) this engine as instance ``instance`` of ``run``.

        Parameters
        ----------
        run
            The run to serve.
        instance
            This engine's instance index in the run.

        Raises
        ------
        EngineError
            The engine still holds requests from before.
        """
        if self.requests:
            raise EngineError("vllm", f"the engine still holds {len(self.requests)} requests from another run",
                              "wait for a run to finish before starting the next")
        self._run = run
        self._instance = instance
        self._step = None

    def detach(self) -> None:
        """Back to vLLM's plain scheduler."""
        self._run = None
        self._step = None

    # -- the two hooks ---------------------------------------------------------------------------
    def schedule(self, throttle_prefills: bool = False):
        """Ask the run for the policy's step, show vLLM only what it admits, and let vLLM schedule.

        Parameters
        ----------
        throttle_prefills
            vLLM's data-parallel prefill throttle, passed through.

        Returns
        -------
        vllm.v1.core.sched.output.SchedulerOutput
            vLLM's scheduler output for the step.
        """
        run = self._run
        if run is None:
            return super().schedule(throttle_prefills)
        t0 = run.clock()
        running_before = list(self.running)
        plan = run.plan(self._instance)
        out = self._steer(plan, throttle_prefills) if plan is not None else super().schedule(throttle_prefills)
        reqs = {rid: self.requests[rid] for rid in out.num_scheduled_tokens}
        preempted = [_row(r) for r in running_before if r.status == _Status.PREEMPTED]
        self._step = (t0, reqs, plan, preempted)
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        """vLLM's update, then report the step (work, duration, finished requests) to the run.

        Parameters
        ----------
        scheduler_output, model_runner_output
            As vLLM passes them.

        Returns
        -------
        dict
            vLLM's engine-core outputs.
        """
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        run, step = self._run, self._step
        if run is None or step is None:
            return outputs
        self._step = None
        t0, reqs, plan, preempted = step
        work = {_row(reqs[rid]): n for rid, n in scheduler_output.num_scheduled_tokens.items()}
        finished = {_row(r): list(r.output_token_ids) for r in reqs.values() if r.is_finished()}
        run.observe(self._instance, work, run.clock() - t0, finished, preempted, plan)
        return outputs

    # -- steering --------------------------------------------------------------------------------
    def _steer(self, plan: StepPlan, throttle_prefills: bool):
        """Run vLLM's schedule over the requests ``plan`` admits; put the others back afterwards."""
        run = self._run
        wanted = plan.prompts
        shown_running, held_running = [], []
        for req in self.running:
            row = _row(req)
            decoding = row >= 0 and run.client_state[int(run.req_client[row])] == RUNNING
            keep = plan.decode if decoding else row in wanted
            (shown_running if keep else held_running).append(req)
        # partly prefilled requests in the policy's order, after the decodes
        order = {row: i for i, row in enumerate(wanted)}
        shown_running.sort(key=lambda r: order.get(_row(r), -1))
        if plan.victims:
            # vLLM preempts from the tail of its running list when blocks run out: put the policy's
            # victims there, the first one last
            last = {row: len(plan.victims) - i for i, row in enumerate(plan.victims)}
            shown_running.sort(key=lambda r: last.get(_row(r), 0))
        waiting = list(self.waiting)
        chosen = sorted((r for r in waiting if _row(r) in wanted), key=lambda r: order[_row(r)])
        held_waiting = [r for r in waiting if _row(r) not in wanted]
        n_decode = sum(1 for r in shown_running if _row(r) not in wanted)
        budget = self.max_num_scheduled_tokens
        original_running = self.running
        self.running = shown_running
        self.waiting.remove_requests(waiting)
        for r in chosen:
            self.waiting.add_request(r)
        self.max_num_scheduled_tokens = max(1, min(budget, n_decode + plan.tokens))
        try:
            out = super().schedule(throttle_prefills)
        finally:
            self.max_num_scheduled_tokens = budget
            before = set(map(id, original_running))
            still = set(map(id, self.running))
            held = set(map(id, held_running))
            # running order as before (vLLM preempts from the tail), newly admitted requests last
            self.running = ([r for r in original_running if id(r) in still or id(r) in held]
                            + [r for r in self.running if id(r) not in before])
            for r in held_waiting:
                self.waiting.add_request(r)
        return out


class VllmEngine:
    """One vLLM engine (``LLMEngine``) in this process, scheduled by :class:`LloptimScheduler`.

    Parameters
    ----------
    model
        A built-in model name (``"mini-llama"``; written to a local folder on first use) or a local
        checkpoint directory (``config.json`` + safetensors; no tokenizer needed).
    clients
        Concurrent request slots: vLLM's ``max_num_seqs``.
    kv_blocks
        KV blocks in the pool (``num_gpu_blocks_override``; vLLM keeps one of them as its null block,
        and the longest sequence becomes what the others hold); ``None``: vLLM sizes it from memory.
    max_num_batched_tokens
        Tokens per step; ``None``: vLLM's default.
    dtype
        Weight dtype (``"float32"``, ``"bfloat16"``).
    seed
        Seed of the built-in model's weights, of the synthetic prompts and of vLLM.
    enforce_eager
        Skip torch.compile (starts in seconds instead of about a minute on two cores; CPU steps run
        at similar speed for small models).
    cpu_memory_fraction
        vLLM's ``gpu_memory_utilization``: on the CPU backend the share of the NUMA node's memory
        the process may use, the KV pool being that less what the process already holds. ``None``
        (default): the KV pool is sized explicitly (``kv_cache_memory_bytes``) to ``kv_blocks``
        blocks of the model's KV bytes per token (:func:`kv_bytes_per_token`), or without
        ``kv_blocks`` to every client at the model's longest sequence, at most
        :data:`KV_HOST_SHARE` of the available memory. The fraction rule fails where the node is
        small next to the process (a 9 GiB node and a 0.9 GiB test process: 5 % is a negative pool).
    **engine_args
        Further ``vllm.EngineArgs`` fields.

    Raises
    ------
    LloptimError
        vLLM is not installed.
    EngineError
        vLLM could not start the engine (its message is kept).
    """

    name = "vllm"
    #: vLLM recomputes a request it preempts, so policies may admit by prompt blocks (paged mode).
    preempts = True
    #: vLLM attends per request (paged kernels over each request's own blocks).
    dense_attention = False

    def __init__(self, model: str | Path = "mini-llama", clients: int = 8, kv_blocks: int | None = None,
                 max_num_batched_tokens: int | None = None, dtype: str = "float32", seed: int = 0,
                 enforce_eager: bool = True, cpu_memory_fraction: float | None = None, **engine_args: Any) -> None:
        require_vllm()
        from vllm import EngineArgs, LLMEngine

        if clients < 1:
            raise SpecError("clients", f"must be >= 1, got {clients}", "give the engine at least one slot")
        if kv_blocks is not None and kv_blocks < 1:
            raise SpecError("kv_blocks", f"must be >= 1, got {kv_blocks}", "give the engine some KV blocks")
        self.model_dir = resolve_model_dir(model, seed)
        self.info = ModelInfo.from_dir(self.model_dir)
        self.clients = int(clients)
        self.seed = seed
        self.dtype = dtype
        args = dict(model=str(self.model_dir), skip_tokenizer_init=True, max_num_seqs=self.clients, dtype=dtype,
                    enforce_eager=enforce_eager, enable_prefix_caching=False, seed=seed,
                    scheduler_cls=LloptimScheduler, async_scheduling=False, block_size=BLOCK_SIZE)
        block = int(engine_args.get("block_size", BLOCK_SIZE))
        if kv_blocks is not None:
            args["num_gpu_blocks_override"] = int(kv_blocks)
            # vLLM wants one longest sequence to fit the pool (less its null block)
            args["max_model_len"] = max(1, min(self.info.max_positions, (int(kv_blocks) - 1) * block))
        per_token = kv_bytes_per_token(self.model_dir, dtype)
        if cpu_memory_fraction is not None or per_token is None:
            args["gpu_memory_utilization"] = 0.05 if cpu_memory_fraction is None else cpu_memory_fraction
        elif not {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(engine_args):
            if kv_blocks is not None:
                tokens = int(kv_blocks) * block
            else:
                import psutil

                longest = min(self.info.max_positions, int(engine_args.get("max_model_len", self.info.max_positions)))
                tokens = min(self.clients * longest,
                             int(KV_HOST_SHARE * psutil.virtual_memory().available) // per_token)
                tokens = max(tokens, 2 * block)
            args["kv_cache_memory_bytes"] = tokens * per_token
        if max_num_batched_tokens is not None:
            args["max_num_batched_tokens"] = int(max_num_batched_tokens)
        args.update(engine_args)
        with _in_process():
            try:
                self.engine = LLMEngine.from_engine_args(EngineArgs(**args))
            except (ValueError, RuntimeError, OSError) as exc:
                raise EngineError("vllm", f"could not start on {self.model_dir}: {exc}",
                                  "check the model folder and the engine arguments") from exc
        self.scheduler = self._core().scheduler
        if not isinstance(self.scheduler, LloptimScheduler):  # pragma: no cover - a caller's scheduler_cls
            raise SpecError("scheduler_cls", "VllmEngine needs the lloptim scheduler", "leave scheduler_cls unset")
        self._run: EngineRun | None = None
        self._prompts: dict[tuple[int, int], list[int]] = {}

    def _core(self):
        core = getattr(self.engine.engine_core, "engine_core", None)
        if core is None:  # pragma: no cover - multiprocessing was forced on from outside
            raise EngineError("vllm", "the engine core runs in another process",
                              "unset VLLM_ENABLE_V1_MULTIPROCESSING")
        return core

    # -- what the run needs ----------------------------------------------------------------------
    @property
    def kv_layout(self) -> KVLayout:
        """The engine's KV pool: blocks requests can hold (vLLM keeps one null block) and tokens per block."""
        return KVLayout(int(self.scheduler.cache_config.num_gpu_blocks) - 1, int(self.scheduler.block_size))

    @property
    def token_budget(self) -> int:
        """Tokens vLLM processes per step at most (``max_num_scheduled_tokens``)."""
        return int(self.scheduler.max_num_scheduled_tokens)

    def attach(self, run: EngineRun, instance: int) -> None:
        """Serve ``run`` as instance ``instance`` (see :meth:`LloptimScheduler.attach`).

        Parameters
        ----------
        run
            The run to serve.
        instance
            This engine's instance index in the run.
        """
        self.scheduler.attach(run, instance)
        self._run = run

    def detach(self) -> None:
        """Stop serving the run; abort anything it left in the engine."""
        run, self._run = self._run, None
        self.scheduler.detach()
        if run is not None and self.engine.has_unfinished_requests():
            self.engine.abort_request(list(self.scheduler.requests))
            with contextlib.suppress(Exception):
                while self.engine.has_unfinished_requests():
                    self.engine.step()

    def prompt_ids(self, row: int) -> list[int]:
        """The synthetic prompt token ids of request row ``row`` (those the torch backend uses)."""
        key = (row, int(self._run.prompt[row]))
        ids = self._prompts.get(key)
        if ids is None:
            ids = self.info.prompt_ids(row, key[1], self.seed)
            self._prompts[key] = ids
        return ids

    def submit(self, rows: Sequence[int]) -> None:
        """Add requests ``rows`` to the engine: token-id prompts, greedy, EOS ignored, exact length."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        run = self._run
        for r in rows:
            sp = SamplingParams(max_tokens=int(run.tokens_wanted[r]), ignore_eos=True, temperature=0.0,
                                detokenize=False, extra_args={"lloptim_row": int(r)})
            self.engine.add_request(run.request_handle(r), TokensPrompt(prompt_token_ids=self.prompt_ids(r)), sp)

    def step(self) -> None:
        """One engine step (schedule, execute, update); outputs are gathered by the scheduler."""
        self.engine.step()

    def close(self) -> None:
        """Shut the engine down and free its memory (idempotent)."""
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        self.engine = None
        with contextlib.suppress(Exception):
            engine.engine_core.shutdown()
        del engine
        gc.collect()

    def __enter__(self) -> "VllmEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _in_process():
    """Build vLLM's engine core in this process (not in a spawned one) for the duration."""
    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    old = os.environ.get(key)
    os.environ[key] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
