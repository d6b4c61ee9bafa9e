"""``lloptim.solve`` on models: every backend agrees, duals in one convention, statuses, starts, user formulations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lloptim import Model, Problem, SolveParams, solve, workloads
from lloptim.errors import SolverError, SpecError
from lloptim.solvers import (Incumbent, Limit, Termination, available_solvers, get_formulation,
                             register_formulation)

EXACT = [s for s in ("highs", "cbc", "cvxpy") if s in available_solvers()]


def random_model(seed: int, n: int, m: int, integer: bool, sense: str) -> tuple[Model, np.ndarray]:
    """A feasible, bounded model with ``<=``, ``>=`` and ``==`` rows around a known point ``x0``."""
    rng = np.random.default_rng(seed)
    model = Model(f"rand{seed}")
    lo = rng.integers(-3, 1, n).astype(float)
    hi = lo + rng.integers(1, 6, n)
    x = model.add_variables("x", shape=n, lower=lo, upper=hi, integer=integer)
    x0 = rng.integers(lo, hi + 1).astype(float)
    A = rng.integers(-3, 4, (m, n)).astype(float)
    kinds = rng.integers(0, 3, m)
    ax = A @ x0
    slack = rng.integers(0, 4, m)
    le, ge, eq = kinds == 0, kinds == 1, kinds == 2
    if le.any():
        model.add_constraints("le", A[le] @ x <= ax[le] + slack[le])
    if ge.any():
        model.add_constraints("ge", A[ge] @ x >= ax[ge] - slack[ge])
    if eq.any():
        model.add_constraints("eq", A[eq] @ x == ax[eq])
    c = rng.integers(-5, 6, n).astype(float)
    (model.minimize if sense == "min" else model.maximize)(x @ c + 1.5)
    return model, x0


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(2, 7), m=st.integers(1, 6), integer=st.booleans(),
       sense=st.sampled_from(["min", "max"]))
def test_backends_agree_on_random_models(seed, n, m, integer, sense):
    model, _ = random_model(seed, n, m, integer, sense)
    res = {s: solve(model, s, SolveParams(rel_gap=0, time_limit_s=30)) for s in EXACT}
    ref = res["highs"].primal_bound
    for s, r in res.items():
        assert r.status is Termination.OPTIMAL, (s, r.status, r.extra)
        assert r.backend == s and r.solver == s
        assert r.primal_bound == pytest.approx(ref, rel=1e-6, abs=1e-6), s
        x = r.value("x")
        assert x.shape == (n,) and model.compile().max_violation(x) < 1e-6
        if sense == "min":
            assert r.dual_bound <= r.primal_bound + 1e-6
        else:
            assert r.dual_bound >= r.primal_bound - 1e-6


def _check_lp_duals(model: Model, r, tol: float = 1e-6) -> None:
    """Strong duality, complementary slackness and dual feasibility in the sensitivity convention."""
    lm = model.compile()
    y = np.concatenate([np.atleast_1d(r.dual(g)).ravel() for g in lm.con_groups])
    x = r.x
    rc = lm.c - lm.A.T @ y
    np.testing.assert_allclose(np.concatenate([np.atleast_1d(r.reduced_cost(v)).ravel() for v in model.variables]),
                               rc, atol=1e-9)
    ax = lm.A @ x
    up = 1.0 if lm.sense == "min" else -1.0  # a positive dual of a minimization pins the lower side
    at_lo_r = np.where(up * y > 0, lm.row_lo, lm.row_hi)
    at_lo_c = np.where(up * rc > 0, lm.col_lo, lm.col_hi)
    active_r, active_c = np.abs(y) > tol, np.abs(rc) > tol
    assert np.all(np.isfinite(at_lo_r[active_r])) and np.all(np.isfinite(at_lo_c[active_c]))  # dual feasible
    np.testing.assert_allclose(ax[active_r], at_lo_r[active_r], atol=1e-6)  # complementary slackness
    np.testing.assert_allclose(x[active_c], at_lo_c[active_c], atol=1e-6)
    dual_obj = y[active_r] @ at_lo_r[active_r] + rc[active_c] @ at_lo_c[active_c] + lm.offset
    assert dual_obj == pytest.approx(r.primal_bound, rel=1e-7, abs=1e-7)  # strong duality


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(2, 7), m=st.integers(1, 6), sense=st.sampled_from(["min", "max"]))
def test_lp_duals_satisfy_strong_duality_on_every_backend(seed, n, m, sense):
    model, _ = random_model(seed, n, m, False, sense)
    objs = []
    for s in EXACT:
        r = solve(model, s)
        assert r.status is Termination.OPTIMAL and r.gap < 1e-9
        _check_lp_duals(model, r)
        objs.append(r.primal_bound)
    assert np.ptp(objs) < 1e-6


def test_dual_sign_is_the_sensitivity_on_every_backend():
    """d(objective)/d(rhs), measured by re-solving with a moved right-hand side, for min and max, <=, >=, ==."""
    A = np.array([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [0.0, 1.0, 2.0]])

    def build(sense, c, shift):
        m = Model("sens")
        x = m.add_variables("x", shape=3)
        m.add_constraints("le", A[0] @ x <= 10 + shift[0])
        m.add_constraints("ge", A[1] @ x >= 1 + shift[1])
        m.add_constraints("eq", A[2] @ x == 6 + shift[2])
        (m.minimize if sense == "min" else m.maximize)(x @ c)
        return m

    for sense, c in (("min", [1.0, 2.0, 1.0]), ("max", [1.0, 2.0, 1.0]), ("min", [-1.0, -3.0, -1.0]),
                     ("max", [-1.0, 1.0, 2.0])):
        base = solve(build(sense, c, [0, 0, 0]), "highs").primal_bound
        fd = [(solve(build(sense, c, np.eye(3)[i] * 1e-3), "highs").primal_bound - base) / 1e-3 for i in range(3)]
        for s in EXACT:
            r = solve(build(sense, c, [0, 0, 0]), s)
            got = [r.dual("le"), r.dual("ge"), r.dual("eq")]
            np.testing.assert_allclose(got, fd, atol=1e-4, err_msg=f"{s} {sense} {c}")
            assert isinstance(got[0], float)


def test_duals_need_an_lp():
    m, _ = random_model(1, 4, 3, True, "min")
    r = solve(m, "highs")
    with pytest.raises(SpecError, match="relaxed"):
        r.dual("le" if "le" in m else "ge")
    assert solve(m.relaxed(), "highs").dual(next(iter(m.constraints))) is not None


def test_statuses_tell_infeasible_unbounded_and_limits_apart():
    m = Model("inf")
    x = m.add_variables("x", shape=2, upper=1)
    m.add_constraints("c", x.sum() >= 3)
    m.minimize(x.sum())
    for s in EXACT:
        r = solve(m, s)
        assert r.status is Termination.INFEASIBLE and r.primal_bound is None, s
        with pytest.raises(SpecError, match="without an answer"):
            r.value(x)
    u = Model("unb")
    y = u.add_variables("y", shape=2, lower=-np.inf)
    u.add_constraints("c", y[0] - y[1] <= 1)
    u.minimize(y.sum())
    for s in EXACT:
        assert solve(u, s).status in (Termination.UNBOUNDED, Termination.INFEASIBLE), s  # some say "inf or unb"
    assert solve(u, "highs").status is Termination.UNBOUNDED


def test_a_hard_mip_at_its_time_limit_keeps_the_start():
    rng = np.random.default_rng(0)
    R, C = 300, 40
    w = rng.uniform(1, 3, R)
    m = Model("hard")
    x = m.add_variables("x", shape=(R, C), binary=True)
    t = m.add_variables("t")
    m.add_constraints("assign", x.sum(1) == 1)
    m.add_constraints("load", (w[:, None] * x).sum(0) <= t)
    m.minimize(t)
    a = np.arange(R) % C
    start = {"x": np.eye(C)[a], "t": np.bincount(a, weights=w, minlength=C).max()}
    r = solve(m, "highs", SolveParams(time_limit_s=0.5, rel_gap=0), start=start)
    assert r.status in (Termination.FEASIBLE, Termination.OPTIMAL)
    assert r.primal_bound <= start["t"] + 1e-9 and r.dual_bound <= r.primal_bound
    if r.status is Termination.FEASIBLE:
        assert r.limit is Limit.TIME
    with pytest.raises(SpecError, match="not feasible"):
        solve(m, "highs", start={"x": np.zeros((R, C)), "t": 0.0})


def test_heuristics_refuse_models_with_a_short_message():
    m, _ = random_model(0, 3, 2, False, "min")
    for s in ("greedy", "lagrangian"):
        with pytest.raises(SolverError, match="highs") as info:
            solve(m, s)
        assert len(str(info.value)) < 200


# -- the done-when model: bin packing with eligibility and per-client caps -----------------------------
def side_model(R=24, clients=3, cap=3, seed=0, integer=True):
    problem = Problem.single(workloads.gsm8k("test", limit=R), clients=clients, instances=2)
    prompt = problem.workload.prompt_tokens
    inst = problem.client_instance()
    w = np.random.default_rng(seed).integers(1, 20, R).astype(float)
    m = Model("side")
    x = m.add_variables("x", coords={"request": R, "client": inst.size}, binary=integer,
                        upper=np.inf if integer else 1.0)
    T = m.add_variables("T")
    m.add_constraints("assign", x.sum("client") == 1)
    m.add_constraints("load", (w[:, None] * x).sum("request") <= T)
    m.add_constraints("eligible", x[prompt > 100][:, inst != 0] == 0)
    m.add_constraints("cap", x[:, inst == 1].sum("request") <= cap)
    m.minimize(T)
    return m, x, T, w, prompt, inst


def test_side_constraints_hold_on_every_backend_and_lp_duals_agree():
    m, x, T, w, prompt, inst = side_model()
    objs = []
    for s in EXACT:
        r = solve(m, s, SolveParams(time_limit_s=60, rel_gap=1e-6))
        X = np.round(r.value(x))
        assert r.status is Termination.OPTIMAL, (s, r.status)
        assert np.all(X.sum(1) == 1)
        assert np.all(X[prompt > 100][:, inst != 0] == 0)
        assert np.all(X[:, inst == 1].sum(0) <= 3)
        assert r.value(T) == pytest.approx((w[:, None] * X).sum(0).max(), rel=1e-6)
        assert r.dual_bound <= r.primal_bound + 1e-9
        objs.append(r.primal_bound)
    assert np.ptp(objs) < 1e-6 * objs[0]
    lp = m.relaxed()
    duals = [solve(lp, s).dual("load") for s in EXACT]
    for d in duals[1:]:
        np.testing.assert_allclose(d, duals[0], atol=1e-7)
    assert duals[0].shape == (6,) and np.all(duals[0] <= 1e-12) and duals[0].sum() == pytest.approx(-1.0)
    assert (prompt > 100).any()  # the eligibility rows bind something


# -- user formulations ------------------------------------------------------------------------------------
class SideData:
    """A bin packing with long requests pinned to instance 0 and a per-client cap on instance 1."""

    def __init__(self, problem, cap=10):
        self.R = problem.n_requests
        self.inst = problem.client_instance()
        self.C = self.inst.size
        self.long = problem.workload.prompt_tokens > 100
        self.w = problem.workload.output_tokens.astype(float)
        self.cap = cap


def side_build(d: SideData, bound, cutoff):
    m = Model("side")
    x = m.add_variables("x", coords={"request": d.R, "client": d.C}, binary=True)
    T = m.add_variables("T", lower=-np.inf if bound is None else bound,
                        upper=np.inf if cutoff is None else cutoff * (1 + 1e-9))
    m.add_constraints("assign", x.sum("client") == 1)
    m.add_constraints("load", (d.w[:, None] * x).sum("request") <= T)
    m.add_constraints("eligible", x[d.long][:, d.inst != 0] == 0)
    m.add_constraints("cap", x[:, d.inst == 1].sum("request") <= d.cap)
    m.minimize(T)
    return m


def side_decode(d: SideData, model, xvec):
    lm = model.compile()
    X = np.round(lm.block(xvec, "x").reshape(d.R, d.C))
    a = X.argmax(1)
    return a, float(np.bincount(a, weights=d.w, minlength=d.C).max())


def side_incumbent(d: SideData, params, deadline):
    """LPT that respects both side constraints (longest first, to the least loaded allowed client)."""
    loads, count = np.zeros(d.C), np.zeros(d.C, int)
    a = np.empty(d.R, int)
    for r in np.argsort(-d.w, kind="stable"):
        ok = (~d.long[r] | (d.inst == 0)) & ((d.inst != 1) | (count < d.cap))
        c = int(np.flatnonzero(ok)[np.argmin(loads[ok])])
        a[r], loads[c], count[c] = c, loads[c] + d.w[r], count[c] + 1
    return Incumbent(a, float(loads.max()), values=lambda model: {"x": np.eye(d.C)[a], "T": float(loads.max())},
                     source="side_lpt")


def side_bound(d: SideData) -> float:
    return float(max(d.w.sum() / d.C, d.w.max()))


@pytest.fixture()
def side_formulation():
    register_formulation("test-side", build=side_build, decode=side_decode, prepare=lambda p, cap=10: SideData(p, cap),
                         incumbent=side_incumbent, bound=side_bound)
    yield get_formulation("test-side")


def test_user_formulation_gets_start_bound_and_checks(side_formulation):
    problem = Problem.single(workloads.gsm8k("test", limit=30), clients=3, instances=2)
    d = SideData(problem, cap=6)
    inc = side_incumbent(d, None, None)
    model = side_build(d, side_bound(d), inc.objective)
    assert model.compile().max_violation(model.start_vector(inc.values(model))) == 0  # the MIP start is feasible
    for s in EXACT:
        r = solve(problem, s, SolveParams(time_limit_s=3, rel_gap=0, always_run=True), formulation="test-side", cap=6)
        a = r.assignment
        assert r.formulation == "test-side" and r.backend == s
        assert np.all(d.inst[a[d.long]] == 0) and np.bincount(a, minlength=d.C)[d.inst == 1].max() <= 6
        assert r.primal_bound <= inc.objective + 1e-9 and side_bound(d) <= r.dual_bound <= r.primal_bound + 1e-9
        assert r.value("x").shape == (30, 6) and r.status in (Termination.OPTIMAL, Termination.FEASIBLE)
        assert r.total_s < 3 * 1.1 + 1 + 2  # the limit holds (plus a margin for a loaded machine)
    # a start that meets the gap skips the search and says so
    r = solve(problem, "highs", SolveParams(rel_gap=0.5), formulation="test-side", cap=6)
    assert r.backend == "side_lpt" and r.solver == "highs" and "skipped" in r.skipped
    np.testing.assert_array_equal(r.assignment, inc.answer)
    with pytest.raises(SpecError, match="formulation"):
        solve(problem, "highs", formulation="no-such-formulation")
    with pytest.raises(TypeError):
        solve(problem, "highs", formulation="test-side", capacity=6)


def test_status_prints_its_documented_word_and_integers_come_back_as_integers():
    m = Model("words")
    x = m.add_variables("x", shape=(3,), binary=True)
    y = m.add_variables("y", shape=(2,), upper=2.5)
    m.add_constraints("c", x.sum() >= 2)
    m.minimize(x.sum() + y.sum())
    res = solve(m, "highs")
    assert str(res.status) == f"{res.status}" == "optimal" and str(res.limit) == "none"
    assert res.value(x).dtype.kind == "i" and res.value(x).sum() == 2
    assert isinstance(res.value(x[0]), int) and res.value(y).dtype == np.float64
