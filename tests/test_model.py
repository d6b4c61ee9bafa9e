"""The modeling layer: numpy semantics of variables and expressions, constraint families, compile, files."""

from __future__ import annotations

import highspy
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lloptim
from lloptim import Model
from lloptim.errors import SolverError, SpecError
from lloptim.formulations import LinearExpression, ModelBuilder, Variable


def values_at(model: Model, expr, x: np.ndarray) -> np.ndarray:
    """An expression evaluated at the column vector ``x`` of the compiled model."""
    lm = model.compile()
    return expr.to_expr().evaluate(lm.meta["column_of_label"], x)


def random_x(model: Model, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=model.compile().n_cols)


def var_values(model: Model, var: Variable, x: np.ndarray) -> np.ndarray:
    return x[model.compile().meta["column_of_label"][var.labels]]


# -- variables ---------------------------------------------------------------------------------------
def test_add_variables_shapes_bounds_and_coords():
    m = Model("m")
    x = m.add_variables("x", shape=(3, 4), lower=-1, upper=np.arange(4.0))
    T = m.add_variables("T")
    y = m.add_variables("y", coords={"request": ["a", "b"], "client": 3}, binary=True)
    assert x.shape == (3, 4) and T.shape == () and y.shape == (2, 3) and y.dims == ("request", "client")
    np.testing.assert_array_equal(x.upper, np.broadcast_to(np.arange(4.0), (3, 4)))
    assert y.integer and not x.integer and np.all(y.upper == 1)
    lm = m.compile()
    assert lm.var_blocks == {"x": slice(0, 12), "T": slice(12, 13), "y": slice(13, 19)}
    assert lm.n_integer == 6 and lm.var_shapes["y"] == (2, 3)
    assert m.variables["x"].shape == (3, 4) and "y" in m and m["T"].shape == ()


@pytest.mark.parametrize("kwargs,field", [
    ({"shape": (2,), "lower": 3, "upper": [4, 2]}, r"x\[1\]"),
    ({"shape": (2,), "lower": np.nan}, "x.lower"),
    ({"shape": (2,), "upper": [1, 2, 3]}, "x.upper"),
    ({"shape": (2,), "binary": True, "upper": 3}, "binary"),
    ({"shape": (2,), "binary": True, "integer": True}, "binary and integer"),
    ({"shape": (2,), "coords": {"request": 3}}, "coords"),
    ({"shape": (-1,)}, "x.shape"),
    ({"shape": "big"}, "x.shape"),
])
def test_bad_variables_name_the_field(kwargs, field):
    with pytest.raises(SpecError, match=field):
        Model("m").add_variables("x", **kwargs)


def test_names_are_checked_and_unique():
    m = Model("m")
    m.add_variables("x", shape=2)
    with pytest.raises(SpecError, match="already"):
        m.add_variables("x")
    with pytest.raises(SpecError, match="not a valid name"):
        m.add_variables("2x")
    with pytest.raises(SpecError, match="not a valid name"):
        m.add_variables("x y")
    with pytest.raises(SpecError, match="name"):
        Model("my model")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000))
def test_indexing_matches_numpy_on_the_labels(seed):
    rng = np.random.default_rng(seed)
    m = Model("m")
    x = m.add_variables("x", shape=(4, 5, 3))
    keys = [np.s_[1], np.s_[1:3], np.s_[:, 2], np.s_[..., 1], np.s_[::-1, 1:4:2], np.s_[None, 2],
            rng.random(4) > 0.5, np.s_[:, rng.integers(0, 5, 6)], rng.random((4, 5)) > 0.3,
            np.s_[[0, 3], :, [1, 2]], np.s_[1, [4, 0, 2]], [2, 0]]
    for key in keys:
        np.testing.assert_array_equal(x[key].labels, x.labels[key])
        e = (2 * x + 1)[key]
        assert e.shape == x.labels[key].shape


def test_dims_follow_indexing_and_sel():
    m = Model("m")
    x = m.add_variables("x", coords={"request": [10, 11, 12, 13], "client": ["a", "b", "c"]})
    assert x[1:3].dims == ("request", "client") and list(x[1:3].coords["request"]) == [11, 12]
    assert x[:, 0].dims == ("request",)
    assert x[np.array([True, False, True, True])].dims == ("request", "client")
    assert x[:, [2, 0]].coords["client"].tolist() == ["c", "a"]
    np.testing.assert_array_equal(x.sel(client=["c", "a"], request=11).labels, x.labels[1, [2, 0]])
    with pytest.raises(SpecError, match="not a coordinate"):
        x.sel(client=["z"])
    with pytest.raises(SpecError, match="no axis named 'slot'"):
        x.sum("slot")


# -- expressions -------------------------------------------------------------------------------------
def test_arithmetic_evaluates_like_numpy():
    m = Model("m")
    x = m.add_variables("x", shape=(3, 4), lower=-np.inf)
    y = m.add_variables("y", shape=4, lower=-np.inf)
    t = m.add_variables("t", lower=-np.inf)
    w = np.arange(12.0).reshape(3, 4)
    xv = random_x(m, 1)
    X, Y, Tt = var_values(m, x, xv), var_values(m, y, xv), var_values(m, t, xv)
    cases = [
        (w * x + 2, w * X + 2),
        (x * w - y, X * w - Y),
        (w - x / 4, w - X / 4),
        (-(x - y[None, :]) * 3, -(X - Y[None, :]) * 3),
        ((w * x).sum(axis=0) - t, (w * X).sum(axis=0) - Tt),
        (x.sum(), X.sum()),
        (x.sum(axis=(0, 1)) + y.sum() - 5 * t, X.sum() + Y.sum() - 5 * Tt),
        (2.5 + y, 2.5 + Y),
        (np.ones(4) - y, np.ones(4) - Y),
        (w @ y, w @ Y),
        (y @ np.arange(4.0), Y @ np.arange(4.0)),
        (x @ np.ones((4, 2)), X @ np.ones((4, 2))),
        (sp.csr_matrix(w) @ y, w @ Y),
        (x.T.sum(axis=1), X.T.sum(axis=1)),
        (x.shift(1, axis=1), np.c_[np.zeros(3), X[:, :-1]]),
        ((x + 1).shift(-2, axis=0), np.r_[X[2:] + 1, np.zeros((2, 4))]),
        (x.flatten()[3:7], X.ravel()[3:7]),
        (x.reshape(4, 3)[1], X.reshape(4, 3)[1]),
        (sum([x[0], x[1], x[2]]), X.sum(axis=0)),
    ]
    for expr, expect in cases:
        np.testing.assert_allclose(values_at(m, expr, xv), expect, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(R=st.integers(1, 6), C=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_sums_and_broadcasts_by_name_match_numpy(R, C, seed):
    rng = np.random.default_rng(seed)
    m = Model("m")
    x = m.add_variables("x", coords={"request": R, "client": C}, lower=-np.inf)
    t = m.add_variables("t", coords={"client": C}, lower=-np.inf)
    w = rng.normal(size=(R, C))
    xv = random_x(m, seed)
    X, Tt = var_values(m, x, xv), var_values(m, t, xv)
    e = (w * x).sum("request") - 3 * t
    assert e.dims == ("client",)
    np.testing.assert_allclose(values_at(m, e, xv), (w * X).sum(axis=0) - 3 * Tt, atol=1e-12)
    np.testing.assert_allclose(values_at(m, x.sum("client") + 1, xv), X.sum(axis=1) + 1, atol=1e-12)
    c = (w * x).sum("request") <= t
    lm = (m.add_constraints("load", c), m.compile())[1]
    np.testing.assert_allclose(lm.A @ xv, (w * X).sum(axis=0) - Tt, atol=1e-12)
    assert lm.con_groups["load"] == slice(0, C) and np.all(lm.row_hi == 0) and np.all(lm.row_lo == -np.inf)


def test_axis_names_must_line_up():
    m = Model("m")
    x = m.add_variables("x", coords={"request": 3, "client": 3})
    with pytest.raises(SpecError, match="named 'request' in one operand and 'client'"):
        x + x.T


def test_linear_only_and_no_truth_values():
    m = Model("m")
    x = m.add_variables("x", shape=2)
    with pytest.raises(SpecError, match="not linear"):
        x * x
    with pytest.raises(SpecError, match="not linear"):
        1 / x
    with pytest.raises(SpecError, match="truth value"):
        bool(x <= 1)
    with pytest.raises(SpecError, match="chained|truth value"):
        0 <= x <= 1  # noqa: B015 - the point of the test
    with pytest.raises(SpecError, match="strict"):
        x < 1  # noqa: B015
    with pytest.raises(SpecError, match="non-finite|NaN"):
        np.array([1.0, np.nan]) * x
    with pytest.raises(SpecError, match="model 'm'"):
        x + Model("other").add_variables("y", shape=2)


# -- constraints, objective, remove, relaxed ---------------------------------------------------------
def test_constraint_families_compile_to_rows():
    m = Model("m")
    x = m.add_variables("x", shape=(2, 3))
    t = m.add_variables("t")
    m.add_constraints("assign", x.sum(1) == 1)
    m.add_constraints("cap", 2 * x.sum(0) - t <= np.array([1.0, 2.0, 3.0]))
    m.add_constraints("floor", x[0, 0] + 5 >= 2 * t)
    m.maximize(x.sum() - 0.5 * t + 7)
    lm = m.compile()
    assert lm.con_groups == {"assign": slice(0, 2), "cap": slice(2, 5), "floor": slice(5, 6)}
    assert lm.group_shape("floor") == () and lm.sense == "max" and lm.offset == 7
    np.testing.assert_array_equal(lm.row_lo, [1, 1, -np.inf, -np.inf, -np.inf, -5])
    np.testing.assert_array_equal(lm.row_hi, [1, 1, 1, 2, 3, np.inf])
    np.testing.assert_array_equal(lm.A[5].toarray().ravel(), [1, 0, 0, 0, 0, 0, -2])
    np.testing.assert_array_equal(lm.c, [1, 1, 1, 1, 1, 1, -0.5])
    with pytest.raises(SpecError, match="already"):
        m.add_constraints("cap", t >= 0)
    with pytest.raises(SpecError, match="not a comparison"):
        m.add_constraints("c", True)
    with pytest.raises(SpecError, match=r"bad\[1\]"):
        m.add_constraints("bad", x[0] == np.array([1.0, np.inf, 2.0]))


def test_remove_and_relaxed():
    m = Model("m")
    x = m.add_variables("x", shape=3, binary=True)
    z = m.add_variables("z", shape=3, upper=2)
    m.add_constraints("link", x - z <= 0)
    m.add_constraints("pick", x.sum() >= 2)
    m.minimize(x.sum() + z.sum())
    assert m.compile().n_cols == 6
    relaxed = m.relaxed()
    assert relaxed.is_mip is False and m.is_mip and relaxed.compile().n_integer == 0
    res = lloptim.solve(relaxed, "highs")
    np.testing.assert_allclose(res.value(x), res.value("x"))  # a variable of the original model reads the copy
    m.remove("z")
    lm = m.compile()
    assert lm.n_cols == 3 and lm.con_groups["link"] == slice(0, 3)
    np.testing.assert_array_equal(lm.A[:3].toarray(), np.eye(3))  # z's terms are gone, the rows stay
    m.remove("pick")
    assert "pick" not in m.compile().con_groups
    with pytest.raises(SpecError, match="no variable or constraint 'zz'"):
        m.remove("zz")
    with pytest.raises(SpecError, match="not part of the solved model|no longer"):
        lloptim.solve(m, "highs").value(z)


# -- files ---------------------------------------------------------------------------------------------
def _highs_optimum(path) -> float:
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    assert h.readModel(str(path)) == highspy.HighsStatus.kOk
    h.run()
    assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    return h.getInfo().objective_function_value


@pytest.mark.parametrize("sense", ["min", "max"])
def test_lp_and_mps_files_round_trip_through_highs(tmp_path, sense):
    rng = np.random.default_rng(3)
    m = Model("files")
    x = m.add_variables("x", shape=(3, 4), integer=True, lower=-2, upper=rng.integers(1, 6, (3, 4)))
    y = m.add_variables("y", shape=4, lower=-np.inf, upper=10)
    b = m.add_variables("b", shape=2, binary=True)
    m.add_constraints("rows", (rng.normal(size=(3, 4)) * x).sum(1) + y[0] <= 5)
    m.add_constraints("cols", x.sum(0) - y >= -3)
    m.add_constraints("link", y.sum() + 3 * b.sum() == 4.5)
    obj = (rng.normal(size=(3, 4)) * x).sum() + 0.25 * y.sum() - b[0] + 11
    m.minimize(obj) if sense == "min" else m.maximize(obj)
    ref = lloptim.solve(m, "highs", lloptim.SolveParams(rel_gap=0)).primal_bound
    for f in ("lp", "mps"):
        path = getattr(m, f"to_{f}")(tmp_path / f"m.{f}")
        assert _highs_optimum(path) == pytest.approx(ref, rel=1e-9, abs=1e-9), f
    relaxed = m.relaxed()
    lp = lloptim.solve(relaxed, "highs").primal_bound
    assert _highs_optimum(relaxed.to_mps(tmp_path / "r.mps")) == pytest.approx(lp, rel=1e-9)
    text = (tmp_path / "m.lp").read_text()
    assert "x(2,3)" in text and "link:" in text and ("Maximize" in text) == (sense == "max")


def test_mps_writes_ranged_rows_of_the_low_level_builder(tmp_path):
    b = ModelBuilder("ranged")
    b.add_block("x", 2, lo=0, hi=4)
    b.add_group("r", 1, {"x": ([0, 0], [0, 1], [1.0, 1.0])}, lo=1.0, hi=3.0)
    lm = b.build(np.array([-1.0, -2.0]))
    from lloptim.formulations.io import write_lp, write_mps

    assert _highs_optimum(write_mps(lm, tmp_path / "r.mps")) == pytest.approx(-6.0)
    assert _highs_optimum(write_lp(lm, tmp_path / "r.lp")) == pytest.approx(-6.0)  # split into two rows


def test_errors_never_print_the_model():
    m = Model("big")
    x = m.add_variables("x", shape=(300, 50), binary=True)
    m.add_constraints("a", x.sum(1) == 1)
    m.minimize(x.sum())
    for call, err in ((lambda: lloptim.solve(m, "greedy"), SolverError),
                      (lambda: lloptim.solve(m, "highs", weights=np.ones(3)), SpecError),
                      (lambda: lloptim.solve(m.compile(), "nope"), SpecError),
                      (lambda: lloptim.solve("model.lp", "highs"), SpecError)):
        with pytest.raises(err) as info:
            call()
        assert len(str(info.value)) < 300, str(info.value)
    assert len(repr(m)) < 200 and len(repr(x)) < 100 and len(repr(x.sum(1) == 1)) < 100


def test_expression_repr_and_types():
    m = Model("m")
    x = m.add_variables("x", shape=2)
    assert isinstance(x + 1, LinearExpression) and isinstance(x[0], Variable)
    assert "LinearExpression" in repr(x + 1)
