"""Audit the docstrings of every public name the API reference documents.

Run: ``python docs/_scripts/audit_docstrings.py`` (prints one line per gap, ``file:line name: problem``;
exits 1 when there is any). ``tests/test_docstring_audit.py`` runs it, so a new gap fails the tests.

Checks, for each name in a documented module's ``__all__`` (and the public methods of public
classes, skipping overrides whose base documents them):

* a docstring exists (``#:`` comments count for data);
* a function's parameters are each named in a numpydoc ``Parameters`` section;
* a dataclass's or named tuple's fields are each named in an ``Attributes`` section;
* a docstring that mentions a quantity (a name ending in ``_s``/``_ns``/``_us``/``_mb``, or tokens
  and times) states a unit somewhere.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _scripts.generate import _attr_docs, _import, discover_modules, public_names  # noqa: E402

UNIT = re.compile(r"second|\bs\b|\bms\b|\bus\b|µs|token|MiB|bytes|\bsteps?\b|per |fraction|share|ratio|\[0, 1\]|"
                  r"relative|%|count|number of|index|indices", re.I)
QUANTITY = re.compile(r"\w+_(s|ns|us|mb|tokens)\b|\btime\b|\btokens?\b|latency|duration|makespan", re.I)


def _section_names(doc: str, section: str) -> set[str]:
    """Names listed in a numpydoc section (``name`` or ``name : type``, comma-separated allowed)."""
    lines = doc.splitlines()
    names: set[str] = set()
    for i, line in enumerate(lines):
        if line.strip() == section and i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}:
            for entry in lines[i + 2:]:
                if entry.strip() and set(entry.strip()) == {"-"}:
                    break  # the next section's underline: stop (its title was added, harmless)
                if entry and not entry.startswith((" ", "\t")):
                    head = entry.split(":")[0]
                    names.update(n.strip().lstrip("*") for n in head.split(","))
            break
    return names


def _where(obj) -> str:
    try:
        f = inspect.getsourcefile(obj)
        line = inspect.getsourcelines(obj)[1]
        return f"{Path(f).resolve().relative_to(Path.cwd().resolve())}:{line}"
    except Exception:  # noqa: BLE001
        return "?"


def _inherited_doc(cls, name: str) -> bool:
    return any(name in vars(base) and (getattr(vars(base)[name], "__doc__", None) or "").strip()
               for base in cls.__mro__[1:] if base is not object)


def audit_function(qual: str, fn, gaps: list[str], owner=None) -> None:
    doc = inspect.getdoc(fn) or ""
    if not doc:
        if owner is None or not _inherited_doc(owner, fn.__name__):
            gaps.append(f"{_where(fn)} {qual}: no docstring")
        return
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    if len(params) >= 2 or (params and "Parameters" in doc):
        listed = _section_names(doc, "Parameters")
        missing = [p.name for p in params if p.name not in listed]
        if missing and not listed:
            gaps.append(f"{_where(fn)} {qual}: no Parameters section (parameters: {', '.join(missing)})")
        elif missing:
            gaps.append(f"{_where(fn)} {qual}: Parameters section misses {', '.join(missing)}")
    if QUANTITY.search(doc + " ".join(p.name for p in params)) and not UNIT.search(doc):
        gaps.append(f"{_where(fn)} {qual}: mentions a quantity but states no unit")


def audit_class(qual: str, cls, gaps: list[str]) -> None:
    doc = inspect.getdoc(cls) or ""
    if not (cls.__doc__ or "").strip():
        gaps.append(f"{_where(cls)} {qual}: no docstring")
    fields = []
    if dataclasses.is_dataclass(cls):
        fields = [f.name for f in dataclasses.fields(cls)]
    elif issubclass(cls, tuple) and hasattr(cls, "_fields"):
        fields = list(cls._fields)
    if fields and doc:
        listed = _section_names(doc, "Attributes") | _section_names(doc, "Parameters")
        missing = [f for f in fields if f not in listed]
        if missing and len(fields) > 1:
            gaps.append(f"{_where(cls)} {qual}: fields not in an Attributes section: {', '.join(missing)}")
    init = vars(cls).get("__init__")
    generated = dataclasses.is_dataclass(cls) or hasattr(cls, "_fields") or getattr(cls, "_is_protocol", False)
    if inspect.isfunction(init) and not generated:
        params = [p for p in inspect.signature(init).parameters if p != "self"]
        listed = _section_names(doc, "Parameters")
        missing = [p for p in params if p not in listed]
        if params and missing:
            gaps.append(f"{_where(cls)} {qual}: constructor parameters not in a Parameters section: "
                        f"{', '.join(missing)}")
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if inspect.isfunction(member):
            audit_function(f"{qual}.{name}", member, gaps, owner=cls)
        elif isinstance(member, property) and not (member.__doc__ or "").strip():
            gaps.append(f"{_where(member.fget)} {qual}.{name}: property without docstring")


def main() -> int:
    gaps: list[str] = []
    for _title, names in discover_modules():
        for modname in names:
            mod = _import(modname)
            if not (mod.__doc__ or "").strip():
                gaps.append(f"{modname}: module without docstring")
            docs = _attr_docs(mod)
            for n in public_names(mod):
                obj = getattr(mod, n)
                qual = f"{modname}.{n}"
                if inspect.ismodule(obj):
                    continue
                if inspect.isclass(obj):
                    if obj.__module__ == modname:
                        audit_class(qual, obj, gaps)
                elif inspect.isfunction(obj):
                    if obj.__module__ == modname:
                        audit_function(qual, obj, gaps)
                elif n not in docs:
                    gaps.append(f"{modname} {n}: data without a #: doc comment")
    for g in gaps:
        print(g)
    print(f"{len(gaps)} gaps", file=sys.stderr)
    return 1 if gaps else 0


if __name__ == "__main__":
    raise SystemExit(main())
