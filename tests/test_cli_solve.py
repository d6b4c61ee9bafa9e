"""``lloptim solve`` / ``compare`` / ``solvers``."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from lloptim.cli import app
from lloptim.cli.solve import COLUMNS, run_compare_task
from lloptim.solvers import SolveParams

runner = CliRunner()

SPEC = """
name = "small"
[workload]
source = "gsm8k"
split = "test"
limit = 120
[[instances]]
profile = "llama-65b"
clients = 6
"""


@pytest.fixture()
def spec(tmp_path):
    p = tmp_path / "small.toml"
    p.write_text(SPEC)
    return p


def test_solve_json(spec):
    res = runner.invoke(app, ["solve", str(spec), "--solver", "greedy", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["backend"] == "greedy" and d["status"] in ("optimal", "feasible")
    assert len(d["assignment"]) == 120 and max(d["assignment"]) < 6
    assert d["dual_bound"] <= d["primal_bound"]
    assert sum(d["multipliers"]["load"]) == pytest.approx(1.0)


def test_solve_default_spec_table():
    res = runner.invoke(app, ["solve", "--solver", "greedy"])
    assert res.exit_code == 0, res.output
    assert "1319 requests, 40 clients" in res.stdout and "greedy" in res.stdout


@pytest.mark.slow  # one fresh process per backend: seconds
def test_compare_json_and_csv(spec, tmp_path):
    out = tmp_path / "rows.csv"
    res = runner.invoke(app, ["compare", str(spec), "--solvers", "greedy,highs", "--time-limit", "2", "--json",
                              "--csv", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["results"]
    assert [r["backend"] for r in rows] == ["greedy", "highs"]
    for r in rows:
        assert set(COLUMNS) <= set(r)
        assert r["status"] in ("optimal", "feasible")
        assert r["dual_bound"] <= r["primal_bound"] and r["peak_mem_mb"] > 0
    with open(out) as fh:
        assert [r["backend"] for r in csv.DictReader(fh)] == ["greedy", "highs"]


def test_compare_errors_name_the_option(spec):
    res = runner.invoke(app, ["compare", str(spec), "--solvers", "greedy,gurobi"])
    assert res.exit_code == 2 and "gurobi" in res.output
    res = runner.invoke(app, ["compare", str(spec), "--executor", "dask"])
    assert res.exit_code == 2 and "--executor" in res.output
    res = runner.invoke(app, ["compare", str(spec), "--address", "auto"])
    assert res.exit_code == 2 and "--executor ray" in res.output
    res = runner.invoke(app, ["solve", str(spec), "--time-limit", "-1"])
    assert res.exit_code == 2 and "--time-limit" in res.output and "time_limit_s" not in res.output


def test_run_compare_task_reports_refusals_as_rows(spec):
    row = run_compare_task(spec, "cbc", SolveParams(solver_options={"always_run": True, "max_mem_mb": 1}))
    assert row["status"] == "error" and "GiB" in row["error"] and row["primal_bound"] is None


def test_solvers_lists_backends():
    res = runner.invoke(app, ["solvers"])
    assert res.exit_code == 0 and "greedy" in res.stdout and "highs" in res.stdout
