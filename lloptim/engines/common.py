"""Engine-neutral pieces of the real-engine adapters: the run state, the driver loop, the trace.

An adapter (:mod:`lloptim.engines.vllm`, :mod:`lloptim.engines.hf`) plugs a scheduler class into a
serving engine. That scheduler asks an :class:`EngineRun` what the next step should do and tells it
what the engine actually did; everything that is not specific to one engine lives here, once:

* **The state view.** Policies decide on :class:`~lloptim.runtime.engine.InstanceState` and, through
  ``state.engine``, on per-client lists (``client_request``, ``prompt``, ``context``, ...). An
  :class:`EngineRun` provides exactly those, filled from what the engine reports after each step
  (which requests it processed, how many tokens each, which finished), so the runtime's policies run
  unchanged inside an engine. Observation, not prediction, moves the state: if an engine schedules
  less than it was asked to (a KV allocation that failed, a token budget), the view follows the
  engine and the deviation is counted in ``RunResult.extra["plan_deviations"]``.
* **Memory.** The view counts the engine's real KV blocks (its block size and pool) in the
  runtime's KV model (:mod:`lloptim.memory`): in ``"paged"`` mode a prefill takes the blocks of its
  prompt and the engine preempts (recomputes) a request when the decodes outgrow the pool, the
  engine preempting first the requests the policy's victim rule names; in ``"reserve"`` mode a
  prefill reserves the request's peak, so nothing is ever preempted. Either way a policy's prefill
  is checked against the free blocks before the engine sees it, so a plug-in never admits what the
  engine's blocks cannot hold (:class:`KVLayout`).
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

import math
import time
from dataclasses import dataclass, field, replace
from typing import Mapping, Protocol, Sequence

import numpy as np

from lloptim.errors import LloptimError, PolicyError, SpecError
from lloptim.memory import blocks, check_kv_mode, reservation_tokens
from lloptim.problem import Instance, Problem, Workload
from lloptim.runtime.engine import (IDLE, KIND_DECODE, KIND_MIXED, KIND_PREFILL, RUNNING, WAITING, InstanceState,
                                    RunResult)
from lloptim.runtime.policy import Decode, Mixed, Policy, Prefill, RunContext, output_estimates
from lloptim.runtime.clocks import InstanceClocks, wake_time
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
    victims
        Request rows the engine should preempt first, in this order, if the step's decodes need
        more KV blocks than are free (the policy's victim rule; empty when they fit).
    """

    decode: bool
    prompts: dict[int, int]
    kind: str
    victims: list[int] = field(default_factory=list)

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


class _EngineState(InstanceState):
    """An instance's :class:`~lloptim.runtime.engine.InstanceState` filled from an engine's reports.

    The runtime's engine counts a decode step's new blocks incrementally; here they are counted
    from the observed caches (one pass over the instance's clients), with the same meaning.
    """

    __slots__ = ()

    def growth_blocks(self) -> int:
        """Blocks the next decode step of the running requests needs (count)."""
        run = self.engine
        state, request_of = run.client_state, run.client_request
        need = 0
        for c in self.clients:
            if state[c] == RUNNING:
                r = request_of[c]
                t = run.context[r] + run.decoded[r]
                need += self.held_blocks(r, t + 1) > self.held_blocks(r, t)
        return need


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
    kv_mode
        How policies see the engines' KV memory (:mod:`lloptim.memory`): ``"paged"`` (a prefill
        takes the blocks of its prompt; the engine preempts when decodes outgrow the pool, as vLLM
        does) or ``"reserve"`` (a prefill reserves the request's peak, so nothing is ever
        preempted); ``None``: each instance's own (its spec's ``kv_mode``).

    Attributes
    ----------
    steps_problem
        :func:`engine_problem` of ``problem``: what policies, bounds and the result use.
    client_request, client_state, client_start_step, client_epoch, prompt, output, context, generated_before, reserve_floor
        The per-client and per-request lists a policy reads through ``state.engine``, with the
        runtime engine's meaning (``output`` and ``generated_before`` in decode steps).
    states
        One :class:`~lloptim.runtime.engine.InstanceState` per instance.
    tokens
        Token ids each finished request generated (``request row -> list``).
    """

    def __init__(self, problem: Problem, policy: Policy | None, kv: Sequence[KVLayout], engine: str = "engine",
                 estimates: np.ndarray | None = None, seed: int = 0, clock: str = "wall",
                 kv_mode: str | None = None) -> None:
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
        if kv_mode is not None:
            check_kv_mode(kv_mode, "kv_mode")
        self.kv_modes = [inst.kv_mode if kv_mode is None else kv_mode for inst in problem.instances]
        block = kv[0].block_size
        # blocks a policy may fill: the pool, less one block per client for an allocator that takes
        # one ahead (transformers' pages)
        visible = [max(1, k.blocks - k.slack_blocks * inst.clients) for k, inst in zip(kv, problem.instances)]
        wt = problem.workload
        # the KV cache peaks at prompt + max(output, cap) - 1 tokens: the last sampled token is never fed back
        peak = (wt.prompt_tokens + np.maximum(wt.output_tokens, wt.max_output_tokens) - 1).tolist()
        too_big = [r for r in range(len(wt)) if blocks(peak[r], block) > max(visible)]
        if too_big:
            r = too_big[0]
            raise SpecError(f"requests[{r}]", f"needs {blocks(peak[r], block) * block} KV tokens (whole blocks of "
                            f"{block}) but the largest engine KV pool holds {max(visible) * block}",
                            "give the engine more KV blocks or shorten the request")
        # what policies plan with: each instance's KV pool is its engine's
        insts = tuple(Instance.from_profile(inst.profile, inst.clients, visible[k] * block, name=inst.name,
                                            kv_mode=self.kv_modes[k], kv_block_tokens=block)
                      for k, inst in enumerate(problem.instances))
        self.problem = problem
        self.steps_problem = engine_problem(Problem(wt, insts, name=problem.name))
        self.policy = policy
        self.engine_name = engine
        self.kv = list(kv)
        w = self.steps_problem.workload
        n = len(w)
        if estimates is None:
            est, known = w.output_tokens.astype(np.float64), True
        else:
            est, known = output_estimates(estimates, problem.workload.output_tokens)
            est = np.maximum(est - 1.0, 1.0)  # in decode steps, like the outputs
        self.ctx = RunContext(self.steps_problem, est, known, self.steps_problem.client_instance(), seed)
        self.ctx.extra["kv_mode"] = list(self.kv_modes)
        self.prompt = w.prompt_tokens.tolist()
        self.output = w.output_tokens.tolist()
        self.tokens_wanted = problem.workload.output_tokens.tolist()
        # in the engine's steps the peak is prompt + the cap of decode steps
        self.reserve_floor = np.minimum(reservation_tokens(w.prompt_tokens, w.max_output_tokens, est),
                                        min(visible) * block).tolist()
        # tokens a prefill processes (the prompt, plus what it had generated before a preemption)
        self.context = list(self.prompt)
        self.generated_before = [0] * n
        self.client_request = [-1] * problem.n_clients
        self.client_state = [IDLE] * problem.n_clients
        self.client_start_step = [0] * problem.n_clients
        self.client_epoch = [0] * problem.n_clients
        self.ctx.extra["client_state"] = self.client_state
        # when each request becomes schedulable (arrival, or its predecessors' finish), in time order
        self.readiness = ReadyTimes(w)
        self.states = [_EngineState(self, k, self.ctx.instance_clients(k), visible[k] * block,
                                    inst.profile.latency, self.kv_modes[k], block)
                       for k, inst in enumerate(problem.instances)]
        self.assign_s = np.full(n, np.nan)
        self.prefill_start_s = np.full(n, np.nan)
        self.prefill_end_s = np.full(n, np.nan)
        self.done_s = np.full(n, np.nan)
        self.req_client = np.full(n, -1, dtype=np.int64)
        self.preempted = np.zeros(n, dtype=np.int64)
        self.trace: list[tuple] = []
        self.trace_kv: list[int] = []  # KV tokens the decoding requests held before each step
        self.trace_mem: list[int] = []  # KV memory allocated during each step, tokens
        self.trace_decodes: list[int] = []
        self.trace_prefix: list[int] = []  # prompt tokens the step's chunks had prefilled before it
        self.decisions: list[int] = []
        self.tokens: dict[int, list[int]] = {}
        self.decoded = [0] * n  # decode steps each request has taken part in since its (re)start
        self.n_done = 0
        self.generated = 0
        self.recomputed = 0
        self.preemptions = 0
        self.deviations = 0
        self.empty_steps = [0] * n_inst
        self.steps_taken = [0] * n_inst
        # engine's own scheduler: a router hands ready requests, first come first served, to an
        # instance with a free slot (one engine: the engine's own queue order)
        self.router: list[int] = []
        self.routed = 0
        self.queued: list[dict[int, None]] = [{} for _ in range(n_inst)]  # submitted, not yet started
        # clients whose whole-prompt prefill the engine cut at its token budget (to be finished first)
        self.split: list[dict[int, None]] = [{} for _ in range(n_inst)]
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
            on_ready = self.policy.on_ready
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
        from idling (``state.dirty``), or when the request scheduler asks to be asked again
        (:meth:`~lloptim.runtime.policy.RequestScheduler.wants_retry`), not at every step.
        """
        s = self.states[k]
        if not s.dirty and not (self.policy is not None and s.idle and self.policy.requests.pending()
                                and self.policy.requests.wants_retry(s)):
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

    def wake_time(self, k: int, earliest_busy: float) -> float | None:
        """When idle instance ``k`` should look again (next ready request or a busy peer's clock); None: never.

        The simulator's rule (:func:`lloptim.runtime.clocks.wake_time`), so engine runs follow the
        schedule it predicts.

        Parameters
        ----------
        k
            Instance index.
        earliest_busy
            The lowest clock of a busy instance, seconds (``inf``: none is busy).

        Returns
        -------
        float or None
            The time to wake at, seconds; ``None`` when nothing can come its way.
        """
        return wake_time(self.states[k].now, self.next_ready, earliest_busy, bool(self.pending()))

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
        split = self.split[k]
        if split:
            # the engine cut a prefill at its token budget: finish it, as the decision asked, first
            prompts = {}
            free = s.kv_free_blocks
            for c in list(split):
                if c not in s.prefilled:
                    del split[c]
                    continue
                r = self.client_request[c]
                prompts[r] = self.context[r] - s.prefilled[c]
                free = self._take(s, c, r, s.prefilled[c], self.context[r], free, name)
            if prompts:
                return StepPlan(False, prompts, "prefill")
        t0 = time.perf_counter_ns()
        decision = its.decide(s)
        self.decisions.append(time.perf_counter_ns() - t0)
        free = s.kv_free_blocks
        if type(decision) is Decode:
            if s.n_running == 0:
                raise PolicyError(f"{name} asked for a decode with no running client on instance {k}; "
                                  "prefill a waiting client first")
            return StepPlan(True, {}, "decode", self._victims(s, free))
        if type(decision) is Prefill:
            clients = list(decision.clients)
            if not clients:
                raise PolicyError(f"{name} asked for a prefill of no client")
            if len(set(clients)) != len(clients):
                raise PolicyError(f"prefill names a client twice: {clients}")
            prompts = {}
            for c in clients:
                r = self._waiting(s, c, name)
                done = s.prefilled.get(c, 0)
                prompts[r] = self.context[r] - done
                free = self._take(s, c, r, done, self.context[r], free, name)
            return StepPlan(False, prompts, "prefill")
        if type(decision) is Mixed:
            if not decision.chunks and s.n_running == 0:
                raise PolicyError("a mixed iteration with no chunk and no running client does nothing")
            prompts = {}
            for c, n_tok in decision.chunks.items():
                r = self._waiting(s, c, name)
                done = s.prefilled.get(c, 0)
                left = self.context[r] - done
                if not (isinstance(n_tok, (int, np.integer)) and 0 < n_tok <= left):
                    raise PolicyError(f"chunk of {n_tok!r} tokens for client {c}: {left} prompt tokens remain")
                prompts[r] = int(n_tok)
                free = self._take(s, c, r, done, done + int(n_tok), free, name)
            victims = self._victims(s, free) if s.n_running else []
            return StepPlan(s.n_running > 0, prompts, "mixed", victims)
        raise PolicyError(f"{name}.decide returned {decision!r}; return Prefill(clients), DECODE or Mixed(chunks)")

    def _waiting(self, s: InstanceState, c: int, name: str) -> int:
        if self.client_state[c] != WAITING or c not in s.waiting:
            raise PolicyError(f"{name} asked to prefill client {c}, which is not waiting on instance {s.index}")
        return self.client_request[c]

    def _take(self, s: InstanceState, c: int, r: int, done: int, after: int, free: int, name: str) -> int:
        """Blocks left after ``c``'s cache grows from ``done`` to ``after`` tokens (its prompt part).

        As the runtime engine: a prefill or chunk must fit the free blocks as they are (a decode
        step's growth is made room for by preemption), or the decision is refused.
        """
        have = s.held_blocks(r, done) if c in s.prefilled else 0
        need = s.held_blocks(r, after) - have
        if need > free:
            raise PolicyError(f"prefilling client {c} needs {need * s.kv_block} KV tokens ({need} blocks) but only "
                              f"{free * s.kv_block} are free on instance {s.index}; check state.kv_free (or the "
                              "helpers of lloptim.runtime.iteration_schedulers) first")
        return free - need

    def _victims(self, s: InstanceState, free: int) -> list[int]:
        """Rows the engine should preempt first if the next decode step's new blocks do not fit ``free``.

        The policy's victim rule (:meth:`~lloptim.runtime.policy.IterationScheduler.victim`), else
        the most recently started request, asked repeatedly as the runtime engine does; the engine
        preempts only what it must, in this order.
        """
        if s.kv_unbound or s.n_running == 0 or s.growth_blocks() <= free:
            return []
        its = self.policy.iterations
        victims, flipped = [], []
        try:
            while s.n_running > len(victims) and s.growth_blocks() > free:
                c = its.victim(s)
                if c is None or self.client_state[c] != RUNNING or not (s.clients.start <= c < s.clients.stop):
                    running = [x for x in s.clients if self.client_state[x] == RUNNING]
                    c = max(running, key=lambda x: (self.client_start_step[x], x))
                r = self.client_request[c]
                free += s.held_blocks(r, self.context[r] + self.decoded[r])
                self.client_state[c] = WAITING  # out of the running set while the next victim is chosen
                flipped.append(c)
                victims.append(r)
        finally:
            for c in flipped:
                self.client_state[c] = RUNNING
        return victims

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
        # the engine preempted while it scheduled the step, before running it
        for r in preempted:
            self._preempt(s, r)
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
        full = all(s.prefilled.get(c, 0) == 0 and n == self.context[r] for c, r, n in chunks)
        kind = KIND_DECODE if not chunks else (KIND_PREFILL if not decodes and full else KIND_MIXED)
        self.trace.append((k, kind, start, duration_s, len(decodes) + len(chunks), prompt_tokens, running_before))
        self.trace_kv.append(sum(self.context[r] + self.decoded[r] for r in decodes))
        self.trace_decodes.append(len(decodes))
        self.trace_prefix.append(sum(s.prefilled.get(c, 0) for c, _, _ in chunks))
        s.now = start + duration_s
        if decodes:
            s.decode_steps += 1
            s.kv_tokens += len(decodes)
            for r in decodes:
                self.decoded[r] += 1
        for c, r, n_tok in chunks:
            before = s.prefilled.get(c, 0)
            if before == 0 and math.isnan(self.prefill_start_s[r]):
                self.prefill_start_s[r] = start
            if before + n_tok >= self.context[r]:
                s.prefilled.pop(c, None)
                self.split[k].pop(c, None)
                del s.waiting[c]
                self.client_state[c] = RUNNING
                # as if prefilled generated_before steps ago: it has produced that many of its steps
                self.client_start_step[c] = s.decode_steps - self.generated_before[r]
                s.n_running += 1
                s.kv_tokens += self.context[r]
                if math.isnan(self.prefill_end_s[r]):
                    self.prefill_end_s[r] = s.now
            else:
                s.prefilled[c] = before + n_tok
                if plan is not None and plan.kind == "prefill":
                    self.split[k][c] = None
        self._count_blocks(s)
        self.trace_mem.append(s.kv_used * s.kv_block)
        for r, ids in finished.items():
            self._finish(s, r, list(ids))

    def _count_blocks(self, s: InstanceState) -> None:
        """Blocks held by the instance's running and partly prefilled requests, as the engine allocates them."""
        used = 0
        state, request_of = self.client_state, self.client_request
        for c in s.clients:
            if state[c] == RUNNING:
                r = request_of[c]
                used += s.held_blocks(r, self.context[r] + self.decoded[r])
            elif c in s.prefilled:
                used += s.held_blocks(request_of[c], s.prefilled[c])
        s.kv_used = used
        if used > s.kv_peak:
            s.kv_peak = used

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
        if self.client_state[c] == RUNNING:
            s.n_running -= 1
            s.kv_tokens -= self.context[r] + self.decoded[r]
        elif c in s.waiting:
            del s.waiting[c]
            s.prefilled.pop(c, None)

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
        s.kv_used -= s.held_blocks(r, self.context[r] + self.decoded[r])
        self.client_state[c] = IDLE
        self.client_request[c] = -1
        self.client_epoch[c] += 1
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
        """The engine evicted running request ``r`` to free KV blocks: it will recompute it.

        The engine prefills again the prompt and every token generated so far (which also samples
        the next token), so the request counts ``generated_before`` decode steps done, as the runtime
        engine counts a recomputed request; it waits first in line.
        """
        c = int(self.req_client[r])
        if c < 0 or self.client_request[c] != r:
            return
        if self.client_state[c] == RUNNING:
            s.kv_used -= s.held_blocks(r, self.context[r] + self.decoded[r])
            self._release(s, c, r)
            self.generated_before[r] += self.decoded[r] + 1
            self.context[r] = self.prompt[r] + self.generated_before[r]
        else:  # a partly prefilled request loses its chunks
            if c in s.prefilled:
                s.kv_used -= s.held_blocks(r, s.prefilled[c])
            self._release(s, c, r)
        self.decoded[r] = 0
        self.split[s.index].pop(c, None)
        self.recomputed += self.context[r]
        self.preemptions += 1
        self.preempted[r] += 1
        self.client_epoch[c] += 1
        self.client_state[c] = WAITING
        s.waiting = {c: None, **s.waiting}  # first in line, as the engine puts it back
        s.dirty = True
        if self.policy is not None:
            self.policy.on_preempt(r, c, self.generated_before[r])

    # -- the result ------------------------------------------------------------------------------
    def result(self) -> RunResult:
        """The run as a :class:`~lloptim.runtime.engine.RunResult` over :attr:`steps_problem`.

        ``generated_tokens`` counts the true output tokens; ``extra`` holds ``engine``,
        ``preemptions`` (requests an engine evicted and recomputed), ``plan_deviations`` (steps that
        did not do what the policy asked), ``trace_decodes`` (requests each step decoded),
        ``trace_decode_kv_tokens`` (the KV tokens those requests held before the step) and
        ``trace_chunk_prefix_tokens`` (prompt tokens the step's chunks had prefilled before it), for calibration,
        ``clock``, and ``note`` (:data:`DECODE_STEPS_NOTE`).
        """
        tr = self.trace
        cols = list(zip(*tr)) if tr else [()] * 7
        return RunResult(
            problem=self.steps_problem, policy=self.policy_name, backend=self.engine_name,
            known_lengths=self.ctx.known_lengths, client=self.req_client.copy(), assign_s=self.assign_s.copy(),
            prefill_start_s=self.prefill_start_s.copy(), prefill_end_s=self.prefill_end_s.copy(),
            done_s=self.done_s.copy(), restarts=np.zeros(len(self.prompt), dtype=np.int64),
            migrations=np.zeros(len(self.prompt), dtype=np.int64),
            ready_s=np.array(self.readiness.ready, dtype=np.float64),
            trace_instance=np.array(cols[0], dtype=np.int32), trace_kind=np.array(cols[1], dtype=np.int8),
            trace_start_s=np.array(cols[2], dtype=np.float64), trace_duration_s=np.array(cols[3], dtype=np.float64),
            trace_participants=np.array(cols[4], dtype=np.int32),
            trace_prefill_tokens=np.array(cols[5], dtype=np.int64), trace_running=np.array(cols[6], dtype=np.int32),
            decision_ns=np.array(self.decisions, dtype=np.int64), generated_tokens=self.generated,
            wasted_tokens=0, requeued=0, failed_clients=0, preemptions=self.preempted.copy(),
            recomputed_tokens=self.recomputed, trace_kv_tokens=np.array(self.trace_mem, dtype=np.int64),
            wall_s=time.perf_counter() - self._t_wall,
            extra={"engine": self.engine_name, "preemptions": self.preemptions, "plan_deviations": self.deviations,
                   "trace_decode_kv_tokens": np.array(self.trace_kv, dtype=np.int64),
                   "trace_decodes": np.array(self.trace_decodes, dtype=np.int64),
                   "trace_chunk_prefix_tokens": np.array(self.trace_prefix, dtype=np.int64), "note": DECODE_STEPS_NOTE,
                   "kv_mode": list(self.kv_modes), "kv_block_tokens": [st.kv_block for st in self.states],
                   "kv_peak_tokens": [st.kv_peak * st.kv_block for st in self.states],
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
    active = InstanceClocks(len(run.states))
    retired: set[int] = set()
    while run.n_done < n:
        if not active:
            raise PolicyError(f"{n - run.n_done} requests were never served: {run.pending()} pending with every "
                              "client idle")
        _, _, k = active.pop()
        s = run.states[k]
        if run.next_ready <= s.now and run.release(s.now):
            # requests became ready: instances that had gone quiet look again
            for j in sorted(retired):
                other = run.states[j]
                other.now = max(other.now, s.now)
                active.push((other.now, 1, j))
            retired.clear()
        rows = run.bind(k)
        if rows:
            engines[k].submit(rows)
        if not run.has_work(k):
            wake = run.wake_time(k, active.earliest_busy)
            if wake is None:
                retired.add(k)
                continue
            s.now = max(s.now, wake)
            s.dirty = True
            active.push((s.now, 1, k))
            continue
        engines[k].step()
        active.push((s.now, 0, k))
    return run.result()
