"""The ``lloptim`` command line. Each submodule of this package adds its commands to :data:`app`."""

from __future__ import annotations

import importlib
import pkgutil

from lloptim.cli.app import app

__all__ = ["app", "main"]

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in ("app", "common")):
    importlib.import_module(f"{__name__}.{_mod}")


def main() -> None:
    """Entry point of the ``lloptim`` console script."""
    app()
