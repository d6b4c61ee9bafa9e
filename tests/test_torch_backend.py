"""The torch backend serves a real model, and scheduling never changes what the model says."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lloptim import Problem, Workload  # noqa: E402
from lloptim.backends.base import InstanceLost  # noqa: E402
from lloptim.backends.models import load_model, prompt_token_ids, reference_generate  # noqa: E402
from lloptim.backends.torch_backend import TorchBackend, token_mismatches  # noqa: E402
from lloptim.errors import LloptimError, SpecError  # noqa: E402
from lloptim.hardware import HardwareProfile, LatencyModel, save_profile  # noqa: E402
from lloptim.runtime.engine import Fault  # noqa: E402
from lloptim.runtime.registry import policy_names  # noqa: E402
from lloptim.simulator import run_policy  # noqa: E402

pytestmark = pytest.mark.torch

POLICIES = ["baseline", "vllm", "sarathi", "sorted-f", "lpt", "offline", "hybrid", "hybrid-fused"]
# small budgets: prompts get split into several chunks
OPTIONS = {"sarathi": {"token_budget": 8}, "hybrid-fused": {"token_budget": 8}}


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def problem() -> Problem:
    """16 requests (prompts 4-24, outputs 2-16 tokens) on 2 instances of 2 clients each."""
    rng = np.random.default_rng(7)
    w = Workload.from_arrays(rng.integers(4, 25, 16), rng.integers(2, 17, 16), name="tiny-synthetic")
    prof = HardwareProfile("tiny-hand", LatencyModel(1e-3, 1e-5, 1e-3, 3e-5, 5e-7), kv_capacity_tokens=4096, clients=2)
    return Problem.single(w, prof, clients=2, instances=2)


def _registered(policy: str) -> None:
    if policy not in policy_names():
        pytest.skip(f"policy {policy!r} is not registered")


def _serve(problem, model, policy, faults=()):
    be = TorchBackend(problem, model)
    try:
        res = run_policy(problem, policy, faults=faults, backend=be, **OPTIONS.get(policy, {}))
    except ImportError as exc:  # a policy whose solver is not built yet
        pytest.skip(f"policy {policy!r} cannot run: {exc}")
    return be, res


def test_reference_is_deterministic_and_prompt_dependent(model):
    p = prompt_token_ids(model, 3, 12)
    assert p == prompt_token_ids(model, 3, 12)
    assert not set(p) & set(model.special_ids)
    assert p != prompt_token_ids(model, 4, 12)
    a = reference_generate(model, p, 10)
    assert a == reference_generate(model, p, 10) and len(a) == 10
    assert reference_generate(model, p, 4) == a[:4]


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_generates_exactly_the_reference(problem, model, policy):
    _registered(policy)
    be, res = _serve(problem, model, policy)
    assert int(np.count_nonzero(~np.isnan(res.done_s))) == problem.n_requests
    out = problem.workload.output_tokens
    assert {r: len(t) for r, t in be.generated.items()} == {r: int(out[r]) for r in range(problem.n_requests)}
    assert max(token_mismatches(be).values()) == 0
    assert res.makespan_s > 0 and np.all(res.trace_duration_s > 0)
    if policy in ("sarathi", "hybrid-fused"):
        assert be.counters["mixed"] > 0 and be.counters["partial_chunks"] > 0


@pytest.mark.parametrize("policy", ["baseline", "sarathi", "hybrid"])
def test_fault_requeue_keeps_tokens_exact(problem, model, policy):
    _registered(policy)
    # the faults are placed by events, not by wall time (measured iteration times vary under load):
    # instance 0 dies at its second iteration that advances running requests, so it always holds work
    # then; client 3 (instance 1) dies right after instance 1's first iteration (any lasts over 1 ns)
    be = _DiesAtIteration(problem, model, instance=0, iteration=2)
    try:
        res = run_policy(problem, policy, faults=[Fault(1e-9, 1, 3)], backend=be, **OPTIONS.get(policy, {}))
    except ImportError as exc:  # a policy whose solver is not built yet
        pytest.skip(f"policy {policy!r} cannot run: {exc}")
    assert be.lost and res.extra["lost_instances"] == 1
    assert res.failed_clients == 3  # instance 0's two clients and client 3
    assert res.requeued >= 2 and be.counters["evictions"] >= 1
    assert int(np.count_nonzero(~np.isnan(res.done_s))) == problem.n_requests
    assert not np.any(res.client[~np.isnan(res.done_s)] == 3)  # nothing finished on the dead client
    assert max(token_mismatches(be).values()) == 0


class _DiesAtIteration(TorchBackend):
    """A torch backend whose ``instance`` is lost at its ``iteration``-th step that advances running requests.

    It raises :class:`InstanceLost` before the step runs (the engine then treats the instance as
    failed at that time), so the fault always finds requests in flight, whatever the timings.
    """

    def __init__(self, problem, model, instance: int, iteration: int) -> None:
        super().__init__(problem, model)
        self.doomed, self.left, self.lost = instance, iteration, False

    def _tick(self, instance: int, n_running: int) -> None:
        if instance == self.doomed and n_running > 0 and not self.lost:
            self.left -= 1
            if self.left == 0:
                self.lost = True
                raise InstanceLost(instance, "test fault")

    def decode(self, instance, n_running, kv_tokens):
        self._tick(instance, n_running)
        return super().decode(instance, n_running, kv_tokens)

    def mixed(self, instance, n_running, kv_tokens, chunks):
        self._tick(instance, n_running)
        return super().mixed(instance, n_running, kv_tokens, chunks)


def test_load_model_from_a_directory(model, tmp_path):
    model.module.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m", device="cpu", dtype="float64")
    p = prompt_token_ids(model, 0, 9)
    assert reference_generate(loaded, p, 6) == reference_generate(model, p, 6)


def test_bad_inputs_name_the_field(tmp_path):
    with pytest.raises(SpecError, match="model.*tiny-llama"):
        load_model("no-such-model")
    with pytest.raises(SpecError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(SpecError, match="dtype"):
        load_model("tiny-llama", device="cpu", dtype="float8")
    with pytest.raises(SpecError, match="device"):
        load_model("tiny-llama", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SpecError, match="CUDA"):
            load_model("tiny-llama", device="cuda")


def test_backend_refuses_to_run_out_of_sync(problem, model):
    be = TorchBackend(problem, model)
    with pytest.raises(LloptimError, match="out of sync"):
        be.decode(0, 1, 5)


def test_cli_run_json(tmp_path):
    from typer.testing import CliRunner

    from lloptim.cli import app

    prof = HardwareProfile("tiny-hand", LatencyModel(1e-3, 1e-5, 1e-3, 3e-5, 5e-7), 16384, 4)
    path = save_profile(prof, tmp_path / "p.toml")
    res = CliRunner().invoke(app, ["run", "--requests", "6", "--clients", "3", "--profile", str(path),
                                   "--policy", "vllm", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    for key in ("requests_total", "requests_completed", "makespan_s", "utilization", "tokens_per_s",
                "max_token_mismatch", "predicted_makespan_s", "prediction_rel_error"):
        assert key in d
    assert d["requests_completed"] == d["requests_total"] == 6
    assert d["max_token_mismatch"] == 0 and d["tokens_per_s"] > 0


def test_cli_run_reports_bad_model_without_traceback():
    from typer.testing import CliRunner

    from lloptim.cli import app

    res = CliRunner().invoke(app, ["run", "--model", "nope", "--json"])
    assert res.exit_code == 2
    assert "Traceback" not in res.output


@pytest.mark.slow
def test_builtin_model_folder_is_written_once_and_loads_as_the_seeded_model(tmp_path):
    from lloptim.backends.models import ModelInfo, builtin_model_dir

    path = builtin_model_dir("mini-llama", seed=3, root=tmp_path)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["head_dim"] == 64 and cfg["architectures"] == ["LlamaForCausalLM"]
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert builtin_model_dir("mini-llama", seed=3, root=tmp_path) == path  # reused, not rewritten
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert builtin_model_dir("mini-llama", seed=4, root=tmp_path) != path
    from_dir = load_model(str(path), device="cpu", dtype="float64")
    built = load_model("mini-llama", device="cpu", dtype="float64", seed=3)
    for a, b in zip(from_dir.module.state_dict().values(), built.module.state_dict().values()):
        assert torch.equal(a, b)
    info = ModelInfo.from_dir(path)
    assert info.vocab_size == 512 and info.special_ids == (0, 1, 2)
    assert info.prompt_ids(5, 12) == prompt_token_ids(built, 5, 12)
    with pytest.raises(SpecError, match="built-in"):
        builtin_model_dir("no-such-model", root=tmp_path)
