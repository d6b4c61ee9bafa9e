"""The Sphinx documentation builds warning-free, tutorials included.

Runs ``sphinx-build -W --keep-going -b html docs <tmp>`` in a subprocess, as CI does. It takes about a
minute (the tutorials and the reproduction table are executed), so it is marked ``slow``: leave it
out with ``pytest -m "not slow"``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"

pytestmark = pytest.mark.slow


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("furo")
    pytest.importorskip("sphinx_gallery")
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", str(DOCS), str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stderr[-8000:]}\n{proc.stdout[-2000:]}"
    for page in ("index", "concepts", "formulations", "backends", "runtime", "reproducing", "cli", "api",
                 "auto_examples/index", "auto_examples/plot_01_solve_spec", "auto_examples/plot_02_custom_policy",
                 "auto_examples/plot_03_profile", "generated/api/lloptim.bounds", "generated/api/lloptim.solvers.base"):
        assert (out / f"{page}.html").is_file(), page
    # the tutorials ran (their output is in the page) and the figures were drawn
    assert "Traceback" not in (out / "auto_examples" / "plot_02_custom_policy.html").read_text()
    assert (out / "_images" / "concepts_timeline.png").is_file()
    assert "lloptim simulate --help" in (out / "cli.html").read_text()
