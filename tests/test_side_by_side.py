"""The side-by-side page's code runs: the same model in lloptim, linopy, MathOpt, cvxpy and Pyomo agrees.

Each tool runs in a fresh process (OR-Tools and highspy each bring a HiGHS library and cannot be
loaded into one process in every order); tools that are not installed are skipped.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

SNIPPETS = Path(__file__).resolve().parents[1] / "docs" / "snippets" / "side_by_side"
TOOLS = {"lloptim": "lloptim", "linopy": "linopy", "mathopt": "ortools", "cvxpy": "cvxpy", "pyomo": "pyomo"}
#: The duals each tool reports for the ``load`` rows of this minimization, times this, are d(objective)/d(rhs).
DUAL_SIGN = {"lloptim": 1.0, "linopy": 1.0, "mathopt": 1.0, "cvxpy": -1.0, "pyomo": 1.0}


def _run(tool: str, conn) -> None:
    from lloptim import Problem, workloads

    problem = Problem.single(workloads.gsm8k("test", limit=24), clients=3, instances=2)
    w = np.random.default_rng(0).integers(1, 20, 24).astype(float)
    prompt, inst = problem.workload.prompt_tokens, problem.client_instance()
    spec = importlib.util.spec_from_file_location(f"side_{tool}", SNIPPETS / f"{tool}_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.solve(mod.build(w, prompt, inst, cap=3), 30)
    duals = mod.load_duals(mod.build(w, prompt, inst, cap=3, relax=True))
    conn.send({"objective": float(out["objective"]), "bound": float(out["bound"]),
               "x": np.asarray(out["x"], dtype=float), "duals": np.asarray(duals, dtype=float).ravel(),
               "w": w, "prompt": prompt, "inst": inst})
    conn.close()


def _solve_in_child(tool: str) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_run, args=(tool, child))
    proc.start()
    child.close()  # only the child writes: recv() raises EOFError if it dies
    try:
        return parent.recv()
    finally:
        proc.join()


@pytest.mark.parametrize("tool", list(TOOLS))
def test_the_same_model_in_each_tool(tool):
    if importlib.util.find_spec(TOOLS[tool]) is None:
        pytest.skip(f"{TOOLS[tool]} is not installed")
    out = _solve_in_child(tool)
    ref = _solve_in_child("lloptim") if tool != "lloptim" else out
    X, w, prompt, inst = np.round(out["x"]), out["w"], out["prompt"], out["inst"]
    assert (X.sum(axis=1) == 1).all() and (X[prompt > 100][:, inst != 0] == 0).all()
    assert (X[:, inst == 1].sum(axis=0) <= 3).all()
    assert out["objective"] == pytest.approx(ref["objective"], rel=1e-6)
    assert out["objective"] == pytest.approx((w[:, None] * X).sum(axis=0).max(), rel=1e-6)
    np.testing.assert_allclose(DUAL_SIGN[tool] * out["duals"], ref["duals"], atol=1e-7)
