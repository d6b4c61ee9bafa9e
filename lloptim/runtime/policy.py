"""The policy interface: the two decisions a scheduling policy makes.

A :class:`Policy` is a :class:`RequestScheduler` (which client serves which request) plus an
:class:`IterationScheduler` (what the next model iteration of an instance runs). The engine
(:mod:`lloptim.runtime.engine`) calls them; they read the engine's state through
:class:`~lloptim.runtime.engine.InstanceState` and the :class:`RunContext`, and never mutate it.

Information discipline: a policy sees the *estimated* output lengths of :attr:`RunContext.estimates`
(equal to the truth only when ``RunContext.known_lengths`` is true) and learns a request's true
length when it finishes (:meth:`RequestScheduler.on_finish`). A request scheduler learns of a
request when it becomes *ready* (:meth:`RequestScheduler.on_ready`: at its arrival, or when the last
of its predecessors finishes if that is later) and may hand out only requests it has been told of;
it needs no arrival time of the future.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from lloptim.problem import Problem
    from lloptim.runtime.engine import InstanceState

__all__ = [
    "RunContext", "Prefill", "Decode", "Mixed", "DECODE", "Decision",
    "RequestScheduler", "IterationScheduler", "Policy", "output_estimates",
]


class Prefill(NamedTuple):
    """Run a prefill iteration of the full prompts of these waiting clients (global client indices)."""

    clients: Sequence[int]


class Decode(NamedTuple):
    """Run one decode iteration of every running client of the instance."""


class Mixed(NamedTuple):
    """One fused iteration: decode every running client and prefill prompt chunks.

    ``chunks`` maps waiting clients to the number of prompt tokens to process in this iteration
    (chunked prefill, as in Sarathi-Serve). A client whose prompt completes joins the decodes from
    the next iteration on.
    """

    chunks: dict[int, int]


#: The decode decision (:class:`Decode` has no field, so one instance serves every call).
DECODE = Decode()
#: What :meth:`IterationScheduler.decide` returns: a :class:`Prefill`, :data:`DECODE` or a :class:`Mixed`.
Decision = Prefill | Decode | Mixed


def output_estimates(estimates, output_tokens: np.ndarray) -> tuple[np.ndarray, bool]:
    """The output-length estimates a policy sees, checked, and whether they are the truth.

    Parameters
    ----------
    estimates
        One estimate per request, tokens (finite, positive); ``None``: the true lengths.
    output_tokens
        The true output lengths, tokens.

    Returns
    -------
    tuple
        ``(estimates as float64 tokens, known)``: ``known`` is true when they equal the truth.

    Raises
    ------
    SpecError
        Not one finite positive estimate per request.
    """
    if estimates is None:
        return np.asarray(output_tokens).astype(np.float64), True
    n = len(output_tokens)
    est = np.asarray(estimates, dtype=np.float64)
    if est.shape != (n,) or not np.all(np.isfinite(est)) or np.any(est <= 0):
        from lloptim.errors import SpecError

        raise SpecError("estimates", f"need {n} finite positive output estimates",
                        "give one estimate (tokens) per request")
    return est, bool(np.array_equal(est, output_tokens))


@dataclass
class RunContext:
    """What a policy knows before the run starts.

    Attributes
    ----------
    problem
        The problem being served.
    estimates
        Estimated output length of each request, tokens (float64). Equals the truth when
        ``known_lengths`` is true.
    known_lengths
        Whether ``estimates`` are the true output lengths.
    client_instance
        Instance index of each global client index.
    seed
        Seed for any randomness in the policy.
    extra
        Shared run state, read-only for schedulers: the engine puts ``"client_state"`` (the state of
        each global client, :data:`~lloptim.runtime.engine.IDLE` ... :data:`~lloptim.runtime.engine.FAILED`),
        :meth:`Policy.setup` the ``"request_scheduler"``, and offline-planned schedulers their solve
        result under ``"offline"``.
    """

    problem: "Problem"
    estimates: np.ndarray
    known_lengths: bool
    client_instance: np.ndarray
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def instance_clients(self, instance: int) -> range:
        """Global client indices of ``instance``."""
        start = sum(i.clients for i in self.problem.instances[:instance])
        return range(start, start + self.problem.instances[instance].clients)


class RequestScheduler:
    """Decides which request a client serves next. Subclass and override the hooks.

    The engine announces every request once, when it becomes ready (:meth:`on_ready`); the
    scheduler keeps the ready requests it has not handed out (:meth:`pending` counts them) and
    gives one to an idle client when asked (:meth:`next_request`).
    """

    def setup(self, ctx: RunContext) -> None:
        """Called once before the run (offline planning goes here)."""
        self.ctx = ctx

    def on_ready(self, request: int, now: float) -> None:
        """``request`` became ready at ``now`` seconds: from now on it may be handed out.

        Called by the engine exactly once per request, in order of ``now``: at the request's
        arrival, or when its last predecessor finishes if that is later. No instance whose clock
        is before ``now`` asks for work afterwards.

        Parameters
        ----------
        request
            Row index of the request.
        now
            Its ready time, seconds.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement on_ready(request, now): keep the "
                                  "request until next_request hands it out")

    def pending(self) -> int:
        """Number of ready requests not yet handed to a client (count)."""
        raise NotImplementedError

    def next_request(self, state: "InstanceState", client: int) -> int | None:
        """A request (row index) for idle ``client`` of ``state``'s instance, or ``None`` for none now.

        Only requests announced by :meth:`on_ready` may be returned.

        Parameters
        ----------
        state
            The instance the client belongs to; ``state.now`` is the current time, seconds.
        client
            Global index of the idle client.

        Returns
        -------
        int or None
            Row index of the request to serve, or None to leave the client idle for now.
        """
        raise NotImplementedError

    def wants_retry(self, state: "InstanceState") -> bool:
        """Whether ``state``'s idle clients should ask again although nothing finished since they last asked.

        The engine asks idle clients for work when the instance's state changed (a finish, a
        preemption, a request becoming ready). A scheduler that refused a request because it does
        not fit *yet* (the running requests' projected KV memory shrinks as they near their ends)
        says so here, and the engine asks again before the next iteration. Default: False.

        Parameters
        ----------
        state
            The instance whose clients are idle.

        Returns
        -------
        bool
            Whether to ask again now.
        """
        return False

    def on_finish(self, request: int, client: int, output_tokens: int, now: float) -> None:
        """``request`` finished on ``client`` at ``now`` seconds after ``output_tokens`` tokens.

        Parameters
        ----------
        request
            Row index of the finished request.
        client
            Global index of the client that served it.
        output_tokens
            Its true output length, tokens.
        now
            Finish time, seconds (the instance clock).
        """

    def requeue(self, request: int, now: float) -> None:
        """A fault took ``request`` back (it will restart from its prefill); hand it out again.

        Parameters
        ----------
        request
            Row index of the request taken back.
        now
            Time of the fault, seconds (the failed instance's clock).
        """
        raise NotImplementedError

    def on_client_failed(self, client: int, now: float) -> None:
        """``client`` failed for good: move anything reserved for it to live clients.

        Parameters
        ----------
        client
            Global index of the failed client.
        now
            Time of the failure, seconds (the failed instance's clock).
        """

    def on_preempt(self, request: int, client: int, generated: int) -> None:
        """``request`` was preempted for KV memory; it stays with ``client``, waiting to be prefilled again.

        Parameters
        ----------
        request
            Row index of the preempted request.
        client
            Global index of its client.
        generated
            Output tokens it keeps (its next prefill recomputes them with the prompt), tokens.
        """


class IterationScheduler:
    """Decides what the next iteration of an instance runs. Subclass and override :meth:`decide`."""

    def setup(self, ctx: RunContext) -> None:
        """Called once before the run."""
        self.ctx = ctx

    def decide(self, state: "InstanceState") -> Decision:
        """The next iteration: :class:`Prefill`, :data:`DECODE` or :class:`Mixed`.

        Called only when the instance has a running or a waiting client.
        """
        raise NotImplementedError

    def on_finish(self, request: int, client: int, output_tokens: int, now: float) -> None:
        """``request`` finished (its true length is now known).

        Parameters
        ----------
        request
            Row index of the finished request.
        client
            Global index of the client that served it.
        output_tokens
            Its true output length, tokens.
        now
            Finish time, seconds (the instance clock).
        """

    def on_ready(self, request: int, now: float) -> None:
        """``request`` became ready at ``now`` seconds (told right after the request scheduler).

        Aggregates over the workload (whether a cache can fill up, prices solved from the
        estimates) must be taken over the requests announced so far: a request that is not ready
        (not arrived, or waiting for a predecessor) is the future.

        Parameters
        ----------
        request
            Row index of the request.
        now
            Ready time, seconds.
        """

    def victim(self, state: "InstanceState") -> int | None:
        """The running client to preempt when the next decode step needs more KV blocks than are free.

        Called repeatedly until the step fits. ``None`` (the default) leaves the choice to the
        engine's victim rule (:data:`~lloptim.runtime.kv.VICTIM_RULES`, vLLM's ``"newest"`` by
        default).

        Parameters
        ----------
        state
            The instance; ``state.growth_blocks()`` blocks are needed, ``state.kv_free_blocks`` free.

        Returns
        -------
        int or None
            A running client of the instance (global index), or None.
        """
        return None

    def on_preempt(self, request: int, client: int, generated: int) -> None:
        """``request`` was preempted for KV memory (see :meth:`RequestScheduler.on_preempt`).

        Parameters
        ----------
        request
            Row index of the preempted request.
        client
            Global index of its client, where it now waits.
        generated
            Output tokens it keeps, tokens.
        """

    def on_migrate(self, request: int, source_client: int, destination_client: int, generated: int) -> None:
        """``request`` moved, running, from ``source_client`` to ``destination_client`` (another instance).

        Parameters
        ----------
        request
            Row index of the request.
        source_client, destination_client
            Global client indices before and after the move.
        generated
            Output tokens it had generated, tokens; it needs ``output - generated`` more decode steps.
        """


class Policy:
    """A named pair of schedulers, with an optional migration rule.

    Parameters
    ----------
    name
        Name used in reports.
    requests
        The request scheduler.
    iterations
        The iteration scheduler.
    migration
        Optional rule that moves *running* requests (with their KV caches) between instances, such
        as :class:`~lloptim.runtime.migration.EndGameMigration`; ``None``: only requests that have
        not started move.
    """

    def __init__(self, name: str, requests: RequestScheduler, iterations: IterationScheduler,
                 migration=None) -> None:
        self.name = name
        self.requests = requests
        self.iterations = iterations
        self.migration = migration

    def setup(self, ctx: RunContext) -> None:
        """Set both schedulers up for a run (the iteration scheduler may consult the request scheduler)."""
        ctx.extra["request_scheduler"] = self.requests
        self.requests.setup(ctx)
        self.iterations.setup(ctx)
        if self.migration is not None:
            self.migration.setup(ctx)

    def on_ready(self, request: int, now: float) -> None:
        """Tell both schedulers that ``request`` became ready at ``now`` seconds (the request scheduler first).

        Parameters
        ----------
        request
            Row index of the request.
        now
            Ready time, seconds.
        """
        self.requests.on_ready(request, now)
        self.iterations.on_ready(request, now)

    def on_finish(self, request: int, client: int, output_tokens: int, now: float) -> None:
        """Tell both schedulers that ``request`` finished.

        Parameters
        ----------
        request
            Row index of the finished request.
        client
            Global index of the client that served it.
        output_tokens
            Its true output length, tokens.
        now
            Finish time, seconds (the instance clock).
        """
        self.requests.on_finish(request, client, output_tokens, now)
        self.iterations.on_finish(request, client, output_tokens, now)

    def on_preempt(self, request: int, client: int, generated: int) -> None:
        """Tell both schedulers that ``request`` was preempted (it waits on ``client`` with ``generated`` tokens).

        Parameters
        ----------
        request
            Row index of the preempted request.
        client
            Global index of its client.
        generated
            Output tokens it keeps, tokens.
        """
        self.requests.on_preempt(request, client, generated)
        self.iterations.on_preempt(request, client, generated)

    def __repr__(self) -> str:
        return f"Policy({self.name!r}, {type(self.requests).__name__}, {type(self.iterations).__name__})"
