"""The runtime engine: runs instances iteration by iteration, asking a policy what to do.

The engine owns the scheduling state (which client holds which request, the KV-cache accounting,
the clock of each instance), asks the :class:`~lloptim.runtime.policy.Policy` for its two decisions,
has a backend execute each iteration, and records a trace. With
:class:`~lloptim.backends.simulated.SimulatedBackend` it is the discrete-event simulator; with the
torch backend it serves a real model.

Model of one instance (``../shared/design/paper.md``): iterations run one after another; a prefill
starts waiting clients, a decode advances every running client by one token, a mixed iteration does
both (chunked prefill). A request that needs ``o`` output tokens takes part in ``o`` decode steps.
Because every decode step advances all running clients, a request prefilled before step ``g``
finishes at step ``g + o``: the engine keeps those finish steps in a heap, so a decode costs O(1)
plus O(log n) per finishing request, whatever the batch size.

**Readiness.** The engine alone decides when a request becomes schedulable: at its arrival, or, for
a request with predecessors (:attr:`~lloptim.problem.Workload.precedence`), when the last of them
has finished, if that is later. It keeps the coming ready times
(:class:`~lloptim.runtime.readiness.ReadyTimes`, shared with the real engines of
:mod:`lloptim.engines`) and tells the request scheduler of each request exactly once, in time
order, through
:meth:`~lloptim.runtime.policy.RequestScheduler.on_ready`, before any instance whose clock has
reached that time asks it for work (instances run in clock order, so the clock of the instance
being served never goes back). A scheduler therefore never sees a request before it is ready, and
a policy needs no arrival time of the future.

KV memory (:mod:`lloptim.memory`): each instance has ``kv_capacity_tokens // block`` blocks; a
request holds ``ceil(max(tokens, floor) / block)`` of them (``floor`` = 0 in paged mode, its
reservation in reserve mode). A running request needs a new block at the step where its tokens
cross a block boundary; all running requests advance together, so the requests that cross at
step ``s`` are those whose ``tokens - s`` has one residue modulo the block: the engine counts
running requests per residue and knows the blocks the next step needs in O(1). Before every
decision it preempts running requests (:mod:`lloptim.runtime.kv`) until the next decode step
fits, so a policy always decides on a state whose next decode can run; a preempted request waits
at the head of its instance's queue and is prefilled again with its prompt and the tokens it had
generated (recompute), then decodes its remaining tokens.

**Swap** (``preemption="swap"``, vLLM's other mode): a victim whose cache fits the instance's host
swap space (``swap_space_tokens``, in blocks of the instance's block size) has its cache copied out
(``kv_swap_per_token_s`` per token, a stall of the instance recorded as a swap iteration) instead
of dropped. It waits first in line as a recomputed victim does, and the policy resumes it the same
way, by a prefill or prompt chunks of its context; the engine then copies those tokens back (the
same per-token cost, added to that iteration) instead of computing them: no prefill compute, no
recomputed token. When the host space cannot hold the victim, it is recomputed as above. Policies
need no change: to them a swapped request is a waiting request whose prefill happens to be cheap.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from lloptim.backends.base import InstanceLost
from lloptim.errors import PolicyError, SpecError
from lloptim.memory import blocks, check_block_tokens, check_kv_mode, reservation_tokens
from lloptim.problem import Problem
from lloptim.runtime.clocks import InstanceClocks, wake_time
from lloptim.runtime.kv import PREEMPTION_MODES, check_victim_rule, choose_victim
from lloptim.runtime.policy import Decode, Mixed, Policy, Prefill, RunContext, output_estimates
from lloptim.runtime.readiness import ReadyTimes
from lloptim.validation import check_int, check_number

__all__ = ["Engine", "InstanceState", "RunResult", "Fault", "IDLE", "WAITING", "RUNNING", "FAILED"]

#: Client states of ``RunContext.extra["client_state"]`` (a list indexed by global client): no request
#: (``IDLE``), holding a request not yet fully prefilled (``WAITING``), decoding (``RUNNING``), failed
#: for good (``FAILED``).
IDLE, WAITING, RUNNING, FAILED = 0, 1, 2, 3
KIND_PREFILL, KIND_DECODE, KIND_MIXED, KIND_MIGRATE, KIND_SWAP = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class Fault:
    """A failure at ``time_s`` seconds: one client of ``instance``, or the whole instance if ``client`` is None.

    ``client`` is a global client index. The failed clients never serve again; their unfinished
    requests go back to the request scheduler and restart from their prefill.

    Attributes
    ----------
    time_s
        When the failure happens, seconds on the instance clock; applied before the first iteration
        that starts at or after it.
    instance
        Index of the instance that fails.
    client
        Global index of the failing client (a client of ``instance``), or None for every client of
        the instance.
    """

    time_s: float
    instance: int
    client: int | None = None

    def __post_init__(self) -> None:
        check_number("faults.time_s", self.time_s, lo=0, fix="give a failure time in seconds from the start, >= 0")
        check_int("faults.instance", self.instance, lo=0, fix="give an instance index, 0 for the first")
        if self.client is not None:
            check_int("faults.client", self.client, lo=0, fix="give a global client index, or none for the whole "
                      "instance")


class InstanceState:
    """Read-only view of one instance that policies decide on. Do not mutate.

    Parameters
    ----------
    engine
        The :class:`Engine` that owns the state (its per-client arrays back :meth:`request_of`).
    index
        Instance index.
    clients
        Global indices of the instance's clients.
    kv_capacity
        KV-cache capacity, tokens.
    latency
        The instance's :class:`~lloptim.hardware.LatencyModel`.
    kv_mode
        ``"paged"`` or ``"reserve"`` (:mod:`lloptim.memory`).
    kv_block
        Tokens per KV block.

    Attributes
    ----------
    index
        Instance index.
    clients
        Global indices of its clients.
    now
        The instance clock, seconds.
    n_running
        Clients decoding.
    kv_tokens
        Tokens in the KV caches of the running clients (what a decode step reads).
    kv_capacity
        KV-cache capacity, tokens.
    kv_mode
        ``"paged"`` or ``"reserve"``.
    kv_block
        Tokens per KV block.
    kv_blocks
        KV blocks of the instance (count): ``kv_capacity // kv_block``.
    kv_used
        Blocks held by running and partly prefilled requests (count).
    kv_peak
        Most blocks held at once so far (count).
    kv_unbound
        Whether the cache holds the largest requests of all its clients at once, at their peaks
        (then no admission can fail and no decode step can preempt; helpers skip the KV checks).
    waiting
        Clients holding a request that is not yet fully prefilled, in the order they got it (an
        insertion-ordered dict used as an ordered set).
    idle
        Clients with no request (ordered set).
    prefilled
        Prompt tokens already processed for partly prefilled clients (chunked prefill).
    decode_steps
        Decode steps run so far.
    latency
        The instance's :class:`~lloptim.hardware.LatencyModel`.
    """

    __slots__ = ("index", "clients", "now", "n_running", "kv_tokens", "kv_capacity", "waiting",
                 "idle", "prefilled", "decode_steps", "latency", "engine", "heap", "alive", "dirty",
                 "kv_mode", "kv_block", "kv_blocks", "kv_used", "kv_peak", "residue", "floor_heap", "admitted",
                 "floors", "kv_unbound")

    def __init__(self, engine: "Engine", index: int, clients: range, kv_capacity: int, latency,
                 kv_mode: str = "paged", kv_block: int = 16) -> None:
        self.engine = engine
        self.index = index
        self.clients = clients
        self.now = 0.0
        self.n_running = 0
        self.kv_tokens = 0
        self.kv_capacity = kv_capacity
        self.kv_mode = kv_mode
        self.kv_block = kv_block
        self.kv_blocks = kv_capacity // kv_block
        self.kv_used = 0
        self.kv_peak = 0
        # running requests past their reservation, by (tokens - decode_steps) mod block
        self.residue = [0] * kv_block
        # (decode step at which a running request's tokens reach its reservation, client, epoch)
        self.floor_heap: list[tuple[int, int, int]] = []
        # (admission number, client, epoch) of running requests in admission order (stale entries skipped)
        self.admitted: list[tuple[int, int, int]] = []
        # reservations per request in reserve mode (None in paged mode)
        self.floors = engine.reserve_floor if kv_mode == "reserve" else None
        # whether this cache holds every request its clients can hold at once at their peaks: then no
        # admission can fail and no step can preempt, and the helpers skip their checks (same outcome)
        self.kv_unbound = False
        self.waiting: dict[int, None] = {}
        self.idle: dict[int, None] = dict.fromkeys(clients)
        self.prefilled: dict[int, int] = {}
        self.decode_steps = 0
        self.latency = latency
        self.heap: list[tuple[int, int, int]] = []
        self.alive = len(clients)
        self.dirty = True

    def request_of(self, client: int) -> int:
        """Request held by ``client`` (-1 if none)."""
        return self.engine.client_request[client]

    def reservation(self, client: int) -> int:
        """KV tokens that prefilling ``client``'s waiting request takes and its first decode step needs."""
        return self.admission_blocks(client) * self.kv_block

    @property
    def kv_free(self) -> int:
        """KV tokens in free blocks (``kv_free_blocks x kv_block``)."""
        return (self.kv_blocks - self.kv_used) * self.kv_block

    @property
    def kv_free_blocks(self) -> int:
        """Free KV blocks (count)."""
        return self.kv_blocks - self.kv_used

    def context(self, client: int) -> int:
        """Tokens the prefill of ``client``'s request processes: its prompt, plus what it had generated if preempted."""
        return self.engine.context[self.engine.client_request[client]]

    def floor_tokens(self, request: int) -> int:
        """Tokens ``request`` reserves on this instance (0 in paged mode)."""
        return self.floors[request] if self.floors is not None else 0

    def held_blocks(self, request: int, tokens: int) -> int:
        """Blocks ``request`` occupies on this instance when its cache holds ``tokens`` tokens.

        Parameters
        ----------
        request
            Row index of the request.
        tokens
            Tokens in its cache; in reserve mode its reservation floor applies if larger.

        Returns
        -------
        int
            KV blocks held (count).
        """
        floors = self.floors
        if floors is not None and floors[request] > tokens:
            tokens = floors[request]
        return -(-tokens // self.kv_block)

    def admission_blocks(self, client: int, lookahead: int = 1) -> int:
        """More blocks ``client``'s waiting request needs to finish its prefill and take ``lookahead`` decode steps.

        Parameters
        ----------
        client
            A client of this instance with a waiting request.
        lookahead
            Decode steps after the prefill the blocks must cover (count).

        Returns
        -------
        int
            KV blocks beyond those it already holds (count; a partly prefilled request holds some).
        """
        engine = self.engine
        r = engine.client_request[client]
        done = self.prefilled.get(client, 0)
        have = self.held_blocks(r, done) if client in self.prefilled else 0
        return self.held_blocks(r, engine.context[r] + lookahead) - have

    def growth_blocks(self) -> int:
        """Blocks the next decode step of the running requests needs (count; O(1))."""
        heap = self.floor_heap
        step = self.decode_steps
        if heap and heap[0][0] <= step:
            self.engine._register_floor_crossers(self)
        return self.residue[-step % self.kv_block]


@dataclass
class RunResult:
    """Everything a run produced. Times in seconds, tokens in tokens.

    Per-request arrays are indexed by request row; trace arrays by iteration, in the order the
    iterations ran (instances interleaved; each instance's own iterations in time order).

    Attributes
    ----------
    problem
        The problem that was served.
    policy
        Name of the policy.
    backend
        Name of the backend that executed the iterations.
    known_lengths
        Whether the policy saw the true output lengths (rather than estimates).
    client
        Global index of the client that served each request (int64; -1 if none).
    assign_s
        When each request was handed to its client, seconds (NaN if never).
    prefill_start_s
        Start of each request's (first chunk of) prefill, seconds (NaN if never).
    prefill_end_s
        End of each request's prefill, when it starts decoding, seconds (NaN if never).
    done_s
        When each request finished, seconds (NaN if it did not).
    restarts
        Times each request was taken back by a fault and restarted from its prefill (count, int64).
    preemptions
        Times each request was preempted for KV memory and recomputed (count, int64).
    migrations
        Times each running request moved to another instance with its KV cache (count, int64;
        see :mod:`lloptim.runtime.migration`).
    ready_s
        When each request became schedulable, seconds: its arrival, or its last predecessor's
        finish if later (NaN if never).
    trace_instance
        Instance index of each iteration (int32).
    trace_kind
        Kind of each iteration (int8): 0 prefill, 1 decode, 2 mixed (fused decode and prefill chunks),
        3 migration (a running request's KV cache arriving from another instance; the destination
        instance stalls for the transfer, and the migrating client is its only participant),
        4 swap (a preempted request's KV cache copied to host memory, or a resume that only copies
        swapped caches back; the instance stalls for the copy).
    trace_start_s
        Start of each iteration on its instance clock, seconds.
    trace_duration_s
        Duration of each iteration, seconds.
    trace_participants
        Number of clients each iteration worked on (int32): the prefilled clients, the running
        clients, or both for a mixed iteration.
    trace_prefill_tokens
        Prompt tokens each iteration processed (int64; 0 for a decode).
    trace_running
        Clients decoding when each iteration started (int32), excluding the ones it prefills (0
        for a swap, in which nothing decodes).
    trace_kv_tokens
        KV memory allocated during each iteration (int64): blocks held x block tokens, tokens.
    decision_ns
        Wall time of each iteration decision of the policy, nanoseconds (int64; empty unless
        decisions were measured).
    generated_tokens
        Output tokens of the finished requests, tokens.
    wasted_tokens
        Output tokens decoded for requests a fault then took back, tokens.
    recomputed_tokens
        KV tokens prefilled again after preemptions (the victims' prompts and generated tokens), tokens.
    swapped_out_tokens
        KV tokens copied to host memory by swap preemptions (``preemption="swap"``), tokens.
    swapped_in_tokens
        KV tokens copied back from host memory when swapped requests resumed, tokens.
    swap_s
        Time the instances spent copying KV caches to and from host memory, seconds (summed over
        instances; part of their iterations, so of the makespan).
    requeued
        Number of times a fault handed a request back to the request scheduler (count).
    failed_clients
        Number of clients that failed during the run (count).
    wall_s
        Wall-clock time of the run, seconds.
    extra
        Backend and engine details: ``"lost_instances"``, the number of instances whose backend
        reported them lost mid-iteration (count); ``"kv_mode"`` and ``"kv_block_tokens"`` of each
        instance; ``"kv_peak_tokens"``, the most KV memory each instance held at once (tokens);
        ``"preemption"``, the preemption mode; with ``"swap"``, ``"swap_space_tokens"`` and
        ``"swap_peak_tokens"``, each instance's host swap space and the most of it held at once
        (tokens, whole blocks).
    """

    problem: Problem
    policy: str
    backend: str
    known_lengths: bool
    client: np.ndarray
    assign_s: np.ndarray
    prefill_start_s: np.ndarray
    prefill_end_s: np.ndarray
    done_s: np.ndarray
    restarts: np.ndarray
    migrations: np.ndarray
    ready_s: np.ndarray
    trace_instance: np.ndarray
    trace_kind: np.ndarray
    trace_start_s: np.ndarray
    trace_duration_s: np.ndarray
    trace_participants: np.ndarray
    trace_prefill_tokens: np.ndarray
    trace_running: np.ndarray
    decision_ns: np.ndarray
    generated_tokens: int
    wasted_tokens: int
    requeued: int
    failed_clients: int
    wall_s: float
    extra: dict = field(default_factory=dict)
    preemptions: np.ndarray | None = None
    recomputed_tokens: int = 0
    trace_kv_tokens: np.ndarray | None = None
    swapped_out_tokens: int = 0
    swapped_in_tokens: int = 0
    swap_s: float = 0.0

    @property
    def makespan_s(self) -> float:
        """Time the last request finished, seconds."""
        return float(self.done_s.max()) if self.done_s.size else 0.0


class Engine:
    """Runs a problem under a policy on a backend.

    Parameters
    ----------
    problem
        What to serve.
    policy
        The two schedulers.
    backend
        Executes iterations; default: the simulated backend.
    estimates
        Output-length estimates the policy sees, tokens; default: the truth.
    faults
        Failures to inject.
    measure_decisions
        Time every iteration decision (``perf_counter_ns``) for the decision-latency report.
    seed
        Passed to the policy.
    kv_mode
        ``"paged"`` or ``"reserve"`` for every instance (:mod:`lloptim.memory`); None: each
        instance's own (its spec's ``kv_mode``, paged by default).
    kv_block_tokens
        Tokens per KV block for every instance; None: each instance's own.
    preemption
        What preempting a running request does: ``"recompute"`` (vLLM's default; a backend without
        :meth:`~lloptim.backends.base.SupportsPreemption.preempt` restarts the victim from its
        prompt instead, and its generated tokens count as wasted) or ``"swap"`` (its cache goes to
        host memory and comes back when it resumes, see the module docstring; needs every
        profile's ``kv_swap_per_token_s`` and a backend with
        :class:`~lloptim.backends.base.SupportsSwap`; recompute when the host space is full).
    swap_space_tokens
        Host memory each instance keeps for swapped-out caches, tokens (rounded down to whole
        blocks; vLLM's ``swap_space`` GiB over the KV bytes per token); None: as large as the
        instance's KV cache. Only read with ``preemption="swap"``.
    victim
        Which running request a preemption takes unless the policy chooses
        (:data:`~lloptim.runtime.kv.VICTIM_RULES`; default vLLM's ``"newest"``).
    check
        Verify the KV accounting after every iteration (blocks held = blocks of the requests that
        hold them, never above the capacity; slow, for tests and debugging).
    """

    def __init__(self, problem: Problem, policy: Policy, backend=None, estimates: np.ndarray | None = None,
                 faults: Sequence[Fault] = (), measure_decisions: bool = True, seed: int = 0,
                 kv_mode: str | None = None, kv_block_tokens: int | None = None, preemption: str = "recompute",
                 victim: str = "newest", check: bool = False, swap_space_tokens: int | None = None) -> None:
        if backend is None:
            from lloptim.backends.simulated import SimulatedBackend
            backend = SimulatedBackend(problem)
        self.problem = problem
        self.policy = policy
        self.backend = backend
        w = problem.workload
        n = len(w)
        est, known = output_estimates(estimates, w.output_tokens)
        self.ctx = RunContext(problem, est, known, problem.client_instance(), seed)
        n_inst = len(problem.instances)
        for f in faults:
            if not (0 <= f.instance < n_inst):
                raise SpecError("faults.instance", f"no instance {f.instance}", f"use 0..{n_inst - 1}")
            if f.client is not None and not (0 <= f.client < problem.n_clients
                                             and self.ctx.client_instance[f.client] == f.instance):
                raise SpecError("faults.client", f"client {f.client} is not on instance {f.instance}",
                                "give a global client index of that instance")
        self.faults = sorted(faults, key=lambda f: f.time_s)
        self.measure = measure_decisions
        if kv_mode is not None:
            check_kv_mode(kv_mode, "kv_mode")
        if preemption not in PREEMPTION_MODES:
            raise SpecError("preemption", f"unknown preemption mode {preemption!r}", f"use one of {list(PREEMPTION_MODES)}")
        self.victim_rule = check_victim_rule(victim)
        self.preemption = preemption
        self.check = check
        self.kv_modes = [inst.kv_mode if kv_mode is None else kv_mode for inst in problem.instances]
        self.kv_block_sizes = [inst.kv_block_tokens if kv_block_tokens is None else
                               check_block_tokens(kv_block_tokens, inst.kv_capacity_tokens)
                               for inst in problem.instances]
        if kv_mode is not None or kv_block_tokens is not None:
            problem.check_kv_fit(kv_mode, kv_block_tokens)
        if swap_space_tokens is not None:
            check_int("swap_space_tokens", swap_space_tokens, lo=0,
                      fix="give the host memory for swapped KV caches in tokens, >= 0")
        if preemption == "swap":
            self._check_swap(backend)
        # host blocks each instance keeps for swapped-out caches (read only with preemption="swap")
        self.swap_blocks = [(inst.kv_capacity_tokens if swap_space_tokens is None else int(swap_space_tokens)) // b
                            for inst, b in zip(problem.instances, self.kv_block_sizes)]
        self.ctx.extra["kv_mode"] = list(self.kv_modes)  # what policies plan with (the run may override the spec)
        self.ctx.extra["kv_block_tokens"] = list(self.kv_block_sizes)
        # plain lists: scalar access in the hot loop is several times faster than numpy
        self.prompt = w.prompt_tokens.tolist()
        self.output = w.output_tokens.tolist()
        # what a server knows: the user's cap, else the policy's estimate (never the true length);
        # clipped to the smallest instance so an over-estimate cannot make a request unservable
        room = min(inst.kv_blocks * inst.kv_block_tokens for inst in problem.instances)
        self.reserve_floor = np.minimum(reservation_tokens(w.prompt_tokens, w.max_output_tokens, est),
                                        room).tolist()
        # tokens a prefill of each request processes: the prompt, plus the output generated before a preemption
        self.context = list(self.prompt)
        self.generated_before = [0] * n
        self.client_request = [-1] * problem.n_clients
        self.client_state = [IDLE] * problem.n_clients
        self.ctx.extra["client_state"] = self.client_state  # read-only view for schedulers (FAILED = 3)
        self.client_start_step = [0] * problem.n_clients
        self.client_epoch = [0] * problem.n_clients
        self.client_residue = [-1] * problem.n_clients  # residue class of a running client past its floor
        self._admissions = 0
        # when each request becomes schedulable (arrival, or its predecessors' finish), in time order;
        # the arrivals are read here, once: a policy learns them from on_ready only
        self.readiness = ReadyTimes(w)

    def _check_swap(self, backend) -> None:
        """Refuse ``preemption="swap"`` before any work where a profile or the backend cannot swap."""
        for k, inst in enumerate(self.problem.instances):
            if not inst.profile.latency.can_swap:
                raise SpecError("latency.kv_swap_per_token_s",
                                f"profile {inst.profile.name!r} of instance {k} states no KV swap cost",
                                "add kv_swap_per_token_s (KV bytes per token over the host link bandwidth, seconds "
                                "per token) to its [latency] table, or use preemption recompute")
        if not (callable(getattr(backend, "swap_out", None)) and callable(getattr(backend, "swap_in", None))):
            raise SpecError("preemption", f"the {getattr(backend, 'name', type(backend).__name__)} backend cannot "
                            "swap KV caches to host memory", "use preemption recompute (the default), or the "
                            "simulated backend")

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Serve every request; return the :class:`RunResult`."""
        t_wall = time.perf_counter()
        problem, policy, backend = self.problem, self.policy, self.backend
        policy.setup(self.ctx)
        rs, its = policy.requests, policy.iterations
        migration = policy.migration if len(problem.instances) > 1 else None
        if migration is not None and not callable(getattr(backend, "migrate", None)):
            raise SpecError("backend", f"the {getattr(backend, 'name', type(backend).__name__)} backend cannot "
                            "migrate running requests between instances",
                            "use the simulated or torch backend, or a policy without migration")
        n = problem.n_requests
        self.assign_s = np.full(n, np.nan)
        self.prefill_start_s = np.full(n, np.nan)
        self.prefill_end_s = np.full(n, np.nan)
        self.done_s = np.full(n, np.nan)
        self.req_client = np.full(n, -1, dtype=np.int64)
        self.restarts = np.zeros(n, dtype=np.int64)
        self.migrations = np.zeros(n, dtype=np.int64)
        self.preemptions = np.zeros(n, dtype=np.int64)
        self.recomputed = 0
        # swap: host blocks held per instance, and the KV tokens each request has there (0: none)
        self.swap_used = [0] * len(problem.instances)
        self.swap_peak = [0] * len(problem.instances)
        self.swapped = [0] * n
        self.swapped_out = 0
        self.swapped_in = 0
        self.swap_s = 0.0
        self.can_preempt = callable(getattr(backend, "preempt", None))
        self.readiness.restart()
        self.trace: list[tuple] = []
        self.decisions: list[int] = []
        self.n_done = 0
        self.generated = 0
        self.wasted = 0
        self.requeued = 0
        self.failed_clients = 0
        self.lost_instances = 0
        states = []
        for k, inst in enumerate(problem.instances):
            st = InstanceState(self, k, self.ctx.instance_clients(k), inst.kv_capacity_tokens,
                               inst.profile.latency, self.kv_modes[k], self.kv_block_sizes[k])
            st.kv_unbound = self._never_binds(st)
            states.append(st)
        self.states = states
        pending_faults = {k: [f for f in self.faults if f.instance == k] for k in range(len(states))}
        # the instances in order of (clock, idle, index): busy instances at a time step before idle ones
        active = InstanceClocks(len(states))
        retired: set[int] = set()
        self.retired = retired
        self.active = active
        while self.n_done < n:
            if not active and self.failed_clients == problem.n_clients:
                raise SpecError("faults", f"{n - self.n_done} requests were never served: the faults took down "
                                f"every client ({self.failed_clients})", "leave at least one client alive, or fail "
                                "later")
            if not active:
                raise PolicyError(f"{n - self.n_done} requests were never served: the request scheduler "
                                  f"{type(rs).__name__} kept {rs.pending()} pending with every client idle")
            _, _, k = active.pop()
            s = states[k]
            if self.readiness.next_ready <= s.now:
                self._release(s.now)
            faults = pending_faults[k]
            while faults and faults[0].time_s <= s.now:
                self._apply_fault(s, faults.pop(0), active)
            if s.alive == 0:
                retired.add(k)
                continue
            if s.idle and rs.pending() and (s.dirty or rs.wants_retry(s)):
                self._fill(s, rs)
            if migration is not None and s.idle and not rs.pending():
                before = s.now
                self._pull_running(s, migration, policy)
                if s.now > before:
                    # the transfer moved this clock on: let instances behind it go first
                    active.push((s.now, 0, k))
                    continue
            if not s.waiting and not s.n_running:
                wake = wake_time(s.now, self.readiness.next_ready, active.earliest_busy,
                                 bool(self.policy.requests.pending()), faults[0].time_s if faults else None)
                if wake is None:
                    retired.add(k)
                    continue
                s.now = max(s.now, wake)
                s.dirty = True
                active.push((s.now, 1, k))
                continue
            if s.n_running and s.growth_blocks() > s.kv_blocks - s.kv_used:
                before = s.now
                self._make_room(s, policy)
                if (not s.n_running and not s.waiting) or s.now > before:
                    # nothing left to decide on, or a swap-out moved the clock: instances behind go first
                    active.push((s.now, 0, k))
                    continue
            if self.measure:
                t0 = time.perf_counter_ns()
                decision = its.decide(s)
                self.decisions.append(time.perf_counter_ns() - t0)
            else:
                decision = its.decide(s)
            try:
                if type(decision) is Decode:
                    self._decode(s, policy)
                elif type(decision) is Prefill:
                    self._prefill(s, decision.clients)
                elif type(decision) is Mixed:
                    self._mixed(s, decision.chunks, policy)
                else:
                    raise PolicyError(f"{type(its).__name__}.decide returned {decision!r}; "
                                      "return Prefill(clients), DECODE or Mixed(chunks)")
            except InstanceLost:
                # the replica died mid-iteration: nothing of this iteration happened
                self.lost_instances += 1
                self._apply_fault(s, Fault(s.now, k), active)
                retired.add(k)
                continue
            if self.check:
                self._check_kv(s)
            active.push((s.now, 0, k))
        tr = self.trace
        cols = list(zip(*tr)) if tr else [()] * 8
        return RunResult(
            problem=problem, policy=policy.name, backend=getattr(backend, "name", type(backend).__name__),
            known_lengths=self.ctx.known_lengths, client=self.req_client, assign_s=self.assign_s,
            prefill_start_s=self.prefill_start_s, prefill_end_s=self.prefill_end_s, done_s=self.done_s,
            restarts=self.restarts, migrations=self.migrations,
            ready_s=np.array(self.readiness.ready, dtype=np.float64),
            trace_instance=np.array(cols[0], dtype=np.int32), trace_kind=np.array(cols[1], dtype=np.int8),
            trace_start_s=np.array(cols[2], dtype=np.float64), trace_duration_s=np.array(cols[3], dtype=np.float64),
            trace_participants=np.array(cols[4], dtype=np.int32), trace_prefill_tokens=np.array(cols[5], dtype=np.int64),
            trace_running=np.array(cols[6], dtype=np.int32), decision_ns=np.array(self.decisions, dtype=np.int64),
            generated_tokens=self.generated, wasted_tokens=self.wasted, requeued=self.requeued,
            failed_clients=self.failed_clients, wall_s=time.perf_counter() - t_wall,
            extra={"lost_instances": self.lost_instances, "kv_mode": list(self.kv_modes),
                   "kv_block_tokens": list(self.kv_block_sizes),
                   "kv_peak_tokens": [st.kv_peak * st.kv_block for st in states],
                   # what reserve-mode reservations were made from (the bound counts them)
                   "estimates": self.ctx.estimates, "preemption": self.preemption,
                   **({"swap_space_tokens": [b * st.kv_block for b, st in zip(self.swap_blocks, states)],
                       "swap_peak_tokens": [b * st.kv_block for b, st in zip(self.swap_peak, states)]}
                      if self.preemption == "swap" else {})},
            preemptions=self.preemptions, recomputed_tokens=self.recomputed,
            trace_kv_tokens=np.array(cols[7], dtype=np.int64),
            swapped_out_tokens=self.swapped_out, swapped_in_tokens=self.swapped_in, swap_s=self.swap_s,
        )

    # -- pieces of the loop ----------------------------------------------------------------------
    def _release(self, now: float) -> None:
        """Tell the policy (both schedulers) of every request that became ready by ``now``, in time order."""
        on_ready = self.policy.on_ready
        for t, r in self.readiness.pop(now):
            on_ready(r, t)
        # idle clients anywhere may now have work: let every instance look again, and wake the
        # ones that had gone quiet (a finish elsewhere may have readied work for them)
        for st in self.states:
            st.dirty = True
        for k in list(self.retired):
            st = self.states[k]
            if st.alive:
                self.retired.discard(k)
                st.now = max(st.now, now)
                self.active.push((st.now, 1, k))

    def _fill(self, s: InstanceState, rs) -> None:
        s.dirty = False
        now = s.now
        for c in list(s.idle):
            r = rs.next_request(s, c)
            if r is None:
                continue
            if not (0 <= r < len(self.prompt)) or self.req_client[r] >= 0:
                raise PolicyError(f"{type(rs).__name__}.next_request handed out request {r}, "
                                  "which is unknown or already held by a client")
            if not self.readiness.ready[r] <= now:  # NaN: never released to the scheduler
                raise PolicyError(f"{type(rs).__name__}.next_request handed out request {r} at {now:.6g} s, before "
                                  f"it was ready (ready at {self.readiness.ready[r]:.6g} s; hand out only requests "
                                  "announced by on_ready)")
            del s.idle[c]
            s.waiting[c] = None
            self.client_state[c] = WAITING
            self.client_request[c] = r
            self.req_client[r] = c
            self.assign_s[r] = now
            if not rs.pending():
                break

    def _admit(self, s: InstanceState, c: int) -> int:
        if self.client_state[c] != WAITING or c not in s.waiting:
            raise PolicyError(f"{type(self.policy.iterations).__name__} asked to prefill client {c}, "
                              f"which is not waiting on instance {s.index}")
        return self.client_request[c]

    def _allocate(self, s: InstanceState, need: int, what: str) -> None:
        """Take ``need`` blocks for ``what`` or refuse the iteration (before anything of it ran)."""
        free = s.kv_blocks - s.kv_used
        if need > free:
            raise PolicyError(f"{what} needs {need * s.kv_block} KV tokens ({need} blocks) but only "
                              f"{free * s.kv_block} are free on instance {s.index}; check state.kv_free "
                              "(or the helpers of lloptim.runtime.iteration_schedulers) first")
        s.kv_used += need
        if s.kv_used > s.kv_peak:
            s.kv_peak = s.kv_used

    def _start_running(self, s: InstanceState, c: int, r: int) -> None:
        del s.waiting[c]
        self.client_state[c] = RUNNING
        g = self.generated_before[r]
        start = s.decode_steps - g  # as if prefilled g steps ago: it has produced g of its tokens
        self.client_start_step[c] = start
        heapq.heappush(s.heap, (start + self.output[r], c, self.client_epoch[c]))
        s.n_running += 1
        s.kv_tokens += self.context[r]
        self._admissions += 1
        s.admitted.append((self._admissions, c, self.client_epoch[c]))
        self._register(s, c, r)
        if np.isnan(self.prefill_end_s[r]):
            self.prefill_end_s[r] = s.now

    def _never_binds(self, s: InstanceState) -> bool:
        """Whether ``s``'s clients, holding the requests of largest peak at once, fit its blocks."""
        w = self.problem.workload
        peak = w.prompt_tokens + np.maximum(w.output_tokens, w.max_output_tokens)
        if s.floors is not None:
            peak = np.maximum(peak, np.asarray(s.floors))
        held = -(-peak // s.kv_block)
        top = np.partition(held, held.size - len(s.clients))[-len(s.clients):] if held.size > len(s.clients) else held
        return int(top.sum()) <= s.kv_blocks

    # -- block accounting of running requests ------------------------------------------------------
    def _register(self, s: InstanceState, c: int, r: int) -> None:
        """Count running client ``c`` in the residue class that says when it needs its next block."""
        offset = self.prompt[r] - self.client_start_step[c]  # tokens held at step t: offset + t
        tokens = offset + s.decode_steps
        floor = s.floor_tokens(r)
        if tokens >= floor:
            res = offset % s.kv_block
            s.residue[res] += 1
            self.client_residue[c] = res
        else:
            self.client_residue[c] = -1
            heapq.heappush(s.floor_heap, (floor - offset, c, self.client_epoch[c]))

    def _register_floor_crossers(self, s: InstanceState) -> None:
        heap = s.floor_heap
        while heap and heap[0][0] <= s.decode_steps:
            _, c, epoch = heapq.heappop(heap)
            if epoch == self.client_epoch[c] and self.client_state[c] == RUNNING and self.client_residue[c] < 0:
                self._register(s, c, self.client_request[c])

    def _unregister(self, s: InstanceState, c: int) -> None:
        res = self.client_residue[c]
        if res >= 0:
            s.residue[res] -= 1
            self.client_residue[c] = -1

    def _make_room(self, s: InstanceState, policy: Policy) -> None:
        """Preempt running requests until the next decode step's new blocks fit."""
        its = policy.iterations
        while s.n_running and s.growth_blocks() > s.kv_blocks - s.kv_used:
            c = its.victim(s)
            if c is None:
                c = self._default_victim(s)
            elif not (s.clients.start <= c < s.clients.stop) or self.client_state[c] != RUNNING:
                raise PolicyError(f"{type(its).__name__}.victim chose client {c}, which is not running on "
                                  f"instance {s.index}")
            self._preempt(s, c, policy)

    def _default_victim(self, s: InstanceState) -> int:
        adm = s.admitted
        if self.victim_rule == "newest":
            while adm:
                _, c, epoch = adm[-1]
                if epoch == self.client_epoch[c] and self.client_state[c] == RUNNING:
                    return c
                adm.pop()
        live = [(seq, c) for seq, c, epoch in adm if epoch == self.client_epoch[c] and self.client_state[c] == RUNNING]
        if len(adm) > 4 * len(live) + 64:  # drop stale entries now and then
            s.admitted[:] = [(seq, c, self.client_epoch[c]) for seq, c in live]
        clients = [c for _, c in live]
        step = s.decode_steps
        est = self.ctx.estimates
        tokens = [self.prompt[self.client_request[c]] + step - self.client_start_step[c] for c in clients]
        remaining = [max(float(est[self.client_request[c]]) - (step - self.client_start_step[c]), 1.0) for c in clients]
        return choose_victim(self.victim_rule, clients, [seq for seq, _ in live], tokens, remaining)

    def _preempt(self, s: InstanceState, c: int, policy: Policy) -> None:
        """Preempt running client ``c``: free its cache (swapped out or dropped); it waits, first in line, to resume."""
        r = self.client_request[c]
        g = s.decode_steps - self.client_start_step[c]
        tokens = self.prompt[r] + g
        host = blocks(tokens, s.kv_block)
        swap = self.preemption == "swap" and self.swap_used[s.index] + host <= self.swap_blocks[s.index]
        s.n_running -= 1
        s.kv_tokens -= tokens
        s.kv_used -= s.held_blocks(r, tokens)
        self._unregister(s, c)
        self.client_epoch[c] += 1
        if swap:
            dur = self.backend.swap_out(s.index, r, tokens)
            self.swap_used[s.index] += host
            self.swap_peak[s.index] = max(self.swap_peak[s.index], self.swap_used[s.index])
            self.swapped[r] = tokens
            self.swapped_out += tokens
            self.swap_s += dur
            self.generated_before[r] = g
            self.context[r] = tokens
            # the copy runs before the next iteration, with the cache the victim leaves behind
            self.trace.append((s.index, KIND_SWAP, s.now, dur, 1, 0, 0, (s.kv_used + s.held_blocks(r, tokens))
                               * s.kv_block))
            s.now += dur
        else:
            self._drop(s, r, g, tokens)
        self.preemptions[r] += 1
        self.client_state[c] = WAITING
        s.waiting = {c: None, **s.waiting}  # first in line, as vLLM puts a preempted request back
        s.dirty = True
        policy.on_preempt(r, c, self.generated_before[r])

    def _drop(self, s: InstanceState, r: int, g: int, tokens: int) -> None:
        """Recompute preemption of request ``r`` (``g`` tokens generated, ``tokens`` cached): drop its cache."""
        if self.can_preempt:
            kept = self.backend.preempt(s.index, r) is not False
        else:
            self.backend.release(s.index, r, False)
            kept = False
        if kept:
            self.generated_before[r] = g
            self.context[r] = tokens
            self.recomputed += tokens
        else:
            # the backend cannot keep generated tokens: the victim restarts from its prompt
            self.generated_before[r] = 0
            self.context[r] = self.prompt[r]
            self.wasted += g
            self.recomputed += self.prompt[r]

    def _swap_in(self, s: InstanceState, r: int, tokens: int, last: bool) -> float:
        """Copy ``tokens`` of swapped request ``r``'s cache back (its whole context once ``last``); the seconds."""
        dur = self.backend.swap_in(s.index, r, tokens)
        self.swapped_in += tokens
        self.swap_s += dur
        if last:
            # the host blocks are freed once the whole cache is back (vLLM frees them at swap-in)
            self.swap_used[s.index] -= blocks(self.swapped[r], s.kv_block)
            self.swapped[r] = 0
        return dur

    def _check_kv(self, s: InstanceState) -> None:
        """Recount the KV accounting of ``s`` from the per-client state (``check=True``)."""
        used = tokens = running = 0
        residue = [0] * s.kv_block
        for c in s.clients:
            r = self.client_request[c]
            if self.client_state[c] == RUNNING:
                t = self.prompt[r] + s.decode_steps - self.client_start_step[c]
                used += s.held_blocks(r, t)
                tokens += t
                running += 1
                if t >= s.floor_tokens(r) and self.client_residue[c] >= 0:
                    residue[(t - s.decode_steps) % s.kv_block] += 1
            elif self.client_state[c] == WAITING and c in s.prefilled:
                used += s.held_blocks(r, s.prefilled[c])
        bad = []
        if used != s.kv_used:
            bad.append(f"{s.kv_used} blocks counted, {used} held")
        if s.kv_used > s.kv_blocks:
            bad.append(f"{s.kv_used} blocks held of {s.kv_blocks}")
        if tokens != s.kv_tokens or running != s.n_running:
            bad.append(f"kv_tokens {s.kv_tokens} vs {tokens}, running {s.n_running} vs {running}")
        if residue != s.residue:
            bad.append("block-growth counters out of date")
        host = sum(blocks(self.swapped[self.client_request[c]], s.kv_block) for c in s.waiting
                   if self.swapped[self.client_request[c]])
        if host != self.swap_used[s.index] or host > self.swap_blocks[s.index]:
            bad.append(f"host swap: {self.swap_used[s.index]} blocks counted, {host} held, "
                       f"{self.swap_blocks[s.index]} in the space")
        if bad:
            raise AssertionError(f"KV accounting of instance {s.index} at {s.now:.6f} s: " + "; ".join(bad))

    def _prefill(self, s: InstanceState, clients: Sequence[int]) -> None:
        if not clients:
            raise PolicyError(f"{type(self.policy.iterations).__name__} asked for a prefill of no client")
        if len(set(clients)) != len(clients):
            raise PolicyError(f"prefill names a client twice: {list(clients)}")
        reqs = [self._admit(s, c) for c in clients]
        for c in clients:
            if c in s.prefilled:
                raise PolicyError(f"client {c} has a partly prefilled prompt: finish it with Mixed chunks")
        need = sum(s.held_blocks(r, self.context[r]) for r in reqs)
        self._allocate(s, need, f"prefilling clients {list(clients)[:8]}")
        swapped = self.swapped
        computed = [r for r in reqs if not swapped[r]] if self.swap_used[s.index] else reqs
        tokens = sum(self.context[r] for r in computed)
        start = s.now
        try:
            dur = self.backend.prefill(s.index, computed, tokens) if computed else 0.0
        except InstanceLost:
            s.kv_used -= need
            raise
        if len(computed) < len(reqs):
            # swapped requests resume by copying their caches back, not by computing them
            dur += sum(self._swap_in(s, r, self.context[r], True) for r in reqs if swapped[r])
        s.now = start + dur
        for c, r in zip(clients, reqs):
            if np.isnan(self.prefill_start_s[r]):
                self.prefill_start_s[r] = start
            self._start_running(s, c, r)
        self.trace.append((s.index, KIND_PREFILL if computed else KIND_SWAP, start, dur, len(reqs), tokens,
                           s.n_running - len(reqs) if computed else 0, s.kv_used * s.kv_block))

    def _advance_decode(self, s: InstanceState, policy: Policy) -> None:
        """Bookkeeping after a decode step ended at ``s.now``: KV growth and finishing requests."""
        s.decode_steps += 1
        s.kv_tokens += s.n_running
        step = s.decode_steps
        heap = s.heap
        while heap and heap[0][0] <= step:
            _, c, epoch = heapq.heappop(heap)
            if epoch != self.client_epoch[c]:
                continue
            r = self.client_request[c]
            o = self.output[r]
            s.n_running -= 1
            s.kv_tokens -= self.prompt[r] + o
            s.kv_used -= s.held_blocks(r, self.prompt[r] + o)
            self._unregister(s, c)
            self.client_state[c] = IDLE
            self.client_request[c] = -1
            s.idle[c] = None
            s.dirty = True
            self.done_s[r] = s.now
            self.n_done += 1
            self.generated += o
            self.backend.release(s.index, r, True)
            policy.on_finish(r, c, o, s.now)
            self.readiness.finished(r, s.now)

    def _grow(self, s: InstanceState) -> int:
        """Allocate the blocks this decode step needs (room was made before the decision)."""
        need = s.growth_blocks()
        if need:
            self._allocate(s, need, f"the decode step of instance {s.index}")
        return need

    def _decode(self, s: InstanceState, policy: Policy) -> None:
        if s.n_running == 0:
            raise PolicyError(f"{type(policy.iterations).__name__} asked for a decode with no running client "
                              f"on instance {s.index}; prefill a waiting client first")
        grown = self._grow(s)
        start = s.now
        try:
            dur = self.backend.decode(s.index, s.n_running, s.kv_tokens)
        except InstanceLost:
            s.kv_used -= grown
            raise
        s.now = start + dur
        self.trace.append((s.index, KIND_DECODE, start, dur, s.n_running, 0, s.n_running, s.kv_used * s.kv_block))
        self._advance_decode(s, policy)

    def _mixed(self, s: InstanceState, chunks: dict[int, int], policy: Policy) -> None:
        if not chunks and s.n_running == 0:
            raise PolicyError("a mixed iteration with no chunk and no running client does nothing")
        work = []
        need = 0
        for c, n_tok in chunks.items():
            r = self._admit(s, c)
            done_before = s.prefilled.get(c, 0)
            ctx = self.context[r]
            if not (isinstance(n_tok, (int, np.integer)) and 0 < n_tok <= ctx - done_before):
                raise PolicyError(f"chunk of {n_tok!r} tokens for client {c}: "
                                  f"{ctx - done_before} prompt tokens remain")
            have = s.held_blocks(r, done_before) if c in s.prefilled else 0
            need += s.held_blocks(r, done_before + int(n_tok)) - have
            work.append((c, r, done_before, int(n_tok), done_before + n_tok == ctx))
        grown = self._grow(s) if s.n_running else 0
        try:
            self._allocate(s, need, f"the prompt chunks of clients {list(chunks)[:8]}")
        except PolicyError:
            s.kv_used -= grown
            raise
        start = s.now
        running = s.n_running
        swapped = self.swapped
        computed = [w for w in work if not swapped[w[1]]] if self.swap_used[s.index] else work
        try:
            dur = (self.backend.mixed(s.index, running, s.kv_tokens, [(r, b, k, fin) for _, r, b, k, fin in computed])
                   if running or computed else 0.0)
        except InstanceLost:
            s.kv_used -= grown + need
            raise
        if len(computed) < len(work):
            # chunks of swapped requests copy that part of their caches back instead of computing it
            dur += sum(self._swap_in(s, r, k, fin) for _, r, _, k, fin in work if swapped[r])
        s.now = start + dur
        tokens = sum(w[3] for w in computed)
        self.trace.append((s.index, KIND_MIXED if running or computed else KIND_SWAP, start, dur, running + len(work),
                           tokens, running,
                           s.kv_used * s.kv_block))
        if running:
            self._advance_decode(s, policy)
        for c, r, before, k, fin in work:
            if before == 0 and np.isnan(self.prefill_start_s[r]):
                self.prefill_start_s[r] = start
            if fin:
                s.prefilled.pop(c, None)
                self._start_running(s, c, r)
            else:
                s.prefilled[c] = before + k

    def _pull_running(self, dst: InstanceState, migration, policy: Policy) -> None:
        """Let ``dst``'s idle clients take running requests of other instances, as the rule proposes."""
        while dst.idle:
            move = migration.propose(self, dst)
            if move is None:
                return
            c1, c2 = move
            if self.client_state[c1] != RUNNING or c2 not in dst.idle:
                raise PolicyError(f"{type(migration).__name__}.propose moved client {c1} to {c2}: the source must "
                                  "be running and the destination idle on the instance asked")
            src = self.states[int(self.ctx.client_instance[c1])]
            if src is dst:
                raise PolicyError(f"{type(migration).__name__}.propose moved a request within instance {dst.index}")
            r = self.client_request[c1]
            generated = src.decode_steps - self.client_start_step[c1]
            kv = self.prompt[r] + generated
            self._allocate(dst, dst.held_blocks(r, kv), f"migrating request {r} to instance {dst.index}")
            # the transfer starts when the source's current iteration has ended
            start = max(dst.now, src.now)
            try:
                dur = self.backend.migrate(src.index, dst.index, r, kv)
            except InstanceLost:
                dst.kv_used -= dst.held_blocks(r, kv)
                raise
            src.n_running -= 1
            src.kv_tokens -= kv
            src.kv_used -= src.held_blocks(r, kv)
            self._unregister(src, c1)
            self.client_epoch[c1] += 1
            self.client_state[c1] = IDLE
            self.client_request[c1] = -1
            src.idle[c1] = None
            src.dirty = True
            del dst.idle[c2]
            self.client_state[c2] = RUNNING
            self.client_request[c2] = r
            self.req_client[r] = c2
            self.client_start_step[c2] = dst.decode_steps - generated
            heapq.heappush(dst.heap, (dst.decode_steps + self.output[r] - generated, c2, self.client_epoch[c2]))
            self.trace.append((dst.index, KIND_MIGRATE, start, dur, 1, 0, dst.n_running, dst.kv_used * dst.kv_block))
            dst.n_running += 1
            dst.kv_tokens += kv
            self._admissions += 1
            dst.admitted.append((self._admissions, c2, self.client_epoch[c2]))
            self._register(dst, c2, r)
            dst.now = start + dur
            self.migrations[r] += 1
            policy.iterations.on_migrate(r, c1, c2, generated)

    def _apply_fault(self, s: InstanceState, fault: Fault, active) -> None:
        clients = s.clients if fault.client is None else [fault.client]
        rs = self.policy.requests
        for c in clients:
            st = self.client_state[c]
            if st == FAILED:
                continue
            r = self.client_request[c]
            if st == RUNNING:
                done = s.decode_steps - self.client_start_step[c]
                s.n_running -= 1
                s.kv_tokens -= self.prompt[r] + done
                s.kv_used -= s.held_blocks(r, self.prompt[r] + done)
                self._unregister(s, c)
                self.client_epoch[c] += 1
                self.wasted += done
                self.backend.release(s.index, r, False)
            elif st == WAITING:
                del s.waiting[c]
                # a preempted request not yet recomputed loses the tokens it had generated with the client
                self.wasted += self.generated_before[r]
                if self.swapped[r]:  # and its copy in host memory
                    self.swap_used[s.index] -= blocks(self.swapped[r], s.kv_block)
                    self.swapped[r] = 0
                if c in s.prefilled:
                    s.kv_used -= s.held_blocks(r, s.prefilled.pop(c))
                    self.backend.release(s.index, r, False)
                elif self.generated_before[r]:
                    self.backend.release(s.index, r, False)
            else:
                del s.idle[c]
            if r >= 0:
                self.generated_before[r] = 0
                self.context[r] = self.prompt[r]
                self.client_request[c] = -1
                self.req_client[r] = -1
                self.assign_s[r] = np.nan
                self.prefill_start_s[r] = np.nan
                self.prefill_end_s[r] = np.nan
                self.restarts[r] += 1
                self.requeued += 1
                rs.requeue(r, s.now)
            self.client_state[c] = FAILED
            rs.on_client_failed(c, s.now)
            s.alive -= 1
            self.failed_clients += 1
        # requeued work may go to instances that had gone quiet: wake them now
        for k in list(self.retired):
            other = self.states[k]
            if other.alive:
                self.retired.discard(k)
                other.now = max(other.now, s.now)
                other.dirty = True
                active.push((other.now, 1, k))
        for other in self.states:
            other.dirty = True
