"""Backends by name, each declaring what it can do (after linopy's solver capability flags).

A backend is a subclass of :class:`Backend` registered with :func:`register_backend`. It either
solves any :class:`~lloptim.formulations.model.LinearModel` (``solve_model``: HiGHS, CBC, cvxpy)
or works on the bin-packing numbers directly (``solve_binpacking``: greedy, Lagrangian).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lloptim.errors import SolverError, SpecError

if TYPE_CHECKING:  # pragma: no cover
    from lloptim.formulations.model import LinearModel
    from lloptim.solvers.base import BinPackingTask, Outcome
    from lloptim.solvers.params import SolveParams

__all__ = ["Capabilities", "Backend", "register_backend", "get_backend", "available_solvers", "all_solvers"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports.

    Attributes
    ----------
    supports_mip
        Solves integer models exactly (branch and bound), proving a dual bound.
    supports_lp_duals
        Returns row duals of an LP (:meth:`Backend.solve_lp`).
    supports_time_limit
        Honours ``SolveParams.time_limit_s``.
    supports_mip_start
        Uses the incumbent handed to it as a starting solution.
    supports_relaxation
        Relaxes a named constraint group itself (Lagrangian) and returns its multipliers.
    needs_package
        Importable module the backend needs (``None``: only lloptim's own dependencies).
    pip_extra
        The ``lloptim[...]`` extra that installs it.
    """

    supports_mip: bool = False
    supports_lp_duals: bool = False
    supports_time_limit: bool = True
    supports_mip_start: bool = False
    supports_relaxation: bool = False
    needs_package: str | None = None
    pip_extra: str | None = None


class Backend:
    """Base class of solver backends. Subclasses set :attr:`name`, :attr:`capabilities`, a one-line
    :attr:`description`, and override :meth:`solve_model` or :meth:`solve_binpacking`."""

    name: str = ""
    description: str = ""
    capabilities: Capabilities = Capabilities()
    formulations: tuple[str, ...] = ("binpacking",)

    def available(self) -> bool:
        """Whether the backend's package is importable."""
        pkg = self.capabilities.needs_package
        return pkg is None or importlib.util.find_spec(pkg) is not None

    def estimate_mem_mb(self, model: "LinearModel") -> float:
        """Rough peak memory the backend needs for ``model``, MiB (0: no guard)."""
        return 0.0

    def solve_model(self, model: "LinearModel", x_start: np.ndarray | None, params: "SolveParams") -> "Outcome":
        """Solve a :class:`LinearModel` (MIP backends).

        Parameters
        ----------
        model : LinearModel
            The model to solve (objective in seconds for every lloptim formulation).
        x_start : numpy.ndarray or None
            A feasible column vector of ``model``, shape ``(n_cols,)``, to start from (a MIP start);
            the pipeline passes None unless :attr:`Capabilities.supports_mip_start`.
        params : SolveParams
            Time limit (seconds), relative gap, threads, seed, verbosity and backend-specific
            ``solver_options`` (the pipeline's own options removed).

        Returns
        -------
        Outcome
            The column vector found (``x``, or None), the backend's objective and proven bound in the
            model's units (seconds), the termination and what stopped the search.

        Raises
        ------
        SolverError
            Always, in the base class: the backend does not solve general models.
        """
        raise SolverError(f"backend {self.name!r} does not solve general models")

    def solve_lp(self, model: "LinearModel") -> dict:
        """Solve an LP and return ``{"x", "objective", "row_duals"}`` (backends with LP duals)."""
        raise SolverError(f"backend {self.name!r} gives no LP duals")

    def solve_binpacking(self, task: "BinPackingTask") -> "Outcome":
        """Solve the bin packing; the default builds the MIP and calls :meth:`solve_model`."""
        from lloptim.solvers.base import solve_binpacking_as_mip

        return solve_binpacking_as_mip(self, task)


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Make ``backend`` available to :func:`lloptim.solvers.solve` under ``backend.name``."""
    _BACKENDS[backend.name] = backend
    return backend


def all_solvers() -> dict[str, Backend]:
    """Every registered backend by name, usable or not."""
    return dict(_BACKENDS)


def available_solvers() -> list[str]:
    """Names of the backends whose packages are installed, in registration order."""
    return [n for n, b in _BACKENDS.items() if b.available()]


def get_backend(name: str) -> Backend:
    """The backend called ``name``.

    Raises
    ------
    SpecError
        Unknown name.
    SolverError
        Known but its package is missing (the message names the pip extra).
    """
    if not isinstance(name, str) or name not in _BACKENDS:
        raise SpecError("solver", f"unknown solver {name!r}", f"use one of {sorted(_BACKENDS)}")
    b = _BACKENDS[name]
    if not b.available():
        cap = b.capabilities
        hint = f"pip install lloptim[{cap.pip_extra}]" if cap.pip_extra else f"pip install {cap.needs_package}"
        raise SolverError(f"solver {name!r} needs the Python package {cap.needs_package!r}, which is not "
                          f"installed (fix: {hint})")
    return b
