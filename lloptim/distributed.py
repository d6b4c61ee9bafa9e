"""Scale-out on Ray: parallel sweeps (:func:`ray_map`) and instances served by Ray actors (:class:`RayBackend`).

Ray is optional (``pip install lloptim[ray]``) and imported only inside the functions of this
module, so ``import lloptim`` never pays for it nor needs it.

* **Sweeps.** :func:`ray_map` is ``[fn(t) for t in tasks]`` with every call a Ray task; results come
  back in task order, so a sweep whose tasks carry their own seeds gives the same numbers on Ray as
  in-process (:func:`lloptim.executors.map_tasks` dispatches ``executor="ray"`` here).
* **Serving.** :class:`RayBackend` implements the :class:`~lloptim.backends.base.Backend` protocol
  with one Ray actor per instance (model replica). The engine stays a single process that owns all
  scheduling state; actors only execute iterations and report their durations. When an actor dies
  mid-run, the call raises :class:`~lloptim.backends.base.InstanceLost` and the engine re-queues that
  instance's unfinished requests to the surviving instances.

>>> from lloptim import Problem, run_policy, workloads             # doctest: +SKIP
>>> from lloptim.distributed import RayBackend                      # doctest: +SKIP
>>> problem = Problem.single(workloads.gsm8k("test", limit=100), clients=8, instances=2)  # doctest: +SKIP
>>> with RayBackend(problem, kill_after_calls={1: 50}) as backend:  # doctest: +SKIP
...     result = run_policy(problem, "vllm", backend=backend)
>>> result.extra["lost_instances"]                                  # doctest: +SKIP
1
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from lloptim.backends.base import InstanceLost
from lloptim.errors import LloptimError

if TYPE_CHECKING:  # pragma: no cover
    from lloptim.problem import Problem

__all__ = ["RayNotInstalledError", "DistributedError", "ray_map", "ensure_ray", "RayBackend"]

INSTALL_HINT = "pip install lloptim[ray]"


class RayNotInstalledError(LloptimError, ImportError):
    """Ray is needed (``--executor ray``, :class:`RayBackend`) but is not installed.

    Parameters
    ----------
    what
        The feature that needs Ray, for the message.
    """

    def __init__(self, what: str = "the Ray executor") -> None:
        super().__init__(f"{what} needs Ray, which is not installed (fix: {INSTALL_HINT})")


class DistributedError(LloptimError, RuntimeError):
    """Ray could not be started or reached, or a task/actor could not be set up.

    Parameters
    ----------
    problem
        What went wrong.
    fix
        What the user should do instead.
    """

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem + (f" (fix: {fix})" if fix else ""))


def _ray(what: str = "the Ray executor"):
    """The ``ray`` module, imported on first use; :class:`RayNotInstalledError` if it is missing."""
    try:
        import ray
    except ImportError:
        raise RayNotInstalledError(what) from None
    return ray


def ensure_ray(address: str | None = None, num_cpus: int | None = None, what: str = "the Ray executor") -> bool:
    """Make sure this process is connected to Ray; return whether this call started the connection.

    Parameters
    ----------
    address
        Cluster address for ``ray.init(address=...)`` (``"auto"``, ``"ray://host:10001"``,
        ``"host:6379"``); ``None`` starts a private local Ray (all local cores unless ``num_cpus``),
        even when a cluster started by ``ray start`` runs on this machine.
        Ignored when Ray is already initialised in this process: the caller's Ray is used as is.
    num_cpus
        CPUs of a local Ray (number of tasks run at once); only without ``address``.
    what
        Names the feature in error messages.

    Returns
    -------
    bool
        True if this call ran ``ray.init`` (so the caller may shut it down when done), False if Ray
        was already running in this process.

    Raises
    ------
    RayNotInstalledError
        Ray is not installed.
    DistributedError
        The cluster at ``address`` cannot be reached, or the local Ray fails to start.
    """
    ray = _ray(what)
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "configure_logging": True}
    if address is not None:
        if not isinstance(address, str) or not address.strip():
            raise DistributedError(f"Ray address {address!r} is not a valid address",
                                   "give e.g. 'auto', 'ray://head:10001' or 'head:6379'")
        kwargs["address"] = address
    else:
        # a private instance: never attach to a cluster `ray start` left running on this machine
        kwargs["address"] = "local"
        if num_cpus is not None:
            kwargs["num_cpus"] = int(num_cpus)
    try:
        ray.init(**kwargs)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        fix = ("check the address and that `ray start --head` runs there; a cluster with token authentication "
               "(what `ray start` does by default since Ray 2.59) also needs RAY_AUTH_MODE=token here, with its "
               "token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the head prints it)" if address
               else "check `ray status`, free memory and /tmp space")
        raise DistributedError(f"could not connect to {where}: {exc}", fix) from None
    return True


# -- sweeps ------------------------------------------------------------------------------------------

class _TaskFailure:
    """An exception raised by a sweep task, in a form that always crosses process boundaries.

    Exceptions whose ``__init__`` takes other arguments than ``args`` (``SpecError(field, problem,
    fix)``, say) do not unpickle, and Ray would replace them by an opaque error; this keeps the
    class (pickled by reference), ``args`` and attributes and rebuilds the original without
    calling ``__init__``.
    """

    def __init__(self, exc: Exception) -> None:
        import traceback

        self.exc_type = type(exc)
        self.args = exc.args
        self.state = dict(getattr(exc, "__dict__", {}))
        self.message = str(exc)
        self.remote_traceback = "".join(traceback.format_exception(exc))
        try:  # an unpicklable attribute must not turn the failure itself into an opaque Ray error
            import cloudpickle

            cloudpickle.dumps((self.exc_type, self.args, self.state))
        except Exception:
            self.exc_type, self.args, self.state = RuntimeError, (f"{type(exc).__name__}: {exc}",), {}

    def rebuild(self) -> BaseException:
        """The task's exception, same type, arguments and attributes."""
        try:
            exc = self.exc_type.__new__(self.exc_type)
            exc.args = self.args
            exc.__dict__.update(self.state)
        except Exception:  # exotic exception types (C extensions without __dict__)
            exc = RuntimeError(self.message)
        exc.add_note("raised in a Ray task; remote traceback:\n" + self.remote_traceback.rstrip())
        return exc


def _apply(fn: Callable[[Any], Any], task: Any) -> Any:
    """Body of one sweep task (module-level so Ray pickles it by reference); failures come back as values."""
    try:
        return fn(task)
    except Exception as exc:
        return _TaskFailure(exc)


def ray_map(fn: Callable[[Any], Any], tasks: Sequence[Any], progress: bool = True, desc: str = "tasks",
            address: str | None = None, num_cpus: float = 1.0, max_in_flight: int | None = None) -> list[Any]:
    """``[fn(t) for t in tasks]`` with every call a Ray task; results in task order.

    Parameters
    ----------
    fn
        A picklable function of one argument (module-level functions are safest: cluster workers
        must be able to import their module, i.e. have lloptim installed).
    tasks
        The arguments, each picklable.
    progress
        Show a tqdm bar (stderr) counting completed tasks.
    desc
        Label of the progress bar.
    address
        Ray cluster to connect to (see :func:`ensure_ray`); ``None``: the Ray this process is already
        connected to, else a private local Ray, shut down again on return.
    num_cpus
        CPUs each task reserves (fractions allowed); with a local Ray this sets how many run at once.
    max_in_flight
        Submit at most this many tasks before earlier ones finish (bounds object-store use for long
        sweeps); ``None``: submit everything at once.

    Returns
    -------
    list
        ``fn(task)`` for each task, in the order of ``tasks``.

    Raises
    ------
    RayNotInstalledError
        Ray is not installed.
    DistributedError
        Ray cannot be reached, or ``fn``/a task cannot be pickled.
    Exception
        The first exception a task raised, re-raised with its own type (remaining tasks are
        cancelled), so e.g. a :class:`~lloptim.errors.SpecError` inside a task stays a ``SpecError``.
    """
    from tqdm.auto import tqdm

    tasks = list(tasks)
    if not callable(fn):
        raise DistributedError(f"ray_map needs a function, got {type(fn).__name__}", "pass a module-level function")
    if max_in_flight is not None and (isinstance(max_in_flight, bool) or int(max_in_flight) < 1):
        raise DistributedError(f"max_in_flight must be a positive integer, got {max_in_flight!r}",
                               "give at least 1, or None")
    if not (num_cpus >= 0):
        raise DistributedError(f"num_cpus must be >= 0, got {num_cpus!r}", "give the CPUs one task needs")
    if not tasks:
        return []  # nothing to run: do not pay for starting Ray
    ray = _ray()
    started = ensure_ray(address)
    try:
        try:
            fn_ref = ray.put(fn)  # pickled once, not once per task
        except Exception as exc:  # cloudpickle raises many types (TypeError, PicklingError, ...)
            raise DistributedError(f"cannot send {getattr(fn, '__name__', fn)!r} to Ray workers: {exc}",
                                   "use a module-level function and picklable tasks") from None
        remote = ray.remote(num_cpus=num_cpus, max_retries=0)(_apply)
        limit = len(tasks) if max_in_flight is None else int(max_in_flight)
        refs: list[Any] = []
        index_of: dict[Any, int] = {}
        pending: list[Any] = []

        def submit(i: int) -> None:
            try:
                ref = remote.remote(fn_ref, tasks[i])
            except Exception as exc:
                raise DistributedError(f"cannot send task {i} to Ray: {exc}", "make every task picklable") from None
            refs.append(ref)
            index_of[ref] = i
            pending.append(ref)

        for i in range(min(limit, len(tasks))):
            submit(i)
        with tqdm(total=len(tasks), desc=desc, disable=not progress, leave=False) as bar:
            try:
                while pending:
                    # one wait per completion keeps the bar live; the timeout only bounds the wait
                    done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                    for ref in done:
                        try:
                            value = ray.get(ref)
                        except ray.exceptions.RaySystemError as exc:
                            # the worker could not even unpickle fn or the task: an environment problem
                            raise DistributedError(
                                f"Ray workers could not load task {index_of[ref]} of {desc!r}: {exc.args[0] if exc.args else exc}",
                                "make fn's module importable on the workers (lloptim installed there, the "
                                "module on PYTHONPATH, or ray.init(runtime_env=...))") from None
                        except ray.exceptions.RayError as exc:
                            # task errors come back as _TaskFailure values: this is the worker or node itself
                            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                            raise DistributedError(
                                f"task {index_of[ref]} of {desc!r} failed in Ray: {type(exc).__name__}: {first}",
                                "see `ray status` and the worker logs; if workers run out of memory, "
                                "lower max_in_flight or num_cpus per task") from None
                        if isinstance(value, _TaskFailure):
                            # raise a task's error now, not after every other task finished
                            raise value.rebuild()
                        bar.update(1)
                        if len(refs) < len(tasks):
                            submit(len(refs))
            except BaseException:
                for ref in pending:
                    ray.cancel(ref, force=False)
                raise
        # every ref is finished: ray.get is a local object-store read, in task order
        return ray.get(refs)
    finally:
        if started:
            ray.shutdown()


# -- serving -----------------------------------------------------------------------------------------

def _default_factory(problem: "Problem"):
    """The simulated backend (module-level so Ray pickles it by reference)."""
    from lloptim.backends.simulated import SimulatedBackend

    return SimulatedBackend(problem)


class _InstanceActor:
    """One instance on a Ray actor: a backend built by ``factory(problem)``, driven for ``instance``.

    Becomes a Ray actor class in :class:`RayBackend` (``ray.remote`` is applied lazily so that this
    module imports without Ray).
    """

    def __init__(self, factory: Callable[["Problem"], Any], problem: "Problem", instance: int) -> None:
        self.instance = instance
        self.error = ""
        self.backend = None
        try:
            self.backend = factory(problem)
        except Exception as exc:  # reported by ready(): a construction error must not look like a lost instance
            self.error = f"backend_factory raised {type(exc).__name__}: {exc}"
            return
        missing = [m for m in ("prefill", "decode", "mixed", "release") if not callable(getattr(self.backend, m, None))]
        if missing:
            self.error = (f"backend_factory returned a {type(self.backend).__name__}, which lacks "
                          f"{', '.join(missing)} of the Backend protocol")

    def ready(self) -> tuple[str, str]:
        """``(error, backend name)``; ``error`` is empty when the backend was built."""
        return self.error, str(getattr(self.backend, "name", type(self.backend).__name__))

    def prefill(self, requests, prompt_tokens):
        return self.backend.prefill(self.instance, requests, prompt_tokens)

    def decode(self, n_running, kv_tokens):
        return self.backend.decode(self.instance, n_running, kv_tokens)

    def mixed(self, n_running, kv_tokens, chunks):
        return self.backend.mixed(self.instance, n_running, kv_tokens, chunks)

    def release(self, request, finished):
        return self.backend.release(self.instance, request, finished)

    def preempt(self, request) -> bool:
        fn = getattr(self.backend, "preempt", None)
        if fn is None:  # a backend that cannot keep generated tokens: the request restarts from its prompt
            self.backend.release(self.instance, request, False)
            return False
        return fn(self.instance, request) is not False

    def ping(self) -> int:
        return self.instance

    def generated(self) -> dict:
        return dict(getattr(self.backend, "generated", {}) or {})


class RayBackend:
    """Backend whose instances are Ray actors, each wrapping a backend built by ``backend_factory``.

    Call ``prefill``/``decode``/``mixed`` for instance ``k`` run on actor ``k`` and return its
    iteration time (seconds). ``release`` is sent without waiting (actor calls from one caller run
    in submission order, so it still precedes the next iteration on that actor). If actor ``k`` has
    died (crashed, node lost, ``ray.kill``), the call raises
    :class:`~lloptim.backends.base.InstanceLost` ``(k)``: the engine re-queues the instance's
    unfinished requests to the other instances and never calls instance ``k`` again.

    Parameters
    ----------
    problem
        What will be served; each actor receives it (once, through the object store) to build its
        backend.
    backend_factory
        Picklable callable ``factory(problem) -> Backend``, run inside each actor; default: the
        :class:`~lloptim.backends.simulated.SimulatedBackend`. A class such as ``SimulatedBackend``
        works as is.
    kill_after_calls
        For fault tests: ``{instance: n}`` ``ray.kill``\\ s actor ``instance`` just before its
        ``n``-th iteration call (1-based; prefill, decode and mixed count), so that call finds the
        actor dead and the instance is lost mid-run.
    actor_options
        Passed to ``.options()`` of each actor, e.g. ``{"num_gpus": 1}`` for a torch backend;
        default ``{"num_cpus": 0}`` (the simulated backend barely computes, and a fractional
        reservation lets more replicas than cores share a small machine).
    address
        Ray cluster address (see :func:`ensure_ray`); a Ray started here is shut down by :meth:`close`.
    timeout_s
        Seconds to wait for all actors to come up.

    Attributes
    ----------
    name : str
        ``"ray:<inner backend name>"``.
    actors : list
        Actor handle of each instance (instance order).
    calls : list[int]
        Iteration calls made to each instance.
    lost : dict[int, str]
        Instances found dead, with the reason.

    Raises
    ------
    RayNotInstalledError
        Ray is not installed.
    DistributedError
        ``backend_factory`` is not callable or not picklable, fails inside an actor, or returns
        something that is not a backend; bad ``kill_after_calls``; actors do not start in time.
    """

    def __init__(self, problem: "Problem", backend_factory: Callable[["Problem"], Any] | None = None,
                 kill_after_calls: Mapping[int, int] | None = None, actor_options: Mapping[str, Any] | None = None,
                 address: str | None = None, timeout_s: float = 120.0) -> None:
        factory = _default_factory if backend_factory is None else backend_factory
        if not callable(factory):
            raise DistributedError(f"backend_factory must be callable, got {type(factory).__name__}",
                                   "pass e.g. SimulatedBackend or a module-level function problem -> Backend")
        n = len(problem.instances)
        kills = dict(kill_after_calls or {})
        for k, c in kills.items():
            if not (isinstance(k, int) and 0 <= k < n) or isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise DistributedError(f"kill_after_calls entry {k!r}: {c!r} is invalid",
                                       f"map an instance in 0..{n - 1} to a call number >= 1")
        ray = _ray("RayBackend")
        import cloudpickle  # ships with Ray

        try:
            cloudpickle.dumps(factory)
        except Exception as exc:
            raise DistributedError(f"backend_factory {factory!r} cannot be pickled for Ray actors: {exc}",
                                   "use a class or a module-level function (no locks, open files or sockets)") from None
        self._ray = ray
        self._started = ensure_ray(address, what="RayBackend")
        self._kills = kills
        self.calls = [0] * n
        self.lost: dict[int, str] = {}
        self._closed = False
        options = {"num_cpus": 0, **dict(actor_options or {})}
        # max_restarts=0: a restarted replica would have lost its KV caches, so death must be final
        options.setdefault("max_restarts", 0)
        actor_cls = ray.remote(_InstanceActor)
        try:
            problem_ref = ray.put(problem)
            self.actors = [actor_cls.options(**options).remote(factory, problem_ref, k) for k in range(n)]
            replies = ray.get([a.ready.remote() for a in self.actors], timeout=timeout_s)
        except Exception as exc:
            self.close()
            if isinstance(exc, LloptimError):
                raise
            raise DistributedError(f"the {n} instance actors did not start: {type(exc).__name__}: {exc}",
                                   "make backend_factory importable on the Ray workers (lloptim installed, its "
                                   "module on PYTHONPATH or in runtime_env) and actor_options fit the cluster "
                                   "(`ray status`)") from None
        errors = [e for e, _ in replies if e]
        if errors:
            self.close()
            raise DistributedError(errors[0], "pass a callable that builds a Backend from a Problem")
        self.name = f"ray:{replies[0][1]}"
        errs = ray.exceptions
        # ActorUnavailableError: a temporarily unreachable actor; with max_restarts=0 it will not return
        self._dead_errors = tuple(e for e in (getattr(errs, "RayActorError", None),
                                              getattr(errs, "ActorUnavailableError", None)) if e is not None)

    # -- the Backend protocol ------------------------------------------------------------------
    def _call(self, instance: int, method: str, *args) -> float:
        if instance in self.lost:
            raise InstanceLost(instance, self.lost[instance])
        self.calls[instance] += 1
        if self._kills.get(instance) == self.calls[instance]:
            self.kill(instance)
        actor = self.actors[instance]
        try:
            return self._ray.get(getattr(actor, method).remote(*args))
        except self._dead_errors as exc:
            reason = f"actor died: {type(exc).__name__}"
            self.lost[instance] = reason
            raise InstanceLost(instance, reason) from None

    def prefill(self, instance: int, requests: Sequence[int], prompt_tokens: int) -> float:
        """Seconds of a prefill of ``requests`` (``prompt_tokens`` tokens) on actor ``instance``.

        Parameters
        ----------
        instance, requests, prompt_tokens
            As in :meth:`Backend.prefill <lloptim.backends.base.Backend.prefill>`.

        Returns
        -------
        float
            The duration the actor's backend reports, seconds.

        Raises
        ------
        InstanceLost
            The actor is dead (killed, crashed or lost earlier).
        """
        return self._call(instance, "prefill", list(requests), prompt_tokens)

    def decode(self, instance: int, n_running: int, kv_tokens: int) -> float:
        """Seconds of one decode step of ``n_running`` requests holding ``kv_tokens`` tokens on actor ``instance``.

        Parameters
        ----------
        instance, n_running, kv_tokens
            As in :meth:`Backend.decode <lloptim.backends.base.Backend.decode>` (count, tokens).

        Returns
        -------
        float
            The duration the actor's backend reports, seconds.

        Raises
        ------
        InstanceLost
            The actor is dead.
        """
        return self._call(instance, "decode", n_running, kv_tokens)

    def mixed(self, instance: int, n_running: int, kv_tokens: int,
              chunks: Sequence[tuple[int, int, int, bool]]) -> float:
        """Seconds of a fused decode step plus prompt ``chunks`` on actor ``instance``.

        Parameters
        ----------
        instance, n_running, kv_tokens, chunks
            As in :meth:`Backend.mixed <lloptim.backends.base.Backend.mixed>`.

        Returns
        -------
        float
            The duration the actor's backend reports, seconds.

        Raises
        ------
        InstanceLost
            The actor is dead.
        """
        return self._call(instance, "mixed", n_running, kv_tokens, [tuple(c) for c in chunks])

    def release(self, instance: int, request: int, finished: bool) -> None:
        """Free ``request``'s KV cache on actor ``instance``, without waiting; a no-op on a lost instance.

        Parameters
        ----------
        instance, request, finished
            As in :meth:`Backend.release <lloptim.backends.base.Backend.release>`.
        """
        if instance in self.lost or self._closed:
            return  # the engine releases a lost instance's requests while re-queueing them: nothing to free
        self.actors[instance].release.remote(request, finished)

    def preempt(self, instance: int, request: int) -> bool:
        """Preempt ``request`` on actor ``instance`` (see :meth:`SupportsPreemption.preempt
        <lloptim.backends.base.SupportsPreemption.preempt>`); waits for the actor's answer.

        Parameters
        ----------
        instance, request
            Instance index and request row.

        Returns
        -------
        bool
            Whether the actor's backend kept the request's generated tokens (False: it restarts
            from its prompt).

        Raises
        ------
        InstanceLost
            The actor is dead.
        """
        return bool(self._call(instance, "preempt", request))

    def collect_generated(self) -> dict[int, list[int]]:
        """Token ids of every request that finished, gathered from the live actors' backends.

        Only backends that keep generations (the torch backend's ``generated``) contribute; a
        request that finished on an actor that has died since is missing.

        Returns
        -------
        dict[int, list[int]]
            ``request -> token ids``.
        """
        out: dict[int, list[int]] = {}
        for k, actor in enumerate(self.actors):
            if k in self.lost or self._closed:
                continue
            try:
                out.update(self._ray.get(actor.generated.remote()))
            except self._dead_errors:
                self.lost[k] = "actor died"
        return out

    # -- control ---------------------------------------------------------------------------------
    def kill(self, instance: int, wait_s: float = 10.0) -> None:
        """``ray.kill`` actor ``instance`` and wait (up to ``wait_s`` seconds) until calls to it fail.

        The instance is not marked lost here: the engine learns of it from its next call, as it
        would of a crash.

        Parameters
        ----------
        instance
            Index of the instance whose actor is killed.
        wait_s
            Longest wait for the death to show, seconds; the method returns after it even if calls
            still succeed.
        """
        ray = self._ray
        actor = self.actors[instance]
        ray.kill(actor, no_restart=True)
        # ray.kill is asynchronous; wait so that the next call deterministically finds the actor dead
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                ray.get(actor.ping.remote(), timeout=wait_s)
            except self._dead_errors:
                return
            time.sleep(0.01)

    def close(self) -> None:
        """Kill the actors (and shut down a Ray this backend started). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for a in getattr(self, "actors", []):
            try:
                self._ray.kill(a, no_restart=True)
            except Exception:  # already dead or Ray gone: nothing left to free
                pass
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()

    def __enter__(self) -> "RayBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
