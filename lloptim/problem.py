"""The in-memory problem: a workload of requests and the instances that serve it.

These objects are validated on construction, so every later stage (formulations, solvers, the
runtime) can trust them. Arrays are numpy; request ``i`` is row ``i`` everywhere in lloptim, and
``Workload.ids`` maps rows back to the user's identifiers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lloptim.errors import SpecError
from lloptim.hardware import HardwareProfile, load_profile
from lloptim.memory import DEFAULT_BLOCK_TOKENS, DEFAULT_KV_MODE, blocks, check_block_tokens, check_kv_mode

__all__ = ["Workload", "Instance", "Problem"]

MAX_TOKENS = 10_000_000  # a single request beyond this is a unit mistake, not a workload


def _int_array(name: str, values, allow_zero: bool) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise SpecError(name, "must be a one-dimensional sequence", "pass one number per request")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise SpecError(name, "must hold whole numbers of tokens", "round the token counts to integers")
    arr = arr.astype(np.int64)
    lo = 0 if allow_zero else 1
    bad = np.flatnonzero((arr < lo) | (arr > MAX_TOKENS))
    if bad.size:
        i = int(bad[0])
        raise SpecError(f"requests[{i}].{name}", f"is {int(arr[i])}, outside [{lo}, {MAX_TOKENS}]",
                        f"give a token count between {lo} and {MAX_TOKENS}")
    return arr


@dataclass(frozen=True, eq=False)
class Workload:
    """A set of requests, one row each.

    Attributes
    ----------
    prompt_tokens
        Prompt length of each request, tokens (int64, >= 1).
    output_tokens
        True output length of each request, tokens (int64, >= 1): the number of decode iterations
        it takes part in. Online policies may only see estimates of it.
    arrival_s
        Arrival time of each request, seconds from the start (float64, >= 0).
    max_output_tokens
        The output cap the user set on each request (``max_tokens`` of an API call), tokens; 0 where
        none was given (the default). A server knows the cap, never the true length: an instance in
        ``"reserve"`` KV mode reserves ``prompt + cap`` for a capped request and ``prompt +
        estimate`` for an uncapped one (:mod:`lloptim.memory`).
    ids
        The user's identifier of each request (strings).
    name
        Free text naming the workload.
    """

    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    arrival_s: np.ndarray
    max_output_tokens: np.ndarray
    ids: tuple[str, ...]
    name: str = "workload"

    @classmethod
    def from_arrays(cls, prompt_tokens, output_tokens, arrival_s=None, max_output_tokens=None,
                    ids: Sequence | None = None, name: str = "workload") -> "Workload":
        """Build and validate a workload from array-likes (one entry per request)."""
        prompt = _int_array("prompt_tokens", prompt_tokens, allow_zero=False)
        output = _int_array("output_tokens", output_tokens, allow_zero=False)
        n = prompt.size
        if n == 0:
            raise SpecError("requests", "the workload is empty", "give at least one request")
        if output.size != n:
            raise SpecError("output_tokens", f"has {output.size} entries for {n} requests",
                            "give one output length per request")
        if arrival_s is None:
            arrival = np.zeros(n)
        else:
            arrival = np.asarray(arrival_s, dtype=np.float64)
            if arrival.shape != (n,):
                raise SpecError("arrival_s", f"has shape {arrival.shape} for {n} requests", "give one arrival per request")
            bad = np.flatnonzero(~np.isfinite(arrival) | (arrival < 0) | (arrival > 1e9))
            if bad.size:
                i = int(bad[0])
                raise SpecError(f"requests[{i}].arrival_s", f"is {arrival[i]!r}",
                                "give a finite arrival time in seconds, 0 <= arrival_s <= 1e9")
        if max_output_tokens is None:
            cap = np.zeros(n, dtype=np.int64)
        else:
            cap = _int_array("max_output_tokens", max_output_tokens, allow_zero=True)
        if cap.size != n:
            raise SpecError("max_output_tokens", f"has {cap.size} entries for {n} requests", "give one cap per request")
        short = np.flatnonzero((cap > 0) & (cap < output))
        if short.size:
            i = int(short[0])
            raise SpecError(f"requests[{i}].max_output_tokens", f"cap {int(cap[i])} < output_tokens {int(output[i])}",
                            "raise the cap or shorten the output")
        if ids is None:
            id_tuple = tuple(str(i) for i in range(n))
        else:
            id_tuple = tuple(str(x) for x in ids)
            if len(id_tuple) != n:
                raise SpecError("ids", f"has {len(id_tuple)} entries for {n} requests", "give one id per request")
            if len(set(id_tuple)) != n:
                seen: set[str] = set()
                for i, x in enumerate(id_tuple):
                    if x in seen:
                        raise SpecError(f"requests[{i}].id", f"duplicate id {x!r}", "give every request its own id")
                    seen.add(x)
        for a in (prompt, output, arrival, cap):
            a.setflags(write=False)
        return cls(prompt, output, arrival, cap, id_tuple, name)

    def __len__(self) -> int:
        return int(self.prompt_tokens.size)

    @property
    def capped(self) -> np.ndarray:
        """Whether the user set an output cap on each request (bool array)."""
        return self.max_output_tokens > 0

    @property
    def total_output_tokens(self) -> int:
        """Sum of the true output lengths, tokens."""
        return int(self.output_tokens.sum())

    def subset(self, rows: np.ndarray, name: str | None = None) -> "Workload":
        """The workload restricted to ``rows`` (indices), in that order.

        Parameters
        ----------
        rows
            Row indices to keep (repeats would duplicate ids and are rejected).
        name
            Name of the subset; default ``"{name}[{len(rows)}]"``.
        """
        rows = np.asarray(rows, dtype=np.int64)
        return Workload.from_arrays(self.prompt_tokens[rows], self.output_tokens[rows], self.arrival_s[rows],
                                    self.max_output_tokens[rows], [self.ids[i] for i in rows],
                                    name or f"{self.name}[{rows.size}]")

    def with_arrivals(self, arrival_s) -> "Workload":
        """A copy with other arrival times, seconds."""
        return Workload.from_arrays(self.prompt_tokens, self.output_tokens, arrival_s,
                                    self.max_output_tokens, self.ids, self.name)


@dataclass(frozen=True)
class Instance:
    """One model replica: a hardware profile with ``clients`` concurrent request slots.

    Attributes
    ----------
    profile
        Latency model and KV capacity.
    clients
        Number of clients (concurrent request slots), >= 1.
    kv_capacity_tokens
        KV-cache capacity, tokens, across all clients.
    name
        Name used in reports.
    kv_mode
        How the KV cache is managed: ``"paged"`` (blocks allocated as tokens are generated,
        preemption when they run out; vLLM's behaviour, the default) or ``"reserve"`` (prompt plus
        the cap or an estimate reserved at admission); see :mod:`lloptim.memory`.
    kv_block_tokens
        Tokens per KV block (16 by default, as vLLM); the instance holds
        ``kv_capacity_tokens // kv_block_tokens`` blocks.
    """

    profile: HardwareProfile
    clients: int
    kv_capacity_tokens: int
    name: str = "instance-0"
    kv_mode: str = DEFAULT_KV_MODE
    kv_block_tokens: int = DEFAULT_BLOCK_TOKENS

    def __post_init__(self) -> None:
        check_kv_mode(self.kv_mode, f"{self.name}.kv_mode")
        check_block_tokens(self.kv_block_tokens, self.kv_capacity_tokens, f"{self.name}.kv_block_tokens")

    @property
    def kv_blocks(self) -> int:
        """KV blocks of the instance: ``kv_capacity_tokens // kv_block_tokens`` (count)."""
        return self.kv_capacity_tokens // self.kv_block_tokens

    @classmethod
    def from_profile(cls, profile: str | HardwareProfile, clients: int | None = None,
                     kv_capacity_tokens: int | None = None, name: str = "instance-0", kv_mode: str | None = None,
                     kv_block_tokens: int | None = None) -> "Instance":
        """An instance of ``profile`` (a name, a path or a profile), overriding clients, capacity or KV mode."""
        prof = profile if isinstance(profile, HardwareProfile) else load_profile(profile)
        c = prof.clients if clients is None else clients
        kv = prof.kv_capacity_tokens if kv_capacity_tokens is None else kv_capacity_tokens
        for fld, v, fix in (("clients", c, "give at least one client"),
                            ("kv_capacity_tokens", kv, "give the KV-cache capacity in tokens")):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise SpecError(f"{name}.{fld}", f"must be a positive integer, got {v!r}", fix)
        mode = DEFAULT_KV_MODE if kv_mode is None else kv_mode
        block = DEFAULT_BLOCK_TOKENS if kv_block_tokens is None else kv_block_tokens
        if kv_block_tokens is None:
            block = min(block, int(kv))  # a tiny test capacity still gets whole blocks
        return cls(prof, int(c), int(kv), name, check_kv_mode(mode, f"{name}.kv_mode"),
                   check_block_tokens(block, int(kv), f"{name}.kv_block_tokens"))


@dataclass(frozen=True, eq=False)
class Problem:
    """A workload and the instances that serve it.

    Validation checks that every request fits in the KV cache of every instance (a request that
    fits nowhere could never run): ``prompt + max(output, cap)`` tokens, rounded up to whole
    blocks, within the instance's blocks.

    Attributes
    ----------
    workload
        The requests.
    instances
        The instances serving them; global client indices number their clients in this order.
    name
        Name used in reports.
    meta
        Free-form notes of the caller; lloptim does not read it.

    Raises
    ------
    SpecError
        ``workload`` is not a :class:`Workload`, there is no instance, or a request's peak KV need
        exceeds an instance's KV capacity, tokens.
    """

    workload: Workload
    instances: tuple[Instance, ...]
    name: str = "problem"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.workload, Workload):
            raise SpecError("workload", "is not a Workload", "build it with Workload.from_arrays or lloptim.workloads")
        if len(self.instances) == 0:
            raise SpecError("instances", "no instance serves the workload", "add at least one [[instances]] entry")
        self.check_kv_fit()

    def check_kv_fit(self, kv_mode: str | None = None, kv_block_tokens: int | None = None) -> None:
        """Raise a SpecError unless every request can complete on every instance.

        Parameters
        ----------
        kv_mode, kv_block_tokens
            Check under this KV mode / block size instead of each instance's own (a run option
            that overrides the spec).

        Raises
        ------
        SpecError
            A request's peak need (``prompt + max(output, cap)`` tokens, in whole blocks) exceeds an
            instance's KV blocks.
        """
        w = self.workload
        peak = w.prompt_tokens + np.maximum(w.output_tokens, w.max_output_tokens)
        for k, inst in enumerate(self.instances):
            if kv_mode is not None:
                check_kv_mode(kv_mode)
            B = inst.kv_block_tokens if kv_block_tokens is None else check_block_tokens(
                kv_block_tokens, inst.kv_capacity_tokens)
            # a cap beyond the cache is refused in paged mode too, as vLLM refuses prompt + max_tokens
            # beyond max_model_len, which it never lets exceed the KV capacity
            need = peak
            room = (inst.kv_capacity_tokens // B) * B
            too_long = np.flatnonzero(-(-need // B) * B > room)
            if too_long.size:
                i = int(too_long[0])
                what = "prompt + cap" if w.max_output_tokens[i] > w.output_tokens[i] else "prompt + output"
                raise SpecError(f"requests[{i}]", f"needs {int(need[i])} KV tokens ({what}, in blocks of {B}: "
                                f"{blocks(int(need[i]), B) * B}) but instances[{k}] holds only {room}",
                                "raise kv_capacity_tokens or drop/shorten the request")

    @classmethod
    def single(cls, workload: Workload, profile: str | HardwareProfile = "llama-65b", clients: int | None = None,
               kv_capacity_tokens: int | None = None, instances: int = 1, name: str | None = None,
               kv_mode: str | None = None, kv_block_tokens: int | None = None) -> "Problem":
        """A problem with ``instances`` identical instances of ``profile`` (KV mode and block as :class:`Instance`)."""
        if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
            raise SpecError("instances", f"must be a positive integer, got {instances!r}", "give at least one instance")
        insts = tuple(Instance.from_profile(profile, clients, kv_capacity_tokens, name=f"instance-{i}", kv_mode=kv_mode,
                                            kv_block_tokens=kv_block_tokens)
                      for i in range(instances))
        return cls(workload, insts, name or workload.name)

    @property
    def n_requests(self) -> int:
        """Number of requests."""
        return len(self.workload)

    @property
    def n_clients(self) -> int:
        """Clients over all instances."""
        return sum(i.clients for i in self.instances)

    def client_instance(self) -> np.ndarray:
        """For each global client index, the index of its instance (int64 array)."""
        return np.repeat(np.arange(len(self.instances)), [i.clients for i in self.instances])
