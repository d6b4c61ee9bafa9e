"""A first hour without surprises: every bad input a new user tried gets a named error before any work.

The table of issue 14 (and every case found since), run through the command line (typer's
``CliRunner``, in process) and through the Python API. Each CLI case asserts the exit code, that
the flag or spec key is named *as the user typed it*, that no traceback is printed, and, where the
work is expensive, that it never started (the function doing it is replaced by one that fails the
test). Each case takes milliseconds; add a row whenever a new surprise is found.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

import lloptim
from lloptim import Problem, Workload, guards, lower_bound, simulate, workloads
from lloptim.cli import app
from lloptim.errors import SpecError, TooLargeError

runner = CliRunner()

TINY = """
name = "tiny"
[[requests]]
prompt_tokens = 10
output_tokens = 5
[[requests]]
prompt_tokens = 20
output_tokens = 7
[[instances]]
profile = "llama-65b"
clients = 2
"""

FILES = {
    "empty.toml": "",
    "no-requests.toml": "requests = []\n",
    "latin1.toml": 'name = "caf\xe9"\n[workload]\nsource = "gsm8k"\n'.encode("latin-1"),
    "count.toml": '[workload]\nsource = "gsm8k"\n[[instances]]\ncount = 100000\n',
    "tiny.toml": TINY,
    "big.toml": '[workload]\nsource = "synthetic"\nn = 200000\n[[instances]]\nclients = 8\nkv_capacity_tokens = 1000000\n',
    "stray-key.toml": '[workload]\nsource = "gsm8k"\nn = 100\n',
    "clipped.toml": '[workload]\nsource = "synthetic"\nprompt_median = 5000\n',
}


@pytest.fixture()
def files(tmp_path, monkeypatch):
    """The spec files of the table, in a temporary working folder."""
    for name, text in FILES.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    monkeypatch.chdir(tmp_path)
    # messages on one line, so a test can look for a path or a flag in them
    from lloptim.cli.common import console, err_console

    monkeypatch.setattr(err_console, "width", 400)
    monkeypatch.setattr(console, "width", 80)
    # the machine's free memory must not decide a test: 16 GiB and the CLI's hour, as on the machine
    monkeypatch.setattr(guards, "limits", lambda: guards.Limits(16 * 2**30, guards._SETTINGS.get().get("max_seconds")
                                                                or math.inf))
    return tmp_path


def _never(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran: the error must come before any work")
    return fail


#: Expensive functions a case must not reach, by the name used in the table below.
WORK = {
    "reproduce": "lloptim.experiments.compare_policies",
    "cases": "lloptim.workloads.gsm8k_case",
    "simulate": "lloptim.runtime.engine.Engine.run",
    "solve": "lloptim.solvers.greedy.lpt",
    "calibrate": "lloptim.calibrate.calibrate",
    "engines": "lloptim.cli.serve._start_engines",
}


# (id, argv, exit code, texts that must appear in the output, work that must not start)
CLI_CASES = [
    ("empty-spec", ["simulate", "empty.toml"], 2, ["[workload]", "[[requests]]", "spec-reference"], ["simulate"]),
    ("requests-empty", ["simulate", "no-requests.toml"], 2, ["[[requests]] is empty"], ["simulate"]),
    ("reproduce-plot-missing-dir", ["reproduce", "--cases", "2", "--plot", "/nonexistent/dir/x.png"], 2,
     ["--plot", "/nonexistent/dir", "does not exist"], ["reproduce"]),
    ("reproduce-plot-bad-suffix", ["reproduce", "--plot", "x.jpgx"], 2, ["--plot", ".jpgx", ".png"], ["reproduce"]),
    ("reproduce-plot-is-folder", ["reproduce", "--plot", "."], 2, ["--plot"], ["reproduce"]),
    ("compare-csv-missing-dir", ["compare", "--solvers", "greedy", "--csv", "/nonexistent/x.csv"], 2,
     ["--csv", "does not exist"], ["executor", "solve"]),
    ("compare-csv-bad-suffix", ["compare", "--solvers", "greedy", "--csv", "rows.txt"], 2, ["--csv", ".csv"],
     ["executor"]),
    ("calibrate-out-missing-dir", ["calibrate", "--out", "/nonexistent/p.toml"], 2, ["--out", "does not exist"],
     ["calibrate"]),
    ("calibrate-out-bad-suffix", ["calibrate", "--out", "p.json"], 2, ["--out", ".toml"], ["calibrate"]),
    ("calibrate-kv-capacity", ["calibrate", "--kv-capacity", "0"], 2, ["--kv-capacity"], ["calibrate"]),
    ("calibrate-grid", ["calibrate", "--prefill-batches", "1,x"], 2, ["--prefill-batches"], ["calibrate"]),
    ("reproduce-seed", ["reproduce", "--seed", "-1"], 2, ["--seed", "--seed 0"], ["reproduce", "cases"]),
    ("spec-not-utf8", ["simulate", "latin1.toml"], 2, ["spec", "not UTF-8", "line 1"], ["simulate"]),
    ("spec-count-100000", ["simulate", "count.toml"], 2, ["instances[].count", "--no-size-guard", "at most about"],
     ["simulate"]),
    ("reproduce-cases-1e8", ["reproduce", "--cases", "100000000"], 2, ["--cases", "at most about", "--no-size-guard"],
     ["reproduce", "cases"]),
    ("reproduce-executor", ["reproduce", "--cases", "100000000", "--executor", "foo"], 2,
     ["--executor", "'local'", "'ray'"], ["reproduce", "cases"]),
    ("reproduce-estimator", ["reproduce", "--estimator", "nope"], 2, ["--estimator", "bucket-quantile"], ["reproduce"]),
    ("reproduce-cases-negative", ["reproduce", "--cases", "-1"], 2, ["--cases"], ["reproduce"]),
    ("run-clients-1e9", ["run", "--backend", "simulated", "--clients", "1000000000"], 2, ["--clients"], ["simulate"]),
    ("run-clients-x-instances", ["run", "--backend", "simulated", "--clients", "1000000", "--instances", "5000"], 2,
     ["--clients", "--no-size-guard"], ["simulate"]),
    ("solve-gap-0-large", ["solve", "big.toml", "--gap", "0"], 2, ["--gap", "at least", "--no-size-guard"],
     ["solve"]),
    ("simulate-fault-negative", ["simulate", "--fault", "-5:0"], 2, ["--fault", "-5:0", ">= 0"], ["simulate"]),
    ("simulate-fault-unknown-instance", ["simulate", "--fault", "1:3"], 2, ["--fault", "instance 3"], ["simulate"]),
    ("simulate-fault-client-elsewhere", ["simulate", "--fault", "1:0:50"], 2, ["--fault", "client 50", "0..39"],
     ["simulate"]),
    ("simulate-fault-unreadable", ["simulate", "--fault", "soon"], 2, ["--fault", "TIME:INSTANCE"], ["simulate"]),
    ("simulate-faults-kill-everything", ["simulate", "tiny.toml", "--fault", "0:0"], 2,
     ["--fault", "every client"], []),
    ("simulate-policy", ["simulate", "--policy", "nope"], 2, ["--policy", "hybrid"], ["simulate"]),
    ("run-profile-missing", ["run", "--backend", "simulated", "--profile", "/nonexistent.toml"], 2,
     ["--profile", "no file"], ["simulate"]),
    ("run-profile-folder", ["run", "--backend", "simulated", "--profile", "."], 2, ["--profile", "folder"],
     ["simulate"]),
    ("run-profile-unknown-name", ["run", "--backend", "simulated", "--profile", "h100"], 2,
     ["--profile", "unknown profile", "llama-65b"], ["simulate"]),
    ("run-requests", ["run", "--backend", "simulated", "--requests", "0"], 2, ["--requests"], ["simulate"]),
    ("run-backend", ["run", "--backend", "tpu"], 2, ["--backend", "simulated"], ["simulate"]),
    ("run-seed", ["run", "--backend", "simulated", "--seed", "-3"], 2, ["--seed"], ["simulate"]),
    ("run-clock", ["run", "--backend", "simulated", "--clock", "sundial"], 2, ["--clock", "wall"], ["simulate"]),
    ("solve-time-limit", ["solve", "--time-limit", "-1"], 2, ["--time-limit", "--time-limit 10"], ["solve"]),
    ("solve-time-limit-nan", ["solve", "--time-limit", "nan"], 2, ["--time-limit"], ["solve"]),
    ("solve-gap", ["solve", "--gap", "2"], 2, ["--gap"], ["solve"]),
    ("solve-threads", ["solve", "--threads", "0"], 2, ["--threads"], ["solve"]),
    ("solve-seed", ["solve", "--seed", "-1"], 2, ["--seed"], ["solve"]),
    ("solve-solver", ["solve", "--solver", "gurobi"], 2, ["--solver", "highs"], ["solve"]),
    ("compare-time-limit", ["compare", "--solvers", "greedy", "--time-limit", "0"], 2, ["--time-limit"],
     ["executor"]),
    ("compare-executor", ["compare", "--solvers", "greedy", "--executor", "slurm"], 2, ["--executor"], ["executor"]),
    ("spec-stray-key", ["simulate", "stray-key.toml"], 2, ["workload: n is read only with source = 'synthetic'",
                                                            "spec-reference"],
     ["simulate"]),
    ("spec-median-above-clip", ["simulate", "clipped.toml"], 2, ["workload.prompt_median", "max_tokens"],
     ["simulate"]),
    ("spec-missing", ["simulate", "nowhere.toml"], 2, ["spec", "no file"], ["simulate"]),
    # a SPEC's [[instances]] decide the replicas: --instances beside it was silently ignored
    ("run-instances-with-spec", ["run", "tiny.toml", "--backend", "simulated", "--instances", "2"], 2,
     ["--instances", "count = N"], ["simulate"]),
    ("run-engine-instances-with-spec", ["run", "tiny.toml", "--backend", "hf", "--instances", "2"], 2,
     ["--instances", "count = N"], ["engines"]),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_named_before_any_work(case, files, monkeypatch):
    _, argv, code, texts, no_work = case
    import lloptim.cli.solve as solve_cli

    for key in no_work:
        if key == "executor":  # compare's executors are looked up in a table
            monkeypatch.setitem(solve_cli.EXECUTORS, "local", _never(key))
        else:
            monkeypatch.setattr(WORK[key], _never(key))
    res = runner.invoke(app, argv)
    out = res.output
    assert res.exit_code == code, out
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in out
    for text in texts:
        assert text in out, f"{text!r} missing from: {out}"
    assert out.startswith("error:") or "\nerror:" in out


def test_migrate_on_one_instance_warns_and_runs(files):
    res = runner.invoke(app, ["simulate", "tiny.toml", "--migrate", "--json"])
    assert res.exit_code == 0, res.output
    assert "--migrate does nothing" in res.stderr and "one instance" in res.stderr
    assert json.loads(res.stdout)["requests_completed"] == 2  # stdout stays pure JSON


def test_size_guard_override_runs_what_it_refused(files):
    """``--no-size-guard`` lets a refused run through (here: refused for time, run for real on a tiny spec)."""
    import lloptim.guards as g

    res = runner.invoke(app, ["simulate", "tiny.toml", "--json"])
    assert res.exit_code == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(g, "CLI_MAX_SECONDS", 1e-9)
        assert runner.invoke(app, ["simulate", "tiny.toml"]).exit_code == 2
        res = runner.invoke(app, ["simulate", "tiny.toml", "--no-size-guard", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["requests_completed"] == 2


def test_unwritable_output_keeps_the_results(files, monkeypatch):
    """A file that fails to write at the end (a full disk) costs the user nothing but the file."""
    import lloptim.plots

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lloptim.plots, "plot_reproduction", full_disk)
    res = runner.invoke(app, ["reproduce", "tiny.toml", "--cases", "0", "--plot", "out.png"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "hybrid-fused" in res.stdout and "gap to bound" in res.stdout  # the table was printed
    assert "--plot" in res.stderr and "No space left" in res.stderr


def test_spec_errors_point_to_the_reference(files):
    for name in ("empty.toml", "stray-key.toml", "clipped.toml"):
        res = runner.invoke(app, ["simulate", name])
        assert "lloptim spec-reference" in res.output and "docs/spec.rst" in res.output


def test_markup_in_messages_survives(files):
    (files / "brackets.toml").write_text('name = "[bold]x[/bold]"\n' + TINY.split("\n", 2)[2])
    res = runner.invoke(app, ["simulate", "brackets.toml"])
    assert res.exit_code == 0 and "[bold]x[/bold]" in res.stdout


def test_every_spec_key_is_documented():
    """The spec reference is generated from the validator: a key without a description is a gap in it."""
    from lloptim.spec import spec_reference

    rows = spec_reference()
    missing = [r["key"] for r in rows if r["description"] in ("", "(undocumented)")]
    assert not missing, f"describe these keys with spec._key(...): {missing}"
    numeric = [r for r in rows if r["type"] in ("integer", "number") and r["key"].rsplit(".", 1)[-1] != "seed"]
    assert all(r["unit"] for r in numeric), [r["key"] for r in numeric if not r["unit"]]


def test_listings_have_json():
    pol = json.loads(runner.invoke(app, ["policies", "--json"]).stdout)["policies"]
    assert {"baseline", "hybrid", "hybrid-fused"} <= {p["name"] for p in pol} and all(p["description"] for p in pol)
    sol = json.loads(runner.invoke(app, ["solvers", "--json"]).stdout)["solvers"]
    greedy = next(s for s in sol if s["name"] == "greedy")
    assert greedy["available"] is True and "supports_mip" in greedy["capabilities"]
    keys = json.loads(runner.invoke(app, ["spec-reference", "--json"]).stdout)["keys"]
    assert {"workload.prompt_median", "requests[].arrival_s", "instances[].kv_capacity_tokens"} <= {k["key"] for k in keys}


# -- the Python API -----------------------------------------------------------------------------------
def _workload(**override):
    base = dict(prompt_tokens=np.array([3, 5]), output_tokens=np.array([4, 4]), arrival_s=np.zeros(2),
                max_output_tokens=np.array([4, 4]), ids=("a", "b"))
    base.update(override)
    return Workload(**base)


API_CASES = [
    ("synthetic-median-inf", lambda: workloads.synthetic(10, prompt_median=math.inf), "workload.prompt_median"),
    ("synthetic-median-zero", lambda: workloads.synthetic(10, prompt_median=0), "workload.prompt_median"),
    ("synthetic-output-median-nan", lambda: workloads.synthetic(10, output_median=math.nan), "workload.output_median"),
    ("synthetic-median-above-clip", lambda: workloads.synthetic(10, prompt_median=2000), "workload.prompt_median"),
    ("synthetic-seed-negative", lambda: workloads.synthetic(10, seed=-1), "workload.seed"),
    ("synthetic-n-float", lambda: workloads.synthetic(10.5), "workload.n"),
    ("synthetic-sigma", lambda: workloads.synthetic(10, sigma=-1), "workload.sigma"),
    ("synthetic-rate", lambda: workloads.synthetic(10, arrival_rate=0.0), "workload.arrival_rate"),
    ("synthetic-arrivals-beyond-1e9", lambda: workloads.synthetic(100, arrival_rate=1e-8), "workload.arrival_rate"),
    ("gsm8k-cases-negative", lambda: workloads.gsm8k_cases(-1), "n_cases"),
    ("gsm8k-cases-seed", lambda: workloads.gsm8k_cases(2, seed=-1), "seed"),
    ("gsm8k-case-index", lambda: workloads.gsm8k_case(-1), "index"),
    ("gsm8k-case-too-many", lambda: workloads.gsm8k_case(0, n_requests=10**6), "n_requests"),
    ("gsm8k-split", lambda: workloads.gsm8k("dev"), "workload.split"),
    ("workload-negative-prompt", lambda: _workload(prompt_tokens=np.array([-1, 5])), "requests[0].prompt_tokens"),
    ("workload-inf-arrival", lambda: _workload(arrival_s=np.array([0.0, np.inf])), "requests[1].arrival_s"),
    ("workload-duplicate-id", lambda: _workload(ids=("a", "a")), "requests[1].id"),
    ("workload-cap-below-output", lambda: _workload(max_output_tokens=np.array([4, 1])),
     "requests[1].max_output_tokens"),
    ("workload-ids-string", lambda: _workload(ids="ab"), "ids"),
    ("workload-fractional", lambda: _workload(output_tokens=np.array([1.5, 2.0])), "output_tokens"),
    ("workload-replace", lambda: replace(workloads.gsm8k("test", limit=3), prompt_tokens=np.array([1, 0, 2])),
     "requests[1].prompt_tokens"),
    ("problem-single-none", lambda: Problem.single(None, "llama-65b"), "workload"),
    ("problem-instances-list-of-none", lambda: Problem(workloads.gsm8k("test", limit=2), [None]), "instances[0]"),
    ("problem-no-instances", lambda: Problem(workloads.gsm8k("test", limit=2), ()), "instances"),
    ("instance-zero-clients", lambda: lloptim.Instance(lloptim.load_profile("llama-65b"), 0, 100), "instance-0.clients"),
    ("instance-profile-name", lambda: lloptim.Instance("llama-65b", 4, 100), "instance-0.profile"),
    ("simulate-none", lambda: simulate(None), "problem"),
    ("lower-bound-none", lambda: lower_bound(None), "problem"),
    ("solve-none", lambda: __import__("lloptim.solvers", fromlist=["solve"]).solve(None), "problem"),
    ("reproduce-cases", lambda: __import__("lloptim.experiments", fromlist=["x"]).reproduce(
        Problem.single(workloads.gsm8k("test", limit=10)), cases=-1), "cases"),
    ("reproduce-executor", lambda: __import__("lloptim.experiments", fromlist=["x"]).reproduce(
        Problem.single(workloads.gsm8k("test", limit=10)), executor="foo"), "executor"),
    ("fault-negative-time", lambda: __import__("lloptim.runtime.engine", fromlist=["x"]).Fault(-5.0, 0),
     "faults.time_s"),
    ("fault-nan-time", lambda: __import__("lloptim.runtime.engine", fromlist=["x"]).Fault(math.nan, 0),
     "faults.time_s"),
    ("profile-missing-file", lambda: lloptim.load_profile("/nonexistent.toml"), "profile"),
    ("spec-text-count", lambda: lloptim.load_spec(text="[workload]\nsource='gsm8k'\n[[instances]]\ncount=0\n"),
     "instances[0].count"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_is_named(case):
    _, call, field = case
    with pytest.raises(SpecError) as info:
        call()
    assert info.value.field == field, str(info.value)
    assert info.value.fix, "every error says how to fix it"


def test_profile_missing_file_says_no_file():
    with pytest.raises(SpecError, match="no file at"):
        lloptim.load_profile("/nonexistent.toml")
    with pytest.raises(SpecError, match="unknown profile"):
        lloptim.load_profile("h100")


def test_api_refuses_what_does_not_fit_in_memory(monkeypatch):
    """The Python API applies the memory guard (not the CLI's time limit); ``unguarded`` lifts it."""
    monkeypatch.setattr(guards, "limits", lambda: guards.Limits(2**30))
    problem = Problem.single(workloads.gsm8k("test", limit=4), clients=2_000_000)  # ~1.7 GiB of client state
    with pytest.raises(TooLargeError) as info:
        simulate(problem)
    assert info.value.field == "instances[].clients" and "unguarded" in info.value.fix
    with guards.unguarded():
        with pytest.raises(AssertionError):  # got past the guard: the engine was reached
            with monkeypatch.context() as m:
                m.setattr("lloptim.runtime.engine.Engine.run", _never("engine"))
                simulate(problem)


# -- invariants hold however a workload is built ----------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VALUES = st.one_of(st.integers(-5, 12), st.floats(-2, 12), st.sampled_from([2**70, 1e300, 10_000_001, math.nan,
                                                                            math.inf, -math.inf, 2.5]))


@settings(max_examples=150, deadline=None)
@given(prompt=st.lists(VALUES, min_size=0, max_size=6), output=st.lists(VALUES, min_size=0, max_size=6),
       arrival=st.lists(VALUES, min_size=0, max_size=6), cap_extra=st.lists(st.integers(-3, 3), max_size=6))
def test_a_workload_is_valid_or_refused_with_a_name(prompt, output, arrival, cap_extra):
    """Built directly from arbitrary values: either a SpecError naming a field, or every invariant holds."""
    cap = [o + c if isinstance(o, int) else o for o, c in zip(output, cap_extra + [0] * len(output))]
    try:
        w = Workload(np.array(prompt), np.array(output), np.array(arrival, dtype=float), np.array(cap),
                     tuple(str(i) for i in range(len(prompt))))
    except SpecError as exc:
        assert exc.field and exc.fix
        return
    n = len(w)
    assert n >= 1 and w.prompt_tokens.dtype == np.int64 and w.output_tokens.dtype == np.int64
    assert np.all(w.prompt_tokens >= 1) and np.all(w.output_tokens >= 1)
    assert np.all((w.max_output_tokens == 0) | (w.max_output_tokens >= w.output_tokens))  # 0: no cap
    assert np.all(np.isfinite(w.arrival_s)) and np.all(w.arrival_s >= 0)
    assert len(set(w.ids)) == n and not w.prompt_tokens.flags.writeable


def test_workflow_size_is_bounded_before_drawing():
    with pytest.raises(SpecError) as info:
        lloptim.load_spec(text='[workload]\nsource = "workflow"\nshape = "chain"\nworkflows = 1000000\n'
                               'depth = 10000\n')
    assert info.value.field == "workload.workflows" and "10,000,000" in info.value.problem


@pytest.mark.parametrize("extra", [[], ["--clients", "3"]])
def test_engine_run_starts_one_replica_per_spec_instance(files, monkeypatch, extra):
    """``lloptim run SPEC --backend hf`` serves the SPEC's instances, with or without --clients."""
    import lloptim.cli.serve as serve_cli

    (files / "two.toml").write_text(TINY + "count = 2\n")
    started = {}

    def record(backend, model, clients, instances, *args):
        started.update(clients=clients, instances=instances)
        raise SpecError("--model", "stop here", "this test only looks at the replicas")

    monkeypatch.setattr(serve_cli, "_start_engines", record)
    res = runner.invoke(app, ["run", "two.toml", "--backend", "hf", *extra])
    assert res.exit_code == 2 and "stop here" in res.output, res.output
    assert started == {"instances": 2, "clients": 3 if extra else 2}
