import pytest

from lloptim import Problem, workloads
from lloptim.hardware import HardwareProfile, LatencyModel


@pytest.fixture
def toy_profile() -> HardwareProfile:
    """Round numbers so schedules can be computed by hand (seconds)."""
    return HardwareProfile(
        name="toy",
        latency=LatencyModel(prefill_base_s=1.0, prefill_per_token_s=0.1, decode_base_s=0.5,
                             decode_per_seq_s=0.1, decode_per_kv_token_s=0.01),
        kv_capacity_tokens=10_000, clients=2)


@pytest.fixture(scope="session")
def gsm8k_small() -> Problem:
    return Problem.single(workloads.gsm8k("test", limit=200), "llama-65b", clients=12)
