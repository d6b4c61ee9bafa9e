"""Every table fits 80 columns without losing a digit.

Each command's text output is rendered at 80 columns (what a pipe gets) and compared with its
``--json`` output: no line is wider than 80, nothing is cut (no ellipsis), and the key numbers
appear whole. :func:`lloptim.cli.tables.render_table` is also checked on random tables.
"""

from __future__ import annotations

import io
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

from lloptim.cli import app
from lloptim.cli.tables import Column, print_table

runner = CliRunner()

SPEC = """
name = "a spec whose name is long enough to wrap [and has brackets]"
[workload]
source = "gsm8k"
split = "test"
limit = 200
[[instances]]
profile = "llama-65b"
clients = 12
"""


@pytest.fixture()
def narrow(monkeypatch):
    """Both consoles 80 columns wide, as for ``lloptim ... | cat``."""
    from lloptim.cli.common import console, err_console

    monkeypatch.setattr(console, "width", 80)
    monkeypatch.setattr(err_console, "width", 80)


@pytest.fixture()
def spec(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(SPEC)
    return p


def _check_text(text: str, numbers: list[str]) -> None:
    lines = text.splitlines()
    assert lines, "no output"
    assert max(len(line) for line in lines) <= 80, "\n".join(line for line in lines if len(line) > 80)
    assert "…" not in text  # rich's mark of a cut cell
    flat = re.sub(r"\s+", " ", text)
    for n in numbers:
        assert re.search(rf"(?<![\d.,]){re.escape(n)}(?![\d,])", flat), f"{n} missing or cut in:\n{text}"


def _run(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.stdout


def test_simulate_fits(narrow, spec):
    d = json.loads(_run(["simulate", str(spec), "--policy", "hybrid-fused", "--json"]))
    text = _run(["simulate", str(spec), "--policy", "hybrid-fused"])
    _check_text(text, [f"{d['makespan_s']:,.2f}", f"{100 * d['utilization']:.2f} %", f"{d['lower_bound_s']:,.2f}",
                       f"{d['throughput_tokens_per_s']:,.2f}", f"{d['latency_p99_s']:,.2f}"])
    assert "[and has brackets]" in text


@pytest.mark.parametrize("args", [["solve", "--solver", "greedy"], ["solve", "--solver", "highs", "--gap", "0", "--time-limit", "0.5"]])
def test_solve_fits(narrow, spec, args):
    d = json.loads(_run(args + [str(spec), "--json"]))
    text = _run(args + [str(spec)])
    _check_text(text, [f"{d['primal_bound']:,.4f}", f"{d['dual_bound']:,.4f}", f"{100 * d['gap']:.4f} %"])


@pytest.mark.slow  # a fresh process per backend
def test_compare_fits(narrow, spec):
    res = runner.invoke(app, ["compare", str(spec), "--solvers", "greedy,lagrangian", "--time-limit", "1",
                              "--csv", str(spec.with_suffix(".csv"))])
    assert res.exit_code == 0, res.output
    with open(spec.with_suffix(".csv")) as fh:  # the same run's rows, as written
        import csv

        rows = [{k: float(v) for k, v in r.items() if k in ("primal_bound", "dual_bound")}
                for r in csv.DictReader(fh)]
    _check_text(res.stdout, [f"{r['primal_bound']:,.4f}" for r in rows] + [f"{r['dual_bound']:,.4f}" for r in rows])


def test_reproduce_fits(narrow, spec):
    d = json.loads(_run(["reproduce", str(spec), "--cases", "2", "--json"]))
    text = _run(["reproduce", str(spec), "--cases", "2"])
    nums = [f"{v['makespan_s']:.2f}" for v in d["policies"].values()]
    nums += [f"{100 * v['gap_to_bound']:.2f} %" for v in d["policies"].values()]
    nums += [f"{100 * n['gap_to_bound']:.2f} %" for n in d["noise"]]
    _check_text(text, nums)
    assert "hybrid-fused" in text and "(lengths" in text  # a label wraps; a number never does


def test_run_simulated_fits(narrow, spec):
    d = json.loads(_run(["run", str(spec), "--backend", "simulated", "--json"]))
    _check_text(_run(["run", str(spec), "--backend", "simulated"]), [f"{d['makespan_s']:.4f} s"])


@pytest.mark.torch
@pytest.mark.slow
def test_calibrate_fits(narrow):
    pytest.importorskip("torch")
    args = ["calibrate", "--repeats", "1", "--prefill-batches", "1,2", "--prefill-lengths", "4,8",
            "--decode-batches", "1,2", "--decode-contexts", "8,16"]
    _check_text(_run(args), [])


@pytest.mark.parametrize("args", [["policies"], ["solvers"], ["spec-reference"], ["--help"], ["simulate", "--help"]])
def test_listings_fit(narrow, args):
    _check_text(_run(args), [])


@pytest.mark.parametrize("command", ["reproduce", "calibrate", "run", "simulate", "policies", "solve", "compare",
                                     "solvers", "spec-reference"])
def test_every_help_fits_without_cutting(command):
    """typer renders help itself: at 80 columns no option's help or default may be cut with an ellipsis."""
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert res.exit_code == 0, res.output
    _check_text(res.output, [])


NUMBER = st.one_of(st.floats(0, 1e9, allow_nan=False).map(lambda v: f"{v:,.4f}"),
                   st.integers(0, 10**12).map(lambda v: f"{v:,}"),
                   st.floats(0, 1, allow_nan=False).map(lambda v: f"{100 * v:.2f} %"))
WORDS = st.lists(st.text("abcdefghij-_", min_size=1, max_size=30), min_size=1, max_size=4).map(" ".join)


@settings(max_examples=60, deadline=None)
@given(headers=st.lists(WORDS, min_size=2, max_size=12), data=st.data(), width=st.integers(50, 160))
def test_render_never_cuts_a_number(headers, data, width):
    """Whatever the columns and the width: every number whole, every line within the width."""
    cols = [Column(headers[0], numeric=False)] + [Column(h) for h in headers[1:]]
    rows = [[data.draw(WORDS)] + [data.draw(NUMBER) for _ in headers[1:]]
            for _ in range(data.draw(st.integers(1, 4)))]
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None)
    print_table(console, data.draw(WORDS), cols, rows)
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= width
    for row in rows:
        for cell in row[1:]:
            assert cell in text, f"{cell!r} cut at width {width}:\n{text}"


@pytest.mark.parametrize("command", ["run", "calibrate", "compare"])
def test_help_paragraphs_reflow(command):
    """A command's help wraps to the terminal, not at the docstring's source line breaks."""
    import inspect

    from lloptim.cli import reflow_help

    info = next(i for i in app.registered_commands if (i.name or i.callback.__name__) == command)
    doc = inspect.getdoc(info.callback)
    assert "\n\n" in doc  # a body paragraph, the part typer would print with the source's breaks
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    head = result.output.split("╭")[0]
    lines = [ln.strip() for ln in head.splitlines()]
    # every line of a wrapped paragraph but its last fills most of the 80 columns
    for line, nxt in zip(lines, lines[1:]):
        if line and nxt and not line.startswith("Usage:"):
            assert len(line) >= 60, f"ragged help line {line!r} in:\n{head}"
    body = reflow_help(doc).split("\n\n")[1]
    assert "\n" not in body and re.sub(r"\s+", " ", head).find(body[:40]) >= 0


def test_reflow_keeps_lists():
    from lloptim.cli import reflow_help

    doc = "First line.\n\nA paragraph\nwrapped here.\n\n- item one\n- item two"
    assert reflow_help(doc) == "First line.\n\nA paragraph wrapped here.\n\n- item one\n- item two"
