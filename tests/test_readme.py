"""The Python snippets a new user copies from README.md and the modeling guide run as printed.

Each ``python`` block of README.md runs in order in one namespace (later blocks may use earlier
names, as a reader's session would); the first code block of ``docs/modeling.rst`` ("A model in
ten lines") runs on its own. The checks are on what the snippets compute, not only that they run.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # the CBC solve of the README's model takes a few seconds


def _readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_python_blocks_run(capsys):
    blocks = _readme_blocks()
    assert len(blocks) >= 2
    ns: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), ns)  # noqa: S102 - the README's own code
    out = capsys.readouterr().out
    makespan, bound = map(float, out.splitlines()[0].split())
    assert bound <= makespan  # the bound is never above a schedule
    # the eligibility + count-cap model: a feasible answer under every rule
    res, x, w, prompt, inst = ns["res"], ns["x"], ns["w"], ns["prompt"], ns["inst"]
    X = np.round(res.value(x))
    assert (X.sum(axis=1) == 1).all()
    assert (X[prompt > 100][:, inst != 0] == 0).all()
    assert (X[:, inst == 1].sum(axis=0) <= 10).all()
    assert res.dual_bound <= res.primal_bound + 1e-6
    assert abs(res.primal_bound - (w[:, None] * X).sum(axis=0).max()) < 1e-6


def _doc_blocks(page: str) -> list[str]:
    text = (ROOT / "docs" / page).read_text()
    return [textwrap.dedent(m.group(1))
            for m in re.finditer(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)", text)]


def test_modeling_guide_first_block_runs():
    code = _doc_blocks("modeling.rst")[0]
    ns: dict = {}
    exec(compile(code, "docs/modeling.rst", "exec"), ns)  # noqa: S102 - the guide's own code
    res, x = ns["res"], ns["x"]
    assert res.value(x).shape == (ns["R"], ns["C"])
    assert res.status.value in ("optimal", "feasible")


#: docs pages whose first Python block is a whole program a reader may paste (the others are
#: excerpts of the formulations' source, or need Ray or vLLM)
SELF_CONTAINED = ["index.rst", "backends.rst", "workflows.rst"]


@pytest.mark.parametrize("page", SELF_CONTAINED)
def test_docs_first_python_block_runs(page, capsys):
    code = _doc_blocks(page)[0]
    exec(compile(code, f"docs/{page}", "exec"), {"__name__": "docs_snippet"})  # noqa: S102
