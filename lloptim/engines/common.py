"""Engine-neutral pieces of the real-engine adapters: the run state, the driver loop, the trace.

An adapter (:mod:`lloptim.engines.vllm`, :mod:`lloptim.engines.hf`) plugs a scheduler class into a
serving engine. That scheduler asks an :class:`EngineRun` what the next step should do and tells it
what the engine actually did; everything that is not specific to one engine lives here, once:

* **The state view.** Policies decide on :class:`~lloptim.runtime.engine.InstanceState` and, through
  ``state.engine``, on per-client lists (``client_request``, ``prompt``, ``reserve_tokens``). An
  :class:`EngineRun` provides exactly those, filled from what the engine reports after each step
  (which requests it processed, how many tokens each, which finished), so the runtime's policies run
  unchanged inside an engine. Observation, not prediction, moves the state: if an engine schedules
  less than it was asked to (a KV allocation that failed, a token budget), the view follows the
  engine and the deviation is counted in ``RunResult.extra["plan_deviations"]``.
* **Admission.** A policy's prefill is checked against the engine's real KV pool: each request
  reserves its prompt and output cap rounded up to whole KV blocks (plus the engine's allocation
  slack), so a plug-in never admits what the engine's blocks cannot hold and the engine never has to
  preempt (:class:`KVLayout`).
* **The driver loop** (:func:`drive`): instances step one at a time in the order of their clocks (the
  simulator's event order). An instance's clock advances by the measured duration of each of its
  steps and jumps over idle time to the next arrival, as the torch backend's runs do, so several
  replicas driven from one process are timed as if they ran in parallel, and runs are reproducible.
  Idle clients take requests (:meth:`EngineRun.bind`) from the policy's request scheduler, which is
  global: an idle client of one replica takes the unstarted work of another (stealing between
  replicas).
* **The trace.** :meth:`EngineRun.result` builds a :class:`~lloptim.runtime.engine.RunResult`, so
  :func:`~lloptim.metrics.summarize` reports an engine run with the simulator's metrics.

Engines emit a request's first output token from its prefill: a request of ``o`` output tokens takes
part in ``o - 1`` decode iterations after the step that completes its prompt (the simulator's model
counts ``o``). :func:`engine_problem` states the work in the engine's terms (``o - 1`` decode steps,
at least 1), and policies, bounds and predictions of engine runs all use it; the tokens reported are
the true ``o``.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, replace
from typing import Mapping, Protocol, Sequence

import numpy as np

from lloptim.errors import LloptimError, PolicyError, SpecError
from lloptim.problem import Problem, Workload
from lloptim.runtime.engine import (IDLE, KIND_DECODE, KIND_MIXED, KIND_PREFILL, RUNNING, WAITING, InstanceState,
                                    RunResult)
from lloptim.runtime.policy import Decode, Mixed, Policy, Prefill, RunContext
from lloptim.runtime.readiness import ReadyTimes

__all__ = ["EngineError", "KVLayout", "StepPlan", "EngineRun", "EngineDriver", "drive", "engine_problem",
           "ENGINE_DEFAULT", "DECODE_STEPS_NOTE", "CLOCKS"]

#: Policy name that leaves every decision to the engine's own scheduler (recorded, not steered).
ENGINE_DEFAULT = "engine-default"

#: One sentence on the engine's token semantics, for reports.
DECODE_STEPS_NOTE = "engines emit the first output token from the prefill: o tokens take o - 1 decode steps"

#: Step clocks: wall seconds, or CPU seconds of the process (all threads).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

#: Consecutive engine steps that process nothing before a run is declared stuck.
MAX_IDLE_STEPS = 3


class EngineError(LloptimError, RuntimeError):
    """A serving engine failed, stopped, or did something the run cannot account for.

    Parameters
    ----------
    engine
        Which engine (``"vllm"``, ``"hf"``).
    problem
        What went wrong.
    fix
        What the user can do about it (may be empty).
    """

    def __init__(self, engine: str, problem: str, fix: str = "") -> None:
        self.engine = engine
        self.problem = problem
        self.fix = fix
        super().__init__(f"{engine} engine: {problem}" + (f" (fix: {fix})" if fix else ""))

    def __reduce__(self):
        return (type(self), (self.engine, self.problem, self.fix))


@dataclass(frozen=True)
class KVLayout:
    """The KV pool of one engine instance, as its allocator hands it out.

    Attributes
    ----------
    blocks
        KV blocks in the pool (count).
    block_size
        Tokens per block.
    slack_blocks
        Extra blocks an allocator may take per request beyond ``ceil(tokens / block_size)``
        (transformers' paged cache allocates one block ahead), count.
    """

    blocks: int
    block_size: int
    slack_blocks: int = 0

    def __post_init__(self) -> None:
        if self.blocks < 1 or self.block_size < 1 or self.slack_blocks < 0:
            raise SpecError("kv", f"a KV pool needs blocks >= 1 and block_size >= 1, got {self.blocks} x "
                            f"{self.block_size} (+{self.slack_blocks})", "give the engine some KV cache")

    @property
    def capacity_tokens(self) -> int:
        """Tokens the pool holds, tokens."""
        return self.blocks * self.block_size

    def reservation(self, tokens: int) -> int:
        """Tokens a request holding at most ``tokens`` KV tokens occupies: whole blocks plus slack."""
        return (-(-int(tokens) // self.block_size) + self.slack_blocks) * self.block_size


@dataclass
class StepPlan:
    """What a policy asks of the next engine step, in request rows.

    Attributes
    ----------
    decode
        Whether every running request decodes in this step.
    prompts
        ``request row -> prompt tokens`` to process in this step, in the policy's order (a whole
        prompt, or a chunk of it).
    kind
        The decision's kind: ``"prefill"``, ``"decode"`` or ``"mixed"``.
    """

    decode: bool
    prompts: dict[int, int]
    kind: str

    @property
    def tokens(self) -> int:
        """Tokens the step processes: one per decode plus the prompt tokens (decodes not counted here)."""
        return sum(self.prompts.values())


def engine_problem(problem: Problem) -> Problem:
    """``problem`` in an engine's terms: a request of ``o`` output tokens takes ``o - 1`` decode steps.

    The step that completes a prompt also samples its first output token, so only ``o - 1`` decode
    iterations follow. A one-token request needs none; it keeps one here (``Workload`` counts at
    least one output token), so its modeled finish is one decode step late. Output caps shrink
    alike. The KV cache then peaks at ``prompt + o - 1`` tokens, which is what the engine stores.

    Parameters
    ----------
    problem
        Requests with their true output lengths, tokens.

    Returns
    -------
    Problem
        The same instances; each request's output (and cap) minus one, at least 1.
    """
    w = problem.workload
    steps = np.maximum(w.output_tokens - 1, 1)
    cap = np.maximum(w.max_output_tokens - 1, steps)
    ws = Workload.from_arrays(w.prompt_tokens, steps, w.arrival_s, cap, w.ids, f"{w.name} (engine steps)")
    return Problem(replace(ws, precedence=w.precedence), problem.instances, name=problem.name)


class EngineRun:
    """The engine-neutral state of one run on real engines; the object a scheduler plug-in talks to.

    Create it with the problem (true output lengths), the policy (``None``: the engine's own
    scheduler decides, and the run only records it), and each instance's KV layout. A plug-in calls
    :meth:`plan` before an engine step and :meth:`observe` after it; :func:`drive` calls
    :meth:`bind` to give idle clients requests.

    Parameters
    ----------
    problem
        What to serve; request row ``r`` needs ``problem.workload.output_tokens[r]`` tokens.
    policy
        The policy (a fresh one per run), or ``None`` for the engine's own scheduler.
    kv
        One :class:`KVLayout` per instance (identical block sizes).
    engine
        Engine name for the trace and messages.
    estimates
        Output-length estimates the policy sees, in true output tokens; ``None``: the truth.
    seed
        Seed handed to the policy.
    clock
        What a step's duration is measured in: ``"wall"`` seconds (``time.perf_counter``; what a user
        waits), or ``"cpu"`` seconds of this process (``time.process_time``: all its threads, immune
        to other processes competing for a shared machine's cores; for CPU engines only).

    Attributes
    ----------
    steps_problem
        :func:`engine_problem` of ``problem``: what policies, bounds and the result use.
    client_request, client_state, prompt, output, reserve_tokens
        The per-client and per-request lists a policy reads through ``state.engine`` (``output`` is
        in decode steps, ``reserve_tokens`` in block-rounded tokens).
    states
        One :class:`~lloptim.runtime.engine.InstanceState` per instance.
    tokens
        Token ids each finished request generated (``request row -> list``).
    """

    def __init__(self, problem: Problem, policy: Policy | None, kv: Sequence[KVLayout], engine: str = "engine",
                 estimates: np.ndarray | None = None, seed: int = 0, clock: str = "wall") -> None:
        if clock not in CLOCKS:
            raise SpecError("clock", f"unknown clock {clock!r}", f"use one of {sorted(CLOCKS)}")
        self.clock_name = clock
        #: The clock plug-ins time steps with (seconds).
        self.clock = CLOCKS[clock]
        n_inst = len(problem.instances)
        if len(kv) != n_inst:
            raise SpecError("kv", f"{len(kv)} KV layouts for {n_inst} instances", "give one per instance")
        if len({(k.block_size, k.slack_blocks) for k in kv}) != 1:
            raise SpecError("kv", "replicas with different KV block sizes",
                            "serve replicas of one engine configuration")
        if policy is not None and policy.migration is not None:
            raise SpecError("policy", "engines cannot move running requests between replicas",
                            "use a policy without migration")
        self.problem = problem
        self.steps_problem = engine_problem(problem)
        self.policy = policy
        self.engine_name = engine
        self.kv = list(kv)
        w = self.steps_problem.workload
        n = len(w)
        if estimates is None:
            est, known = w.output_tokens.astype(np.float64), True
        else:
            est = np.asarray(estimates, dtype=np.float64)
            if est.shape != (n,) or not np.all(np.isfinite(est)) or np.any(est <= 0):
                raise SpecError("estimates", f"need {n} finite positive output estimates",
                                "give one estimate (tokens) per request")
            known = bool(np.array_equal(est, problem.workload.output_tokens))
            est = np.maximum(est - 1.0, 1.0)  # in decode steps, like the outputs
        self.ctx = RunContext(self.steps_problem, est, known, self.steps_problem.client_instance(), seed)
        self.prompt = w.prompt_tokens.tolist()
        self.output = w.output_tokens.tolist()
        self.tokens_wanted = problem.workload.output_tokens.tolist()
        # the KV cache peaks at prompt + cap - 1 tokens: the last sampled token is never fed back
        peak = problem.workload.prompt_tokens + problem.workload.max_output_tokens - 1
        self.reserve_tokens = [kv[0].reservation(t) for t in peak.tolist()]
        cap_tokens = [k.capacity_tokens for k in kv]
        too_big = [r for r in range(n) if self.reserve_tokens[r] > max(cap_tokens)]
        if too_big:
            r = too_big[0]
            raise SpecError(f"requests[{r}]", f"needs {self.reserve_tokens[r]} KV tokens (whole blocks of "
                            f"{kv[0].block_size}) but the largest engine KV pool holds {max(cap_tokens)}",
                            "give the engine more KV blocks or shorten the request")
        self.client_request = [-1] * problem.n_clients
        self.client_state = [IDLE] * problem.n_clients
        self.ctx.extra["client_state"] = self.client_state
        # when each request becomes schedulable (arrival, or its predecessors' finish), in time order
        self.readiness = ReadyTimes(w)
        self.states = [InstanceState(self, k, self.ctx.instance_clients(k), cap_tokens[k],
                                     inst.profile.latency) for k, inst in enumerate(problem.instances)]
        self.assign_s = np.full(n, np.nan)
        self.prefill_start_s = np.full(n, np.nan)
        self.prefill_end_s = np.full(n, np.nan)
        self.done_s = np.full(n, np.nan)
        self.req_client = np.full(n, -1, dtype=np.int64)
        self.restarts = np.zeros(n, dtype=np.int64)
        self.trace: list[tuple] = []
        self.trace_kv: list[int] = []
        self.trace_decodes: list[int] = []
        self.decisions: list[int] = []
        self.tokens: dict[int, list[int]] = {}
        self.decoded = [0] * n  # decode steps each request has taken part in
        self.carried = [0] * n  # output tokens an engine recomputes after preempting a request
        self.n_done = 0
        self.generated = 0
        self.wasted = 0
        self.preemptions = 0
        self.deviations = 0
        self.empty_steps = [0] * n_inst
        self.steps_taken = [0] * n_inst
        # engine's own scheduler: a router hands ready requests, first come first served, to an
        # instance with a free slot (one engine: the engine's own queue order)
        self.router: list[int] = []
        self.routed = 0
        self.queued: list[dict[int, None]] = [{} for _ in range(n_inst)]  # submitted, not yet started
        self._started = False
        self._t_wall = time.perf_counter()

    # -- setup -----------------------------------------------------------------------------------
    @property
    def policy_name(self) -> str:
        """The policy's name, or :data:`ENGINE_DEFAULT`."""
        return ENGINE_DEFAULT if self.policy is None else self.policy.name

    def start(self) -> None:
        """Set the policy up (the offline plan is solved here) and start the wall clock."""
        if self._started:
            return
        self._started = True
        if self.policy is not None:
            self.policy.setup(self.ctx)
        self._t_wall = time.perf_counter()

    def request_handle(self, row: int) -> str:
        """The engine request id of request row ``row``."""
        return f"lloptim-{row}"

    @staticmethod
    def row_of(handle: str) -> int:
        """The request row of an engine request id made by :meth:`request_handle` (-1 if foreign)."""
        if isinstance(handle, str) and handle.startswith("lloptim-"):
            try:
                return int(handle[8:])
            except ValueError:
                return -1
        return -1

    # -- binding requests to clients -------------------------------------------------------------
    def pending(self) -> int:
        """Ready requests not yet given to an instance (count)."""
        if self.policy is not None:
            return self.policy.requests.pending()
        return len(self.router) - self.routed

    @property
    def next_ready(self) -> float:
        """The earliest time a request not yet announced becomes ready, seconds (``inf``: none known)."""
        return self.readiness.next_ready

    def release(self, now: float) -> bool:
        """Announce every request ready by ``now`` (to the request scheduler, or the router); any?

        As in the simulator, every instance then looks for work again (``state.dirty``).

        Parameters
        ----------
        now
            Clock of the instance about to step, seconds.

        Returns
        -------
        bool
            Whether a request was announced.
        """
        due = self.readiness.pop(now)
        if not due:
            return False
        if self.policy is not None:
            on_ready = self.policy.requests.on_ready
            for t, r in due:
                on_ready(r, t)
        else:
            self.router.extend(r for _, r in due)
        for st in self.states:
            st.dirty = True
        return True

    def bind(self, k: int) -> list[int]:
        """Give idle clients of instance ``k`` requests; return the rows the engine must now receive.

        With a policy, its request scheduler picks a request for each idle client (among the requests
        :meth:`release` announced to it; the scheduler is shared by all instances, so an idle client
        may take another replica's planned work). With the engine's own scheduler, a router hands
        ready requests first come first served to the instance while it has free slots (the engine
        then decides when to start them).

        As in the simulator, an instance takes requests when it has just freed a client or woken up
        from idling (``state.dirty``), not at every step.
        """
        s = self.states[k]
        if not s.dirty:
            return []
        s.dirty = False
        if self.policy is None:
            rows = []
            free = len(s.idle) - len(self.queued[k])
            while free > 0 and self.routed < len(self.router):
                r = self.router[self.routed]
                self.routed += 1
                self.queued[k][r] = None
                self.assign_s[r] = s.now
                rows.append(r)
                free -= 1
            return rows
        rs = self.policy.requests
        rows = []
        if not s.idle or not rs.pending():
            return rows
        for c in list(s.idle):
            r = rs.next_request(s, c)
            if r is None:
                continue
            if not (0 <= r < len(self.prompt)) or self.req_client[r] >= 0 or not math.isnan(self.done_s[r]):
                raise PolicyError(f"{type(rs).__name__}.next_request handed out request {r}, "
                                  "which is unknown, already held by a client or done")
            if not self.readiness.ready[r] <= s.now:  # NaN: never announced
                raise PolicyError(f"{type(rs).__name__}.next_request handed out request {r} at {s.now:.6g} s, before "
                                  "it was ready (hand out only requests announced by on_ready)")
            del s.idle[c]
            s.waiting[c] = None
            self.client_state[c] = WAITING
            self.client_request[c] = r
            self.req_client[r] = c
            self.assign_s[r] = s.now
            rows.append(r)
            if not rs.pending():
                break
        return rows

    def has_work(self, k: int) -> bool:
        """Whether instance ``k`` has a request to run (waiting, running, or queued in the engine)."""
        s = self.states[k]
        return bool(s.waiting or s.n_running or self.queued[k])

    def wake_time(self, k: int, busy_clocks: Sequence[float]) -> float | None:
        """When idle instance ``k`` should look again (next ready request or a busy peer's clock); None: never.

        Parameters
        ----------
        k
            Instance index.
        busy_clocks
            Clocks of the instances that are busy, seconds.

        Returns
        -------
        float or None
            The time to wake at, seconds; ``None`` when nothing can come its way.
        """
        s = self.states[k]
        candidates = []
        if self.next_ready < math.inf:
            candidates.append(max(self.next_ready, s.now))
        if busy_clocks and (self.pending() or not candidates):
            # work is waiting for a client, or a peer may still finish work that readies requests
            # (the simulator's rule, so engine runs follow the schedule it predicts)
            candidates.append(max(min(busy_clocks), s.now))
        return min(candidates) if candidates else None

    # -- decisions -------------------------------------------------------------------------------
    def plan(self, k: int) -> StepPlan | None:
        """The policy's next step for instance ``k`` (``None`` with the engine's own scheduler).

        Raises
        ------
        PolicyError
            The decision is impossible (a client that is not waiting, a chunk longer than what is left
            of its prompt, admissions beyond the free KV blocks, a decode with nothing running).
        """
        if self.policy is None:
            return None
        s = self.states[k]
        its = self.policy.iterations
        name = type(its).__name__
        t0 = time.perf_counter_ns()
        decision = its.decide(s)
        self.decisions.append(time.perf_counter_ns() - t0)
        free = s.kv_free
        if type(decision) is Decode:
            if s.n_running == 0:
                raise PolicyError(f"{name} asked for a decode with no running client on instance {k}; "
                                  "prefill a waiting client first")
            return StepPlan(True, {}, "decode")
        if type(decision) is Prefill:
            clients = list(decision.clients)
            if not clients:
                raise PolicyError(f"{name} asked for a prefill of no client")
            if len(set(clients)) != len(clients):
                raise PolicyError(f"prefill names a client twice: {clients}")
            prompts = {}
            for c in clients:
                r, free = self._admissible(s, c, free, name)
                prompts[r] = self.prompt[r] + self.carried[r] - s.prefilled.get(c, 0)
            return StepPlan(False, prompts, "prefill")
        if type(decision) is Mixed:
            if not decision.chunks and s.n_running == 0:
                raise PolicyError("a mixed iteration with no chunk and no running client does nothing")
            prompts = {}
            for c, n_tok in decision.chunks.items():
                r, free = self._admissible(s, c, free, name)
                left = self.prompt[r] + self.carried[r] - s.prefilled.get(c, 0)
                if not (isinstance(n_tok, (int, np.integer)) and 0 < n_tok <= left):
                    raise PolicyError(f"chunk of {n_tok!r} tokens for client {c}: {left} prompt tokens remain")
                prompts[r] = int(n_tok)
            return StepPlan(s.n_running > 0, prompts, "mixed")
        raise PolicyError(f"{name}.decide returned {decision!r}; return Prefill(clients), DECODE or Mixed(chunks)")

    def _admissible(self, s: InstanceState, c: int, free: int, name: str) -> tuple[int, int]:
        if self.client_state[c] != WAITING or c not in s.waiting:
            raise PolicyError(f"{name} asked to prefill client {c}, which is not waiting on instance {s.index}")
        r = self.client_request[c]
        if c not in s.prefilled:
            need = self.reserve_tokens[r]
            if need > free:
                raise PolicyError(f"prefilling client {c} needs {need} KV tokens but only {free} of "
                                  f"{s.kv_capacity} are free on instance {s.index}; check state.kv_free first")
            free -= need
        return r, free

    # -- what the engine did ---------------------------------------------------------------------
    def observe(self, k: int, work: Mapping[int, int], duration_s: float,
                finished: Mapping[int, Sequence[int]] = {}, preempted: Sequence[int] = (),
                plan: StepPlan | None = None) -> None:
        """Account for one engine step of instance ``k``.

        Parameters
        ----------
        k
            Instance index.
        work
            ``request row -> tokens`` the step processed (1 for a decode; a prompt chunk otherwise).
        duration_s
            Measured duration of the step, seconds.
        finished
            Requests the step completed, with all the token ids each generated.
        preempted
            Requests the engine took back from running (it recomputes them later).
        plan
            What the policy had asked for (to count deviations), if anything.

        Raises
        ------
        EngineError
            The engine processed a request this run does not know, or a request finished with
            another number of tokens than it asked for.
        """
        s = self.states[k]
        name = self.engine_name
        if not (duration_s >= 0 and math.isfinite(duration_s)):
            raise EngineError(name, f"step of instance {k} measured {duration_s!r} s")
        decodes, chunks = [], []
        for r, n_tok in work.items():
            c = int(self.req_client[r]) if 0 <= r < len(self.prompt) else -1
            if c < 0 and self.policy is None and r in self.queued[k]:
                c = self._start_observed(s, r)
            if c < 0 or self.ctx.client_instance[c] != k:
                raise EngineError(name, f"instance {k} processed request {r}, which is not bound to it")
            if self.client_state[c] == RUNNING:
                if n_tok != 1:
                    raise EngineError(name, f"request {r} processed {n_tok} tokens in a decode step")
                decodes.append(r)
            else:
                chunks.append((c, r, int(n_tok)))
        if plan is not None and self._deviates(plan, decodes, chunks, s):
            self.deviations += 1
        if not work:
            self.empty_steps[k] += 1
            if self.empty_steps[k] >= MAX_IDLE_STEPS and self.has_work(k):
                raise EngineError(name, f"instance {k} ran {MAX_IDLE_STEPS} steps without processing a request "
                                  f"while {len(s.waiting) + s.n_running + len(self.queued[k])} were due",
                                  "give the engine more KV blocks or a larger token budget")
            s.now += duration_s
            return
        self.empty_steps[k] = 0
        self.steps_taken[k] += 1
        prompt_tokens = sum(n for _, _, n in chunks)
        running_before = s.n_running
        start = s.now
        full = all(s.prefilled.get(c, 0) == 0 and n == self.prompt[r] + self.carried[r] for c, r, n in chunks)
        kind = KIND_DECODE if not chunks else (KIND_PREFILL if not decodes and full else KIND_MIXED)
        self.trace.append((k, kind, start, duration_s, len(decodes) + len(chunks), prompt_tokens, running_before))
        self.trace_kv.append(sum(self.prompt[r] + self.carried[r] + self.decoded[r] for r in decodes))
        self.trace_decodes.append(len(decodes))
        s.now = start + duration_s
        if decodes:
            s.decode_steps += 1
            s.kv_tokens += len(decodes)
            for r in decodes:
                self.decoded[r] += 1
        for c, r, n_tok in chunks:
            before = s.prefilled.get(c, 0)
            if before == 0:
                if math.isnan(self.prefill_start_s[r]):
                    self.prefill_start_s[r] = start
                s.kv_reserved += self.reserve_tokens[r]
            if before + n_tok >= self.prompt[r] + self.carried[r]:
                s.prefilled.pop(c, None)
                del s.waiting[c]
                self.client_state[c] = RUNNING
                s.n_running += 1
                s.kv_tokens += self.prompt[r] + self.carried[r]
                self.prefill_end_s[r] = s.now
            else:
                s.prefilled[c] = before + n_tok
        for r in preempted:
            self._preempt(s, r)
        for r, ids in finished.items():
            self._finish(s, r, list(ids))

    def _deviates(self, plan: StepPlan, decodes: list[int], chunks: list[tuple[int, int, int]],
                  s: InstanceState) -> bool:
        if plan.decode and len(decodes) != s.n_running:
            return True
        if not plan.decode and decodes:
            return True
        return {r: n for _, r, n in chunks} != plan.prompts

    def _start_observed(self, s: InstanceState, r: int) -> int:
        """The engine's own scheduler started queued request ``r``: bind it to a free client slot."""
        if not s.idle:
            raise EngineError(self.engine_name, f"instance {s.index} runs more requests than its "
                              f"{len(s.clients)} clients", "configure the engine's concurrency to the clients")
        c = next(iter(s.idle))
        del s.idle[c]
        del self.queued[s.index][r]
        s.waiting[c] = None
        self.client_state[c] = WAITING
        self.client_request[c] = r
        self.req_client[r] = c
        return c

    def _release(self, s: InstanceState, c: int, r: int) -> None:
        state = self.client_state[c]
        if state == RUNNING:
            s.n_running -= 1
            s.kv_tokens -= self.prompt[r] + self.carried[r] + self.decoded[r]
            s.kv_reserved -= self.reserve_tokens[r]
        elif c in s.waiting:
            del s.waiting[c]
            if c in s.prefilled:
                s.prefilled.pop(c)
                s.kv_reserved -= self.reserve_tokens[r]

    def _finish(self, s: InstanceState, r: int, ids: list[int]) -> None:
        c = int(self.req_client[r])
        if c < 0 or self.client_request[c] != r:
            raise EngineError(self.engine_name, f"request {r} finished but is not held by a client of instance "
                              f"{s.index}")
        want = self.tokens_wanted[r]
        if len(ids) != want:
            raise EngineError(self.engine_name, f"request {r} finished with {len(ids)} output tokens, "
                              f"{want} were asked for", "serve with EOS ignored and max tokens = output_tokens")
        self._release(s, c, r)
        self.client_state[c] = IDLE
        self.client_request[c] = -1
        s.idle[c] = None
        s.dirty = True
        self.done_s[r] = s.now
        self.tokens[r] = ids
        self.n_done += 1
        self.generated += want
        if self.policy is not None:
            self.policy.on_finish(r, c, self.output[r], s.now)
        self.readiness.finished(r, s.now)

    def _preempt(self, s: InstanceState, r: int) -> None:
        """The engine evicted running request ``r`` to free KV blocks: it will recompute it."""
        c = int(self.req_client[r])
        if c < 0:
            return
        was_running = self.client_state[c] == RUNNING
        self._release(s, c, r)
        self.preemptions += 1
        self.restarts[r] += 1
        if was_running:
            # the engine recomputes the prompt and the tokens generated so far, then decodes on
            self.carried[r] += self.decoded[r] + 1
            self.wasted += self.decoded[r] + 1
            self.decoded[r] = 0
        s.waiting[c] = None
        self.client_state[c] = WAITING

    # -- the result ------------------------------------------------------------------------------
    def result(self) -> RunResult:
        """The run as a :class:`~lloptim.runtime.engine.RunResult` over :attr:`steps_problem`.

        ``generated_tokens`` counts the true output tokens; ``extra`` holds ``engine``,
        ``preemptions`` (requests an engine evicted and recomputed), ``plan_deviations`` (steps that
        did not do what the policy asked), ``trace_decodes`` (requests each step decoded) and
        ``trace_kv_tokens`` (the KV tokens those requests held before the step), for calibration,
        ``clock``, and ``note`` (:data:`DECODE_STEPS_NOTE`).
        """
        tr = self.trace
        cols = list(zip(*tr)) if tr else [()] * 7
        return RunResult(
            problem=self.steps_problem, policy=self.policy_name, backend=self.engine_name,
            known_lengths=self.ctx.known_lengths, client=self.req_client.copy(), assign_s=self.assign_s.copy(),
            prefill_start_s=self.prefill_start_s.copy(), prefill_end_s=self.prefill_end_s.copy(),
            done_s=self.done_s.copy(), restarts=self.restarts.copy(),
            migrations=np.zeros(len(self.prompt), dtype=np.int64),
            ready_s=np.array(self.readiness.ready, dtype=np.float64),
            trace_instance=np.array(cols[0], dtype=np.int32), trace_kind=np.array(cols[1], dtype=np.int8),
            trace_start_s=np.array(cols[2], dtype=np.float64), trace_duration_s=np.array(cols[3], dtype=np.float64),
            trace_participants=np.array(cols[4], dtype=np.int32),
            trace_prefill_tokens=np.array(cols[5], dtype=np.int64), trace_running=np.array(cols[6], dtype=np.int32),
            decision_ns=np.array(self.decisions, dtype=np.int64), generated_tokens=self.generated,
            wasted_tokens=self.wasted, requeued=self.preemptions, failed_clients=0,
            wall_s=time.perf_counter() - self._t_wall,
            extra={"engine": self.engine_name, "preemptions": self.preemptions, "plan_deviations": self.deviations,
                   "trace_kv_tokens": np.array(self.trace_kv, dtype=np.int64),
                   "trace_decodes": np.array(self.trace_decodes, dtype=np.int64), "note": DECODE_STEPS_NOTE,
                   "kv_capacity_tokens": [s.kv_capacity for s in self.states], "clock": self.clock_name,
                   "kv_block_size": self.kv[0].block_size},
        )


class EngineDriver(Protocol):
    """One started engine instance, as :func:`drive` and :func:`~lloptim.engines.serve.serve_engine` use it.

    Attributes
    ----------
    name
        Engine name (``"vllm"``, ``"hf"``).
    clients
        Concurrent request slots, count.
    kv_layout
        Its KV pool (:class:`KVLayout`).
    token_budget
        Tokens one step processes at most, tokens.
    """

    name: str
    clients: int
    kv_layout: KVLayout
    token_budget: int

    def attach(self, run: EngineRun, instance: int) -> None:
        """Serve ``run`` as instance ``instance`` (plug the run into the engine's scheduler).

        Parameters
        ----------
        run
            The run to serve.
        instance
            This engine's instance index in the run.
        """

    def detach(self) -> None:
        """Stop serving the run; leave the engine empty for the next one."""

    def submit(self, rows: Sequence[int]) -> None:
        """Hand the engine the requests of ``rows`` (bound to its clients, or queued for its scheduler)."""

    def step(self) -> None:
        """Run one engine step; the plug-in reports it to the run (:meth:`EngineRun.observe`)."""


def drive(run: EngineRun, engines: Sequence[EngineDriver]) -> RunResult:
    """Serve ``run`` on ``engines`` (one per instance) until every request finished; return the result.

    Instances step one at a time, the one with the earliest clock first (ties: busy before idle), as
    in the simulator; requests are announced when the clock of the instance about to step reaches
    their ready time; an instance with nothing to run jumps to the next ready time, or retires until
    a request becomes ready.

    Parameters
    ----------
    run
        The run state (its plug-ins must be attached to ``engines``).
    engines
        One driver per instance.

    Returns
    -------
    RunResult
        :meth:`EngineRun.result`.

    Raises
    ------
    PolicyError
        A policy decision was impossible, or requests were never served.
    EngineError
        An engine failed or stopped making progress.
    """
    if len(engines) != len(run.states):
        raise SpecError("engines", f"{len(engines)} engines for {len(run.states)} instances", "give one per instance")
    run.start()
    n = len(run.prompt)
    active = [(0.0, 0, k) for k in range(len(run.states))]
    heapq.heapify(active)
    retired: set[int] = set()
    while run.n_done < n:
        if not active:
            raise PolicyError(f"{n - run.n_done} requests were never served: {run.pending()} pending with every "
                              "client idle")
        _, _, k = heapq.heappop(active)
        s = run.states[k]
        if run.next_ready <= s.now and run.release(s.now):
            # requests became ready: instances that had gone quiet look again
            for j in sorted(retired):
                other = run.states[j]
                other.now = max(other.now, s.now)
                heapq.heappush(active, (other.now, 1, j))
            retired.clear()
        rows = run.bind(k)
        if rows:
            engines[k].submit(rows)
        if not run.has_work(k):
            wake = run.wake_time(k, [t for t, idle, _ in active if not idle])
            if wake is None:
                retired.add(k)
                continue
            s.now = max(s.now, wake)
            s.dirty = True
            heapq.heappush(active, (s.now, 1, k))
            continue
        engines[k].step()
        heapq.heappush(active, (s.now, 0, k))
    return run.result()
