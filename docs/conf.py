"""Sphinx configuration of the lloptim documentation.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (offline; no intersphinx).

At start-up this file writes everything that must be measured rather than typed into
``docs/generated/`` (ignored by git): the API stubs of every module that exists, the
``lloptim --help`` output of every command, the README's set-up commands, the figures of the
*Concepts* page and the solver-capability table (:mod:`_scripts.generate`). The tutorials in
``docs/examples/`` are executed by sphinx-gallery into ``docs/auto_examples/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS))

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_DISABLE", "1")

project = "lloptim"
author = "the lloptim authors"
copyright = "2025, the lloptim authors"

try:
    import lloptim

    release = lloptim.__version__
except Exception:  # pragma: no cover - the docs need the package installed
    release = "0.1.0"
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# optional heavy dependencies: the API pages build without them
autodoc_mock_imports = [m for m in ("torch", "transformers", "ray") if not __import__("importlib.util").util.find_spec(m)]

# numpydoc-style docstrings through napoleon; "Attributes" become field lists, so dataclass fields
# that autodoc documents are not described twice
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_ivar = True
napoleon_use_rtype = False
napoleon_preprocess_types = False

autodoc_default_options: dict = {}  # the generated pages give every directive its options
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autosummary_generate = False  # stubs are written by _scripts/generate.py (modules that exist now)
autosummary_ignore_module_all = False

exclude_patterns = ["_build", "examples", "_scripts", "**/*.inc", "Thumbs.db", ".DS_Store"]
suppress_warnings = ["config.cache"]

html_theme = "furo"
html_title = f"lloptim {release}"
html_static_path = ["_static"]
html_css_files = ["lloptim.css"]

# -- tutorials (sphinx-gallery) -------------------------------------------------------------------
from _scripts import generate  # noqa: E402

_facts = generate.run(DOCS / "generated")

try:
    import sphinx_gallery  # noqa: F401
except ImportError:  # pragma: no cover - the docs extra installs it
    _have_gallery = False
else:
    _have_gallery = True
    extensions.append("sphinx_gallery.gen_gallery")
    # a tutorial whose API is missing is shown but not executed (its code stays visible)
    _skip = [name for name, ok in _facts["tutorial_ok"].items() if not ok]
    _pattern = r"/plot_(?!" + "|".join(_skip) + r")" if _skip else r"/plot_"
    sphinx_gallery_conf = {
        "examples_dirs": ["examples"],
        "gallery_dirs": ["auto_examples"],
        "filename_pattern": _pattern,
        "download_all_examples": False,
        "write_computation_times": False,
        "remove_config_comments": True,
        "abort_on_example_error": False,
        "only_warn_on_example_error": False,
        "matplotlib_animations": False,
        "within_subsection_order": "FileNameSortKey",
        "reset_modules": ("matplotlib",),
        "min_reported_time": 1,
        "show_memory": False,
        "plot_gallery": "True",
    }

rst_prolog = """
.. |paper| replace:: Pang, Li, She, Wang, *Hybrid Offline-online Scheduling Method for Large Language Model Inference Optimization*, arXiv:2502.15763 (2025)
"""


def _alias_reexports(app, env):
    """Mark the package-level re-export entries (``lloptim.Problem``...) as aliases.

    They are link targets only; an unqualified reference (``SpecError`` in a *Raises* section)
    then resolves to the full documentation in the defining module instead of being ambiguous.
    """
    objects = env.domaindata["py"]["objects"]
    for name in _facts["reexports"]:
        if name in objects:
            objects[name] = objects[name]._replace(aliased=True)


def setup(app):
    app.connect("env-updated", _alias_reexports)
