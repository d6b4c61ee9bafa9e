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


def test_simulate_with_faults_reports_them():
    res = runner.invoke(app, ["simulate", "--policy", "hybrid", "--fault", "20:0:3", "--fault", "40:0:9", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["failed_clients"] == 2 and d["requeued"] >= 1
    assert d["requests_completed"] == 1319 and d["output_tokens"] == 132_872
    bad = runner.invoke(app, ["simulate", "--fault", "soon"])
    assert bad.exit_code == 2 and "--fault" in bad.output


def test_reproduce_json_has_the_promised_keys():
    res = runner.invoke(app, ["reproduce", "--cases", "3", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    for name in ("baseline", "offline", "hybrid", "hybrid_unknown_lengths", "hybrid-fused",
                 "hybrid_fused_unknown_lengths", "vllm", "sarathi"):
        assert {"makespan_s", "utilization", "gap_to_bound"} <= set(d["policies"][name])
        assert d["policies"][name]["makespan_s"] >= d["policies"][name]["lower_bound_s"]
    # fused prompt insertion removes the prefill/idle trade-off that unknown lengths make costly
    assert d["policies"]["hybrid_fused_unknown_lengths"]["gap_to_bound"] < 0.03
    assert (d["policies"]["hybrid_fused_unknown_lengths"]["makespan_s"]
            < d["policies"]["hybrid_unknown_lengths"]["makespan_s"])
    assert set(d["decision_latency_us"]) == {"p50", "p99"}
    assert d["cases"]["n"] == 3 and 0 <= d["cases"]["hybrid_wins"] <= 3
    assert "mean_utilization_gain" in d["cases"]
    assert d["policies"]["hybrid"]["makespan_s"] < d["policies"]["baseline"]["makespan_s"]


def test_simulate_policy_options_reach_the_policy():
    """``-o fused=true`` makes the hybrid the fused hybrid (GSM8K: 172.85 s rather than 173.16 s)."""
    default = json.loads(runner.invoke(app, ["simulate", "-p", "hybrid", "--json"]).stdout)
    fused = runner.invoke(app, ["simulate", "-p", "hybrid", "-o", "fused=true", "--json"])
    assert fused.exit_code == 0, fused.output
    fused = json.loads(fused.stdout)
    named = json.loads(runner.invoke(app, ["simulate", "-p", "hybrid-fused", "--json"]).stdout)
    assert fused["policy_options"] == {"fused": True}
    assert "policy_options" not in default
    assert fused["makespan_s"] == named["makespan_s"] < default["makespan_s"]


def test_simulate_bad_policy_options_are_one_line_before_any_work():
    for option, words in (("order_candidates=0", "order_candidates"), ("bogus=1", "bogus"),
                          ("order_candidates", "KEY=VALUE"), ("fleet_homes=sometimes", "fleet_homes")):
        res = runner.invoke(app, ["simulate", "-p", "hybrid", "-o", option])
        assert res.exit_code == 2, (option, res.output)
        assert "--policy-option" in res.output and words in res.output
        assert "Traceback" not in res.output
    twice = runner.invoke(app, ["simulate", "-p", "hybrid", "-o", "fused=true", "-o", "fused=false"])
    assert twice.exit_code == 2 and "given twice" in twice.output


def test_run_takes_policy_options_as_simulate_does():
    """``lloptim run`` shares the option: the simulated backend's run is the named fused hybrid's."""
    base = ["run", "--backend", "simulated", "--json"]
    fused = runner.invoke(app, base + ["-p", "hybrid", "-o", "fused=true"])
    assert fused.exit_code == 0, fused.output
    fused = json.loads(fused.stdout)
    named = json.loads(runner.invoke(app, base + ["-p", "hybrid-fused"]).stdout)
    assert fused["policy_options"] == {"fused": True}
    assert fused["makespan_s"] == named["makespan_s"]
    for args, words in ((["-p", "hybrid", "-o", "bogus=1"], "bogus"),
                        (["--backend", "vllm", "-p", "engine-default", "-o", "fused=true"], "takes no options")):
        res = runner.invoke(app, ["run"] + args)
        assert res.exit_code == 2, (args, res.output)
        assert "--policy-option" in res.output and words in res.output and "Traceback" not in res.output
