"""lloptim's own formulations, registered for :func:`lloptim.solve` like a user's would be.

* ``"binpacking"`` (the default): the offline makespan bin packing. Options ``weights`` (seconds
  per request, ``(R,)`` or ``(R, instances)``) and ``estimates`` (output lengths, tokens). Bound:
  :func:`~lloptim.formulations.binpacking.binpacking_lower_bound` (closed form, plus the exact LP
  over instances on a mixed fleet). Start: LPT + local search (:mod:`lloptim.solvers.greedy`),
  or the caller's ``SolveParams.warm_start`` when better. Prices: the LP prices of client time, or
  the Lagrangian backend's own multipliers, with the Lagrangian bound they prove.
* ``"full_mip"``: the time-indexed serving MIP of one small instance. Option ``horizon`` (slots).
  Bound: :func:`lloptim.bounds.lower_bound`. Start: the simulator's LPT schedule. No prices.
* ``"binpacking_kv"``: the bin packing with each instance's decode steps priced by its clients and
  its KV memory (:mod:`lloptim.formulations.binpacking_kv`). Options ``estimates``, ``kv_mode``,
  ``kv_block_tokens``, ``fused``, ``relax`` (the LP over instances, whose ``dual("kv")`` prices
  memory), ``kv_areas``. Bound: :func:`lloptim.bounds.lower_bound` (the fused bound). Start: LPT
  on each request's least client time (the MIP only).
* ``"precedence"`` and ``"weighted_completion"``: schedules of requests on clients with releases
  and precedence, minimizing the makespan or ``sum u_r C_r`` (:mod:`lloptim.formulations.precedence`,
  :mod:`lloptim.formulations.weighted_completion`). Options ``estimates``, ``weights``, ``exact_max``
  (and ``completion_weights``, ``slot_s``). Start: list scheduling (critical-path rank with
  forward-backward passes; Smith's rule). The model is searched only up to ``exact_max`` requests.
"""

from __future__ import annotations

import numpy as np

from lloptim.formulations.binpacking import (BinPackingData, assignment_values, binpacking_data,
                                             binpacking_lower_bound, binpacking_model, binpacking_prices, loads,
                                             x_to_assignment)
from lloptim.solvers.formulation_registry import Incumbent, register_formulation

__all__ = ["greedy_incumbent", "binpacking_certificate"]


def greedy_incumbent(data: BinPackingData, params, deadline) -> Incumbent:
    """LPT + local search (polished to a tenth of ``rel_gap`` above the bound), or the warm start if better.

    Parameters
    ----------
    data : BinPackingData
        The instance (weights in seconds).
    params : SolveParams
        ``rel_gap``, ``warm_start`` and ``solver_options["start_work"]`` (the local search's work
        budget, elements touched; default none) are read.
    deadline : Deadline
        The local search stops when it has no time left (or its work budget is spent).

    Returns
    -------
    Incumbent
        The assignment, its makespan (seconds) and the MIP-start values of
        :func:`~lloptim.formulations.binpacking.binpacking_model`.
    """
    from lloptim.solvers.greedy import local_search, lpt

    # stop polishing at a tenth of the requested gap: the MIP start needs no better
    a = local_search(data, lpt(data), target=binpacking_lower_bound(data) * (1 + params.rel_gap / 10),
                     time_limit_s=deadline.remaining(), work_limit=params.solver_options.get("start_work"))
    obj = float(loads(data, a).max())
    src = "greedy"
    warm = params.check_warm_start(data.n_requests, data.n_clients)
    if warm is not None:
        wobj = float(loads(data, warm).max())
        if wobj < obj:
            a, obj, src = warm, wobj, "warm_start"
    return Incumbent(a, obj, values=lambda model, a=a: assignment_values(data, a), source=src,
                     extra={"incumbent_source": src, "incumbent_obj": obj})


def binpacking_certificate(data: BinPackingData, multipliers: dict | None) -> tuple[dict, float]:
    """Prices of client time and the Lagrangian bound they prove, seconds.

    Parameters
    ----------
    data : BinPackingData
        The instance.
    multipliers : dict or None
        A backend's own prices (``"load"``: one per client, on the simplex), or None for the LP
        prices (:func:`~lloptim.formulations.binpacking.binpacking_prices`).

    Returns
    -------
    tuple
        ``(multipliers, bound)``: the prices reported and ``L(lambda) = sum_r min_c lambda_c
        w[r, c]``, a lower bound on the makespan for any prices on the simplex, seconds.
    """
    from lloptim.solvers.lagrangian import lagrangian_dual

    if multipliers is None or multipliers.get("load") is None:
        prices = binpacking_prices(data)
        return prices, float(prices["assign"].sum())
    lam = np.clip(np.asarray(multipliers["load"], dtype=np.float64), 0.0, None)
    if lam.shape != (data.n_clients,) or lam.sum() <= 0:
        prices = binpacking_prices(data)
        return prices, float(prices["assign"].sum())
    return multipliers, lagrangian_dual(data, lam / lam.sum())[0]


def _binpacking_build(data: BinPackingData, bound: float | None, cutoff: float | None):
    # a relative slack on the upper bound: a start with T exactly at the bound must stay feasible
    upper = None if cutoff is None or not np.isfinite(cutoff) else cutoff * (1 + 1e-9) + 1e-12
    return binpacking_model(data, t_lower=bound, t_upper=upper)


def _binpacking_decode(data: BinPackingData, model, x: np.ndarray):
    a = x_to_assignment(data, x)
    return a, (float(loads(data, a).max()) if a is not None else None)


register_formulation(
    "binpacking", build=_binpacking_build, decode=_binpacking_decode,
    prepare=lambda problem, weights=None, estimates=None: binpacking_data(problem, weights, estimates),
    incumbent=greedy_incumbent, bound=binpacking_lower_bound, certify=binpacking_certificate,
    description="offline makespan bin packing of requests onto clients (seconds)")


# -- the full serving MIP -------------------------------------------------------------------------
class _FullMipData:
    """The problem and the horizon (internal)."""

    def __init__(self, problem, horizon):
        self.problem = problem
        self.horizon = horizon
        self.run = None


def _full_mip_bound(data: _FullMipData) -> float:
    from lloptim.bounds import lower_bound

    return lower_bound(data.problem).total_s


def _full_mip_incumbent(data: _FullMipData, params, deadline) -> Incumbent:
    from lloptim.formulations.full_mip import start_from_run
    from lloptim.simulator import run_policy

    # the simulator's LPT schedule is a feasible start and the fallback answer
    run = run_policy(data.problem, "lpt")
    return Incumbent(np.asarray(run.client, dtype=np.int64), float(run.makespan_s),
                     values=lambda model: start_from_run(model.compile(), run), source="simulated_lpt",
                     extra={"simulated_lpt_s": float(run.makespan_s)})


def _full_mip_build(data: _FullMipData, bound: float | None, cutoff: float | None):
    from lloptim.formulations.full_mip import full_mip_model

    # a hair below the bound: it is exact up to round-off, and the simulator's start must stay feasible
    return full_mip_model(data.problem, horizon=data.horizon,
                          makespan_lower=None if bound is None else bound * (1 - 1e-9))


def _full_mip_decode(data: _FullMipData, model, x: np.ndarray):
    from lloptim.formulations.full_mip import decode_schedule

    sched = decode_schedule(data.problem, model.compile(), x)
    return sched.assignment, sched.makespan_s, {"schedule": {"kinds": sched.kinds,
                                                             "client_order": sched.client_order}}


def _full_mip_prepare(problem, horizon: int | None = None) -> _FullMipData:
    from lloptim.formulations.full_mip import full_mip_model

    full_mip_model(problem, horizon=horizon)  # validate (one instance, size, horizon) before any work
    return _FullMipData(problem, horizon)


register_formulation(
    "full_mip", build=_full_mip_build, decode=_full_mip_decode, prepare=_full_mip_prepare,
    incumbent=_full_mip_incumbent, bound=_full_mip_bound,
    description="time-indexed serving MIP of one small instance (makespan, seconds)")


# -- the bin packing with KV memory -----------------------------------------------------------------
_KV_OPTIONS = ("estimates", "kv_mode", "kv_block_tokens", "fused", "relax", "kv_areas")


def _kv_prepare(problem, **options):
    from lloptim.errors import SpecError
    from lloptim.formulations.binpacking_kv import kv_binpacking_data

    for name in options:
        if name not in _KV_OPTIONS:
            raise SpecError(f"options.{name}", "is not an option of the binpacking_kv formulation",
                            f"use some of {list(_KV_OPTIONS)}")
    return kv_binpacking_data(problem, **options)


def _kv_incumbent(data, params, deadline) -> Incumbent | None:
    """LPT of the requests by their least client time, its model makespan (the MIP only)."""
    if data.relax:
        return None  # the LP is solved for its duals: no start, no skip
    from lloptim.formulations.binpacking import BinPackingData
    from lloptim.formulations.binpacking_kv import kv_objective
    from lloptim.solvers.greedy import lpt

    uniform = bool(np.all(data.t_min == data.t_min[:, :1]))
    W = np.ascontiguousarray(data.t_min[:, :1] if uniform else data.t_min)
    a = lpt(BinPackingData(W, data.client_instance, uniform))
    obj = kv_objective(data, a)

    def values(model, a=a):
        x = np.zeros((data.n_requests, data.n_clients))
        x[np.arange(data.n_requests), a] = 1.0
        inst = data.client_instance[a]
        m = data.n_instances
        steps = np.maximum(np.bincount(inst, weights=data.outputs, minlength=m) / data.clients,
                           np.bincount(inst, weights=data.area[np.arange(a.size), inst], minlength=m) / data.capacity)
        return {"x": x, "D": steps, "T": obj}  # obj >= the bound, the column's lower bound

    return Incumbent(a, obj, values=values, source="lpt", extra={"incumbent_source": "lpt", "incumbent_obj": obj})


def _kv_build(data, bound: float | None, cutoff: float | None):
    from lloptim.formulations.binpacking_kv import kv_binpacking_model

    if data.relax:
        return kv_binpacking_model(data)  # no column bound on T: the rows must carry the prices
    upper = None if cutoff is None or not np.isfinite(cutoff) else cutoff * (1 + 1e-9) + 1e-12
    # a hair below the closed-form bound (exact up to round-off): the start must stay feasible
    return kv_binpacking_model(data, t_lower=None if bound is None else bound * (1 - 1e-9), t_upper=upper)


def _kv_decode(data, model, x: np.ndarray):
    from lloptim.formulations.binpacking_kv import kv_objective, kv_share_objective

    cols = model.column_of_label()
    if data.relax:
        Y = np.clip(np.asarray(x)[cols[model["y"].labels]], 0.0, 1.0)
        return Y, kv_share_objective(data, Y)
    X = np.asarray(x)[cols[model["x"].labels]]
    a = X.argmax(axis=1)
    ok = (np.abs(X[np.arange(a.size), a] - 1.0) < 1e-5).all()
    return (a.astype(np.int64), kv_objective(data, a)) if ok else (None, None)


def _kv_bound(data) -> float:
    from lloptim.formulations.binpacking_kv import kv_bound

    return kv_bound(data)


register_formulation(
    "binpacking_kv", build=_kv_build, decode=_kv_decode, prepare=_kv_prepare, incumbent=_kv_incumbent,
    bound=_kv_bound,
    description="bin packing with each instance's decode steps priced by its clients and its KV memory (seconds); "
                "relax=True: the LP whose dual('kv') prices memory")


# -- schedules: makespan with precedence, and total weighted completion time ----------------------
_SCHEDULE_OPTIONS = ("estimates", "weights", "exact_max", "completion_weights", "slot_s")


def _schedule_prepare(objective: str):
    def prepare(problem, **options):
        from lloptim.errors import SpecError
        from lloptim.formulations.precedence import schedule_data

        allowed = _SCHEDULE_OPTIONS if objective == "completion" else _SCHEDULE_OPTIONS[:3]
        for name in options:
            if name not in allowed:
                raise SpecError(f"options.{name}", "is not an option of this formulation", f"use some of {list(allowed)}")
        return schedule_data(problem, objective=objective, **options)

    return prepare


def _schedule_bound(data) -> float:
    if data.objective == "makespan":
        fastest = data.weights.min(axis=1)
        rel = data.release
        # the relaxations without the client limit (critical path) or without precedence (work / C)
        return max(data.precedence.longest_path(fastest, rel),
                   float(np.sum(fastest)) / max(data.client_kind.size, 1) + float(rel.min(initial=0.0)))
    from lloptim.formulations.weighted_completion import weighted_completion_bound

    return weighted_completion_bound(data)


def _schedule_incumbent(data, params, deadline) -> Incumbent:
    from lloptim.formulations.precedence import schedule_values
    from lloptim.formulations.weighted_completion import time_indexed_values

    if data.objective == "makespan":
        from lloptim.dag_plan import plan_workflows

        plan = plan_workflows(data.precedence, data.weights, data.client_kind, data.release, exact=False,
                              time_limit_s=deadline.remaining())
        start, client, source = plan.start_s, plan.client, "list_schedule"
    else:
        from lloptim.formulations.weighted_completion import wspt_schedule

        start, client = wspt_schedule(data)
        source = "wspt"
    obj = data.value(start, client)
    values = (lambda model: time_indexed_values(data, model, start, client)) if data.slot_s is not None else (
        lambda model: schedule_values(data, start, client))
    return Incumbent(client, obj, values=values, source=source,
                     extra={"schedule": {"start_s": start, "client": client}, "incumbent_source": source,
                            "incumbent_obj": obj})


def _schedule_build(data, bound: float | None, cutoff: float | None):
    from lloptim.formulations.precedence import build_precedence_mip

    upper = None if cutoff is None or not np.isfinite(cutoff) else cutoff * (1 + 1e-9) + 1e-9
    if data.slot_s is not None:
        from lloptim.formulations.weighted_completion import time_indexed_model

        return time_indexed_model(data, upper)
    serial = float(data.release.max(initial=0.0)) + float(data.weights.max(axis=1).sum())
    if data.objective == "makespan":
        # no better schedule ends after the start's makespan: it is the big-M horizon
        horizon = serial if cutoff is None or not np.isfinite(cutoff) else cutoff
        lower = 0.0 if bound is None else bound * (1 - 1e-9)
    else:
        horizon, lower = serial, 0.0  # a schedule of smaller total completion may end later
    return build_precedence_mip(data.precedence, data.weights, data.clients_per_kind, data.release, horizon, lower,
                                objective=data.objective, completion_weights=data.completion_weights,
                                objective_upper=upper)


def _schedule_decode(data, model, x: np.ndarray):
    from lloptim.formulations.precedence import check_schedule, decode_schedule_x

    if data.slot_s is not None:
        from lloptim.formulations.weighted_completion import decode_time_indexed

        sched = decode_time_indexed(data, model, x)
    else:
        sched = decode_schedule_x(data, model, x)
    if sched is None or check_schedule(data, *sched, tol=1e-5):
        return None, None
    start, client = sched
    return client, data.value(start, client), {"schedule": {"start_s": start, "client": client}}


def _schedule_search(data) -> bool:
    return data.n_requests <= data.exact_max


register_formulation(
    "precedence", build=_schedule_build, decode=_schedule_decode, prepare=_schedule_prepare("makespan"),
    incumbent=_schedule_incumbent, bound=_schedule_bound, search=_schedule_search,
    description="makespan of requests with precedence on clients (work seconds): exact client-chain MIP up to "
                "exact_max requests, else list scheduling by critical-path rank, forward-backward improved")
register_formulation(
    "weighted_completion", build=_schedule_build, decode=_schedule_decode,
    prepare=_schedule_prepare("completion"), incumbent=_schedule_incumbent, bound=_schedule_bound,
    search=_schedule_search,
    description="total weighted completion time (work seconds): exact client-chain MIP up to exact_max requests, "
                "else list scheduling by Smith's ratio (WSPT)")
