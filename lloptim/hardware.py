"""Hardware profiles: the latency model of one model instance and its KV-cache capacity.

The latency model (see ``../shared/design/paper.md`` and the docs' *Concepts* page):

* a **prefill** iteration of a set ``P`` of requests takes
  ``t_p(P) = prefill_base_s + prefill_per_token_s * sum(prompt_tokens[r] for r in P)`` seconds;
* a **decode** iteration of the running set ``D`` takes
  ``t_d(D) = decode_base_s + decode_per_seq_s * |D| + decode_per_kv_token_s * sum(kv_tokens[r] for r in D)``
  seconds, where ``kv_tokens[r]`` is the number of tokens already in ``r``'s KV cache;
* an engine whose attention is one dense masked matrix over the whole batch (transformers' paged
  ``sdpa`` path) also pays ``dense_attention_per_pair_s * Q * (Q + K)`` per iteration, ``Q`` its query
  tokens and ``K`` the cached KV tokens it reads (:meth:`LatencyModel.dense_attention_time`; 0 for
  engines that attend per request). The simulator charges it; planning (bounds, prices) uses the
  linear terms, which stay a valid lower estimate.

Profiles are TOML files; the built-in ``llama-65b`` profile ships inside the package and was fitted
so that the baseline policy on the GSM8K test split reproduces the paper's baseline (see
``benchmarks/fit_llama65b.py``).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from lloptim.errors import ProfileError, SpecError
from lloptim.validation import read_text_file

__all__ = ["LatencyModel", "HardwareProfile", "load_profile", "builtin_profiles", "save_profile", "transfer_time_between",
           "ITERATION_COEFFICIENTS"]

#: The five coefficients of the iteration-time model (required in every profile; what calibration
#: fits from prefill and decode timings), seconds or seconds per token / request.
ITERATION_COEFFICIENTS = ("prefill_base_s", "prefill_per_token_s", "decode_base_s", "decode_per_seq_s",
                          "decode_per_kv_token_s")


@dataclass(frozen=True)
class LatencyModel:
    """Linear iteration-time model of one model instance. All coefficients are in seconds.

    Attributes
    ----------
    prefill_base_s
        Fixed cost of a prefill iteration (weights read, launch overheads), seconds.
    prefill_per_token_s
        Cost per prompt token in a prefill iteration (compute bound), seconds per token.
    decode_base_s
        Fixed cost of a decode iteration (weights read), seconds.
    decode_per_seq_s
        Cost per running request in a decode iteration, seconds per request.
    decode_per_kv_token_s
        Cost per token held in the KV cache of the running requests, seconds per token.
    kv_transfer_base_s
        Fixed cost of moving one running request's KV cache to or from another instance
        (handshake, allocation), seconds; ``None``: the profile states no transfer cost and
        running requests cannot migrate to or from it.
    kv_transfer_per_token_s
        Cost per KV-cache token moved between instances (cache bytes per token over the
        interconnect bandwidth), seconds per token; ``None`` as above.
    dense_attention_per_pair_s
        Cost per (query token, key token) pair of an iteration whose attention is computed as one
        dense masked matrix over the whole batch, as transformers' paged ``sdpa`` path does (every
        query against every key the batch reads); seconds per pair. 0 (the default) for engines
        that attend per request (vLLM, lloptim's torch backend, the paper's profile).
    kv_swap_per_token_s
        Cost per KV-cache token copied between the instance's KV cache and host memory, in either
        direction, when preemption swaps a request out and back in (vLLM's ``swap`` preemption):
        the cache bytes per token over the host link's bandwidth, seconds per token. ``None`` (the
        default): the profile states no swap cost, and ``preemption="swap"`` refuses to run on it.
    """

    prefill_base_s: float
    prefill_per_token_s: float
    decode_base_s: float
    decode_per_seq_s: float
    decode_per_kv_token_s: float
    kv_transfer_base_s: float | None = None
    kv_transfer_per_token_s: float | None = None
    dense_attention_per_pair_s: float = 0.0
    kv_swap_per_token_s: float | None = None

    def __post_init__(self) -> None:
        if (self.kv_transfer_base_s is None) != (self.kv_transfer_per_token_s is None):
            raise ProfileError("latency.kv_transfer_per_token_s", "only one of the two KV-transfer costs is given",
                               "give both kv_transfer_base_s and kv_transfer_per_token_s, or neither")
        for name, value in asdict(self).items():
            if value is None and (name.startswith("kv_transfer") or name == "kv_swap_per_token_s"):
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ProfileError(f"latency.{name}", f"must be a number, got {value!r}",
                                   "give a non-negative number of seconds")
            if not math.isfinite(value) or value < 0:
                raise ProfileError(f"latency.{name}", f"must be finite and >= 0, got {value!r}",
                                   "give a non-negative number of seconds")
        if self.decode_base_s + self.decode_per_seq_s <= 0:
            raise ProfileError("latency.decode_base_s", "a decode iteration would take no time",
                               "make decode_base_s or decode_per_seq_s positive")
        if self.prefill_base_s + self.prefill_per_token_s <= 0:
            raise ProfileError("latency.prefill_base_s", "a prefill iteration would take no time",
                               "make prefill_base_s or prefill_per_token_s positive")

    def prefill_time(self, prompt_tokens: float) -> float:
        """Seconds of one prefill iteration over ``prompt_tokens`` prompt tokens in total."""
        return self.prefill_base_s + self.prefill_per_token_s * prompt_tokens

    def decode_time(self, n_running: int, kv_tokens: float) -> float:
        """Seconds of one decode iteration of ``n_running`` requests holding ``kv_tokens`` tokens.

        Parameters
        ----------
        n_running
            Requests decoding (count).
        kv_tokens
            Tokens in their KV caches before the step, tokens.

        Returns
        -------
        float
            ``decode_base_s + decode_per_seq_s * n_running + decode_per_kv_token_s * kv_tokens``, seconds.
        """
        return self.decode_base_s + self.decode_per_seq_s * n_running + self.decode_per_kv_token_s * kv_tokens

    def coefficients(self) -> dict[str, float]:
        """The coefficients a profile writes: the five iteration terms and the optional ones that are set.

        Returns
        -------
        dict
            Coefficient name -> seconds (per token, request or pair); ``kv_transfer_*`` left out when
            ``None`` and ``dense_attention_per_pair_s`` when 0, so profiles without them read as before.
        """
        return {k: v for k, v in asdict(self).items()
                if v is not None and not (k == "dense_attention_per_pair_s" and v == 0)}

    def dense_attention_time(self, query_tokens: float, cached_tokens: float) -> float:
        """Seconds of an iteration's dense batch attention (0 unless ``dense_attention_per_pair_s`` is set).

        Parameters
        ----------
        query_tokens
            Tokens the iteration feeds the model: one per decoding request plus the prompt tokens,
            tokens.
        cached_tokens
            KV tokens already cached that the iteration reads (the decoding requests' caches and
            the prompt chunks prefilled before), tokens.

        Returns
        -------
        float
            ``dense_attention_per_pair_s * query_tokens * (query_tokens + cached_tokens)``, seconds.
        """
        return self.dense_attention_per_pair_s * query_tokens * (query_tokens + cached_tokens)

    @property
    def can_transfer(self) -> bool:
        """Whether the profile states a KV-transfer cost (running requests may migrate)."""
        return self.kv_transfer_base_s is not None

    def transfer_time(self, kv_tokens: float) -> float:
        """Seconds to move a running request holding ``kv_tokens`` KV-cache tokens between instances.

        Parameters
        ----------
        kv_tokens
            Tokens in the request's KV cache (prompt + generated), tokens.

        Returns
        -------
        float
            ``kv_transfer_base_s + kv_transfer_per_token_s * kv_tokens``, seconds.

        Raises
        ------
        ProfileError
            The profile states no transfer cost.
        """
        if not self.can_transfer:
            raise ProfileError("latency.kv_transfer_base_s", "the profile states no KV-transfer cost",
                               "add kv_transfer_base_s and kv_transfer_per_token_s to its [latency] table")
        return self.kv_transfer_base_s + self.kv_transfer_per_token_s * kv_tokens

    @property
    def can_swap(self) -> bool:
        """Whether the profile states a host-swap cost (``preemption="swap"`` may run on it)."""
        return self.kv_swap_per_token_s is not None

    def swap_time(self, kv_tokens: float) -> float:
        """Seconds to copy ``kv_tokens`` KV-cache tokens to host memory, or back.

        Parameters
        ----------
        kv_tokens
            Tokens copied (the request's prompt and generated tokens), tokens.

        Returns
        -------
        float
            ``kv_swap_per_token_s * kv_tokens``, seconds.

        Raises
        ------
        ProfileError
            The profile states no swap cost.
        """
        if not self.can_swap:
            raise ProfileError("latency.kv_swap_per_token_s", "the profile states no KV swap cost",
                               "add kv_swap_per_token_s (KV bytes per token over the host link bandwidth, "
                               "seconds per token) to its [latency] table")
        return self.kv_swap_per_token_s * kv_tokens

    def scaled(self, prefill: float = 1.0, decode: float = 1.0) -> "LatencyModel":
        """A copy with the prefill and decode coefficients multiplied by the given factors.

        Parameters
        ----------
        prefill
            Factor on ``prefill_base_s`` and ``prefill_per_token_s`` (dimensionless; 2.0 doubles the
            prefill time).
        decode
            Factor on the three decode coefficients (dimensionless).
        """
        return replace(
            self, prefill_base_s=self.prefill_base_s * prefill, prefill_per_token_s=self.prefill_per_token_s * prefill,
            decode_base_s=self.decode_base_s * decode, decode_per_seq_s=self.decode_per_seq_s * decode,
            decode_per_kv_token_s=self.decode_per_kv_token_s * decode,
        )


def transfer_time_between(source: LatencyModel, destination: LatencyModel, kv_tokens: float) -> float:
    """Seconds to move a request's KV cache of ``kv_tokens`` tokens between two instances.

    The slower end sets the pace: the larger of the two profiles' :meth:`LatencyModel.transfer_time`.

    Parameters
    ----------
    source, destination
        Latency models of the two instances.
    kv_tokens
        Tokens in the request's KV cache, tokens.

    Returns
    -------
    float
        Transfer time, seconds.

    Raises
    ------
    ProfileError
        One of the profiles states no transfer cost.
    """
    return max(source.transfer_time(kv_tokens), destination.transfer_time(kv_tokens))


@dataclass(frozen=True)
class HardwareProfile:
    """One model instance on its hardware.

    Attributes
    ----------
    name
        Profile name, e.g. ``"llama-65b"``.
    latency
        The iteration-time model.
    kv_capacity_tokens
        Tokens the KV cache holds across all clients of the instance.
    clients
        Default number of clients (concurrent request slots); a spec may override it.
    description
        Free text: hardware, provenance of the coefficients.
    meta
        Provenance of a fit (targets, residuals); free-form, kept when saved.
    """

    name: str
    latency: LatencyModel
    kv_capacity_tokens: int
    clients: int
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.kv_capacity_tokens, int) or self.kv_capacity_tokens <= 0:
            raise ProfileError("kv_capacity_tokens", f"must be a positive integer, got {self.kv_capacity_tokens!r}",
                               "give the number of tokens the KV cache holds")
        if not isinstance(self.clients, int) or self.clients <= 0:
            raise ProfileError("clients", f"must be a positive integer, got {self.clients!r}",
                               "give the number of concurrent request slots")

    def with_latency(self, latency: LatencyModel, **meta: Any) -> "HardwareProfile":
        """A copy with another latency model (and extra provenance in ``meta``).

        Parameters
        ----------
        latency
            The new iteration-time model (coefficients in seconds, per token or per sequence).
        **meta
            Entries added to (or replacing those of) the profile's ``meta``.
        """
        return replace(self, latency=latency, meta={**self.meta, **meta})

    def to_dict(self) -> dict[str, Any]:
        """A TOML-ready dictionary."""
        out: dict[str, Any] = {
            "name": self.name, "description": self.description,
            "kv_capacity_tokens": self.kv_capacity_tokens, "clients": self.clients,
            "latency": self.latency.coefficients(),
        }
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "profile") -> "HardwareProfile":
        """Build a profile from a parsed TOML document, with named errors on bad fields."""
        if not isinstance(data, dict):
            raise ProfileError(source, "is not a table", "write the profile as a TOML table")
        allowed = {"name", "description", "kv_capacity_tokens", "clients", "latency", "meta"}
        extra = set(data) - allowed
        if extra:
            raise ProfileError(f"{source}.{sorted(extra)[0]}", "unknown key", f"use only {sorted(allowed)}")
        for key in ("name", "kv_capacity_tokens", "clients", "latency"):
            if key not in data:
                raise ProfileError(f"{source}.{key}", "is missing", f"add `{key} = ...` to the profile")
        lat = data["latency"]
        if not isinstance(lat, dict):
            raise ProfileError(f"{source}.latency", "must be a table", "write [latency] with the five coefficients")
        names = set(LatencyModel.__dataclass_fields__)
        missing = set(ITERATION_COEFFICIENTS) - set(lat)
        if missing:
            raise ProfileError(f"{source}.latency.{sorted(missing)[0]}", "is missing", "give all five coefficients")
        unknown = set(lat) - names
        if unknown:
            raise ProfileError(f"{source}.latency.{sorted(unknown)[0]}", "unknown coefficient", f"use only {sorted(names)}")
        return cls(
            name=str(data["name"]), latency=LatencyModel(**lat),
            kv_capacity_tokens=data["kv_capacity_tokens"], clients=data["clients"],
            description=str(data.get("description", "")), meta=dict(data.get("meta", {})),
        )


def _toml_value(value: Any) -> str:
    if hasattr(value, "item") and not isinstance(value, (list, tuple, str)):
        value = value.item()  # numpy scalars: write the plain number, not its repr
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def save_profile(profile: HardwareProfile, path: str | Path) -> Path:
    """Write ``profile`` as TOML to ``path`` (loadable by :func:`load_profile`) and return the path.

    Parameters
    ----------
    profile
        The profile; nested tables in its ``meta`` are not written.
    path
        File to write (overwritten).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    TypeError
        A ``meta`` value that TOML cannot hold (not a bool, number, string or list of them).
    """
    data = profile.to_dict()
    lines = []
    for key in ("name", "description", "kv_capacity_tokens", "clients"):
        lines.append(f"{key} = {_toml_value(data[key])}")
    lines.append("\n[latency]")
    lines += [f"{k} = {_toml_value(v)}" for k, v in data["latency"].items()]
    if "meta" in data:
        lines.append("\n[meta]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in data["meta"].items() if not isinstance(v, dict)]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def builtin_profiles() -> list[str]:
    """Names of the profiles shipped in the package."""
    folder = resources.files("lloptim") / "data"
    return sorted(p.name[: -len(".profile.toml")] for p in folder.iterdir() if p.name.endswith(".profile.toml"))


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """Load a built-in profile by name or a profile TOML file by path.

    Raises
    ------
    ProfileError
        When the name is unknown, there is no (UTF-8, ``.toml``) file at the path, or a field is
        invalid.
    """
    text: str | None = None
    source = str(name_or_path)
    if str(name_or_path) in builtin_profiles():
        text = (resources.files("lloptim") / "data" / f"{name_or_path}.profile.toml").read_text()
    else:
        path = Path(name_or_path).expanduser()
        looks_like_path = path.suffix != "" or len(path.parts) > 1
        if not path.exists() and not looks_like_path:
            raise ProfileError("profile", f"unknown profile {source!r}",
                               f"use one of {builtin_profiles()} or the path of a profile .toml file")
        try:
            text = read_text_file("profile", path, "profile .toml file")
        except SpecError as exc:
            raise ProfileError(exc.field, exc.problem, exc.fix if path.exists() else
                               f"give the path of a profile .toml file (e.g. one written by `lloptim calibrate "
                               f"--out`), or a built-in name: {builtin_profiles()}") from None
        if path.suffix.lower() != ".toml":
            raise ProfileError("profile", f"{source!r} is not a .toml file", "profiles are TOML files ending in .toml")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError("profile", f"{source} is not valid TOML: {exc}", "fix the TOML syntax") from None
    return HardwareProfile.from_dict(data, source="profile")
