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
from lloptim.memory import DEFAULT_BLOCK_TOKENS, DEFAULT_KV_MODE, blocks, check_block_tokens, check_kv_mode
from lloptim.precedence import Precedence

__all__ = ["Workload", "Instance", "Problem", "as_problem"]

MAX_TOKENS = 10_000_000  # a single request beyond this is a unit mistake, not a workload


def _int_array(name: str, values, allow_zero: bool) -> np.ndarray:
    """``values`` as a new int64 array of token counts in ``[0 or 1, MAX_TOKENS]`` (one vectorized pass)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise SpecError(name, "must be a one-dimensional sequence", "pass one number per request")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not (np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            raise SpecError(name, "must hold whole numbers of tokens", "round the token counts to integers")
    lo = 0 if allow_zero else 1
    bad = np.flatnonzero((arr < lo) | (arr > MAX_TOKENS))  # on the given dtype: no int64 overflow first
    if bad.size:
        i = int(bad[0])
        raise SpecError(f"requests[{i}].{name}", f"is {arr[i].item()!r}, outside [{lo}, {MAX_TOKENS}]",
                        f"give a token count between {lo} and {MAX_TOKENS}")
    return arr.astype(np.int64)


@dataclass(frozen=True, eq=False)
class Workload:
    """A set of requests, one row each.

    The constructor checks every invariant (one vectorized pass) and stores fresh read-only
    arrays, so no workload lloptim handles can hold a negative length, an arrival at infinity or
    a duplicate id; :meth:`from_arrays` is the convenient way to build one.

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

    def __post_init__(self) -> None:
        # the invariants every later stage relies on, checked here so that no way of building a
        # workload skips them; the arrays are converted to fresh read-only copies
        prompt = _int_array("prompt_tokens", self.prompt_tokens, allow_zero=False)
        n = prompt.size
        if n == 0:
            raise SpecError("requests", "the workload is empty", "give at least one request")
        output = _int_array("output_tokens", self.output_tokens, allow_zero=False)
        if output.size != n:
            raise SpecError("output_tokens", f"has {output.size} entries for {n} requests",
                            "give one output length per request")
        arrival = np.asarray(self.arrival_s)
        if arrival.shape != (n,):
            raise SpecError("arrival_s", f"has shape {arrival.shape} for {n} requests", "give one arrival per request")
        if not (np.issubdtype(arrival.dtype, np.integer) or np.issubdtype(arrival.dtype, np.floating)):
            raise SpecError("arrival_s", f"must hold numbers, got dtype {arrival.dtype}", "give arrival times in seconds")
        arrival = arrival.astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(arrival) | (arrival < 0) | (arrival > 1e9))
        if bad.size:
            i = int(bad[0])
            raise SpecError(f"requests[{i}].arrival_s", f"is {float(arrival[i])!r}",
                            "give a finite arrival time in seconds, 0 <= arrival_s <= 1e9")
        cap = _int_array("max_output_tokens", self.max_output_tokens, True)  # 0: no cap
        if cap.size != n:
            raise SpecError("max_output_tokens", f"has {cap.size} entries for {n} requests", "give one cap per request")
        short = np.flatnonzero((cap > 0) & (cap < output))
        if short.size:
            i = int(short[0])
            raise SpecError(f"requests[{i}].max_output_tokens", f"cap {int(cap[i])} < output_tokens {int(output[i])}",
                            "raise the cap or shorten the output")
        if isinstance(self.ids, (str, bytes)) or not isinstance(self.ids, Sequence | np.ndarray):
            raise SpecError("ids", f"must be a sequence of identifiers, got {type(self.ids).__name__}",
                            "give one id per request")
        id_tuple = tuple(str(x) for x in self.ids)
        if len(id_tuple) != n:
            raise SpecError("ids", f"has {len(id_tuple)} entries for {n} requests", "give one id per request")
        if len(set(id_tuple)) != n:
            seen: set[str] = set()
            for i, x in enumerate(id_tuple):
                if x in seen:
                    raise SpecError(f"requests[{i}].id", f"duplicate id {x!r}", "give every request its own id")
                seen.add(x)
        if not isinstance(self.name, str):
            raise SpecError("name", f"must be a string, got {type(self.name).__name__}", "give the workload a name")
        if self.precedence is not None and not (isinstance(self.precedence, Precedence) and self.precedence.n == n):
            raise SpecError("precedence", f"must be a Precedence over the {n} requests, got {self.precedence!r}"[:300],
                            "give after=... to Workload.from_arrays, or build it with Precedence.from_edges(n, ...)")
        for attr, a in (("prompt_tokens", prompt), ("output_tokens", output), ("arrival_s", arrival),
                        ("max_output_tokens", cap), ("ids", id_tuple)):
            if isinstance(a, np.ndarray):
                a.setflags(write=False)
            object.__setattr__(self, attr, a)

    @classmethod
    def from_arrays(cls, prompt_tokens, output_tokens, arrival_s=None, max_output_tokens=None,
                    ids: Sequence | None = None, name: str = "workload", after=None) -> "Workload":
        """Build and validate a workload from array-likes (one entry per request).

        Parameters
        ----------
        prompt_tokens, output_tokens
            Prompt and true output length of each request, tokens.
        arrival_s
            Arrival time of each request, seconds; default: all at 0.
        max_output_tokens
            Output cap the user set on each request, tokens (0: none); default: none.
        ids
            Identifier of each request; default ``"0"``, ``"1"``, ...
        name
            Name of the workload.
        after
            Predecessors of each request: one entry per request (None or ``[]`` for none, else a
            list of ids), or a mapping ``id -> [ids]``. A request can start only once all of them
            have finished. Validated here, before any work (see :mod:`lloptim.precedence`).

        Raises
        ------
        SpecError
            Any invariant of :class:`Workload` broken (the constructor checks them); a
            :class:`~lloptim.errors.PrecedenceError` (or its :class:`~lloptim.errors.CycleError`)
            for an unknown id, a self-reference, a duplicate or a cycle in ``after``.
        """
        prompt = np.asarray(prompt_tokens)
        n = prompt.shape[0] if prompt.ndim == 1 else 0
        w = cls(prompt, output_tokens, np.zeros(n) if arrival_s is None else arrival_s,
                np.zeros(n, dtype=np.int64) if max_output_tokens is None else max_output_tokens,
                tuple(str(i) for i in range(n)) if ids is None else tuple(ids), name)
        if after is None:
            return w
        # the dependencies are checked against the validated ids (unknown, self, duplicate, cycle)
        return replace(w, precedence=Precedence.from_after(after, w.ids))

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
    kv_mode
        How the KV cache is managed: ``"paged"`` (blocks allocated as tokens are generated,
        preemption when they run out; vLLM's behaviour, the default) or ``"reserve"`` (prompt plus
        the cap or an estimate reserved at admission); see :mod:`lloptim.memory`.
    kv_block_tokens
        Tokens per KV block (16 by default, as vLLM; a smaller capacity makes the default the
        capacity); the instance holds ``kv_capacity_tokens // kv_block_tokens`` blocks.
    """

    profile: HardwareProfile
    clients: int
    kv_capacity_tokens: int
    name: str = "instance-0"
    kv_mode: str = DEFAULT_KV_MODE
    kv_block_tokens: int = DEFAULT_BLOCK_TOKENS

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise SpecError("instance.name", f"must be a string, got {type(self.name).__name__}", "name the instance")
        if not isinstance(self.profile, HardwareProfile):
            raise SpecError(f"{self.name}.profile", f"must be a HardwareProfile, got {type(self.profile).__name__}",
                            "use Instance.from_profile(name_or_path, ...) or lloptim.load_profile")
        for fld, fix in (("clients", "give at least one client"),
                         ("kv_capacity_tokens", "give the KV-cache capacity in tokens")):
            v = getattr(self, fld)
            if type(v) is not int:  # the common case costs one comparison: specs build 100,000 instances
                if isinstance(v, (bool, np.bool_)) or not isinstance(v, np.integer):
                    raise SpecError(f"{self.name}.{fld}", f"must be a positive integer, got {v!r}", fix)
                v = int(v)
                object.__setattr__(self, fld, v)
            if v < 1:
                raise SpecError(f"{self.name}.{fld}", f"must be a positive integer, got {v!r}", fix)
        if self.kv_mode != DEFAULT_KV_MODE:
            check_kv_mode(self.kv_mode, f"{self.name}.kv_mode")
        if self.kv_block_tokens == DEFAULT_BLOCK_TOKENS and self.kv_capacity_tokens < DEFAULT_BLOCK_TOKENS:
            object.__setattr__(self, "kv_block_tokens", self.kv_capacity_tokens)  # a tiny cache is one block
        elif type(self.kv_block_tokens) is not int or not 1 <= self.kv_block_tokens <= self.kv_capacity_tokens:
            object.__setattr__(self, "kv_block_tokens", check_block_tokens(
                self.kv_block_tokens, self.kv_capacity_tokens, f"{self.name}.kv_block_tokens"))

    @property
    def kv_blocks(self) -> int:
        """KV blocks of the instance: ``kv_capacity_tokens // kv_block_tokens`` (count)."""
        return self.kv_capacity_tokens // self.kv_block_tokens

    @classmethod
    def from_profile(cls, profile: str | HardwareProfile, clients: int | None = None,
                     kv_capacity_tokens: int | None = None, name: str = "instance-0", kv_mode: str | None = None,
                     kv_block_tokens: int | None = None) -> "Instance":
        """An instance of ``profile`` (a name, a path or a profile), overriding clients, capacity or KV mode.

        Parameters
        ----------
        profile
            Built-in profile name, profile file path, or :class:`~lloptim.hardware.HardwareProfile`.
        clients, kv_capacity_tokens
            Overrides of the profile's clients (count) and KV capacity (tokens).
        name
            Name of the instance.
        kv_mode, kv_block_tokens
            KV mode and tokens per block (None: paged, 16).
        """
        prof = profile if isinstance(profile, HardwareProfile) else load_profile(profile)
        return cls(prof, prof.clients if clients is None else clients,
                   prof.kv_capacity_tokens if kv_capacity_tokens is None else kv_capacity_tokens, name,
                   DEFAULT_KV_MODE if kv_mode is None else kv_mode,
                   DEFAULT_BLOCK_TOKENS if kv_block_tokens is None else kv_block_tokens)


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
            raise SpecError("workload", f"must be a Workload, got {type(self.workload).__name__}",
                            "build it with Workload.from_arrays or lloptim.workloads")
        if isinstance(self.instances, Instance) or not isinstance(self.instances, (tuple, list)):
            raise SpecError("instances", f"must be a tuple of Instance, got {type(self.instances).__name__}",
                            "pass (Instance.from_profile(...), ...), or use Problem.single")
        object.__setattr__(self, "instances", tuple(self.instances))
        if len(self.instances) == 0:
            raise SpecError("instances", "no instance serves the workload", "add at least one [[instances]] entry")
        for k, inst in enumerate(self.instances):
            if not isinstance(inst, Instance):
                raise SpecError(f"instances[{k}]", f"must be an Instance, got {type(inst).__name__}",
                                "build it with Instance.from_profile(profile, clients)")
        if not isinstance(self.name, str):
            raise SpecError("name", f"must be a string, got {type(self.name).__name__}", "give the problem a name")
        self.check_kv_fit()

    def check_kv_fit(self, kv_mode: str | None = None, kv_block_tokens: int | None = None) -> None:
        """Raise a SpecError unless every request can complete on every instance.

        A cap beyond the cache is refused in paged mode too, as vLLM refuses ``prompt +
        max_tokens`` beyond a ``max_model_len`` it never lets exceed the KV capacity.

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
        if kv_mode is not None:
            check_kv_mode(kv_mode)
        w = self.workload
        need = w.prompt_tokens + np.maximum(w.output_tokens, w.max_output_tokens)
        largest = int(need.max())
        checked: set[tuple[int, int]] = set()
        for k, inst in enumerate(self.instances):
            B = inst.kv_block_tokens if kv_block_tokens is None else check_block_tokens(
                kv_block_tokens, inst.kv_capacity_tokens)
            room = (inst.kv_capacity_tokens // B) * B
            if (room, B) in checked or blocks(largest, B) * B <= room:  # the search only on failure
                checked.add((room, B))
                continue
            i = int(np.flatnonzero(-(-need // B) * B > room)[0])
            what = "prompt + cap" if w.max_output_tokens[i] > w.output_tokens[i] else "prompt + output"
            raise SpecError(f"requests[{i}]", f"needs {int(need[i])} KV tokens ({what}, in blocks of {B}: "
                            f"{blocks(int(need[i]), B) * B}) but instances[{k}] holds only {room}",
                            "raise kv_capacity_tokens or drop/shorten the request")

    @classmethod
    def single(cls, workload: Workload, profile: str | HardwareProfile = "llama-65b", clients: int | None = None,
               kv_capacity_tokens: int | None = None, instances: int = 1, name: str | None = None,
               kv_mode: str | None = None, kv_block_tokens: int | None = None) -> "Problem":
        """A problem with ``instances`` identical instances of ``profile``.

        Parameters
        ----------
        workload
            The requests.
        profile
            Built-in profile name, profile file path, or :class:`~lloptim.hardware.HardwareProfile`.
        clients, kv_capacity_tokens
            Overrides of the profile's clients (count) and KV capacity (tokens).
        instances
            Identical instances (count).
        name
            Name of the problem; default: the workload's.
        kv_mode, kv_block_tokens
            KV mode and tokens per block of the instances (see :class:`Instance`).
        """
        if not isinstance(workload, Workload):
            raise SpecError("workload", f"must be a Workload, got {type(workload).__name__}",
                            "build it with Workload.from_arrays or lloptim.workloads, e.g. workloads.gsm8k('test')")
        if isinstance(instances, bool) or not isinstance(instances, (int, np.integer)) or instances < 1:
            raise SpecError("instances", f"must be a positive integer, got {instances!r}", "give at least one instance")
        first = Instance.from_profile(profile, clients, kv_capacity_tokens, name="instance-0", kv_mode=kv_mode,
                                      kv_block_tokens=kv_block_tokens)
        insts = (first,) + tuple(replace(first, name=f"instance-{i}") for i in range(1, int(instances)))
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


def as_problem(value, field: str = "problem") -> "Problem":
    """``value`` if it is a :class:`Problem`; else a :class:`~lloptim.errors.SpecError` naming ``field``.

    Entry points (:func:`lloptim.simulate`, :func:`lloptim.lower_bound`, :func:`lloptim.solvers.solve`)
    call it first, so a wrong argument is named instead of failing deep inside.

    Parameters
    ----------
    value
        What the caller passed.
    field
        The parameter's name, for the message.

    Returns
    -------
    Problem
        ``value``.
    """
    if not isinstance(value, Problem):
        raise SpecError(field, f"must be a Problem, got {type(value).__name__}",
                        "build one with Problem.single(workload, profile) or lloptim.load_spec(path)")
    return value
