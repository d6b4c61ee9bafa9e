"""Loading causal language models for the torch backend, and the one-request reference generation.

Two sources of models:

* built-in LLaMAs with seeded random weights, built from a :class:`transformers.LlamaConfig` (see
  :data:`BUILTIN_MODELS`); they need no download:

  - ``"tiny-llama"`` (hidden size 64, 2 layers, 4 heads of 16 dimensions, vocabulary of 256 ids)
    runs a decode step in about a millisecond on one CPU core, so tests and CI can serve it;
  - ``"mini-llama"`` (hidden size 256, 2 layers, 4 heads of 64 dimensions, vocabulary of 512 ids):
    the smallest shape the CPU attention kernels of the serving engines accept (vLLM's CPU backend
    rejects heads of 16 dimensions). :func:`builtin_model_dir` writes it to a local folder
    (``config.json`` + ``model.safetensors``, no tokenizer) on first use, so vLLM and transformers
    load it like any checkpoint;
  - ``"random-llama-1b"``: TinyLlama-1.1B's shape (22 layers, 32 heads of 64 dimensions, 4 KV
    heads), for GPU benchmarks; its folder takes 4.4 GB.

  In memory their default dtype is float64, which makes greedy generation reproducible bit for bit
  whatever the batching.
* a path to a local directory saved by ``save_pretrained`` (``config.json`` plus weights): any
  transformers causal LM. Nothing is ever downloaded (``local_files_only=True``).

torch and transformers are imported lazily: ``import lloptim`` works without them, and every entry
point here raises :class:`~lloptim.errors.LloptimError` naming ``pip install lloptim[torch]`` when
they are missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lloptim.errors import LloptimError, SpecError

__all__ = ["LoadedModel", "BUILTIN_MODELS", "load_model", "resolve_device", "require_torch",
           "prompt_token_ids", "reference_generate", "builtin_model_dir", "model_cache_root", "ModelInfo",
           "resolve_model_dir"]

#: Built-in models: name -> keyword arguments of ``transformers.LlamaConfig``.
BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                       initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       tie_word_embeddings=False),
    "mini-llama": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                       initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       tie_word_embeddings=False),
    # TinyLlama-1.1B's shape with random weights (1.1 B parameters, 4.4 GB as written): for GPU runs
    "random-llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                            initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                            tie_word_embeddings=False),
}

#: Environment variable naming the folder :func:`builtin_model_dir` writes models to.
MODEL_DIR_ENV = "LLOPTIM_MODEL_DIR"

_DTYPES = ("float64", "float32", "float16", "bfloat16")


def require_torch():
    """Import and return :mod:`torch`, or raise a :class:`LloptimError` saying how to install it."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - CI installs the extra
        raise LloptimError(f"the torch backend needs torch and transformers ({exc.name} is not installed); "
                           "install them with `pip install lloptim[torch]`") from None
    return torch


def resolve_device(device: str = "auto") -> str:
    """The torch device to run on: ``"auto"`` picks ``"cuda"`` when available, else ``"cpu"``.

    Raises
    ------
    SpecError
        For an unknown device, or ``"cuda"`` on a machine without a usable GPU.
    """
    torch = require_torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or (isinstance(device, str) and device.startswith("cuda:")):
        if not torch.cuda.is_available():
            raise SpecError("device", "CUDA was asked for but torch sees no GPU",
                            "use --device cpu (or auto), or install a CUDA build of torch")
        return device
    raise SpecError("device", f"unknown device {device!r}", "use 'auto', 'cpu' or 'cuda'")


@dataclass
class LoadedModel:
    """A causal LM ready to serve, with what the backend needs to know about it.

    Attributes
    ----------
    name
        ``"tiny-llama"`` or the model directory.
    module
        The ``transformers`` model (``eval()`` mode, on ``device``).
    device
        Torch device string (``"cpu"``, ``"cuda"``).
    dtype
        Torch dtype of the weights and activations.
    vocab_size
        Number of token ids, tokens.
    max_positions
        Longest sequence (prompt + output) the model supports, tokens.
    special_ids
        Token ids never used in synthesized prompts (BOS, EOS, padding).
    """

    name: str
    module: Any
    device: str
    dtype: Any
    vocab_size: int
    max_positions: int
    special_ids: tuple[int, ...]

    def synchronize(self) -> None:
        """Wait for queued GPU work (no-op on CPU); call before reading a timer."""
        if self.device.startswith("cuda"):
            import torch
            torch.cuda.synchronize(self.device)


def _dtype(torch, dtype: str | None, default: str):
    name = default if dtype is None else str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise SpecError("dtype", f"unknown dtype {dtype!r}", f"use one of {list(_DTYPES)}")
    return getattr(torch, name)


def _special_ids(config) -> tuple[int, ...]:
    ids: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(config, key, None)
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return tuple(sorted(ids))


def load_model(model: str | Path = "tiny-llama", device: str = "auto", dtype: str | None = None,
               seed: int = 0) -> LoadedModel:
    """Load ``model``: a built-in name (see :data:`BUILTIN_MODELS`) or a local model directory.

    Parameters
    ----------
    model
        A built-in name (``"tiny-llama"``, ``"mini-llama"``) or the path of a directory written by
        ``save_pretrained``.
    device
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    dtype
        ``"float64"``, ``"float32"``, ``"float16"`` or ``"bfloat16"``; ``None``: float64 for the
        built-in models (exact reproducibility), float32 for a model directory on CPU and bfloat16
        on CUDA.
    seed
        Seed of the random weights of a built-in model.

    Raises
    ------
    SpecError
        Unknown model name, a path that is not a model directory, bad device or dtype.
    LloptimError
        torch or transformers not installed.
    """
    torch = require_torch()
    dev = resolve_device(device)
    name = str(model)
    if name in BUILTIN_MODELS:
        dt = _dtype(torch, dtype, "float64")
        config, module = _build_builtin(torch, name, seed)
    else:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise SpecError("model", f"{name!r} is neither a built-in model nor a directory",
                            f"use one of {sorted(BUILTIN_MODELS)} or the path of a local model directory "
                            "(written by save_pretrained)")
        if not (path / "config.json").is_file():
            raise SpecError("model", f"{name!r} has no config.json, so it is not a transformers model directory",
                            "point --model at the folder that save_pretrained wrote")
        from transformers import AutoModelForCausalLM

        dt = _dtype(torch, dtype, "bfloat16" if dev.startswith("cuda") else "float32")
        import transformers

        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        try:
            module = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **{dtype_kw: dt})
        except (OSError, ValueError, KeyError) as exc:
            raise SpecError("model", f"cannot load a causal LM from {name!r}: {exc}",
                            "check that the directory holds a complete causal-LM checkpoint") from None
        config = module.config
    module = module.to(device=dev, dtype=dt).eval()
    vocab = int(module.get_output_embeddings().weight.shape[0])
    max_pos = int(getattr(config, "max_position_embeddings", 1 << 30) or (1 << 30))
    return LoadedModel(name=name, module=module, device=dev, dtype=dt, vocab_size=vocab,
                       max_positions=max_pos, special_ids=_special_ids(config))


def model_cache_root() -> Path:
    """Folder holding the built-in models written by :func:`builtin_model_dir`.

    ``$LLOPTIM_MODEL_DIR`` when set, else ``$XDG_CACHE_HOME/lloptim/models`` (``~/.cache/lloptim/models``).
    """
    env = os.environ.get(MODEL_DIR_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lloptim" / "models"


def _build_builtin(torch, name: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**BUILTIN_MODELS[name])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = LlamaForCausalLM(config)
    return config, module


def builtin_model_dir(name: str = "mini-llama", seed: int = 0, root: str | Path | None = None) -> Path:
    """A local checkpoint folder of built-in model ``name``, written on first use; its path.

    The folder holds ``config.json`` (``architectures: LlamaForCausalLM``), the seeded weights as
    ``model.safetensors`` in float32 and ``generation_config.json``; no tokenizer (serve it with
    token-id prompts: vLLM's ``skip_tokenizer_init=True``, transformers' ``input_ids``). Its name
    carries the seed and a hash of the configuration, so a changed configuration never reuses stale
    weights. It is written to a temporary sibling and renamed into place, so concurrent first uses
    (test workers, replicas) never see a half-written folder.

    Parameters
    ----------
    name
        A key of :data:`BUILTIN_MODELS`.
    seed
        Seed of the random weights (the same seed gives the same weights as :func:`load_model`).
    root
        Parent folder; default :func:`model_cache_root`.

    Returns
    -------
    pathlib.Path
        The checkpoint folder.

    Raises
    ------
    SpecError
        Unknown model name, or the folder cannot be written.
    LloptimError
        torch or transformers not installed (only when the folder must be written).
    """
    if name not in BUILTIN_MODELS:
        raise SpecError("model", f"unknown built-in model {name!r}", f"use one of {sorted(BUILTIN_MODELS)}")
    digest = hashlib.sha256(json.dumps(BUILTIN_MODELS[name], sort_keys=True).encode()).hexdigest()[:10]
    parent = Path(root).expanduser() if root is not None else model_cache_root()
    target = parent / f"{name}-seed{int(seed)}-{digest}"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    torch = require_torch()
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=parent))
    except OSError as exc:
        raise SpecError("model", f"cannot write the built-in model under {parent}: {exc}",
                        f"set {MODEL_DIR_ENV} to a writable folder") from None
    try:
        _, module = _build_builtin(torch, name, seed)
        module.to(torch.float32).save_pretrained(tmp, safe_serialization=True)
        (tmp / "lloptim.json").write_text(json.dumps({"builtin": name, "seed": int(seed), "config_sha": digest}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: its folder is identical
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(model: str | Path, seed: int = 0) -> Path:
    """The checkpoint folder of ``model``: a built-in name (written on first use) or a local folder.

    Parameters
    ----------
    model
        A key of :data:`BUILTIN_MODELS` or the path of a folder holding ``config.json`` and weights.
    seed
        Seed of a built-in model's weights.

    Raises
    ------
    SpecError
        Neither a built-in name nor a folder with ``config.json``.
    """
    name = str(model)
    if name in BUILTIN_MODELS:
        return builtin_model_dir(name, seed)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise SpecError("model", f"{name!r} is neither a built-in model nor a directory",
                        f"use one of {sorted(BUILTIN_MODELS)} or the path of a local checkpoint folder")
    if not (path / "config.json").is_file():
        raise SpecError("model", f"{name!r} has no config.json, so it is not a checkpoint folder",
                        "point --model at the folder that save_pretrained wrote")
    return path


@dataclass(frozen=True)
class ModelInfo:
    """What synthesizing prompts for a model needs, read from its ``config.json`` (no torch).

    Attributes
    ----------
    vocab_size
        Number of token ids, tokens.
    special_ids
        Token ids never used in synthesized prompts (BOS, EOS, padding).
    max_positions
        Longest sequence (prompt + output) the model supports, tokens.
    """

    vocab_size: int
    special_ids: tuple[int, ...]
    max_positions: int

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelInfo":
        """Read ``path/config.json`` (a text model's config, or the ``text_config`` inside it).

        Raises
        ------
        SpecError
            No readable ``config.json`` or no ``vocab_size`` in it.
        """
        try:
            cfg = json.loads((Path(path) / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise SpecError("model", f"cannot read {path}/config.json: {exc}", "point at a checkpoint folder") from None
        cfg = cfg.get("text_config", cfg) if "vocab_size" not in cfg else cfg
        if not isinstance(cfg.get("vocab_size"), int):
            raise SpecError("model", f"{path}/config.json has no vocab_size", "point at a causal-LM checkpoint folder")

        from types import SimpleNamespace

        return cls.from_config(SimpleNamespace(**cfg))

    @classmethod
    def from_config(cls, config) -> "ModelInfo":
        """From a model configuration object (``vocab_size``, special token ids, ``max_position_embeddings``)."""
        max_pos = getattr(config, "max_position_embeddings", None) or (1 << 30)
        return cls(int(config.vocab_size), _special_ids(config), int(max_pos))

    def prompt_ids(self, request: int, n_tokens: int, seed: int = 0) -> list[int]:
        """:func:`prompt_token_ids` for this model: the prompts the torch backend would use.

        Parameters
        ----------
        request
            Request row index.
        n_tokens
            Prompt length, tokens.
        seed
            Seed shared by all requests of a run.

        Returns
        -------
        list of int
            ``n_tokens`` token ids.
        """
        return prompt_token_ids(self, request, n_tokens, seed)


def prompt_token_ids(model: LoadedModel, request: int, n_tokens: int, seed: int = 0) -> list[int]:
    """Deterministic synthetic prompt of ``n_tokens`` ids for request row ``request``.

    Workloads carry token counts only; the ids are drawn uniformly from the vocabulary minus the
    special ids with ``numpy.random.default_rng([seed, request])``, so a request gets the same
    prompt on every instance, client and restart.

    Parameters
    ----------
    model
        The loaded model, or a :class:`ModelInfo` (its vocabulary size and special ids).
    request
        Request row index.
    n_tokens
        Prompt length, tokens.
    seed
        Seed shared by all requests of a run.

    Returns
    -------
    list of int
        ``n_tokens`` token ids.
    """
    allowed = np.setdiff1d(np.arange(model.vocab_size), np.asarray(model.special_ids, dtype=np.int64))
    rng = np.random.default_rng([seed, request])
    return allowed[rng.integers(0, allowed.size, size=int(n_tokens))].tolist()


def reference_generate(model: LoadedModel, prompt_ids: Sequence[int], n_tokens: int) -> list[int]:
    """Greedy generation of ``n_tokens`` tokens for one request alone (no batching, no padding).

    This is the ground truth a scheduled run must reproduce: the whole prompt in one forward, then
    one token per forward through the KV cache, EOS ignored.

    Parameters
    ----------
    model
        The loaded model.
    prompt_ids
        Prompt token ids (at least one).
    n_tokens
        Number of tokens to generate, tokens.

    Returns
    -------
    list[int]
        The ``n_tokens`` generated ids.
    """
    torch = require_torch()
    if len(prompt_ids) == 0 or n_tokens < 0:
        raise SpecError("prompt_ids", "need a non-empty prompt and n_tokens >= 0", "give at least one prompt id")
    out: list[int] = []
    if n_tokens == 0:
        return out
    m = model.module
    with torch.inference_mode():
        res = m(input_ids=torch.tensor([list(prompt_ids)], device=model.device), use_cache=True)
        cache = res.past_key_values
        tok = int(res.logits[0, -1].argmax())
        out.append(tok)
        for _ in range(n_tokens - 1):
            res = m(input_ids=torch.tensor([[tok]], device=model.device), past_key_values=cache, use_cache=True)
            cache = res.past_key_values
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
    return out
