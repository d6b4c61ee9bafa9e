"""The ``lloptim`` command line. Each submodule of this package adds its commands to :data:`app`."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from lloptim.cli.app import app

__all__ = ["app", "main"]

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in ("app", "common")):
    importlib.import_module(f"{__name__}.{_mod}")


def reflow_help(doc: str) -> str:
    """Join the lines of each paragraph of a command's docstring into one.

    typer's rich help keeps single line breaks after the first paragraph, so a docstring wrapped
    at the source's line length would print as ragged lines in an 80-column terminal; one line per
    paragraph lets rich wrap it to the terminal. Paragraphs with indented lines or list items keep
    their breaks.

    Parameters
    ----------
    doc : str
        The cleaned docstring (:func:`inspect.getdoc`).

    Returns
    -------
    str
        The docstring with every plain paragraph on one line; paragraphs stay separated by a
        blank line.
    """
    out = []
    for para in doc.split("\n\n"):
        lines = para.split("\n")
        plain = not any(ln.startswith((" ", "-", "*", "\b")) for ln in lines)
        out.append(" ".join(ln.strip() for ln in lines) if plain else para)
    return "\n\n".join(out)


for _info in app.registered_commands:
    if _info.help is None and _info.callback is not None and _info.callback.__doc__:
        _info.help = reflow_help(inspect.getdoc(_info.callback))


def main() -> None:
    """Entry point of the ``lloptim`` console script."""
    app()
