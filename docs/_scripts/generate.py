"""Write the measured parts of the docs into ``docs/generated/`` (run by ``conf.py`` at start-up).

Everything here is derived from the code and the README as they are at build time, so the docs
cannot drift from them:

* ``api/<module>.rst``: one API page per public module that exists (modules needing torch,
  transformers or ray are documented through autodoc's mocks when those are missing), and
  ``api_toc.inc``, the grouped toctree of them;
* ``cli/<command>.txt``: ``lloptim <command> --help``;
* ``readme_setup.txt``, ``readme_tests.txt``, ``readme_tour.txt``: the README's code blocks;
* ``concepts_timeline.png``, ``concepts_bound.png``: the figures of the *Concepts* page;
* ``solver_capabilities.inc``: the capability table of the registered solver backends;
* ``spec_reference.inc``: every key of a spec, from the validator's pydantic models
  (:func:`lloptim.spec.spec_reference`);
* ``benchmark_figures.inc``: the figures of ``benchmarks/results/`` when present;
* ``workflows_table.inc``: the table of ``benchmarks/workflows.py`` (its summary JSON) when present;
* ``engines_benchmark.inc``: the table of ``benchmarks/results/engines.json`` when present;
* ``engine_prediction.inc``: the prediction-error table of ``benchmarks/results/engine_prediction.json``
  (``benchmarks/engine_prediction.py``) when present.

Figures and tables are rewritten only when missing or older than the code, which keeps repeated
builds fast.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
import shutil
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]
ROOT = DOCS.parent

#: Packages whose modules get API pages, in the order of the API reference, with section titles.
SECTIONS = [
    ("Core", "lloptim", ["lloptim.spec", "lloptim.problem", "lloptim.workloads", "lloptim.precedence",
                         "lloptim.hardware", "lloptim.memory", "lloptim.bounds", "lloptim.work", "lloptim.arrivals",
                         "lloptim.dag_plan",
                         "lloptim.metrics", "lloptim.trace", "lloptim.simulator",
                         "lloptim.experiments", "lloptim.executors", "lloptim.distributed",
                         "lloptim.calibrate", "lloptim.plots", "lloptim.errors", "lloptim.validation",
                         "lloptim.guards", "lloptim.progress"]),
    ("Online runtime", "lloptim.runtime", ["lloptim.runtime.policy", "lloptim.runtime.engine",
                                           "lloptim.runtime.request_schedulers",
                                           "lloptim.runtime.iteration_schedulers", "lloptim.runtime.kv",
                                           "lloptim.runtime.memory_schedulers", "lloptim.runtime.order_choice",
                                           "lloptim.runtime.lagrangian",
                                           "lloptim.runtime.hybrid", "lloptim.runtime.dispatch",
                                           "lloptim.runtime.fleet", "lloptim.runtime.endgame",
                                           "lloptim.runtime.rolling",
                                           "lloptim.runtime.migration",
                                           "lloptim.runtime.estimators",
                                           "lloptim.runtime.registry"]),
    ("Execution backends", "lloptim.backends", ["lloptim.backends.base", "lloptim.backends.simulated",
                                                "lloptim.backends.torch_backend", "lloptim.backends.models"]),
    ("Serving engines", "lloptim.engines", ["lloptim.engines.common", "lloptim.engines.serve",
                                            "lloptim.engines.vllm", "lloptim.engines.hf"]),
    ("Formulations", "lloptim.formulations", ["lloptim.formulations.model", "lloptim.formulations.variables",
                                              "lloptim.formulations.expressions", "lloptim.formulations.constraints",
                                              "lloptim.formulations.indexing", "lloptim.formulations.compiled",
                                              "lloptim.formulations.io", "lloptim.formulations.binpacking",
                                              "lloptim.formulations.lp_bound", "lloptim.formulations.full_mip",
                                              "lloptim.formulations.precedence"]),
    ("Solvers", "lloptim.solvers", ["lloptim.solvers.base", "lloptim.solvers.params", "lloptim.solvers.result",
                                    "lloptim.solvers.formulation_registry", "lloptim.solvers.builtin_formulations",
                                    "lloptim.solvers.registry", "lloptim.solvers.limits",
                                    "lloptim.solvers.isolation"]),
]
OPTIONAL = ("torch", "transformers", "ray")
#: Modules never documented in the API reference (the CLI has its own page).
SKIP_PREFIXES = ("lloptim.cli",)


def _mock():
    import importlib.util

    from sphinx.ext.autodoc.mock import mock

    return mock([m for m in OPTIONAL if importlib.util.find_spec(m) is None])


def _import(name: str):
    try:
        with _mock():
            return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a module that cannot import is left out, and reported
        return None


def discover_modules() -> list[tuple[str, list[str]]]:
    """Sections of module names that exist now: the listed ones first, then any others found."""
    out = []
    for title, pkg_name, listed in SECTIONS:
        pkg = _import(pkg_name)
        found: list[str] = []
        if pkg is not None and hasattr(pkg, "__path__"):
            for m in pkgutil.iter_modules(pkg.__path__):
                full = f"{pkg_name}.{m.name}"
                if m.ispkg or m.name.startswith("_") or full.startswith(SKIP_PREFIXES):
                    continue
                found.append(full)
        names = [n for n in listed if n in found] + sorted(n for n in found if n not in listed)
        out.append((title, [n for n in names if _import(n) is not None]))
    return out


def public_names(mod) -> list[str]:
    """The module's ``__all__``, else its public objects defined in it."""
    if hasattr(mod, "__all__"):
        return [n for n in mod.__all__ if hasattr(mod, n)]
    return [n for n, obj in vars(mod).items()
            if not n.startswith("_") and getattr(obj, "__module__", None) == mod.__name__
            and (inspect.isclass(obj) or inspect.isfunction(obj))]


def _attr_docs(mod) -> dict[str, list[str]]:
    """``#:`` doc comments of the module's top-level names."""
    from sphinx.pycode import ModuleAnalyzer

    try:
        return {name: doc for (scope, name), doc in ModuleAnalyzer.for_module(mod.__name__).find_attr_docs().items()
                if scope == ""}
    except Exception:  # noqa: BLE001
        return {}


def _directive(mod, name: str, attr_docs: dict) -> str:
    obj = getattr(mod, name)
    if inspect.isclass(obj):
        kind = "autoexception" if issubclass(obj, BaseException) else "autoclass"
        return (f".. {kind}:: {name}\n   :members:\n   :undoc-members:\n   :show-inheritance:\n"
                f"   :member-order: bysource\n")
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return f".. autofunction:: {name}\n"
    if inspect.ismodule(obj):
        return ""
    if name in attr_docs:
        multiline = isinstance(obj, str) and "\n" in obj
        return f".. autodata:: {name}\n" + ("   :no-value:\n" if multiline else "")
    value = repr(obj)
    value = value if len(value) <= 200 and "\n" not in value else type(obj).__name__ + " (see the source)"
    return f".. py:data:: {name}\n   :value: {value}\n"


def _summary(obj, attr_doc: list[str] | None) -> str:
    """The first paragraph of the docstring (complete reST, unlike a first sentence)."""
    if attr_doc is not None:
        lines = list(attr_doc)
    elif inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismethod(obj):
        lines = inspect.cleandoc(obj.__doc__ or "").splitlines()
    else:
        lines = []
    para = []
    for line in lines:
        if not line.strip():
            break
        para.append(line.strip())
    return " ".join(para) or "(undocumented)"


def module_page(name: str) -> str:
    """The reST API page of module ``name``: its docstring, a summary table, then every public name."""
    mod = _import(name)
    title = f"``{name}``"
    lines = [title, "=" * len(title), "", f".. automodule:: {name}", "", f".. currentmodule:: {name}", ""]
    names = [n for n in public_names(mod) if not inspect.ismodule(getattr(mod, n))]
    docs = _attr_docs(mod)
    if names:
        lines += [".. list-table::", "   :widths: 30 70", "   :class: api-summary", ""]
        for n in names:
            lines += [f"   * - :py:obj:`{n}`", f"     - {_summary(getattr(mod, n), docs.get(n))}"]
        lines += ["", ".. rubric:: Reference", ""]
        for n in names:
            lines.append(_directive(mod, n, docs))
    return "\n".join(lines) + "\n"


#: Full names of the re-export entries written by :func:`reexport_page` (conf.py marks them as aliases).
REEXPORTS: list[str] = []


def reexport_page(pkg_name: str) -> str | None:
    """The page of a package that re-exports names: its docstring and a short entry per name.

    Each entry is a target under the package's name (so ``lloptim.simulate`` and
    ``lloptim.solvers.solve`` resolve) that links to where the object is documented in full.
    """
    pkg = _import(pkg_name)
    names = [n for n in getattr(pkg, "__all__", []) if hasattr(pkg, n)]
    if pkg is None or not names:
        return None
    title = f"``{pkg_name}``"
    lines = [title, "=" * len(title), "", f".. automodule:: {pkg_name}", "", f".. currentmodule:: {pkg_name}", "",
             "This package re-exports the names below; each is documented in full in its module.", "",
             ".. list-table::", "   :widths: 30 70", "   :class: api-summary", ""]
    entries = []
    for n in names:
        obj = getattr(pkg, n)
        if inspect.ismodule(obj):
            lines += [f"   * - :py:mod:`{obj.__name__}`", f"     - {_summary_text(obj.__doc__)}"]
            continue
        home = getattr(obj, "__module__", pkg_name)
        if inspect.isclass(obj):
            kind, role = ("exception", "exc") if issubclass(obj, BaseException) else ("class", "class")
        elif callable(obj):
            kind, role = "function", "func"
        else:
            kind, role = "data", "data"
        lines += [f"   * - :py:{role}:`{n}`", f"     - {_summary(obj, None)}"]
        REEXPORTS.append(f"{pkg_name}.{n}")
        entries += [f".. py:{kind}:: {n}", "   :no-index-entry:", "",
                    f"   Re-export of :py:{role}:`{home}.{n}`.", ""]
    lines += ["", ".. rubric:: Re-exports", ""] + entries
    if pkg_name == "lloptim":
        lines += [".. py:data:: __version__", f"   :value: {pkg.__version__!r}", "", "   The package version.", ""]
    return "\n".join(lines) + "\n"


def _summary_text(doc: str | None) -> str:
    para = []
    for line in inspect.cleandoc(doc or "").splitlines():
        if not line.strip():
            break
        para.append(line.strip())
    return " ".join(para) or "(undocumented)"


def _write(path: Path, text: str) -> None:
    """Write ``text`` unless the file already holds it (keeps mtimes, so Sphinx rebuilds less)."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def write_api(out: Path) -> list[str]:
    api = out / "api"
    api.mkdir(parents=True, exist_ok=True)
    _write(api / "lloptim.rst", reexport_page("lloptim"))
    toc = [".. toctree::", "   :maxdepth: 1", "   :caption: Package", "", "   generated/api/lloptim", ""]
    documented = ["lloptim"]
    pkgs = {title: pkg for title, pkg, _ in SECTIONS}
    for title, names in discover_modules():
        if not names:
            continue
        toc += [".. toctree::", "   :maxdepth: 1", f"   :caption: {title}", ""]
        page = reexport_page(pkgs[title]) if pkgs[title] != "lloptim" else None
        if page:
            _write(api / f"{pkgs[title]}.rst", page)
            toc.append(f"   generated/api/{pkgs[title]}")
            documented.append(pkgs[title])
        for n in names:
            _write(api / f"{n}.rst", module_page(n))
            toc.append(f"   generated/api/{n}")
            documented.append(n)
        toc.append("")
    _write(out / "api_toc.inc", "\n".join(toc) + "\n")
    for stale in api.glob("*.rst"):  # modules that no longer exist
        if stale.stem not in documented:
            stale.unlink()
    return documented


# -- CLI --------------------------------------------------------------------------------------------
def write_cli(out: Path) -> list[str]:
    import typer.main
    from typer.testing import CliRunner

    from lloptim.cli import app

    cli = out / "cli"
    cli.mkdir(parents=True, exist_ok=True)
    env = {"COLUMNS": "92", "TERMINAL_WIDTH": "92", "NO_COLOR": "1", "TERM": "dumb",
           "_TYPER_FORCE_DISABLE_TERMINAL": "1"}
    runner = CliRunner()
    group = typer.main.get_command(app)
    commands = list(group.commands)
    for args, fname in [([], "lloptim")] + [([c], c) for c in commands]:
        res = runner.invoke(app, [*args, "--help"], env=env, prog_name="lloptim")
        text = "\n".join(line.rstrip() for line in res.output.splitlines()).strip("\n")
        _write(cli / f"{fname}.txt", f"$ lloptim {' '.join(args + ['--help'])}\n{text}\n")
    inc = []
    for c in commands:
        head = f"``lloptim {c}``"
        inc += [head, "-" * len(head), "", f".. literalinclude:: /generated/cli/{c}.txt", "   :language: text", ""]
    _write(out / "cli_commands.inc", "\n".join(inc))
    return commands


def write_policies(out: Path) -> list[str]:
    """The table of registered policies (``lloptim policies``)."""
    from lloptim.runtime.registry import policy_names

    found = policy_names()
    first = ["baseline", "offline", "hybrid", "hybrid-plan", "vllm", "sarathi", "sorted-f", "lpt"]
    names = {n: found[n] for n in first if n in found} | {n: d for n, d in found.items() if n not in first}
    lines = [".. list-table:: Registered policies (read from the registry at build time)", "   :header-rows: 1",
             "   :widths: 20 80", "", "   * - policy", "     - what it does"]
    for n, desc in names.items():
        lines += [f"   * - ``{n}``", f"     - {desc}"]
    _write(out / "policies.inc", "\n".join(lines) + "\n")
    return list(names)


# -- spec reference ---------------------------------------------------------------------------------
def _cell(text: str) -> str:
    """A list-table cell: reST markup characters in free text shown literally."""
    return text.replace("\\", "\\\\").replace("*", "\\*").replace("`", "\\`").replace("|", "\\|") or "\\-"


def write_spec_reference(out: Path) -> list[str]:
    """One table per TOML table of a spec, read from the pydantic models of :mod:`lloptim.spec`."""
    from lloptim.spec import spec_reference

    rows = spec_reference()
    lines: list[str] = []
    for table in dict.fromkeys(r["table"] for r in rows):
        title = "Top-level keys" if table == "top level" else f"``{table}``"
        lines += [title, "-" * len(title), "", ".. list-table::", "   :header-rows: 1", "   :widths: 18 14 10 14 16 28",
                  "   :class: spec-reference", "", "   * - key", "     - type", "     - unit", "     - default",
                  "     - bounds", "     - meaning"]
        for r in rows:
            if r["table"] != table:
                continue
            default = r["default"] if r["default"] in ("required", "not set") or " " in r["default"] \
                else f"``{r['default']}``"
            lines += [f"   * - ``{r['key']}``", f"     - {_cell(r['type'])}", f"     - {_cell(r['unit'])}",
                      f"     - {default}", f"     - {_cell(r['bounds'])}", f"     - {_cell(r['description'])}"]
        lines.append("")
    _write(out / "spec_reference.inc", "\n".join(lines) + "\n")
    return [r["key"] for r in rows]


# -- README -----------------------------------------------------------------------------------------
def write_readme(out: Path) -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)
    bash = [b for lang, b in blocks if lang == "bash"]
    python = [b for lang, b in blocks if lang == "python"]
    names = ["readme_setup.txt", "readme_tests.txt", "readme_tour.txt"]
    for i, name in enumerate(names):
        _write(out / name, bash[i] if i < len(bash) else "# (not in README.md)\n")
    _write(out / "readme_python.txt", python[0] if python else "# (not in README.md)\n")
    m = re.search(r"\(`pip install -e \.` alone.*?\)", text, flags=re.S)
    _write(out / "readme_extras.inc", " ".join(m.group(0).split()) + "\n" if m else "\n")


# -- figures ----------------------------------------------------------------------------------------
def _stale(target: Path, sources: list[Path]) -> bool:
    if not target.exists():
        return True
    t = target.stat().st_mtime
    return any(p.exists() and p.stat().st_mtime > t for p in sources)


def write_concept_figures(out: Path) -> dict:
    """A small baseline run drawn per client and per iteration, and the lower bound's parts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from lloptim import Problem, lower_bound, run_policy, summarize, workloads
    from lloptim.plots import COLORS, plot_timeline

    facts: dict = {}
    timeline = out / "concepts_timeline.png"
    sources = [ROOT / "lloptim" / "plots.py", ROOT / "lloptim" / "runtime" / "engine.py", Path(__file__)]
    if _stale(timeline, sources):
        problem = Problem.single(workloads.gsm8k("test", limit=24), "llama-65b", clients=6)
        res = run_policy(problem, "baseline")
        fig, (top, ax) = plt.subplots(2, 1, figsize=(10, 5.2), height_ratios=[1.3, 4], constrained_layout=True)
        # zoom on a window around a prefill: iterations are ~30 ms, a whole run is seconds
        prefills = res.trace_start_s[res.trace_kind == 0]
        t0 = float(prefills[len(prefills) // 2]) - 0.25
        t1 = t0 + 0.6
        for kind, color, label in ((0, COLORS["prefill"], "prefill iteration"),
                                   (1, COLORS["decode"], "decode iteration")):
            sel = (res.trace_kind == kind) & (res.trace_start_s < t1) & (res.trace_start_s + res.trace_duration_s > t0)
            top.broken_barh(list(zip(res.trace_start_s[sel], res.trace_duration_s[sel])), (0, 1), color=color,
                            edgecolor="white", linewidth=1.0, label=label)
            for st, du, n in zip(res.trace_start_s[sel], res.trace_duration_s[sel], res.trace_participants[sel]):
                if st >= t0 and st + du <= t1:
                    top.text(st + du / 2, 0.5, str(n), ha="center", va="center", fontsize=7, color="white")
        top.set_xlim(t0, t1)
        top.set_yticks([])
        top.set_title(f"iterations of the instance between {t0:.2f} s and {t1:.2f} s "
                      "(number: requests taking part)", fontsize=9)
        top.set_xlabel("time (s)", fontsize=8)
        top.legend(loc="upper right", ncols=2, fontsize=8)
        plot_timeline(ax, res, "baseline, 24 GSM8K requests on 6 clients")
        ax.axvspan(t0, t1, color="k", alpha=0.08, lw=0)
        ax.title.set_fontsize(10)
        handles = [matplotlib.patches.Patch(color=v, label=f"client {k}") for k, v in COLORS.items()]
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncols=3)
        fig.savefig(timeline, dpi=110)
        plt.close(fig)

    bound_fig = out / "concepts_bound.png"
    if _stale(bound_fig, [ROOT / "lloptim" / "bounds.py", ROOT / "lloptim" / "data" / "llama-65b.profile.toml",
                          Path(__file__)]):
        problem = Problem.single(workloads.gsm8k("test"), "llama-65b")
        lb = lower_bound(problem)
        base = summarize(run_policy(problem, "baseline"), lb)
        parts = [("per-token work", lb.token_s, "#3b75af"), ("decode fixed cost", lb.decode_base_s, "#7fa7d1"),
                 ("prefill fixed cost", lb.prefill_base_s, "#e8a33d")]
        fig, ax = plt.subplots(figsize=(8, 3.0), constrained_layout=True)
        left = 0.0
        for label, width, color in parts:
            ax.barh(1, width, left=left, color=color, label=f"{label}: {width:.1f} s")
            left += width
        ax.barh(0, base.makespan_s, color="#999999", label=f"baseline makespan: {base.makespan_s:.2f} s")
        ax.axvline(lb.total_s, color="k", ls="--", lw=1)
        ax.text(lb.total_s, 1.45, f" T^LB = {lb.total_s:.2f} s", va="center", fontsize=9)
        ax.set_yticks([0, 1], ["baseline", "lower bound"])
        ax.set_xlabel("seconds (GSM8K test, 1319 requests, llama-65b, 40 clients)")
        ax.set_ylim(-0.6, 1.8)
        ax.legend(loc="upper center", fontsize=8, ncols=2, bbox_to_anchor=(0.5, -0.3))
        fig.savefig(bound_fig, dpi=110)
        plt.close(fig)
        facts.update(lower_bound=lb.to_dict(), baseline={"makespan_s": base.makespan_s,
                                                         "utilization": base.utilization})
        _write(out / "concepts_facts.json", json.dumps(facts, indent=1))
    return facts


# -- solver capabilities ----------------------------------------------------------------------------
def write_capabilities(out: Path) -> bool:
    path = out / "solver_capabilities.inc"
    try:
        from lloptim.solvers import registry  # noqa: F401

        from dataclasses import fields

        found = registry.all_solvers()
        backends = list(found.values()) if isinstance(found, dict) else [registry.get_backend(n) for n in found]
    except Exception as exc:  # noqa: BLE001 - the page says what is missing instead
        _write(path, f".. note::\n\n   The solver registry could not be read at build time ({type(exc).__name__}: "
                        f"{exc}); run ``lloptim compare --help`` for the backends of your installation.\n")
        return False
    caps = [f.name for f in fields(backends[0].capabilities)]
    head = ["backend", "installed here"] + [c.removeprefix("supports_").replace("_", " ") for c in caps]
    rows = []
    for b in backends:
        cells = [f"``{b.name}``", "yes" if b.available() else "no"]
        for c in caps:
            v = getattr(b.capabilities, c)
            cells.append("yes" if v is True else "--" if v in (False, None) else f"``{v}``")
        rows.append(cells)
    lines = [".. list-table:: Solver backends and their capabilities (read from the registry at build time)",
             "   :header-rows: 1", ""]
    for r in [head] + rows:
        lines.append("   * - " + r[0])
        lines += [f"     - {c}" for c in r[1:]]
    lines.append("")
    desc = [f"* ``{b.name}``: {b.description}" for b in backends if getattr(b, "description", "")]
    if desc:
        lines += [""] + desc + [""]
    _write(path, "\n".join(lines))
    return True


def write_side_by_side(out: Path) -> bool:
    """The measured table of ``benchmarks/modeling_side_by_side.py`` (its CSV), or a note to run it."""
    import csv

    src = ROOT / "benchmarks" / "results" / "modeling_side_by_side.csv"
    path = out / "side_by_side_figures.inc"
    if not src.is_file():
        _write(path, ".. note::\n\n   Run ``python benchmarks/modeling_side_by_side.py`` to measure the tools here.\n")
        return False
    rows = list(csv.DictReader(src.open()))
    first = rows[0]
    fmt = (lambda v, f: format(float(v), f) if v not in ("", None) else "--")  # noqa: E731
    lines = [f"``python benchmarks/modeling_side_by_side.py``: {first['requests']} requests x {first['clients']} "
             f"clients, HiGHS, time limit {fmt(first['time_limit_s'], '.0f')} s, relative gap 1e-4, each tool in a "
             f"fresh process (load average {first['load_average']} on a 2-core machine: times are comparable "
             "within the table only).", "",
             ".. list-table::", "   :header-rows: 1", "",
             "   * - tool", "     - build s", "     - solve s", "     - objective s", "     - bound s", "     - gap",
             "     - peak MiB", "     - status"]
    for r in rows:
        gap = f"{100 * float(r['gap']):.3f} %" if r["gap"] else "--"
        lines += [f"   * - {r['tool']}", f"     - {fmt(r['build_s'], '.2f')}", f"     - {fmt(r['solve_s'], '.2f')}",
                  f"     - {fmt(r['objective_s'], '.3f')}", f"     - {fmt(r['bound_s'], '.3f')}", f"     - {gap}",
                  f"     - {fmt(r['peak_mib'], ',.0f')}", f"     - ``{r['status']}``"]
    _write(path, "\n".join(lines) + "\n")
    return True


def write_benchmark_figures(out: Path) -> list[str]:
    results = ROOT / "benchmarks" / "results"
    figs = sorted(results.glob("*.png")) if results.is_dir() else []
    dest = out / "benchmarks"
    lines = []
    if figs:
        dest.mkdir(parents=True, exist_ok=True)
        for f in figs:
            shutil.copy2(f, dest / f.name)
            cap = f.stem.replace("_", " ").replace("-", " ")
            lines += [f".. figure:: /generated/benchmarks/{f.name}", "   :width: 100%", "",
                      f"   ``benchmarks/results/{f.name}``: {cap}.", ""]
    else:
        lines = [".. note::", "",
                 "   No measured figures were present in ``benchmarks/results/`` when these pages were built.",
                 "   They are produced by the scripts in ``benchmarks/`` (each prints its figures and writes",
                 "   its PNG there); rebuild the docs after running them to show them here.", ""]
    _write(out / "benchmark_figures.inc", "\n".join(lines))
    return [f.name for f in figs]


def write_workflow_table(out: Path) -> bool:
    """``workflows_table.inc``: the summary of ``benchmarks/workflows.py`` (its JSON), or a note."""
    src = ROOT / "benchmarks" / "results" / "workflows_summary.json"
    if not src.is_file():
        _write(out / "workflows_table.inc", ".. note::\n\n   Run ``python benchmarks/workflows.py`` and rebuild the "
                                            "docs to show its table here.\n")
        return False
    lines = [".. list-table:: Gap to the bound, % (mean / worst over the seeds)", "   :header-rows: 1", "",
             "   * - case", "     - workflows (requests)", "     - bound s (x simple)", "     - ``hybrid``",
             "     - separate-iteration hybrid", "     - best blind peer", "     - hybrid vs best peer",
             "     - separate hybrid vs best separate peer"]
    for c in json.loads(src.read_text()):
        case = c["shape"] + ("" if c["instances"] == 1 else f", {c['instances']} x {c['clients']} clients") + \
            (f", {c['rate']:g} workflows/s" if c["rate"] else "")
        pair = "{0[0]:.2f} / {0[1]:.2f}".format
        lines += [f"   * - {case}", f"     - {c['workflows']} ({c['requests']})",
                  f"     - {c['bound_s']:.1f} ({c['bound_over_simple']:.2f})", f"     - {pair(c['hybrid'])}",
                  f"     - {pair(c['hybrid_separate'])}",
                  f"     - ``{c['best_peer']}`` {pair(c['best_peer_gap'])}",
                  f"     - {pair(c['hybrid_vs_peers'])}",
                  f"     - {pair(c['hybrid_separate_vs_peers'])}"]
    _write(out / "workflows_table.inc", "\n".join(lines) + "\n")
    return True


def write_engine_prediction(out: Path) -> bool:
    """``engine_prediction.inc``: per engine and policy, the prediction error of every run and the noise floor."""
    path = ROOT / "benchmarks" / "results" / "engine_prediction.json"
    if not path.is_file():
        _write(out / "engine_prediction.inc", ".. note::\n\n   ``benchmarks/results/engine_prediction.json`` was not "
               "present when these pages were built; run ``python benchmarks/engine_prediction.py``.\n")
        return False
    d = json.loads(path.read_text())
    seeds = ",".join(map(str, d["seeds"]))
    sizes = ",".join(map(str, d["sizes"]))
    n = len(d["runs"])
    lines = [f"``python benchmarks/engine_prediction.py --repeats {d['repeats']} --seeds {seeds} --sizes {sizes}``: "
             f"{n} runs of ``{d['model']}`` ({d['clients']} clients, {d['clock']} clock): GSM8K test cases and "
             "heavy-tailed synthetic requests, each served once per round, every round recalibrated. ``|error|`` "
             "is ``|predicted / measured - 1|`` per run (median, largest, share within 10 %); *schedule* is the "
             "largest ``|predicted / replay - 1|`` (the simulator taking other steps than the engine); *cost* the "
             "median ``|replay / measured - 1|`` (the profile pricing the engine's own steps); *corrected* the "
             "median and largest error after scaling the prediction by the machine drift a probe measured.", "",
             ".. list-table::", "   :header-rows: 1", "",
             "   * - engine", "     - policy", "     - runs", "     - \\|error\\| median / max", "     - within 10 %",
             "     - schedule", "     - cost", "     - corrected median / max"]
    for r in d["summary"]:
        lines += [f"   * - {r['engine']}", f"     - {r['policy']}", f"     - {r['runs']}",
                  f"     - {100 * r['median_abs_error']:.1f} / {100 * r['max_abs_error']:.1f} %",
                  f"     - {100 * r['within_10pct']:.0f} %", f"     - {100 * r['max_abs_schedule_error']:.1f} %",
                  f"     - {100 * r['median_abs_cost_error']:.1f} %",
                  f"     - {100 * r['median_abs_corrected_error']:.1f} / {100 * r['max_abs_corrected_error']:.1f} %"]
    lines += ["", "The machine's own noise, measured: the same run's makespan over the rounds varied by"]
    parts = [f"{100 * x['median_spread']:.1f} % in the median (at most {100 * x['max_spread']:.1f} %) on {x['engine']}"
             + (f" (1-minute load {x['loadavg_min']:.1f} to {x['loadavg_max']:.1f})"
                if x.get("loadavg_min") is not None else "")
             for x in d["noise_floor"] if x.get("median_spread") is not None]
    lines += ["; ".join(parts) + "."]
    _write(out / "engine_prediction.inc", "\n".join(lines) + "\n")
    return True


def write_engines_benchmark(out: Path) -> bool:
    """``engines_benchmark.inc``: the table of ``benchmarks/results/engines.json`` (``benchmarks/engines.py``)."""
    path = ROOT / "benchmarks" / "results" / "engines.json"
    if not path.is_file():
        _write(out / "engines_benchmark.inc", ".. note::\n\n   ``benchmarks/results/engines.json`` was not present "
               "when these pages were built; run ``python benchmarks/engines.py``.\n")
        return False
    d = json.loads(path.read_text())
    lines = [f"``python benchmarks/engines.py --requests {d['requests']} --repeats {d['repeats']}``: GSM8K test, first "
             f"{d['requests']} requests ({d['output_tokens']:,} output tokens), {d['clients']} clients, "
             f"``{d['model']}`` in {d['dtype']}, {d['device']}, {d['clock']} clock; makespan is the median of "
             f"{d['repeats']} runs (min-max in brackets), predicted by the simulator with a profile fitted to the "
             "engine's own steps on GSM8K train requests.", "",
             ".. list-table::", "   :header-rows: 1", "",
             "   * - engine", "     - scheduler", "     - makespan s", "     - tokens/s", "     - predicted s",
             "     - prediction error"]
    for r in d["rows"]:
        pred = f"{r['predicted_s']:.3f}" if r.get("predicted_s") is not None else "n/a"
        err = f"{100 * r['rel_error']:+.1f} %" if r.get("rel_error") is not None else ""
        lines += [f"   * - {r['engine']}", f"     - {r['scheduler']}",
                  f"     - {r['makespan_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f})",
                  f"     - {r['tokens_per_s']:,.0f}", f"     - {pred}", f"     - {err}"]
    _write(out / "engines_benchmark.inc", "\n".join(lines) + "\n")
    return True


def _sources() -> list[Path]:
    return [p for d in ("lloptim", "formulations", "solvers") for p in (ROOT / d).rglob("*") if p.is_file()
            and p.suffix in (".py", ".toml", ".csv")] + [Path(__file__)]


def write_reproduction(out: Path, cases: int = 100) -> dict:
    """``lloptim reproduce --cases 100 --json`` (its Python form), cached until the code changes."""
    cache = out / "reproduce.json"
    if _stale(cache, _sources()):
        from lloptim.cli.common import _clean
        from lloptim.experiments import reproduce
        from lloptim.spec import default_problem

        t0 = time.perf_counter()
        report, _ = reproduce(default_problem(), cases=cases, progress=False)
        report["wall_s"] = time.perf_counter() - t0
        _write(cache, json.dumps(_clean(report), indent=1))
    rep = json.loads(cache.read_text())
    paper = rep["paper"]
    pol = rep["policies"]
    lines = [".. list-table:: GSM8K test (1319 requests), llama-65b profile, 40 clients; measured at build time",
             "   :header-rows: 1", "",
             "   * - policy", "     - makespan (s)", "     - utilization", "     - gap to bound",
             "     - prefill iterations", "     - paper makespan (s)", "     - paper utilization"]
    for name, row in pol.items():
        pp = paper.get(name, {})
        lines += [f"   * - ``{name}``", f"     - {row['makespan_s']:.2f}", f"     - {100 * row['utilization']:.1f} %",
                  f"     - {100 * row['gap_to_bound']:.2f} %", f"     - {row['prefill_iterations']}",
                  f"     - {pp['makespan_s']:.2f}" if pp else "     -", f"     - {100 * pp['utilization']:.1f} %" if pp else "     -"]
    noisy = list(dict.fromkeys(n["policy"] for n in rep["noise"]))
    lines += ["", ".. list-table:: Noisy forecasts: estimates = truth x exp(N(0, sigma)); makespan (s) and gap to bound",
              "   :header-rows: 1", "", "   * - sigma"]
    lines += [f"     - ``{name}``" for name in noisy]
    for sigma in dict.fromkeys(n["sigma"] for n in rep["noise"]):
        lines.append(f"   * - {sigma:.1f}")
        for name in noisy:
            n = next(x for x in rep["noise"] if x["policy"] == name and x["sigma"] == sigma)
            lines.append(f"     - {n['makespan_s']:.2f} s ({100 * n['gap_to_bound']:.2f} %)")
    _write(out / "reproduce_tables.inc", "\n".join(lines) + "\n")
    c = rep["cases"]
    b, h = pol["baseline"], pol["hybrid"]
    gap_cut = 1 - c["mean_gap_hybrid"] / c["mean_gap_baseline"] if c["n"] and c["mean_gap_baseline"] else float("nan")
    main_cut = 1 - h["gap_to_bound"] / b["gap_to_bound"]
    d = rep["decision_latency_us"]
    subs = {
        "lb": f"{rep['lower_bound_s']:.2f} s", "paper_lb": f"{paper['lower_bound_s']:.0f} s",
        "base_ms": f"{b['makespan_s']:.2f} s", "base_util": f"{100 * b['utilization']:.1f} %",
        "hyb_ms": f"{h['makespan_s']:.2f} s", "hyb_util": f"{100 * h['utilization']:.1f} %",
        "main_cut": f"{100 * main_cut:.0f} %",
        "n_cases": str(c["n"]), "wins": str(c.get("hybrid_wins", 0)),
        "gain": f"{100 * c['mean_utilization_gain']:.1f}",
        "paper_gain": f"{100 * paper['cases_mean_utilization_gain']:.1f}",
        "gap_base": f"{100 * c.get('mean_gap_baseline', float('nan')):.2f} %",
        "gap_hyb": f"{100 * c.get('mean_gap_hybrid', float('nan')):.2f} %",
        "gap_cut": f"{100 * gap_cut:.0f} %", "dec_p50": f"{d['p50']:.2f}", "dec_p99": f"{d['p99']:.1f}",
        "wall": f"{rep.get('wall_s', float('nan')):.1f}",
    }
    for key, tag in (("hybrid_unknown_lengths", "unk"), ("hybrid_fused_unknown_lengths", "fus_unk")):
        if key in pol:
            u = pol[key]
            subs.update({f"{tag}_ms": f"{u['makespan_s']:.2f} s", f"{tag}_util": f"{100 * u['utilization']:.1f} %",
                         f"{tag}_gap": f"{100 * u['gap_to_bound']:.2f} %"})
    if "hybrid-fused" in pol:
        subs["fus_gap"] = f"{100 * pol['hybrid-fused']['gap_to_bound']:.2f} %"
    for k in ("offline", "lpt", "sarathi", "vllm", "hybrid-fused"):
        if k in pol:
            subs[f"{k}_ms"] = f"{pol[k]['makespan_s']:.2f} s"
            subs[f"{k}_util"] = f"{100 * pol[k]['utilization']:.1f} %"
    _write(out / "reproduce_subs.inc", "".join(f".. |r_{k}| replace:: {v}\n" for k, v in subs.items()))
    return subs


def tutorial_status() -> dict[str, bool]:
    """Which tutorials can run now (the API they teach exists)."""
    ok = {}
    try:
        from lloptim.solvers import SolveParams, solve  # noqa: F401

        ok["01"] = True
    except Exception:  # noqa: BLE001
        ok["01"] = False
    try:
        from lloptim.hardware import save_profile  # noqa: F401
        from lloptim.runtime.policy import IterationScheduler, Policy, RequestScheduler  # noqa: F401

        ok["02"] = ok["03"] = True
    except Exception:  # noqa: BLE001
        ok["02"] = ok["03"] = False
    try:
        from lloptim import Model, solve  # noqa: F401

        ok["04"] = ok["05"] = ok["06"] = True
    except Exception:  # noqa: BLE001
        ok["04"] = ok["05"] = ok["06"] = False
    return ok


def run(out: Path) -> dict:
    """Write everything; return facts for ``conf.py``."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    facts = {"modules": write_api(out), "commands": write_cli(out), "reexports": list(REEXPORTS)}
    write_readme(out)
    facts["policies"] = write_policies(out)
    facts["spec_keys"] = write_spec_reference(out)
    write_concept_figures(out)
    facts["capabilities"] = write_capabilities(out)
    facts["benchmark_figures"] = write_benchmark_figures(out)
    facts["side_by_side"] = write_side_by_side(out)
    facts["workflow_table"] = write_workflow_table(out)
    facts["engines_benchmark"] = write_engines_benchmark(out)
    facts["engine_prediction"] = write_engine_prediction(out)
    facts["reproduction"] = write_reproduction(out)
    facts["tutorial_ok"] = tutorial_status()
    facts["seconds"] = time.perf_counter() - t0
    return facts


if __name__ == "__main__":
    print(json.dumps(run(DOCS / "generated"), indent=1))
