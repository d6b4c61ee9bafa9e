"""The in-memory problem: a workload of requests and the instances that serve it.

These objects are validated on construction, so every later stage (formulations, solvers, the
runtime) can trust them. Arrays are numpy; request ``i`` is row ``i`` everywhere in lloptim, and
``Workload.ids`` maps rows back to the user's identifiers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from lloptim.errors import SpecError
from lloptim.hardware import HardwareProfile, load_profile
from lloptim.precedence import Precedence

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
        Output cap the server enforces, tokens; the KV cache reserves ``prompt + cap`` for a running
        request. Defaults to ``output_tokens``.
    ids
        The user's identifier of each request (strings).
    name
        Free text naming the workload.
    precedence
        The workflow DAG (:class:`~lloptim.precedence.Precedence`, in rows): a request can start only
        when all its predecessors have finished. None when the requests are independent.
    """

    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    arrival_s: np.ndarray
    max_output_tokens: np.ndarray
    ids: tuple[str, ...]
    name: str = "workload"
    precedence: Precedence | None = None

    @classmethod
    def from_arrays(cls, prompt_tokens, output_tokens, arrival_s=None, max_output_tokens=None,
                    ids: Sequence | None = None, name: str = "workload", after=None) -> "Workload":
        """Build and validate a workload from array-likes (one entry per request).

        Parameters
        ----------
        prompt_tokens, output_tokens
            Prompt and true output length of each request, tokens.
        arrival_s
            Arrival of each request, seconds; default: all at 0.
        max_output_tokens
            Output cap of each request, tokens; default: the output length.
        ids
            Identifier of each request; default ``"0", "1", ...``.
        name
            Name of the workload.
        after
            Predecessors of each request: one entry per request (None or ``[]`` for none, else a
            list of ids), or a mapping ``id -> [ids]``. A request can start only once all of them
            have finished. Validated here, before any work (see :mod:`lloptim.precedence`).

        Raises
        ------
        SpecError
            An invalid field; a :class:`~lloptim.errors.PrecedenceError` (or its
            :class:`~lloptim.errors.CycleError`) for an unknown id, a self-reference, a duplicate
            or a cycle in ``after``.
        """
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
        cap = output.copy() if max_output_tokens is None else _int_array("max_output_tokens", max_output_tokens, False)
        if cap.size != n:
            raise SpecError("max_output_tokens", f"has {cap.size} entries for {n} requests", "give one cap per request")
        short = np.flatnonzero(cap < output)
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
        precedence = None if after is None else Precedence.from_after(after, id_tuple)
        for a in (prompt, output, arrival, cap):
            a.setflags(write=False)
        return cls(prompt, output, arrival, cap, id_tuple, name, precedence)

    def __len__(self) -> int:
        return int(self.prompt_tokens.size)

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

        Dependencies between kept rows are kept; those on a dropped request are dropped with it.
        """
        rows = np.asarray(rows, dtype=np.int64)
        sub = Workload.from_arrays(self.prompt_tokens[rows], self.output_tokens[rows], self.arrival_s[rows],
                                   self.max_output_tokens[rows], [self.ids[i] for i in rows],
                                   name or f"{self.name}[{rows.size}]")
        if self.precedence is None:
            return sub
        return replace(sub, precedence=self.precedence.subset(rows))

    def with_arrivals(self, arrival_s) -> "Workload":
        """A copy with other arrival times, seconds (dependencies kept)."""
        w = Workload.from_arrays(self.prompt_tokens, self.output_tokens, arrival_s,
                                 self.max_output_tokens, self.ids, self.name)
        return replace(w, precedence=self.precedence)

    def after_ids(self) -> list[list[str]]:
        """The predecessor ids of each request (empty lists when it has none), as ``after`` takes them."""
        if self.precedence is None:
            return [[] for _ in range(len(self))]
        return [[self.ids[q] for q in preds] for preds in self.precedence.predecessors()]


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
    """

    profile: HardwareProfile
    clients: int
    kv_capacity_tokens: int
    name: str = "instance-0"

    @classmethod
    def from_profile(cls, profile: str | HardwareProfile, clients: int | None = None,
                     kv_capacity_tokens: int | None = None, name: str = "instance-0") -> "Instance":
        """An instance of ``profile`` (a name, a path or a profile), overriding clients or capacity."""
        prof = profile if isinstance(profile, HardwareProfile) else load_profile(profile)
        c = prof.clients if clients is None else clients
        kv = prof.kv_capacity_tokens if kv_capacity_tokens is None else kv_capacity_tokens
        for fld, v, fix in (("clients", c, "give at least one client"),
                            ("kv_capacity_tokens", kv, "give the KV-cache capacity in tokens")):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise SpecError(f"{name}.{fld}", f"must be a positive integer, got {v!r}", fix)
        return cls(prof, int(c), int(kv), name)


@dataclass(frozen=True, eq=False)
class Problem:
    """A workload and the instances that serve it.

    Validation checks that every request fits in the KV cache of every instance (a request that
    fits nowhere could never run).

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
        ``workload`` is not a :class:`Workload`, there is no instance, or a request's prompt plus
        output cap exceeds an instance's KV capacity, tokens.
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
        need = self.workload.prompt_tokens + self.workload.max_output_tokens
        for k, inst in enumerate(self.instances):
            too_long = np.flatnonzero(need > inst.kv_capacity_tokens)
            if too_long.size:
                i = int(too_long[0])
                raise SpecError(f"requests[{i}]", f"needs {int(need[i])} KV tokens (prompt + output) but "
                                f"instances[{k}] holds only {inst.kv_capacity_tokens}",
                                "raise kv_capacity_tokens or drop/shorten the request")

    @classmethod
    def single(cls, workload: Workload, profile: str | HardwareProfile = "llama-65b", clients: int | None = None,
               kv_capacity_tokens: int | None = None, instances: int = 1, name: str | None = None) -> "Problem":
        """A problem with ``instances`` identical instances of ``profile``."""
        if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
            raise SpecError("instances", f"must be a positive integer, got {instances!r}", "give at least one instance")
        insts = tuple(Instance.from_profile(profile, clients, kv_capacity_tokens, name=f"instance-{i}")
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
