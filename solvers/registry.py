"""Backends by name, each declaring what it can do (after linopy's solver capability flags).

A backend is a subclass of :class:`Backend` registered with :func:`register_backend`. It either
solves any compiled model (:meth:`Backend.solve_model`: HiGHS, CBC, cvxpy; ``supports_mip``) or
works on one formulation's numbers directly (:meth:`Backend.solve_task`: the greedy and
Lagrangian heuristics of the bin packing). Either way it hands back an :class:`Outcome`, which
:func:`lloptim.solve` checks and turns into a :class:`~lloptim.solvers.result.SolveResult`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lloptim.errors import SolverError, SpecError
from lloptim.solvers.result import Limit, Termination

if TYPE_CHECKING:  # pragma: no cover
    from lloptim.formulations.compiled import LinearModel
    from lloptim.solvers.params import SolveParams

__all__ = ["Capabilities", "Backend", "Outcome", "FormulationTask", "register_backend", "get_backend",
           "available_solvers", "all_solvers"]


@dataclass
class Outcome:
    """What a backend hands back to :func:`lloptim.solve` (before the checks).

    Attributes
    ----------
    assignment
        The answer in the formulation's own terms (heuristics), or None.
    x
        The answer as a column vector of the compiled model (model solvers), or None.
    objective
        The backend's own objective value (informational: the pipeline recomputes it).
    bound
        The backend's proven bound on the optimum (None: none).
    termination
        ``OPTIMAL`` when the backend proved optimality; ``FEASIBLE`` when a limit stopped it
        (with or without an answer); ``INFEASIBLE``/``UNBOUNDED`` when proven; ``ERROR``.
    limit
        What stopped it.
    multipliers
        Prices the backend computed itself (Lagrangian), or None.
    row_duals
        LP duals, one per row of the compiled model, in lloptim's sensitivity convention
        (``d(objective)/d(rhs)``, :data:`~lloptim.solvers.result.DUAL_CONVENTION`), or None.
    peak_mb
        Memory the backend used outside this process (a child process), MiB, or 0.
    extra
        Details for :attr:`SolveResult.extra`.
    """

    assignment: np.ndarray | None = None
    x: np.ndarray | None = None
    objective: float | None = None
    bound: float | None = None
    termination: Termination = Termination.FEASIBLE
    limit: Limit = Limit.NONE
    multipliers: dict | None = None
    row_duals: np.ndarray | None = None
    peak_mb: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class FormulationTask:
    """A formulation's solve as a heuristic backend sees it (:meth:`Backend.solve_task`).

    Attributes
    ----------
    formulation
        The formulation's name (``"binpacking"``).
    data
        The formulation's numbers (a :class:`~lloptim.formulations.binpacking.BinPackingData`).
    bound
        The formulation's bound on the optimum (seconds for the bin packing), or None.
    incumbent
        The start's answer (an assignment for the bin packing), or None.
    incumbent_obj
        Its objective, or ``inf``.
    params
        The parameters, ``time_limit_s`` being the seconds left of the solve's deadline.
    """

    formulation: str
    data: Any
    bound: float | None
    incumbent: Any
    incumbent_obj: float
    params: "SolveParams"


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports.

    Attributes
    ----------
    supports_mip
        Solves integer models exactly (branch and bound), proving a dual bound.
    supports_lp_duals
        Returns row duals of an LP (in lloptim's sign convention).
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
    :attr:`description`, and override :meth:`solve_model` (any model; ``supports_mip``) or
    :meth:`solve_task` (the formulations named in :attr:`formulations`)."""

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

    def isolated(self, model: "LinearModel", params: "SolveParams") -> bool:
        """Whether :func:`~lloptim.solvers.base.run_backend` runs this solve in a child process.

        A child is stopped at the deadline and past its memory allowance
        (:mod:`lloptim.solvers.isolation`); an in-process solve relies on the solver's own limit.

        Parameters
        ----------
        model : LinearModel
            The compiled model about to be solved.
        params : SolveParams
            The parameters it will be solved with (``time_limit_s`` in seconds).

        Returns
        -------
        bool
            False in the base class.
        """
        return False

    def solves(self, formulation: str) -> bool:
        """Whether the backend can solve ``formulation`` (any, for a backend that solves models).

        Parameters
        ----------
        formulation : str
            A formulation's name.

        Returns
        -------
        bool
            True for a model solver, else whether ``formulation`` is in :attr:`formulations`.
        """
        return self.capabilities.supports_mip or formulation in self.formulations

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
            ``time_limit_s`` is the seconds left of the solve's deadline *now* (loading the model
            counts against it), ``max_mem_mb`` the memory allowance (MiB); also the relative gap,
            threads, seed, verbosity and backend-specific ``solver_options`` (the pipeline's own
            options removed).

        Returns
        -------
        Outcome
            The column vector found (``x``, or None), the backend's objective and proven bound in the
            model's units, the termination, what stopped the search, and for an LP solved to
            optimality the row duals in lloptim's sign convention.

        Raises
        ------
        SolverError
            Always, in the base class: the backend does not solve general models.
        """
        raise SolverError(f"backend {self.name!r} does not solve general models")

    def solve_lp(self, model: "LinearModel") -> dict:
        """Solve the LP relaxation of ``model``: ``{"x", "objective", "row_duals"}``.

        Duals are in lloptim's sensitivity convention (``d(objective)/d(rhs)``).

        Parameters
        ----------
        model : LinearModel
            The compiled model (its integrality is ignored).

        Returns
        -------
        dict
            The solution, its objective and one dual per row.

        Raises
        ------
        SolverError
            The backend gives no LP duals, or the LP has no optimal solution.
        """
        from lloptim.solvers.params import SolveParams

        if not self.capabilities.supports_lp_duals:
            raise SolverError(f"backend {self.name!r} gives no LP duals (fix: use highs, cbc or cvxpy)")
        out = self.solve_model(model.relaxed(), None, SolveParams())
        if out.termination is not Termination.OPTIMAL or out.x is None or out.row_duals is None:
            raise SolverError(f"{self.name}: the LP ended {out.termination.value} without duals")
        return {"x": out.x, "objective": float(model.objective(out.x)), "row_duals": out.row_duals}

    def solve_task(self, task: FormulationTask) -> Outcome:
        """Solve a formulation directly (heuristic backends); model solvers never receive this call.

        Parameters
        ----------
        task : FormulationTask
            The formulation's numbers, bound, start and parameters.

        Returns
        -------
        Outcome
            The answer (``assignment``) and what the backend proved.

        Raises
        ------
        SolverError
            Always, in the base class.
        """
        raise SolverError(f"backend {self.name!r} does not solve the {task.formulation!r} formulation")


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
