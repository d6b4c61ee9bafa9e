"""Every public name of the API reference has a numpydoc docstring that states its units.

Runs ``docs/_scripts/audit_docstrings.py`` (a few seconds: it imports the documented modules, no
Sphinx build), so a new public function without its Parameters section, or a quantity without a
unit, fails here rather than in a review.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_docstring_audit_finds_no_gap():
    pytest.importorskip("sphinx")  # the audit reads ``#:`` comments with Sphinx's analyzer
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "_scripts" / "audit_docstrings.py")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"docstring gaps (fix them; see docs/_scripts/audit_docstrings.py):\n{proc.stdout}"
