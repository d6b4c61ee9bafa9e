"""Scale-out on Ray: sweeps equal the local executor, actors serve, a killed actor loses nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from lloptim import Problem, run_policy, workloads  # noqa: E402
from lloptim.backends.simulated import SimulatedBackend  # noqa: E402
from lloptim.distributed import DistributedError, RayBackend, RayNotInstalledError, ray_map  # noqa: E402
from lloptim.errors import LloptimError, SpecError  # noqa: E402
from lloptim.executors import map_tasks  # noqa: E402

# every test here starts or uses a Ray cluster (seconds each): part of the slow set
pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    """One local Ray for every test here (starting one costs seconds); left alone if the caller runs one."""
    started = not ray.is_initialized()
    if started:
        # the helpers below live in this test module: let the local workers import it too
        here = os.path.dirname(os.path.abspath(__file__))
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, old) if p)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


# -- helpers (module-level: Ray pickles them by reference) ------------------------------------------

def _square(x: int) -> int:
    return x * x


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise SpecError("task", "three is not allowed", "skip three")
    return x


def _broken_factory(problem):
    raise RuntimeError("no GPU here")


def _not_a_backend(problem):
    return object()


# -- import hygiene and bad input -----------------------------------------------------------------

def test_import_lloptim_does_not_import_ray():
    code = "import sys, lloptim, lloptim.executors, lloptim.distributed, lloptim.experiments; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(RayNotInstalledError, match=r"pip install lloptim\[ray\]") as err:
        map_tasks(_square, [1, 2], executor="ray", progress=False)
    assert isinstance(err.value, LloptimError)
    problem = Problem.single(workloads.gsm8k("test", limit=10), clients=2)
    with pytest.raises(RayNotInstalledError, match=r"lloptim\[ray\]"):
        RayBackend(problem)


def test_executor_input_errors():
    with pytest.raises(SpecError, match="unknown executor"):
        map_tasks(_square, [1], executor="dask")
    with pytest.raises(SpecError, match="--executor ray"):
        map_tasks(_square, [1], executor="local", address="auto")
    with pytest.raises(DistributedError, match="needs a function"):
        ray_map(42, [1], progress=False)


# -- sweeps -----------------------------------------------------------------------------------------

def test_ray_map_keeps_task_order():
    tasks = list(range(23))[::-1]
    assert ray_map(_square, tasks, progress=True, desc="squares") == [t * t for t in tasks]
    assert ray_map(_square, tasks, progress=False, max_in_flight=3) == [t * t for t in tasks]
    assert ray_map(_square, [], progress=False) == []
    assert ray.is_initialized()  # a Ray the caller started is left running


def test_ray_map_reraises_the_task_error():
    with pytest.raises(SpecError, match="three is not allowed") as err:
        ray_map(_fail_on_three, range(6), progress=False)
    assert err.value.field == "task" and err.value.fix == "skip three"  # rebuilt with its attributes


def test_ray_map_function_workers_cannot_import(monkeypatch):
    import types

    ghost = types.ModuleType("lloptim_ghost_module")  # importable here only, so pickled by reference
    exec("def f(x):\n    return x\n", ghost.__dict__)
    monkeypatch.setitem(sys.modules, "lloptim_ghost_module", ghost)
    with pytest.raises(DistributedError, match="could not load task"):
        ray_map(ghost.f, [1, 2], progress=False)


def test_case_study_ray_equals_local():
    from lloptim.experiments import case_study

    local = case_study(n_cases=4, n_requests=300, executor="local", progress=False)
    remote = case_study(n_cases=4, n_requests=300, executor="ray", progress=False)
    assert remote == local  # bit-identical: every case carries its own seeds
    assert [c["case"] for c in remote["per_case"]] == [0, 1, 2, 3]


def test_cli_reproduce_executor_ray():
    from typer.testing import CliRunner

    from lloptim.cli import app

    res = CliRunner().invoke(app, ["reproduce", "--cases", "2", "--executor", "ray", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["cases"]["n"] == 2 and len(report["cases"]["per_case"]) == 2
    local = CliRunner().invoke(app, ["reproduce", "--cases", "2", "--json"])
    assert json.loads(local.stdout)["cases"] == report["cases"]


def test_cli_compare_executor_ray_equals_local(tmp_path):
    from typer.testing import CliRunner

    from lloptim.cli import app

    spec = "[workload]\nsource = \"gsm8k\"\nsplit = \"test\"\nlimit = 200\n[[instances]]\nclients = 8\n"
    runner = CliRunner()
    (tmp_path / "s.toml").write_text(spec)
    args = ["compare", str(tmp_path / "s.toml"), "--solvers", "greedy,lagrangian,highs", "--time-limit", "5", "--json"]
    remote = runner.invoke(app, args + ["--executor", "ray"])
    local = runner.invoke(app, args)
    assert remote.exit_code == 0, remote.output
    rows_r, rows_l = json.loads(remote.stdout)["results"], json.loads(local.stdout)["results"]
    assert [r["backend"] for r in rows_r] == ["greedy", "lagrangian", "highs"]
    for a, b in zip(rows_r, rows_l):
        assert a["status"] == b["status"] and a["primal_bound"] == pytest.approx(b["primal_bound"])
        assert a["dual_bound"] <= a["primal_bound"] * (1 + 1e-9)


# -- serving on actors ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served():
    """GSM8K test slice, 300 requests on 3 instances of 8 clients (about 4k iteration calls per run)."""
    wl = workloads.gsm8k("test", limit=300)
    return wl, Problem.single(wl, "llama-65b", clients=8, instances=3)


@pytest.fixture(scope="module")
def served_small():
    """100 requests on 2 instances of 8 clients: for the checks that need no long run."""
    wl = workloads.gsm8k("test", limit=100)
    return wl, Problem.single(wl, "llama-65b", clients=8, instances=2)


def test_ray_backend_equals_simulated(served_small):
    wl, problem = served_small
    with RayBackend(problem, backend_factory=SimulatedBackend) as backend:
        res = run_policy(problem, "vllm", backend=backend)
    ref = run_policy(problem, "vllm")
    assert res.backend == "ray:simulated"
    np.testing.assert_array_equal(res.done_s, ref.done_s)
    np.testing.assert_array_equal(res.client, ref.client)
    assert res.extra["lost_instances"] == 0 and sum(backend.calls) == res.trace_kind.size


@pytest.mark.parametrize("policy", ["vllm", "hybrid"])
def test_killed_actor_loses_nothing(served, policy):
    wl, problem = served
    victim = 1
    released: dict[int, int] = {}

    class Counting(RayBackend):
        """Counts the finished-releases the engine sends: one per completed request."""

        def release(self, instance, request, finished):
            if finished:
                released[request] = released.get(request, 0) + 1
            super().release(instance, request, finished)

    with Counting(problem, kill_after_calls={victim: 300}) as backend:
        res = run_policy(problem, policy, backend=backend)
    assert victim in backend.lost and backend.calls[victim] == 300
    assert res.extra["lost_instances"] == 1
    # every request completed exactly once, nothing lost or duplicated
    assert not np.isnan(res.done_s).any()
    assert res.generated_tokens == wl.total_output_tokens
    assert sorted(released) == list(range(len(wl))) and set(released.values()) == {1}
    assert res.requeued > 0 and int(res.restarts.sum()) == res.requeued
    # the kill happened mid-run, and everything finishing after it ran on the survivors
    inst = problem.client_instance()[res.client]
    on_victim = res.trace_instance == victim
    t_kill = float((res.trace_start_s[on_victim] + res.trace_duration_s[on_victim]).max())
    assert 0 < t_kill < res.makespan_s
    after = res.done_s > t_kill
    assert after.sum() > 0 and not np.any(inst[after] == victim)
    assert np.all(res.done_s[inst == victim] <= t_kill)
    assert np.all(res.restarts[inst == victim] == 0)  # requeued work went to the survivors


def test_actor_killed_from_outside_before_the_run(served_small):
    wl, problem = served_small
    with RayBackend(problem) as backend:
        backend.kill(0)
        res = run_policy(problem, "vllm", backend=backend)
    assert res.extra["lost_instances"] == 1
    assert not np.isnan(res.done_s).any() and res.generated_tokens == wl.total_output_tokens
    assert not np.any(problem.client_instance()[res.client] == 0)


def test_ray_backend_bad_factory():
    problem = Problem.single(workloads.gsm8k("test", limit=10), clients=2, instances=2)
    with pytest.raises(DistributedError, match="must be callable"):
        RayBackend(problem, backend_factory="simulated")
    with pytest.raises(DistributedError, match="no GPU here"):
        RayBackend(problem, backend_factory=_broken_factory)
    with pytest.raises(DistributedError, match="Backend protocol"):
        RayBackend(problem, backend_factory=_not_a_backend)
    with pytest.raises(DistributedError, match="kill_after_calls"):
        RayBackend(problem, kill_after_calls={5: 1})
    with pytest.raises(DistributedError, match="pickled"):
        import threading

        lock = threading.Lock()
        RayBackend(problem, backend_factory=lambda p, lock=lock: SimulatedBackend(p))


# -- a separately started cluster, reached by address -----------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _lloptim(args, env, timeout=180) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "lloptim")
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_reaches_a_token_authenticated_cluster_by_address():
    """`ray start --head` in another process (token authentication on, as Ray >= 2.59 starts local
    clusters); `lloptim compare --executor ray --address` runs there and agrees with the local run."""
    import secrets
    import time

    port = _free_port()
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    ray_exe = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen([ray_exe, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                             "--block"], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        import socket

        args = ["compare", "--solvers", "greedy,lagrangian", "--time-limit", "2", "--json"]
        local = json.loads(_lloptim(args, env).stdout)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # until the head's GCS accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        res = _lloptim(args + ["--executor", "ray", "--address", f"127.0.0.1:{port}"], env)
        assert res.returncode == 0, res.stderr[-2000:]
        remote = json.loads(res.stdout)
        assert [(r["backend"], r["primal_bound"], r["dual_bound"]) for r in remote["results"]] == \
               [(r["backend"], r["primal_bound"], r["dual_bound"]) for r in local["results"]]
        # without the token: the library's own error, naming the fix
        bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        denied = _lloptim(args + ["--executor", "ray", "--address", f"127.0.0.1:{port}"], bare)
        assert denied.returncode == 2 and "RAY_AUTH_MODE=token" in " ".join(denied.stderr.split())
        assert "Traceback" not in denied.stderr
    finally:
        import signal

        # the whole process group (GCS, raylet, workers) at once: a graceful stop takes half a minute
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)


# -- real model replicas as actors ------------------------------------------------------------------

@pytest.mark.torch
@pytest.mark.parametrize("kill", [False, True], ids=["intact", "replica-killed"])
def test_torch_replicas_on_ray_generate_exactly_the_reference(kill):
    """Each instance a Ray actor with its own tiny-llama; the hybrid steals across them; a replica
    killed mid-run hands its requests to the other, and every generation still matches the reference."""
    pytest.importorskip("torch")
    from lloptim.backends.torch_backend import TorchBackend, replica_factory, token_mismatches
    from lloptim.hardware import HardwareProfile, LatencyModel
    from lloptim.problem import Workload

    rng = np.random.default_rng(3)
    w = Workload.from_arrays(rng.integers(4, 24, 12), rng.integers(2, 20, 12), name="tiny")
    prof = HardwareProfile("tiny-hand", LatencyModel(1e-3, 1e-5, 1e-3, 3e-5, 5e-7), kv_capacity_tokens=4096, clients=2)
    problem = Problem.single(w, prof, clients=2, instances=2)
    with RayBackend(problem, replica_factory("tiny-llama", device="cpu"),
                    kill_after_calls={1: 6} if kill else None) as be:
        assert be.name == "ray:torch"
        res = run_policy(problem, "hybrid", backend=be)
        generated = be.collect_generated()
    assert np.all(np.isfinite(res.done_s)) and res.generated_tokens == int(w.output_tokens.sum())
    assert res.extra["lost_instances"] == int(kill)
    on_survivor = np.flatnonzero(problem.client_instance()[res.client] == 0)
    if kill:
        assert res.restarts.sum() >= 1 and set(np.flatnonzero(res.restarts).tolist()) <= set(on_survivor.tolist())
    # generations of the killed replica died with it; every other one is checked
    checked = np.arange(len(w)) if not kill else on_survivor
    ref = TorchBackend(problem, "tiny-llama", device="cpu")
    assert max(token_mismatches(ref, checked, generated=generated).values()) == 0


@pytest.mark.torch
def test_cli_run_on_ray_replicas(tmp_path):
    pytest.importorskip("torch")
    from typer.testing import CliRunner

    from lloptim.cli import app
    from lloptim.hardware import HardwareProfile, LatencyModel, save_profile

    path = save_profile(HardwareProfile("tiny-hand", LatencyModel(1e-3, 1e-5, 1e-3, 3e-5, 5e-7), 16384, 2),
                        tmp_path / "p.toml")
    res = CliRunner().invoke(app, ["run", "--requests", "8", "--instances", "2", "--profile", str(path), "--policy",
                                   "hybrid", "--device", "cpu", "--ray", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["ray"] and d["requests_completed"] == d["requests_total"] == 8
    assert d["max_token_mismatch"] == 0 and d["lost_instances"] == 0
    bad = CliRunner().invoke(app, ["run", "--address", "auto", "--json"])
    assert bad.exit_code == 2 and "--ray" in bad.output
