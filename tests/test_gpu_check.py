"""The GPU check script's dry run on CPU: the same staging, stages and JSON as on a GPU machine.

``benchmarks/gpu_check.sh --device cpu --tiny`` stages lloptim on PYTHONPATH the way the package-dir
mapping installs it (no install), serves the built-in mini-llama through every stage (static
``generate``, transformers' continuous batching under its own scheduler and lloptim's hybrid, the
torch backend) and writes its JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers.generation.continuous_batching")

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.torch, pytest.mark.hf]


def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "LLOPTIM_WHEELS": str(tmp_path / "no-wheels"),
           "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny",
                           "--requests", "10", "--clients", "4", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = json.loads(out.read_text())
    # lloptim came from the staged copy (formulations and solvers under it), not from the install
    staged = Path(d["environment"]["lloptim_path"])
    assert staged != ROOT / "lloptim" and staged.parent.parent == tmp_path
    assert not staged.exists()  # the staging folder is removed at exit
    assert d["errors"] == {} and d["skipped"] == []
    rows = {(r["engine"], r["scheduler"]): r for r in d["rows"]}
    assert set(rows) == {("generate", "static batches of 4"), ("hf", "engine-default"), ("hf", "hybrid"),
                         ("torch", "hybrid"), ("hf", "hybrid-fused")}
    tokens = d["environment"]["output_tokens"]
    assert tokens > 0
    for key, r in rows.items():
        assert r["makespan_s"] > 0 and r["tokens_per_s"] == pytest.approx(tokens / r["makespan_s"], rel=0.01), key
        if key[0] != "generate":
            assert abs(r["rel_error"]) < 1.0 and r["speedup_vs_generate"] > 0, key
    assert "python" in d["environment"] and d["environment"]["device_kind"] == "cpu"


def test_gpu_check_refuses_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "--device cpu --tiny" in proc.stderr
