"""Lagrangian relaxation of the ``"load"`` rows, solved in numpy.

Relaxing ``sum_r w[r, c] x[r, c] <= T`` with multipliers ``lambda_c >= 0`` leaves::

    L(lambda) = min_T T (1 - sum_c lambda_c) + sum_r min_c lambda_c w[r, c]

which is finite only for ``sum_c lambda_c = 1`` (stationarity in ``T``), so the multipliers live on
the simplex and ``L(lambda) = sum_r min_c lambda_c w[r, c]``: each request picks its cheapest
priced client, separably, in ``O(R * instances + C)``. ``lambda_c`` is the price of client ``c``'s
time: makespan seconds per second of that client's capacity lost (the same meaning as the LP duals
of :mod:`lloptim.formulations.lp_bound`, to which the maximizer converges); ``min_c lambda_c w[r, c]``
is request ``r``'s price, seconds.

The dual is maximized by projected subgradient steps (``method="subgradient"``: Polyak step
``theta (UB - L) / ||g||^2`` towards the incumbent's makespan ``UB``) or by the volume algorithm
(``method="volume"``, default: the direction is an exponential average of subgradients, and the
centre moves only on improving "serious" steps). Primal recovery every ``recover_every``
iterations: price-weighted LPT (clients with a high price get less work) + local search. The
reported bound is ``max(L, closed-form bound)``, since the relaxation alone cannot see ``max(w)``
or the ``C+1``-largest argument.

``solver_options``: ``method``, ``max_iter`` (300), ``theta`` (1.0), ``alpha`` (0.1, volume),
``recover_every`` (50).
"""

from __future__ import annotations

import time

import numpy as np

from lloptim.errors import SpecError
from lloptim.formulations.binpacking import BinPackingData, binpacking_prices, loads
from lloptim.solvers.greedy import local_search, lpt
from lloptim.solvers.registry import Backend, Capabilities, Outcome, register_backend
from lloptim.solvers.result import Limit, Termination

__all__ = ["LagrangianBackend", "lagrangian_dual", "project_simplex"]

_OPTIONS = {"method", "max_iter", "theta", "alpha", "recover_every", "max_mem_mb"}


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``v`` onto ``{lambda >= 0, sum lambda = 1}`` (sort-based, O(C log C))."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.arange(1, v.size + 1)
    rho = np.flatnonzero(u - css / k > 0)[-1]
    return np.maximum(v - css[rho] / (rho + 1), 0.0)


def lagrangian_dual(data: BinPackingData, lam: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """``L(lambda)``, seconds, its subgradient (the client loads of the minimizer, seconds) and the
    minimizer's assignment.

    Parameters
    ----------
    data : BinPackingData
        The instance (weights in seconds).
    lam : numpy.ndarray
        Multipliers of the ``"load"`` rows, shape ``(C,)``, on the simplex (>= 0, summing to 1):
        makespan seconds per second of each client's capacity lost.

    Returns
    -------
    value : float
        ``L(lambda) = sum_r min_c lambda_c w[r, c]``, seconds: a lower bound on the makespan.
    subgradient : numpy.ndarray
        Shape ``(C,)``: the load of each client under the minimizer, seconds.
    assignment : numpy.ndarray
        Shape ``(R,)``, int64: the minimizer, each request on its cheapest priced client (within
        an instance, the lowest-priced client, first on ties).
    """
    ci = data.client_instance
    W = data.inst_weights
    m = W.shape[1]
    # cheapest priced client of each instance (clients of one instance differ only in price)
    best_c = np.empty(m, dtype=np.int64)
    for i in range(m):
        idx = np.flatnonzero(ci == i) if m > 1 else np.arange(ci.size)
        best_c[i] = idx[np.argmin(lam[idx])]
    priced = W * lam[best_c][None, :] if not data.uniform else W * lam[best_c[0]]
    bi = np.argmin(priced, axis=1) if priced.shape[1] > 1 else np.zeros(W.shape[0], dtype=np.int64)
    value = float(priced[np.arange(W.shape[0]), bi].sum())
    a = best_c[bi]
    g = np.bincount(a, weights=W[np.arange(W.shape[0]), bi], minlength=ci.size)
    return value, g, a


class LagrangianBackend(Backend):
    """Subgradient / volume algorithm on the relaxed ``load`` rows, with repair + local search."""

    name = "lagrangian"
    description = "Lagrangian relaxation of the load rows: volume/subgradient in numpy, repair + local search"
    capabilities = Capabilities(supports_time_limit=True, supports_relaxation=True)

    def solve_task(self, task):
        """Maximize the Lagrangian dual from the LP prices; repair its minimizers into assignments.

        Parameters
        ----------
        task : FormulationTask
            A bin-packing task (bound and start in seconds; ``params.solver_options`` as in the
            module docstring).

        Returns
        -------
        Outcome
            The best assignment, the best Lagrangian bound (seconds) and the multipliers proving it.

        Raises
        ------
        SpecError
            An unknown option or method.
        """
        if task.formulation != "binpacking":
            return super().solve_task(task)
        opts = task.params.solver_options
        unknown = set(opts) - _OPTIONS
        if unknown:
            raise SpecError(f"params.solver_options.{sorted(unknown)[0]}", "unknown Lagrangian option",
                            f"use {sorted(_OPTIONS - {'max_mem_mb'})}")
        method = opts.get("method", "volume")
        if method not in ("volume", "subgradient"):
            raise SpecError("params.solver_options.method", f"unknown method {method!r}",
                            "use 'volume' or 'subgradient'")
        max_iter = int(opts.get("max_iter", 300))
        theta = float(opts.get("theta", 1.0))
        alpha = float(opts.get("alpha", 0.1))
        every = max(1, int(opts.get("recover_every", 50)))
        data = task.data
        C = data.n_clients
        t_end = None if task.params.time_limit_s is None else time.perf_counter() + task.params.time_limit_s
        best_a, ub = task.incumbent, task.incumbent_obj
        # start from the LP prices (uniform 1/C for identical clients, the exact LP duals otherwise)
        lam = binpacking_prices(data)["load"]
        L, g, _ = lagrangian_dual(data, lam)
        lam_best, L_best = lam, L
        g_bar = g.copy()
        stall, history, limit, it = 0, [L], Limit.ITERATION, 0
        for it in range(1, max_iter + 1):
            if (ub - max(L_best, task.bound or -np.inf)) <= task.params.rel_gap * ub:
                limit = Limit.GAP
                break
            if t_end is not None and time.perf_counter() > t_end:
                limit = Limit.TIME
                break
            d = g_bar if method == "volume" else g
            d = d - d.mean()  # the simplex's tangent space
            nd = float(d @ d)
            if nd <= 1e-300:
                limit = Limit.NONE  # a zero subgradient: lambda is optimal
                break
            step = theta * max(ub - L, 1e-12 * ub) / nd
            centre = lam_best if method == "volume" else lam
            lam_new = project_simplex(centre + step * d)
            L_new, g_new, _ = lagrangian_dual(data, lam_new)
            if method == "volume":
                g_bar = alpha * g_new + (1 - alpha) * g_bar
            lam, L, g = lam_new, L_new, g_new
            history.append(L)
            if L > L_best + 1e-12 * abs(L_best):
                lam_best, L_best, stall = lam, L, 0
            else:
                stall += 1
                if stall >= 10:  # shrink the step after a run without progress
                    theta, stall = theta / 2, 0
            if it % every == 0:
                left = None if t_end is None else max(0.0, t_end - time.perf_counter())
                a = local_search(data, lpt(data, client_scale=0.5 + 0.5 * C * lam_best), time_limit_s=left)
                obj = float(loads(data, a).max())
                if obj < ub:
                    best_a, ub = a, obj
        # the final repair gets a little time even when the limit is spent: it is the primal answer
        left = None if t_end is None else max(0.05 * task.params.time_limit_s, t_end - time.perf_counter())
        a = local_search(data, lpt(data, client_scale=0.5 + 0.5 * C * lam_best), time_limit_s=left)
        obj = float(loads(data, a).max())
        if obj < ub:
            best_a, ub = a, obj
        lam_out = lam_best / lam_best.sum()
        assign_price = (data.inst_weights * np.array([lam_out[data.client_instance == i].min()
                                                      for i in range(data.inst_weights.shape[1])])[None, :]).min(axis=1)
        return Outcome(assignment=best_a, objective=ub, bound=L_best, termination=Termination.FEASIBLE, limit=limit,
                       multipliers={"load": lam_out, "assign": assign_price},
                       extra={"iterations": it, "method": method, "lagrangian_bound": L_best,
                              "dual_history": np.asarray(history[-20:])})


register_backend(LagrangianBackend())
