"""Peak memory of the greedy local search (:func:`lloptim.solvers.greedy.local_search`).

The search scores every (request on the max client, request elsewhere) swap with numpy. Scored in
one array, that is ``|J| x R`` floats per temporary: harmless from an LPT start (``|J|`` about
``R / C``), but a start that piles requests on one client (a warm start, a rolling plan's
revision, a fleet whose fast instance takes most of the work) makes it quadratic in ``R``: half of
100k requests on one client is 2.5e9 pairs, tens of GiB. The search now scores in blocks of
:data:`~lloptim.solvers.greedy.PAIR_BLOCK` pairs (same result, first minimum in the same order).

Cases (GSM8K test on 200 clients; synthetic lognormal workloads of 10k and 100k requests on 64
clients), each on identical clients (``uniform``) and on a mixed fleet (half the clients 1.5x
slower: the per-instance weights branch), from two starts:

* ``lpt``: the solver's own start, searched to the end (time limit ``--time-limit``, 20 s);
* ``half``: half of the requests on client 0, the rest dealt round-robin, one improving step
  (``max_iter=1``): the worst case of the pair arrays, ``R/2 x R/2``.

Figures: peak of Python-tracked memory during the call (``tracemalloc``; numpy reports its array
buffers to it), MiB, and wall seconds. Targets: a few hundred MiB at most at 1319 x 200 and 10k x 64.

Run: ``python benchmarks/local_search_memory.py [--big] [--time-limit S]`` (``--big`` adds 100k x 64;
about a minute without it on 2 cores).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from lloptim import Instance, Problem, load_profile, workloads
from lloptim.formulations.binpacking import binpacking_data, loads
from lloptim.solvers.greedy import local_search, lpt


def problem(wl, clients: int, mixed: bool) -> Problem:
    """``clients`` clients of LLaMA-65B (mixed: half of them 1.5x slower), room for every request."""
    base = load_profile("llama-65b")
    if not mixed:
        return Problem.single(wl, base, clients=clients, kv_capacity_tokens=10**7)
    slow = base.with_latency(base.latency.scaled(1.5, 1.5))
    half = clients // 2
    return Problem(wl, (Instance.from_profile(base, half, 10**7, name="fast"),
                        Instance.from_profile(slow, clients - half, 10**7, name="slow")), name=wl.name)


def measure(data, start: np.ndarray, **kw) -> tuple[float, float, float]:
    """Peak traced MiB, wall seconds and makespan (seconds) of one local search."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    t = time.perf_counter()
    a = local_search(data, start, **kw)
    wall = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return peak, wall, float(loads(data, a).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big", action="store_true", help="also 100k requests x 64 clients")
    ap.add_argument("--time-limit", type=float, default=20.0, help="limit of the searches from LPT, seconds")
    args = ap.parse_args()
    cases = [("gsm8k 1319x200", workloads.gsm8k("test"), 200),
             ("synthetic 10k x 64", workloads.synthetic(10_000, seed=1), 64)]
    if args.big:
        cases.append(("synthetic 100k x 64", workloads.synthetic(100_000, seed=2), 64))
    print(f"{'case':20s} {'clients':8s} {'start':6s} {'peak MiB':>9s} {'wall s':>7s} {'makespan s':>11s}")
    for name, wl, clients in cases:
        for mixed in (False, True):
            data = binpacking_data(problem(wl, clients, mixed))
            R = data.n_requests
            half = np.arange(R) % clients
            half[: R // 2] = 0
            for start, a0, kw in (("lpt", lpt(data), {"time_limit_s": args.time_limit}),
                                  ("half", half, {"max_iter": 1})):
                peak, wall, mk = measure(data, a0, **kw)
                print(f"{name:20s} {'mixed' if mixed else 'uniform':8s} {start:6s} {peak:9.1f} {wall:7.2f} {mk:11.3f}",
                      flush=True)


if __name__ == "__main__":
    main()
