"""Lower bounds from relaxations: the bin-packing LP (whose duals price client time) and the
``P||Cmax`` decode-step bound fed into :func:`lloptim.bounds.lower_bound`.

**Prices of client time.** The LP relaxation of the bin packing (``x`` continuous, ``T`` free) has
one dual ``lambda_c >= 0`` per ``"load"`` row and one dual ``mu_r`` per ``"assign"`` row. Its dual is
``max sum_r mu_r`` s.t. ``mu_r <= lambda_c w[r, c]``, ``sum_c lambda_c = 1``: stationarity in ``T``
makes the load prices sum to one. ``lambda_c`` reads as *seconds of makespan per second of client
``c``'s capacity lost* (losing ``delta`` seconds on client ``c`` raises the LP makespan by about
``lambda_c * delta``); ``mu_r = min_c lambda_c w[r, c]`` is the makespan seconds request ``r``
costs. With identical clients the optimal prices are unique and uniform (``1/C``, ``w_r / C``), so
:func:`lp_prices` returns them without a solve; otherwise they come from the LP over instances,
solved exactly by HiGHS (:attr:`~lloptim.formulations.binpacking.BinPackingData.fleet_lp`): the
clients of one instance are identical, so they share one price.
"""

from __future__ import annotations

import numpy as np

from lloptim.bounds import LowerBound, lower_bound
from lloptim.errors import SpecError
from lloptim.formulations.binpacking import BinPackingData, binpacking_model, binpacking_prices
from lloptim.formulations.compiled import LinearModel
from lloptim.problem import Problem

__all__ = ["price_lp", "prices_from_duals", "lp_prices", "decode_steps_bound", "tightened_lower_bound"]


def price_lp(data: BinPackingData) -> LinearModel:
    """The LP relaxation of the bin packing with ``T`` free, whose row duals are the prices (compiled).

    Parameters
    ----------
    data : BinPackingData
        The instance.

    Returns
    -------
    LinearModel
        :func:`~lloptim.formulations.binpacking.binpacking_model` with continuous ``x``.
    """
    return binpacking_model(data, integer=False).compile()


def prices_from_duals(model: LinearModel, row_duals: np.ndarray) -> dict[str, np.ndarray]:
    """Turn a solver's row duals of :func:`price_lp` into ``{"load", "assign"}`` prices.

    Row duals in lloptim's convention (``d(objective)/d(rhs)``, what every backend reports through
    :meth:`~lloptim.solvers.SolveResult.dual`) are ``<= 0`` on the ``load`` rows of this
    minimization; the load prices are taken as magnitudes and renormalized to sum to 1 (they do up
    to round-off); ``"assign"`` is in seconds.

    Parameters
    ----------
    model : LinearModel
        The model of :func:`price_lp` the duals belong to (its ``"load"`` and ``"assign"`` row
        groups are read).
    row_duals : numpy.ndarray
        One dual per row of ``model``, shape ``(n_rows,)``, in the solver's sign convention (e.g.
        :meth:`~lloptim.solvers.highs.HighsBackend.solve_lp`'s ``"row_duals"``).

    Returns
    -------
    dict[str, numpy.ndarray]
        ``"load"``: ``(C,)`` prices of client time, makespan seconds per second of the client's
        capacity lost, >= 0 and summing to 1 (uniform ``1/C`` when every load dual is 0);
        ``"assign"``: ``(R,)`` magnitudes of the assign-row duals, seconds of makespan per request.
    """
    d = np.asarray(row_duals, dtype=np.float64)
    lam = np.abs(d[model.con_groups["load"]])
    total = lam.sum()
    lam = lam / total if total > 0 else np.full(lam.size, 1.0 / lam.size)
    return {"load": lam, "assign": np.abs(d[model.con_groups["assign"]])}


def lp_prices(data: BinPackingData, solver: str = "highs", time_limit_s: float | None = None) -> dict[str, np.ndarray]:
    """Optimal LP prices of client time (see the module docstring): ``{"load": (C,), "assign": (R,)}``.

    Parameters
    ----------
    data
        The instance.
    solver : str
        Kept for callers written before the prices came from the exact LP over instances, which
        HiGHS solves whatever is named here.
    time_limit_s : float, optional
        Wall-clock limit, seconds (None: until the LP is solved exactly). At the limit the best
        prices found so far are returned: ``assign.sum()`` is then a valid, possibly weaker bound.

    Returns
    -------
    dict[str, numpy.ndarray]
        ``"load"``: ``(C,)`` prices of client time, makespan seconds per second of the client's
        capacity lost (>= 0, sum 1); ``"assign"``: ``(R,)`` price of each request, seconds.
    """
    return binpacking_prices(data, time_limit_s)


def decode_steps_bound(problem: Problem, solver: str = "highs", time_limit_s: float = 10.0) -> int:
    """A proven lower bound on the decode steps of a single-instance problem, steps.

    Solves ``P||Cmax`` with job sizes = output tokens on the instance's clients (a client advances
    one token per decode step) and returns ``ceil`` of the solver's dual bound (sizes are integers).

    Parameters
    ----------
    problem : Problem
        A single-instance problem; its true output lengths (tokens) are the job sizes.
    solver : str
        Backend that solves ``P||Cmax`` (default ``"highs"``). The result is never below the
        closed-form :func:`~lloptim.formulations.binpacking.binpacking_lower_bound`; a MIP backend
        can raise it up to the proven optimum.
    time_limit_s : float
        Wall-clock limit of the backend's search, seconds (default 10); a time-out still returns a
        valid, possibly weaker, bound.

    Returns
    -------
    int
        Lower bound on the number of decode steps, steps (count).

    Raises
    ------
    SpecError
        If the problem has more than one instance.
    """
    if len(problem.instances) != 1:
        raise SpecError("instances", "the decode-step bound is defined for one instance",
                        "use lower_bound(problem) for several instances")
    from lloptim.solvers import SolveParams, solve

    o = problem.workload.output_tokens.astype(np.float64)
    res = solve(problem, solver=solver, params=SolveParams(time_limit_s=time_limit_s, rel_gap=0.0), weights=o)
    # the bound is a float from the solver; integral sizes allow rounding up, minus round-off slack
    return int(np.ceil(res.dual_bound - 1e-6 * max(1.0, res.dual_bound)))


def tightened_lower_bound(problem: Problem, solver: str = "highs", time_limit_s: float = 10.0) -> LowerBound:
    """:func:`lloptim.bounds.lower_bound` with the decode steps proven by ``solver`` (one instance).

    Parameters
    ----------
    problem : Problem
        A single-instance problem.
    solver : str
        Backend that proves the decode-step bound (:func:`decode_steps_bound`); default ``"highs"``.
    time_limit_s : float
        Wall-clock limit of that backend's search, seconds (default 10).

    Returns
    -------
    LowerBound
        The makespan lower bound of ``problem``, seconds, using the larger of the closed-form and
        the proven decode-step bounds.

    Raises
    ------
    SpecError
        If the problem has more than one instance.
    """
    return lower_bound(problem, decode_steps=decode_steps_bound(problem, solver, time_limit_s))
