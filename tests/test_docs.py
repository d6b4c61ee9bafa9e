"""The Sphinx documentation builds warning-free, tutorials included.

Runs ``sphinx-build -W --keep-going -b html docs <tmp>`` in a subprocess, as CI does. The build writes
generated sources next to the pages (``docs/generated``, ``docs/auto_examples``), so it runs on a
copy of ``docs/`` in a temporary folder (beside links to the package, README and benchmarks): two
test runs at once cannot trip over each other. It takes about a minute (the tutorials and the
reproduction table are executed), so it is marked ``slow``: leave it out with ``pytest -m "not slow"``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("furo")
    pytest.importorskip("sphinx_gallery")
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copytree(ROOT / "docs", work / "docs",
                    ignore=shutil.ignore_patterns("_build", "generated", "auto_examples", "__pycache__"))
    for name in ("README.md", "lloptim", "formulations", "solvers", "benchmarks"):
        if (ROOT / name).exists():
            (work / name).symlink_to(ROOT / name)
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", str(work / "docs"), str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stderr[-8000:]}\n{proc.stdout[-2000:]}"
    for page in ("index", "concepts", "formulations", "modeling", "side_by_side", "backends", "runtime",
                 "reproducing", "cli", "api",
                 "auto_examples/index", "auto_examples/plot_01_solve_spec", "auto_examples/plot_02_custom_policy",
                 "auto_examples/plot_03_profile", "auto_examples/plot_04_eligibility",
                 "auto_examples/plot_05_client_caps", "auto_examples/plot_06_completion_time", "generated/api/lloptim", "generated/api/lloptim.bounds",
                 "generated/api/lloptim.solvers.base"):
        assert (out / f"{page}.html").is_file(), page
    # the tutorials ran (their output is in the page) and the figures were drawn
    for tutorial in ("plot_02_custom_policy", "plot_04_eligibility", "plot_05_client_caps", "plot_06_completion_time"):
        assert "Traceback" not in (out / "auto_examples" / f"{tutorial}.html").read_text(), tutorial
    assert (out / "_images" / "concepts_timeline.png").is_file()
    assert "lloptim simulate --help" in (out / "cli.html").read_text()
