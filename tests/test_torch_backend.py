"""The torch backend serves a real model, and scheduling never changes what the model says."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lloptim import Problem, Workload  # noqa: E402
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
    _, clean = _serve(problem, model, policy)
    # instance 0 dies a third of the way in; client 3 (instance 1) dies right after its first iteration
    faults = [Fault(0.3 * clean.makespan_s, 0), Fault(1e-9, 1, 3)]
    be, res = _serve(problem, model, policy, faults)
    assert res.requeued >= 1 and be.counters["evictions"] >= 1
    assert int(np.count_nonzero(~np.isnan(res.done_s))) == problem.n_requests
    assert max(token_mismatches(be).values()) == 0


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
