"""The torch backend's swap preemption: KV caches copied to host memory and back, tokens unchanged."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lloptim import Problem, Workload  # noqa: E402
from lloptim.backends.models import load_model  # noqa: E402
from lloptim.backends.torch_backend import TorchBackend, token_mismatches  # noqa: E402
from lloptim.errors import LloptimError  # noqa: E402
from lloptim.hardware import HardwareProfile, LatencyModel  # noqa: E402
from lloptim.runtime.engine import KIND_SWAP, Engine, Fault  # noqa: E402
from lloptim.runtime.registry import make_policy  # noqa: E402

pytestmark = pytest.mark.torch

POLICIES = ["vllm", "sarathi", "hybrid", "hybrid-fused"]


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model("tiny-llama", device="cpu")


def _tight(seed: int, n: int = 12, swap_space: int | None = None) -> Problem:
    """A KV cache of 64 tokens for requests of up to 50: the policies must preempt."""
    rng = np.random.default_rng(seed)
    wl = Workload.from_arrays(rng.integers(4, 20, n), rng.integers(6, 30, n))
    prof = HardwareProfile("tiny-hand", LatencyModel(1e-3, 1e-5, 1e-3, 3e-5, 5e-7, kv_swap_per_token_s=1e-6),
                           kv_capacity_tokens=64, clients=4)
    return Problem.single(wl, prof, kv_block_tokens=4)


def _run(problem: Problem, be: TorchBackend, policy: str, swap_space: int | None = None):
    opts = {"token_budget": 8} if policy in ("sarathi", "hybrid-fused") else {}
    # the hybrids preempt when their estimates are wrong
    est = None if policy in ("vllm", "sarathi") else np.full(problem.n_requests, 12.0)
    return Engine(problem, make_policy(policy, **opts), backend=be, estimates=est, preemption="swap",
                  swap_space_tokens=swap_space, check=True).run()


@pytest.mark.parametrize("seed", [3, 5])
@pytest.mark.parametrize("policy", POLICIES)
def test_swapped_requests_decode_on_to_the_reference_tokens(model, policy, seed):
    problem = _tight(seed)
    be = TorchBackend(problem, model)
    res = _run(problem, be, policy)
    # every preemption swapped (the host space is as large as the cache): nothing was recomputed
    assert res.preemptions.sum() > 0 and res.swapped_out_tokens > 0 and res.recomputed_tokens == 0
    assert be.counters["swap_outs"] == res.preemptions.sum() and be.counters["preemptions"] == 0
    assert res.swapped_in_tokens == res.swapped_out_tokens and be.counters["swap_ins"] >= be.counters["swap_outs"]
    # the engine's swap time is the backend's measured copies
    assert res.swap_s > 0 and float(res.trace_duration_s[res.trace_kind == KIND_SWAP].sum()) <= res.swap_s + 1e-9
    assert max(token_mismatches(be).values()) == 0
    want = {r: int(o) for r, o in enumerate(problem.workload.output_tokens)}
    assert {r: len(t) for r, t in be.generated.items()} == want
    assert not be._swapped and all(not p.segments for p in be._pools)  # nothing left in host memory or the pool


def test_chunked_swap_ins_restore_the_cache_piece_by_piece(model):
    """sarathi resumes a swapped request in prompt chunks of its token budget: several copies per cache."""
    problem = _tight(3)
    be = TorchBackend(problem, model)
    res = _run(problem, be, "sarathi")
    assert be.counters["swap_ins"] > be.counters["swap_outs"] > 0
    assert max(token_mismatches(be).values()) == 0


def test_a_small_host_space_mixes_swap_and_recompute_exactly(model):
    problem = _tight(5)
    be = TorchBackend(problem, model)
    res = _run(problem, be, "vllm", swap_space=24)
    assert res.swapped_out_tokens > 0 and res.recomputed_tokens > 0
    assert be.counters["swap_outs"] > 0 and be.counters["preemptions"] > 0
    assert be.counters["swap_outs"] + be.counters["preemptions"] == res.preemptions.sum()
    assert max(token_mismatches(be).values()) == 0


class _FixedClock(TorchBackend):
    """Every call takes 1 ms (a deterministic schedule), and the releases of swapped requests are counted."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clock = 0.0  # one instance, all requests at time 0: the engine's clock is the sum of the calls
        self.swapped_at: dict[int, float] = {}
        self.released_swapped = 0

    def _timed(self, fn) -> float:
        fn()
        self.clock += 1e-3
        return 1e-3

    def swap_out(self, instance, request, kv_tokens):
        dur = super().swap_out(instance, request, kv_tokens)
        self.swapped_at.setdefault(request, self.clock)
        return dur

    def release(self, instance, request, finished):
        self.released_swapped += not finished and request in self._swapped
        super().release(instance, request, finished)


@pytest.mark.parametrize("policy", ["vllm", "sarathi"])
def test_a_fault_on_a_swapped_request_restarts_it_exactly(model, policy):
    """The client of a swapped-out request fails while its cache is in host memory: served again, exactly."""
    problem = _tight(5)
    clean = _FixedClock(problem, model)
    res = _run(problem, clean, policy)
    assert clean.swapped_at
    r, t = min(clean.swapped_at.items(), key=lambda x: x[1])
    be = _FixedClock(problem, model)
    res = Engine(problem, make_policy(policy, **({"token_budget": 8} if policy == "sarathi" else {})), backend=be,
                 preemption="swap", faults=[Fault(t + 5e-4, 0, int(res.client[r]))], check=True).run()
    assert be.released_swapped >= 1  # the fault took a request whose cache was in host memory
    assert res.restarts[r] >= 1 and np.all(~np.isnan(res.done_s))
    assert max(token_mismatches(be).values()) == 0 and not be._swapped


class _Broken(TorchBackend):
    """A swap-in with a bug: ``corrupt(host, restored, kv_tokens)`` says what it copies back instead."""

    corrupt = None

    def swap_in(self, instance, request, kv_tokens):
        sw = self._swapped[request]
        sw.host = type(self).corrupt(sw.host.clone(), sw.restored, kv_tokens)
        return super().swap_in(instance, request, kv_tokens)


def _off_by_one(host, restored, n):
    """Restores into the slots one token late (the first slot keeps whatever was there)."""
    if restored == 0:
        host[:, :, :, 1:] = host[:, :, :, :-1].clone()
    return host


def _layers_shuffled(host, restored, n):
    """Every layer gets the next layer's keys and values."""
    return torch.roll(host, 1, dims=0) if restored == 0 else host


def _keys_for_values(host, restored, n):
    return host.flip(1) if restored == 0 else host


def _chunk_offset_ignored(host, restored, n):
    """Every chunk copies the start of the cache (the chunk's offset in the host copy forgotten)."""
    if restored:
        host[:, :, :, restored:restored + n] = host[:, :, :, :n].clone()
    return host


@pytest.mark.parametrize("policy,corrupt", [("vllm", _off_by_one), ("vllm", _layers_shuffled),
                                            ("vllm", _keys_for_values), ("sarathi", _chunk_offset_ignored)])
def test_the_token_check_catches_a_swap_in_that_restores_the_wrong_blocks(model, policy, corrupt):
    """The exactness test above is not vacuous: each of these swap-in bugs changes generated tokens."""
    problem = _tight(3)
    be = type("Broken", (_Broken,), {"corrupt": staticmethod(corrupt)})(problem, model)
    res = _run(problem, be, policy)
    assert res.swapped_out_tokens > 0
    assert max(token_mismatches(be).values()) > 0


def test_swap_calls_out_of_sync_with_the_engine_are_refused(model):
    problem = _tight(3, n=2)
    be = TorchBackend(problem, model)
    with pytest.raises(LloptimError, match="swap out"):
        be.swap_out(0, 0, 5)  # not running
    p = int(problem.workload.prompt_tokens[0])
    be.prefill(0, [0], p)
    with pytest.raises(LloptimError, match="swap out"):
        be.swap_out(0, 0, p + 1)  # wrong length
    assert be.swap_out(0, 0, p) >= 0
    with pytest.raises(LloptimError, match="tokens left"):
        be.swap_in(0, 0, p + 1)
    with pytest.raises(LloptimError, match="no swapped cache"):
        be.swap_in(0, 1, 1)
    be.swap_in(0, 0, 1)
    be.swap_in(0, 0, p - 1)
    assert 0 in be._running[0] and be._reqs[0].length == p


# -- lloptim run --preemption / --swap-space -----------------------------------------------------------
def _profile(tmp_path, swap: bool = True):
    from lloptim.hardware import save_profile

    lat = LatencyModel(1e-3, 1e-5, 1e-3, 3e-5, 5e-7, kv_swap_per_token_s=1e-6 if swap else None)
    # 160 KV tokens for 4 clients of requests up to 128 tokens: vllm preempts
    return str(save_profile(HardwareProfile("tiny-tight", lat, 160, 4), tmp_path / f"p{int(swap)}.toml"))


def test_cli_run_swaps_on_the_torch_backend_and_keeps_tokens_exact(tmp_path):
    import json

    from typer.testing import CliRunner

    from lloptim.cli import app

    base = ["run", "--requests", "8", "--clients", "4", "--profile", _profile(tmp_path), "--policy", "vllm",
            "--device", "cpu", "--json"]
    out = {}
    for mode in ("recompute", "swap"):
        res = CliRunner().invoke(app, base + ["--preemption", mode])
        assert res.exit_code == 0, res.output
        out[mode] = json.loads(res.stdout)
    rec, swp = out["recompute"], out["swap"]
    assert rec["preemption"] == "recompute" and rec["swapped_out_tokens"] == 0 and rec["recomputed_tokens"] > 0
    assert swp["preemption"] == "swap" and swp["swapped_out_tokens"] > 0 and swp["recomputed_tokens"] == 0
    for d in (rec, swp):
        assert d["preemptions"] > 0 and d["max_token_mismatch"] == 0 and d["requests_completed"] == 8
    # a host space too small for every victim: some swap, the rest recompute
    res = CliRunner().invoke(app, base + ["--preemption", "swap", "--swap-space", "32"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert 0 < d["swapped_out_tokens"] <= 32 * d["preemptions"] and d["max_token_mismatch"] == 0


@pytest.mark.parametrize("extra,flag", [
    (["--preemption", "migrate"], "--preemption"),
    (["--swap-space", "64"], "--swap-space"),  # without --preemption swap
    (["--preemption", "swap", "--swap-space", "-1"], "--swap-space"),
    (["--preemption", "swap", "--ray"], "--preemption"),
    (["--preemption", "swap", "--backend", "vllm"], "--preemption"),
    (["--preemption", "swap", "NOSWAP"], "--profile"),
])
def test_cli_run_refuses_bad_preemption_flags_before_any_work(tmp_path, extra, flag):
    from typer.testing import CliRunner

    from lloptim.cli import app

    prof = _profile(tmp_path, swap="NOSWAP" not in extra)
    extra = [x for x in extra if x != "NOSWAP"]
    res = CliRunner().invoke(app, ["run", "--requests", "4", "--profile", prof, "--device", "cpu"] + extra)
    assert res.exit_code == 2, res.output
    assert flag in res.output and "Traceback" not in res.output
