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
has finished, if that is later. It keeps the coming ready times in a heap and tells the request
scheduler of each request exactly once, in time order, through
:meth:`~lloptim.runtime.policy.RequestScheduler.on_ready`, before any instance whose clock has
reached that time asks it for work (instances run in clock order, so the clock of the instance
being served never goes back). A scheduler therefore never sees a request before it is ready, and
a policy needs no arrival time of the future.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from lloptim.backends.base import InstanceLost
from lloptim.errors import PolicyError, SpecError
from lloptim.problem import Problem
from lloptim.runtime.policy import Decode, Mixed, Policy, Prefill, RunContext
from lloptim.validation import check_int, check_number

__all__ = ["Engine", "InstanceState", "RunResult", "Fault", "IDLE", "WAITING", "RUNNING", "FAILED"]

#: Client states of ``RunContext.extra["client_state"]`` (a list indexed by global client): no request
#: (``IDLE``), holding a request not yet fully prefilled (``WAITING``), decoding (``RUNNING``), failed
#: for good (``FAILED``).
IDLE, WAITING, RUNNING, FAILED = 0, 1, 2, 3
KIND_PREFILL, KIND_DECODE, KIND_MIXED, KIND_MIGRATE = 0, 1, 2, 3


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
        Tokens in the KV caches of the running clients.
    kv_reserved
        Tokens reserved (prompt + output cap) by running and partly prefilled requests.
    kv_capacity
        KV-cache capacity, tokens.
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

    __slots__ = ("index", "clients", "now", "n_running", "kv_tokens", "kv_reserved", "kv_capacity", "waiting",
                 "idle", "prefilled", "decode_steps", "latency", "engine", "heap", "alive", "dirty")

    def __init__(self, engine: "Engine", index: int, clients: range, kv_capacity: int, latency) -> None:
        self.engine = engine
        self.index = index
        self.clients = clients
        self.now = 0.0
        self.n_running = 0
        self.kv_tokens = 0
        self.kv_reserved = 0
        self.kv_capacity = kv_capacity
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
        """KV tokens that admitting ``client``'s request reserves (prompt + output cap)."""
        return self.engine.reserve_tokens[self.engine.client_request[client]]

    @property
    def kv_free(self) -> int:
        """Unreserved KV-cache tokens."""
        return self.kv_capacity - self.kv_reserved


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
        instance stalls for the transfer, and the migrating client is its only participant).
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
        Clients decoding when each iteration started (int32), excluding the ones it prefills.
    decision_ns
        Wall time of each iteration decision of the policy, nanoseconds (int64; empty unless
        decisions were measured).
    generated_tokens
        Output tokens of the finished requests, tokens.
    wasted_tokens
        Output tokens decoded for requests a fault then took back, tokens.
    requeued
        Number of times a fault handed a request back to the request scheduler (count).
    failed_clients
        Number of clients that failed during the run (count).
    wall_s
        Wall-clock time of the run, seconds.
    extra
        Backend and engine details: ``"lost_instances"``, the number of instances whose backend
        reported them lost mid-iteration (count).
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
    """

    def __init__(self, problem: Problem, policy: Policy, backend=None, estimates: np.ndarray | None = None,
                 faults: Sequence[Fault] = (), measure_decisions: bool = True, seed: int = 0) -> None:
        if backend is None:
            from lloptim.backends.simulated import SimulatedBackend
            backend = SimulatedBackend(problem)
        self.problem = problem
        self.policy = policy
        self.backend = backend
        w = problem.workload
        n = len(w)
        if estimates is None:
            est, known = w.output_tokens.astype(np.float64), True
        else:
            est = np.asarray(estimates, dtype=np.float64)
            if est.shape != (n,) or not np.all(np.isfinite(est)) or np.any(est <= 0):
                raise SpecError("estimates", f"need {n} finite positive output estimates",
                                "give one estimate (tokens) per request")
            known = bool(np.array_equal(est, w.output_tokens))
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
        # plain lists: scalar access in the hot loop is several times faster than numpy
        self.prompt = w.prompt_tokens.tolist()
        self.output = w.output_tokens.tolist()
        self.reserve_tokens = (w.prompt_tokens + w.max_output_tokens).tolist()
        self.client_request = [-1] * problem.n_clients
        self.client_state = [IDLE] * problem.n_clients
        self.ctx.extra["client_state"] = self.client_state  # read-only view for schedulers (FAILED = 3)
        self.client_start_step = [0] * problem.n_clients
        self.client_epoch = [0] * problem.n_clients
        self.arrival = w.arrival_s.tolist()
        prec = w.precedence
        # successors of each request and how many predecessors it waits for (None: independent requests)
        self.successors = prec.successors() if prec is not None else None
        self.n_predecessors = prec.in_degree().tolist() if prec is not None else [0] * n
        roots = np.flatnonzero(prec.in_degree() == 0) if prec is not None else np.arange(n)
        roots = roots[np.argsort(w.arrival_s[roots], kind="stable")]
        self.roots = list(zip(w.arrival_s[roots].tolist(), roots.tolist()))

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
        self.ready = [float("nan")] * n
        self.unfinished_predecessors = list(self.n_predecessors)
        self.latest_predecessor_finish = list(self.arrival)  # ready time = max(arrival, predecessor finishes)
        # requests not yet released, as (ready time, request): the roots in arrival order (known
        # up front), and a heap of the others, which join when their last predecessor finishes
        self.next_root = 0
        self.events: list[tuple[float, int]] = []
        self.next_ready = self.roots[0][0] if self.roots else np.inf
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
            states.append(InstanceState(self, k, self.ctx.instance_clients(k), inst.kv_capacity_tokens,
                                        inst.profile.latency))
        self.states = states
        pending_faults = {k: [f for f in self.faults if f.instance == k] for k in range(len(states))}
        # heap of (clock, idle-flag, index): busy instances at a time step before idle ones
        active = [(0.0, 0, k) for k in range(len(states))]
        heapq.heapify(active)
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
            _, _, k = heapq.heappop(active)
            s = states[k]
            if self.next_ready <= s.now:
                self._release(s.now)
            faults = pending_faults[k]
            while faults and faults[0].time_s <= s.now:
                self._apply_fault(s, faults.pop(0), active)
            if s.alive == 0:
                retired.add(k)
                continue
            if s.dirty and s.idle and rs.pending():
                self._fill(s, rs)
            if migration is not None and s.idle and not rs.pending():
                before = s.now
                self._pull_running(s, migration, policy)
                if s.now > before:
                    # the transfer moved this clock on: let instances behind it go first
                    heapq.heappush(active, (s.now, 0, k))
                    continue
            if not s.waiting and not s.n_running:
                wake = self._wake_time(s, active, faults)
                if wake is None:
                    retired.add(k)
                    continue
                s.now = max(s.now, wake)
                s.dirty = True
                heapq.heappush(active, (s.now, 1, k))
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
            heapq.heappush(active, (s.now, 0, k))
        tr = self.trace
        cols = list(zip(*tr)) if tr else [()] * 7
        return RunResult(
            problem=problem, policy=policy.name, backend=getattr(backend, "name", type(backend).__name__),
            known_lengths=self.ctx.known_lengths, client=self.req_client, assign_s=self.assign_s,
            prefill_start_s=self.prefill_start_s, prefill_end_s=self.prefill_end_s, done_s=self.done_s,
            restarts=self.restarts, migrations=self.migrations, ready_s=np.array(self.ready, dtype=np.float64),
            trace_instance=np.array(cols[0], dtype=np.int32), trace_kind=np.array(cols[1], dtype=np.int8),
            trace_start_s=np.array(cols[2], dtype=np.float64), trace_duration_s=np.array(cols[3], dtype=np.float64),
            trace_participants=np.array(cols[4], dtype=np.int32), trace_prefill_tokens=np.array(cols[5], dtype=np.int64),
            trace_running=np.array(cols[6], dtype=np.int32), decision_ns=np.array(self.decisions, dtype=np.int64),
            generated_tokens=self.generated, wasted_tokens=self.wasted, requeued=self.requeued,
            failed_clients=self.failed_clients, wall_s=time.perf_counter() - t_wall,
            extra={"lost_instances": self.lost_instances},
        )

    # -- pieces of the loop ----------------------------------------------------------------------
    def _release(self, now: float) -> None:
        """Tell the request scheduler of every request that became ready by ``now``, in time order."""
        events, roots, ready, on_ready = self.events, self.roots, self.ready, self.policy.requests.on_ready
        i = self.next_root
        while True:
            # the earlier of the next root and the next unblocked request (ties by row)
            if i < len(roots) and (not events or roots[i] < events[0]):
                if roots[i][0] > now:
                    break
                t, r = roots[i]
                i += 1
            elif events and events[0][0] <= now:
                t, r = heapq.heappop(events)
            else:
                break
            ready[r] = t
            on_ready(r, t)
        self.next_root = i
        self._update_next_ready()
        # idle clients anywhere may now have work: let every instance look again, and wake the
        # ones that had gone quiet (a finish elsewhere may have readied work for them)
        for st in self.states:
            st.dirty = True
        for k in list(self.retired):
            st = self.states[k]
            if st.alive:
                self.retired.discard(k)
                st.now = max(st.now, now)
                heapq.heappush(self.active, (st.now, 1, k))

    def _update_next_ready(self) -> None:
        nxt = self.roots[self.next_root][0] if self.next_root < len(self.roots) else np.inf
        self.next_ready = min(nxt, self.events[0][0]) if self.events else nxt

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
            if not self.ready[r] <= now:  # NaN: never released to the scheduler
                raise PolicyError(f"{type(rs).__name__}.next_request handed out request {r} at {now:.6g} s, before "
                                  f"it was ready (ready at {self.ready[r]:.6g} s; hand out only requests "
                                  "announced by on_ready)")
            del s.idle[c]
            s.waiting[c] = None
            self.client_state[c] = WAITING
            self.client_request[c] = r
            self.req_client[r] = c
            self.assign_s[r] = now
            if not rs.pending():
                break

    def _wake_time(self, s: InstanceState, active, faults) -> float | None:
        """When an instance with nothing to run should look again; None if never."""
        candidates = []
        if self.next_ready < np.inf:
            # the next request to become ready (an arrival, or a successor of a finished request)
            candidates.append(max(self.next_ready, s.now))
        busy = [t for t, idle, _ in active if not idle]
        if busy and self.policy.requests.pending():
            candidates.append(max(min(busy), s.now))
        if faults:
            candidates.append(faults[0].time_s)
        if busy and not candidates:
            # another instance may still fail and requeue work: wake with it
            candidates.append(max(min(busy), s.now))
        return min(candidates) if candidates else None

    def _admit(self, s: InstanceState, c: int) -> int:
        if self.client_state[c] != WAITING or c not in s.waiting:
            raise PolicyError(f"{type(self.policy.iterations).__name__} asked to prefill client {c}, "
                              f"which is not waiting on instance {s.index}")
        r = self.client_request[c]
        if c not in s.prefilled:
            need = self.reserve_tokens[r]
            if s.kv_reserved + need > s.kv_capacity:
                raise PolicyError(f"prefilling client {c} needs {need} KV tokens but only {s.kv_free} of "
                                  f"{s.kv_capacity} are free on instance {s.index}; check state.kv_free first")
            s.kv_reserved += need
        return r

    def _start_running(self, s: InstanceState, c: int, r: int) -> None:
        del s.waiting[c]
        self.client_state[c] = RUNNING
        self.client_start_step[c] = s.decode_steps
        heapq.heappush(s.heap, (s.decode_steps + self.output[r], c, self.client_epoch[c]))
        s.n_running += 1
        s.kv_tokens += self.prompt[r]
        self.prefill_end_s[r] = s.now

    def _prefill(self, s: InstanceState, clients: Sequence[int]) -> None:
        if not clients:
            raise PolicyError(f"{type(self.policy.iterations).__name__} asked for a prefill of no client")
        if len(set(clients)) != len(clients):
            raise PolicyError(f"prefill names a client twice: {list(clients)}")
        reqs = [self._admit(s, c) for c in clients]
        tokens = sum(self.prompt[r] for r in reqs)
        start = s.now
        dur = self.backend.prefill(s.index, reqs, tokens)
        s.now = start + dur
        for c, r in zip(clients, reqs):
            self.prefill_start_s[r] = start
            self._start_running(s, c, r)
        self.trace.append((s.index, KIND_PREFILL, start, dur, len(reqs), tokens, s.n_running - len(reqs)))

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
            s.kv_reserved -= self.reserve_tokens[r]
            self.client_state[c] = IDLE
            self.client_request[c] = -1
            s.idle[c] = None
            s.dirty = True
            self.done_s[r] = s.now
            self.n_done += 1
            self.generated += o
            self.backend.release(s.index, r, True)
            policy.on_finish(r, c, o, s.now)
            if self.successors is not None:
                self._unblock(r, s.now)

    def _unblock(self, r: int, now: float) -> None:
        """``r`` finished at ``now``: a successor whose predecessors have all finished becomes ready.

        Its ready time is the latest of their finishes (or its arrival). That is not always
        ``now``: instances run their iterations in order of start, so an iteration that started
        earlier on a slower instance may have finished another predecessor later.
        """
        waiting, latest = self.unfinished_predecessors, self.latest_predecessor_finish
        for q in self.successors[r]:
            waiting[q] -= 1
            if now > latest[q]:
                latest[q] = now
            if waiting[q] == 0:
                t = latest[q]
                heapq.heappush(self.events, (t, q))
                if t < self.next_ready:
                    self.next_ready = t

    def _decode(self, s: InstanceState, policy: Policy) -> None:
        if s.n_running == 0:
            raise PolicyError(f"{type(policy.iterations).__name__} asked for a decode with no running client "
                              f"on instance {s.index}; prefill a waiting client first")
        start = s.now
        dur = self.backend.decode(s.index, s.n_running, s.kv_tokens)
        s.now = start + dur
        self.trace.append((s.index, KIND_DECODE, start, dur, s.n_running, 0, s.n_running))
        self._advance_decode(s, policy)

    def _mixed(self, s: InstanceState, chunks: dict[int, int], policy: Policy) -> None:
        if not chunks and s.n_running == 0:
            raise PolicyError("a mixed iteration with no chunk and no running client does nothing")
        work = []
        for c, n_tok in chunks.items():
            r = self._admit(s, c)
            done_before = s.prefilled.get(c, 0)
            if not (isinstance(n_tok, (int, np.integer)) and 0 < n_tok <= self.prompt[r] - done_before):
                raise PolicyError(f"chunk of {n_tok!r} tokens for client {c}: "
                                  f"{self.prompt[r] - done_before} prompt tokens remain")
            work.append((c, r, done_before, int(n_tok), done_before + n_tok == self.prompt[r]))
        start = s.now
        running = s.n_running
        dur = self.backend.mixed(s.index, running, s.kv_tokens, [(r, b, k, fin) for _, r, b, k, fin in work])
        s.now = start + dur
        tokens = sum(w[3] for w in work)
        self.trace.append((s.index, KIND_MIXED, start, dur, running + len(work), tokens, running))
        if running:
            self._advance_decode(s, policy)
        for c, r, before, k, fin in work:
            if before == 0:
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
            if dst.kv_reserved + self.reserve_tokens[r] > dst.kv_capacity:
                raise PolicyError(f"migrating request {r} needs {self.reserve_tokens[r]} KV tokens but only "
                                  f"{dst.kv_free} are free on instance {dst.index}")
            # the transfer starts when the source's current iteration has ended
            start = max(dst.now, src.now)
            dur = self.backend.migrate(src.index, dst.index, r, kv)
            src.n_running -= 1
            src.kv_tokens -= kv
            src.kv_reserved -= self.reserve_tokens[r]
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
            self.trace.append((dst.index, KIND_MIGRATE, start, dur, 1, 0, dst.n_running))
            dst.n_running += 1
            dst.kv_tokens += kv
            dst.kv_reserved += self.reserve_tokens[r]
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
                s.kv_reserved -= self.reserve_tokens[r]
                self.client_epoch[c] += 1
                self.wasted += done
                self.backend.release(s.index, r, False)
            elif st == WAITING:
                del s.waiting[c]
                if c in s.prefilled:
                    s.prefilled.pop(c)
                    s.kv_reserved -= self.reserve_tokens[r]
                    self.backend.release(s.index, r, False)
            else:
                del s.idle[c]
            if r >= 0:
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
                heapq.heappush(active, (other.now, 1, k))
        for other in self.states:
            other.dirty = True
