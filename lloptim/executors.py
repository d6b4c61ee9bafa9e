"""Executors: run a list of independent tasks locally or on a Ray cluster, with a progress bar.

Tasks are picklable arguments of a module-level function; results come back in task order, so a
sweep gives identical results whatever executor runs it (every task carries its own seeds).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from lloptim.errors import SpecError
from lloptim.progress import DELAY_S

__all__ = ["map_tasks", "EXECUTORS"]

#: Executor names :func:`map_tasks` accepts.
EXECUTORS = ("local", "ray")


def map_tasks(fn: Callable[[Any], Any], tasks: Sequence[Any], executor: str = "local", progress: bool = True,
              desc: str = "tasks", address: str | None = None) -> list[Any]:
    """``[fn(t) for t in tasks]``, run by ``executor``.

    Parameters
    ----------
    fn
        A module-level (picklable) function of one argument.
    tasks
        The arguments.
    executor
        ``"local"`` (this process) or ``"ray"`` (Ray tasks; a local Ray unless ``address`` is given).
    progress
        Show a progress bar over completed tasks (on stderr).
    desc
        Label of the progress bar.
    address
        Ray cluster address (``ray.init(address=...)``); only with ``executor="ray"``.
    """
    if executor == "local":
        if address is not None:
            raise SpecError("address", "--address needs --executor ray", "add --executor ray or drop --address")
        # the bar appears only after DELAY_S, so quick sweeps print nothing
        return [fn(t) for t in tqdm(tasks, desc=desc, disable=not progress, leave=False, delay=DELAY_S)]
    if executor == "ray":
        from lloptim.distributed import ray_map

        return ray_map(fn, tasks, progress=progress, desc=desc, address=address)
    raise SpecError("executor", f"unknown executor {executor!r}", f"use one of {list(EXECUTORS)}")
