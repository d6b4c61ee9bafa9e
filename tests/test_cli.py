"""The command line: JSON outputs hold the promised keys and values; bad input exits with a message."""

import json

from typer.testing import CliRunner

from lloptim.cli import app

runner = CliRunner()


def test_simulate_default_json():
    res = runner.invoke(app, ["simulate", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    for key in ("makespan_s", "utilization", "lower_bound_s", "requests_completed", "output_tokens"):
        assert key in d
    assert d["requests_completed"] == 1319 and d["output_tokens"] == 132_872
    # the fitted profile reproduces the paper's baseline
    assert abs(d["makespan_s"] - 201.00) < 0.005 and abs(d["utilization"] - 0.802) < 0.0005
    assert d["makespan_s"] >= d["lower_bound_s"]


def test_simulate_bad_spec_is_one_line(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[[requests]]\nprompt_tokens = -1\noutput_tokens = 3\n')
    res = runner.invoke(app, ["simulate", str(f)])
    assert res.exit_code == 2
    assert "requests[0].prompt_tokens" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["simulate", "--policy", "nope"])
    assert res.exit_code == 2 and "unknown policy" in res.output
