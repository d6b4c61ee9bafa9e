"""The offline bin packing with KV memory: requests onto clients, with each instance's decode steps priced.

A separate formulation (``"binpacking_kv"``) rather than a ``kv=True`` switch of ``"binpacking"``:
its weights are *certified* times (every coefficient is a lower bound on what the simulator
charges), so its relaxation is a valid bound on every policy's makespan, while ``"binpacking"``
keeps the paper's heuristic client-time weights (:func:`lloptim.work.request_work_s`) the
hybrid's plan was tuned with. The model, for requests ``r``, clients ``c`` and instances ``i``
(``y[r, i] = sum_{c in i} x[r, c]``)::

    min T
    s.t.  sum_c x[r, c] = 1                                        every request r   ("assign")
          sum_r t[r, i(c)] x[r, c] <= T                              every client c    ("load")
          sum_r tok[r, i] y[r, i] + a_d[i] D[i] <= T                 every instance i  ("time")
          sum_r o[r] y[r, i] <= C[i] D[i]                            every instance i  ("steps")
          sum_r area[r, i] y[r, i] <= M[i] D[i]                      every instance i  ("kv")

with ``D[i] >= 0`` the decode steps of instance ``i``. The rows say, in seconds and tokens:

* ``load``: a client serves its requests one after another, and request ``r`` takes at least
  ``t[r, i]`` (:func:`lloptim.bounds.minimal_request_time_s`, fused: the request alone);
* ``time``: an instance's iterations run one after another, so its busy time is at least the
  per-token terms of its requests (``tok``: ``prefill_per_token_s * p + decode_per_seq_s * o +
  decode_per_kv_token_s * (o p + o (o - 1) / 2)``) plus ``decode_base_s`` per decode step (with
  ``fused=False``, also ``prefill_base_s / C`` per request: separate prefill iterations);
* ``steps``: a decode step advances at most ``C`` requests one token each;
* ``kv``: a decode step holds at most ``M`` tokens of KV cache (whole blocks), and request ``r``
  holds ``p + k`` tokens (rounded up to blocks, never below a reservation) at its ``k``-th step:
  its *KV area* ``area[r, i]`` (:func:`lloptim.memory.decode_area_tokens`, token-steps).

**Validity.** Every row is a necessary condition on a schedule of the engine (preemptions
included: a recomputed request resumes with the same context, so its area is unchanged), so the
LP relaxation is a lower bound on every policy's makespan, for fused and separate iterations when
``fused=True`` (the default). The MIP's optimum bounds every policy that keeps a request on one
client; a policy that migrates running requests is bounded by the LP. The result's bound is the
larger of the relaxation and :func:`lloptim.bounds.lower_bound` (its ramp-up and critical-path
terms), and the objective of an assignment is its model makespan (the largest row), not a
simulated makespan.

**Prices.** With ``relax=True`` the LP is solved over instances (clients of an instance are
identical, so the ``load`` rows pool into ``sum_r t[r, i] y[r, i] <= C[i] T``: the same optimum)
and :meth:`~lloptim.solvers.SolveResult.dual` gives ``dual("kv")``, one per instance, in makespan
seconds per token-step of KV area (``<= 0`` in the sensitivity convention: more capacity lowers
the makespan). Stationarity in ``D[i]`` reads ``a_d[i] nu[i] = C[i] sigma[i] + M[i] kappa[i]``
with ``nu = -dual("time")``, ``sigma = -dual("steps")``, ``kappa = -dual("kv")``: the price of an
instance's decode step splits between its clients and its memory, and the memory share

    beta[i] = M[i] kappa[i] / (a_d[i] nu[i])        (dimensionless, in [0, 1])

is the weight the online rule puts on memory (:func:`kv_price_weights`,
:mod:`lloptim.runtime.lagrangian`): ``beta * decode_base_s / M`` seconds per idle token-step,
i.e. ``kappa / nu``. On a fleet ``nu[i]`` (:attr:`KvPrices.time_shares`) says how much of the
makespan's price falls on instance ``i``'s busy time, so ``kappa[i] = beta[i] nu[i] decode_base_s[i]
/ M[i]`` compares a token-step of memory *across* instances (makespan seconds): the online rule
uses it to keep the headroom of a cache whose memory is dearer than another's from drawing work
that the cheaper cache can hold (:meth:`lloptim.runtime.lagrangian.LagrangianIterations.headroom_weight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from lloptim.errors import SpecError
from lloptim.formulations.model import Model
from lloptim.problem import Problem

__all__ = ["KvBinPackingData", "kv_binpacking_data", "kv_binpacking_model", "kv_objective", "kv_share_objective", "kv_bound",
           "kv_price_weights", "kv_prices", "KvPrices", "KV_PRICE_SOLVER"]

#: Backend of the price LP (any LP solver with duals; HiGHS ships with lloptim).
KV_PRICE_SOLVER = "highs"


@dataclass(frozen=True, eq=False)
class KvBinPackingData:
    """The numbers of one KV bin packing, per request ``r`` and instance ``i``.

    Attributes
    ----------
    problem
        The problem.
    t_min
        ``(R, m)`` least time request ``r`` holds a client of instance ``i``, seconds.
    tok
        ``(R, m)`` per-token instance time of request ``r`` on ``i`` (plus ``prefill_base_s / C``
        unless ``fused``), seconds.
    outputs
        ``(R,)`` output tokens (true or estimated) the model uses.
    area
        ``(R, m)`` KV area of request ``r`` on ``i``'s blocks, token-steps.
    capacity
        ``(m,)`` KV capacity of each instance in whole blocks, tokens.
    clients
        ``(m,)`` clients of each instance.
    decode_base
        ``(m,)`` fixed cost of a decode step on each instance, seconds.
    client_instance
        ``(C,)`` instance of each global client.
    relax
        Whether the model is the LP over instances (prices) rather than the MIP over clients.
    fused
        Whether the bound also holds for fused (chunked-prefill) schedules.
    kv_mode, kv_block_tokens, estimates
        The KV options the areas were computed with (for :func:`kv_bound`).
    """

    problem: Problem
    t_min: np.ndarray
    tok: np.ndarray
    outputs: np.ndarray
    area: np.ndarray
    capacity: np.ndarray
    clients: np.ndarray
    decode_base: np.ndarray
    client_instance: np.ndarray
    relax: bool
    fused: bool
    kv_mode: object = None
    kv_block_tokens: object = None
    estimates: np.ndarray | None = None

    @property
    def n_requests(self) -> int:
        """Number of requests ``R``."""
        return int(self.t_min.shape[0])

    @cached_property
    def floor_s(self) -> float:
        """:func:`kv_bound` of this instance (computed once), seconds."""
        return kv_bound(self)

    @property
    def n_instances(self) -> int:
        """Number of instances ``m``."""
        return int(self.t_min.shape[1])

    @property
    def n_clients(self) -> int:
        """Number of clients ``C`` over all instances."""
        return int(self.client_instance.size)


def kv_binpacking_data(problem: Problem, estimates: np.ndarray | None = None, kv_mode=None, kv_block_tokens=None,
                       fused: bool = True, relax: bool = False, kv_areas: np.ndarray | None = None
                       ) -> KvBinPackingData:
    """The numbers of :func:`kv_binpacking_model` for ``problem`` (the ``prepare`` hook).

    Parameters
    ----------
    problem
        The problem.
    estimates
        Output lengths the model uses, tokens (what a policy knows); default: the true lengths.
        With estimates the model plans, and bounds only if they are exact.
    kv_mode, kv_block_tokens
        KV mode and block size to model (a run's overrides, or one per instance); None: each
        instance's own (see :func:`lloptim.bounds.lower_bound`).
    fused
        Leave out the prefill iterations' fixed cost, so the bound also holds for fused schedules
        (default True).
    relax
        Build the LP over instances (its duals are the prices) instead of the MIP over clients.
    kv_areas
        ``(R, m)`` or ``(R,)`` KV areas to use instead of computing them, token-steps (a policy
        passes its own estimate, e.g. :func:`lloptim.runtime.memory_schedulers.estimated_kv_areas`).

    Returns
    -------
    KvBinPackingData
        The instance.

    Raises
    ------
    SpecError
        Estimates or areas of the wrong shape, negative or not finite; a non-boolean flag.
    """
    from lloptim.bounds import _kv_area, minimal_request_time_s

    w = problem.workload
    R, m = problem.n_requests, len(problem.instances)
    for name, flag in (("fused", fused), ("relax", relax)):
        if not isinstance(flag, (bool, np.bool_)):
            raise SpecError(f"options.{name}", f"must be true or false, got {flag!r}", f"pass {name}=True or False")
    if estimates is None:
        o = w.output_tokens.astype(np.float64)
    else:
        o = np.asarray(estimates, dtype=np.float64)
        if o.shape != (R,) or not np.all(np.isfinite(o)) or np.any(o < 0):
            raise SpecError("estimates", f"must be {R} finite output lengths >= 0, tokens",
                            "give one estimate per request")
        o = np.maximum(np.ceil(o), 1.0)
    p = w.prompt_tokens.astype(np.float64)
    lats = [inst.profile.latency for inst in problem.instances]
    clients = np.array([inst.clients for inst in problem.instances], dtype=np.float64)
    kv_steps = o * p + o * (o - 1) / 2
    tok = np.column_stack([l.prefill_per_token_s * p + l.decode_per_seq_s * o + l.decode_per_kv_token_s * kv_steps
                           + (0.0 if fused else l.prefill_base_s / c) for l, c in zip(lats, clients)])
    # the least time alone on each instance (a one-instance problem per instance: its own coefficients)
    t_min = np.column_stack([minimal_request_time_s(Problem(w, (inst,), problem.name), o, fused=True)
                             for inst in problem.instances])
    areas, caps, _starts, _sizes, _mode = _kv_area(problem, o, kv_mode, kv_block_tokens, estimates)
    if kv_areas is not None:
        A = np.asarray(kv_areas, dtype=np.float64)
        A = np.repeat(A[:, None], m, axis=1) if A.ndim == 1 else A
        if A.shape != (R, m) or not np.all(np.isfinite(A)) or np.any(A < 0):
            raise SpecError("kv_areas", f"must be finite token-steps >= 0 of shape ({R},) or ({R}, {m})",
                            "give one KV area per request (and instance)")
    else:
        A = np.column_stack(areas)
    return KvBinPackingData(problem, t_min, tok, o, A, np.asarray(caps, dtype=np.float64), clients,
                            np.array([l.decode_base_s for l in lats]), problem.client_instance().astype(np.int64),
                            bool(relax), bool(fused), kv_mode, kv_block_tokens,
                            None if estimates is None else np.asarray(estimates, dtype=np.float64))


def kv_binpacking_model(data: KvBinPackingData, t_lower: float | None = None, t_upper: float | None = None) -> Model:
    """The KV bin packing of the module docstring as a :class:`~lloptim.Model`.

    Parameters
    ----------
    data : KvBinPackingData
        The instance (``data.relax``: the LP over instances; else the MIP over clients).
    t_lower, t_upper : float or None
        Bounds on the makespan ``T``, seconds.

    Returns
    -------
    Model
        Variables ``x`` (request, client; binary) or ``y`` (request, instance; in [0, 1]), ``D``
        (decode steps per instance) and ``T`` (seconds); families ``assign``, ``load``, ``time``,
        ``steps`` and ``kv`` (one row per instance each for the last three).
    """
    R, m, C = data.n_requests, data.n_instances, data.n_clients
    model = Model("binpacking_kv")
    T = model.add_variables("T", lower=-np.inf if t_lower is None else t_lower,
                            upper=np.inf if t_upper is None else t_upper)
    D = model.add_variables("D", coords={"instance": m})
    if data.relax:
        y = model.add_variables("y", coords={"request": R, "instance": m}, upper=1.0)
        model.add_constraints("assign", y.sum("instance") == 1)
        model.add_constraints("load", (data.t_min * y).sum("request") - data.clients * T <= 0)
        per_instance = y
    else:
        x = model.add_variables("x", coords={"request": R, "client": C}, binary=True)
        model.add_constraints("assign", x.sum("client") == 1)
        ci = data.client_instance
        model.add_constraints("load", (data.t_min[:, ci] * x).sum("request") <= T)
        member = np.zeros((C, m))
        member[np.arange(C), ci] = 1.0
        per_instance = x @ member  # y[r, i]: the share of r on instance i's clients
    model.add_constraints("time", (data.tok * per_instance).sum("request") + data.decode_base * D <= T)
    model.add_constraints("steps", (data.outputs[:, None] * per_instance).sum("request") - data.clients * D <= 0)
    model.add_constraints("kv", (data.area * per_instance).sum("request") - data.capacity * D <= 0)
    model.minimize(T)
    return model


def kv_objective(data: KvBinPackingData, assignment: np.ndarray) -> float:
    """The model makespan of a client assignment: its largest ``load`` or ``time`` row, seconds.

    Parameters
    ----------
    data : KvBinPackingData
        The instance.
    assignment : numpy.ndarray
        Global client of each request, int, shape ``(R,)``.

    Returns
    -------
    float
        ``max(max_c load_c, max_i time_i)`` with each instance's decode steps at their least,
        ``max(outputs / C, area / M)``, and never below :func:`kv_bound` (the model's ``T``
        has it as its lower bound), seconds.
    """
    a = np.asarray(assignment, dtype=np.int64)
    inst = data.client_instance[a]
    rows = np.arange(a.size)
    load = np.bincount(a, weights=data.t_min[rows, inst], minlength=data.n_clients)
    m = data.n_instances
    steps = np.maximum(np.bincount(inst, weights=data.outputs, minlength=m) / data.clients,
                       np.bincount(inst, weights=data.area[rows, inst], minlength=m) / data.capacity)
    time = np.bincount(inst, weights=data.tok[rows, inst], minlength=m) + data.decode_base * steps
    return float(max(load.max(initial=0.0), time.max(initial=0.0), data.floor_s))


def kv_share_objective(data: KvBinPackingData, shares: np.ndarray) -> float:
    """The model makespan of fractional shares ``y[r, i]`` (the LP over instances), seconds.

    ``max(max_i sum_r t[r, i] y[r, i] / C[i], max_i time_i)`` with each instance's decode steps at
    their least, ``max(sum_r o y / C, sum_r area y / M)``.

    Parameters
    ----------
    data
        The instance data.
    shares
        ``(R, m)`` fraction of each request on each instance (rows sum to 1).
    """
    Y = np.asarray(shares, dtype=np.float64)
    steps = np.maximum((data.outputs[:, None] * Y).sum(axis=0) / data.clients,
                       (data.area * Y).sum(axis=0) / data.capacity)
    time = (data.tok * Y).sum(axis=0) + data.decode_base * steps
    load = (data.t_min * Y).sum(axis=0) / data.clients
    return float(max(load.max(initial=0.0), time.max(initial=0.0), data.floor_s))


def kv_bound(data: KvBinPackingData) -> float:
    """The closed-form part of the bound: :func:`lloptim.bounds.lower_bound` with the same KV options, seconds.

    Its fused bound when ``data.fused`` (valid for every policy), else its separate-iteration
    bound; 0 when the model prices estimates (a bound needs the true lengths).
    """
    from lloptim.bounds import lower_bound

    if data.estimates is not None:
        return 0.0
    lb = lower_bound(data.problem, kv_mode=data.kv_mode, kv_block_tokens=data.kv_block_tokens)
    return float(lb.fused_s if data.fused else lb.total_s)


@dataclass(frozen=True)
class KvPrices:
    """The prices of the KV bin packing's LP that the online rule reads, per instance.

    Attributes
    ----------
    weights
        ``(m,)`` memory share ``beta`` of each instance's decode-step price, in [0, 1]
        (dimensionless; see the module docstring).
    time_shares
        ``(m,)`` ``nu = -dual("time")`` of each instance, the makespan seconds one more second of
        the instance's busy time costs (dimensionless, >= 0; they sum to at most 1 with the
        ``load`` duals). Equal shares ``1/m`` when no ``time`` row binds or no optimal LP was found.
    """

    weights: np.ndarray
    time_shares: np.ndarray


def kv_prices(problem: Problem, estimates: np.ndarray | None = None, kv_areas: np.ndarray | None = None,
              kv_mode=None, solver: str = KV_PRICE_SOLVER) -> KvPrices:
    """Memory weights ``beta[i]`` and time shares ``nu[i]`` of each instance, from the LP's duals.

    Solves ``lloptim.solve(problem, formulation="binpacking_kv", relax=True)`` and converts the
    duals as the module docstring derives: ``beta[i] = M[i] kappa[i] / (decode_base_s[i] nu[i])``
    with ``kappa = -dual("kv")`` (seconds per token-step) and ``nu = -dual("time")``
    (dimensionless), clipped to [0, 1]; an instance whose ``time`` row does not bind (``nu = 0``:
    it does not set the makespan) gets the share of its own decode-step lower bound, 1 where its
    memory forces more steps than its clients, else 0.

    Parameters
    ----------
    problem : Problem
        The problem.
    estimates : numpy.ndarray or None
        Output lengths the policy knows, tokens; default: the true lengths.
    kv_areas : numpy.ndarray or None
        KV areas the policy estimates, ``(R,)`` or ``(R, m)`` token-steps; default: computed.
    kv_mode : str or list or None
        KV mode(s) to model (a run's override); None: each instance's own.
    solver : str
        An LP backend with duals (``highs``, ``cbc``, ``cvxpy``).

    Returns
    -------
    KvPrices
        ``weights`` and ``time_shares``, ``(m,)`` each, dimensionless.
    """
    from lloptim.solvers import SolveParams, solve

    # interior point then crossover (optimal basis, so duals): 10-15x faster than simplex on this
    # LP of R convexity rows and 4 m dense rows (10,000 requests, 2 instances: 0.2 s against 2.3 s)
    params = SolveParams(solver_options={"solver": "ipm", "run_crossover": "on"}) if solver == "highs" else None
    res = solve(problem, solver=solver, params=params, formulation="binpacking_kv", relax=True, estimates=estimates,
                kv_areas=kv_areas, kv_mode=kv_mode)
    data = kv_binpacking_data(problem, estimates, kv_mode, relax=True, kv_areas=kv_areas)
    m = data.n_instances
    steps_clients = data.outputs.sum() / data.clients
    steps_memory = data.area.sum(axis=0) / data.capacity
    fallback = (steps_memory > steps_clients).astype(np.float64)
    equal = np.full(m, 1.0 / m)
    try:
        kappa = -np.atleast_1d(res.dual("kv"))
        nu = -np.atleast_1d(res.dual("time"))
    except SpecError:  # no optimal LP (should not happen: the LP is always feasible and bounded)
        return KvPrices(fallback, equal)
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = data.capacity * kappa / (data.decode_base * nu)
    weights = np.where(nu > 1e-12, np.clip(np.nan_to_num(beta), 0.0, 1.0), fallback)
    shares = np.clip(np.nan_to_num(nu), 0.0, None)
    return KvPrices(weights, shares if shares.sum() > 1e-12 else equal)


def kv_price_weights(problem: Problem, estimates: np.ndarray | None = None, kv_areas: np.ndarray | None = None,
                     kv_mode=None, solver: str = KV_PRICE_SOLVER) -> np.ndarray:
    """The memory share ``beta[i]`` of each instance's decode-step price, from ``dual("kv")`` of the LP.

    The ``weights`` of :func:`kv_prices` (see there for the conversion of the duals).

    Parameters
    ----------
    problem : Problem
        The problem.
    estimates : numpy.ndarray or None
        Output lengths the policy knows, tokens; default: the true lengths.
    kv_areas : numpy.ndarray or None
        KV areas the policy estimates, ``(R,)`` or ``(R, m)`` token-steps; default: computed.
    kv_mode : str or list or None
        KV mode(s) to model (a run's override); None: each instance's own.
    solver : str
        An LP backend with duals (``highs``, ``cbc``, ``cvxpy``).

    Returns
    -------
    numpy.ndarray
        ``(m,)`` weights in [0, 1], dimensionless.
    """
    return kv_prices(problem, estimates, kv_areas, kv_mode, solver).weights
