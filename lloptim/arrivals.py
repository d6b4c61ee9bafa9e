"""Requests that arrive over time: Poisson arrivals, and the load of a workload on a fleet.

The *capacity* of a fleet for a workload is the highest rate, in requests per second, at which any
schedule could serve it: the requests divided by the makespan lower bound of the same requests all
present at time 0 (:attr:`~lloptim.bounds.LowerBound.fused_s`, the bound that holds for every kind
of iteration; :func:`capacity_rps`). The *load* of a workload whose requests arrive over time is
its arrival rate over that capacity: at load 1 requests arrive as fast as the lower bound says
the fleet could possibly serve them, so a load above 1 builds a backlog whatever the policy, and a
load below 1 leaves the fleet idle part of the time. The capacity depends on the lengths (long
outputs take longer) and on the fleet (more or faster instances serve more), which is why a load,
unlike a rate, means the same on every workload and fleet.

* :func:`poisson_arrivals`: arrival times of a Poisson process at a given rate.
* :func:`at_load`: the problem with Poisson arrivals at ``load`` times its capacity.
* :func:`scale_to_load`: the problem with its own arrival pattern (a trace) stretched or
  compressed in time so that its mean rate is ``load`` times its capacity.
"""

from __future__ import annotations

import numpy as np

from lloptim.bounds import lower_bound
from lloptim.errors import SpecError
from lloptim.problem import Problem
from lloptim.validation import check_int, check_number, check_seed

__all__ = ["poisson_arrivals", "capacity_rps", "at_load", "scale_to_load", "ARRIVAL_STREAM"]

#: First word of the seed of every arrival process (``default_rng([ARRIVAL_STREAM, seed])``), so
#: the arrivals of seed ``s`` are independent of lengths drawn with ``default_rng(s)``.
ARRIVAL_STREAM = 0xA221


def _positive(name: str, value, fix: str) -> float:
    return check_number(name, value, 0, None, lo_open=True, fix=fix)


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """Arrival times of ``n`` requests of a Poisson process at ``rate`` requests per second, seconds.

    The first request arrives after one exponential gap (not at 0), as in
    :func:`lloptim.workloads.synthetic`.

    Parameters
    ----------
    n
        Number of requests (count).
    rate
        Arrival rate, requests per second.
    seed
        Seed; the generator is ``numpy.random.default_rng([ARRIVAL_STREAM, seed])``.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` increasing arrival times, seconds (float64).
    """
    rate = _positive("workload.arrival_rate", rate, "give requests per second, e.g. 5.0")
    n = check_int("workload.n", n, 1, None, fix="give the number of requests, e.g. 100")
    seed = check_seed("workload.seed", seed)
    return np.cumsum(np.random.default_rng([ARRIVAL_STREAM, seed]).exponential(1.0 / rate, n))


def capacity_rps(problem: Problem) -> float:
    """Most requests per second any schedule could serve of ``problem``'s workload on its fleet.

    ``n / T^LB`` with ``T^LB`` the fused lower bound of the same requests all arriving at 0
    (module docstring).

    Parameters
    ----------
    problem
        The workload (its arrival times are ignored) and the fleet.

    Returns
    -------
    float
        Capacity, requests per second.
    """
    w = problem.workload
    at_once = problem if not np.any(w.arrival_s > 0) else Problem(w.with_arrivals(np.zeros(len(w))),
                                                                 problem.instances, problem.name, problem.meta)
    return len(w) / lower_bound(at_once).fused_s


def at_load(problem: Problem, load: float, seed: int = 0) -> Problem:
    """``problem`` with Poisson arrivals at ``load`` times its capacity (:func:`capacity_rps`).

    Requests arrive in row order: row ``i`` gets the ``i``-th arrival.

    Parameters
    ----------
    problem
        The workload and fleet; the workload's own arrival times are replaced.
    load
        Arrival rate over capacity (dimensionless, > 0; 1.2 is 20 % overload).
    seed
        Seed of the arrivals (see :func:`poisson_arrivals`).

    Returns
    -------
    Problem
        The same requests and fleet with the new arrivals; ``meta`` records ``"load"``,
        ``"arrival_rate"`` (requests per second) and ``"capacity_rps"``.
    """
    load = _positive("workload.load", load, "give the arrival rate over the fleet's capacity, e.g. 1.2")
    cap = capacity_rps(problem)
    rate = load * cap
    arrivals = poisson_arrivals(problem.n_requests, rate, seed)
    meta = dict(problem.meta, load=load, arrival_rate=rate, capacity_rps=cap)
    return Problem(problem.workload.with_arrivals(arrivals), problem.instances, problem.name, meta)


def scale_to_load(problem: Problem, load: float) -> Problem:
    """``problem`` with its arrival times scaled so that its mean arrival rate is ``load`` x capacity.

    Keeps the arrival pattern (bursts and lulls of a trace) and changes only its speed: arrival
    times are multiplied by ``n / (load * capacity * span)``, with ``span`` the time from the
    first to the last arrival, so the ``n`` requests arrive over ``n / (load * capacity)`` seconds,
    as Poisson arrivals at that rate would on average.

    Parameters
    ----------
    problem
        The workload with its arrival times (not all equal) and the fleet.
    load
        Mean arrival rate over capacity (dimensionless, > 0).

    Returns
    -------
    Problem
        The rescaled problem; ``meta`` records ``"load"``, ``"arrival_rate"``, ``"capacity_rps"``
        and ``"time_scale"``.

    Raises
    ------
    SpecError
        All requests arrive at the same time (there is no pattern to scale).
    """
    load = _positive("workload.load", load, "give the arrival rate over the fleet's capacity, e.g. 1.2")
    a = problem.workload.arrival_s
    span = float(a.max() - a.min())
    if span <= 0:
        raise SpecError("workload.load", "every request arrives at the same time: there is no arrival pattern to "
                        "scale", "use lloptim.arrivals.at_load for Poisson arrivals")
    cap = capacity_rps(problem)
    rate = load * cap
    scale = problem.n_requests / (rate * span)
    meta = dict(problem.meta, load=load, arrival_rate=rate, capacity_rps=cap, time_scale=scale)
    return Problem(problem.workload.with_arrivals((a - a.min()) * scale), problem.instances, problem.name, meta)
