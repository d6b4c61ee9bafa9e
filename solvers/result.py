"""One result object for every backend and every model (after MathOpt's ``SolveResult``).

**Status.** :class:`Termination` tells apart what a caller must not confuse:

* ``optimal``: the answer is proven within ``rel_gap`` of the best bound (by the backend's
  search, or by a bound that the start already meets);
* ``feasible``: an exact search (branch and bound) stopped at a limit (:class:`Limit`) with an
  answer and a proven bound; ``gap`` is what is left;
* ``heuristic``: a heuristic (greedy, the Lagrangian repair) finished without closing the gap;
  ``dual_bound`` is the best bound it knows, but no search tried to prove more;
* ``no_solution``: a limit stopped the search before any feasible answer was found;
* ``infeasible`` / ``unbounded``: proven so;
* ``error``: the backend failed and there is no answer.

``solver`` is the backend that was asked for and ``backend`` the one whose work is returned: they
differ when the search was skipped because the start already met the gap (``skipped`` says why),
or when a failed backend left the start as the answer.

**Duals.** :meth:`SolveResult.dual` and :meth:`SolveResult.reduced_cost` use one sign
convention for every backend, the *sensitivity* convention: the dual of a row is the rate of
change of the optimal objective per unit increase of the row's right-hand side,
``d(objective) / d(rhs)``; the reduced cost of a variable is ``d(objective) / d(bound)`` for the
bound it sits at (``c - A^T y``). Consequences, for a minimization: a binding ``<=`` row has a dual
``<= 0``, a binding ``>=`` row a dual ``>= 0``; for a maximization the signs flip; an equality's
sign says which way the objective moves. HiGHS and CBC report this convention natively; cvxpy's
multipliers are converted (its ``<=`` rows of a minimization carry ``-dual``). Duals exist for LP
solves only (solve :meth:`Model.relaxed` for those of a MIP's relaxation).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from lloptim.errors import SpecError

__all__ = ["Termination", "Status", "Limit", "SolveResult", "DUAL_CONVENTION"]

#: The sign convention of every dual and reduced cost lloptim reports (see the module docstring).
DUAL_CONVENTION = "d(objective)/d(rhs)"


class Termination(str, enum.Enum):
    """How a solve ended (see the module docstring): ``optimal``, ``feasible``, ``heuristic``,
    ``no_solution``, ``infeasible``, ``unbounded`` or ``error``."""

    OPTIMAL = "optimal"
    FEASIBLE = "feasible"
    HEURISTIC = "heuristic"
    NO_SOLUTION = "no_solution"
    INFEASIBLE = "infeasible"
    UNBOUNDED = "unbounded"
    ERROR = "error"

    def __str__(self) -> str:  # print(res.status) shows the documented word, not the enum's name
        return self.value

    __format__ = str.__format__

    @property
    def has_solution(self) -> bool:
        """Whether a solve ending this way returns an answer."""
        return self in (Termination.OPTIMAL, Termination.FEASIBLE, Termination.HEURISTIC)


#: Another name for :class:`Termination`.
Status = Termination


class Limit(str, enum.Enum):
    """What stopped a search short of a proof: ``time``, ``memory``, ``gap``, ``iteration`` or ``none``."""

    NONE = "none"
    TIME = "time"
    MEMORY = "memory"
    GAP = "gap"
    ITERATION = "iteration"

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


@dataclass
class SolveResult:
    """The outcome of :func:`lloptim.solve` (a model, or a problem through a formulation).

    Attributes
    ----------
    status
        :class:`Termination`.
    limit
        :class:`Limit` that stopped the search (``none`` when it ran to the end).
    primal_bound
        Objective of the returned answer, in the objective's units (seconds of makespan for the
        bin packing, recomputed from the weights), or None without an answer.
    dual_bound
        Best proven bound on the optimum (below it for a minimization, above for a
        maximization): the backend's own, or the formulation's bound, whichever is tighter.
    gap
        ``|primal_bound - dual_bound| / |primal_bound|`` (relative, >= 0), None without both.
    assignment
        For a problem: the formulation's decoded answer (the global client of each request,
        int64, for the bin packing); None for a model.
    multipliers
        Prices the formulation reports (bin packing: ``"load"``, per-client prices of client
        time summing to 1, and ``"assign"``, seconds per request); empty when there are none.
    build_s
        Wall time building and compiling the model, seconds.
    solve_s
        Wall time in the backend (loading the model into it, its search, reading the answer back),
        seconds.
    peak_mem_mb
        High-water mark of resident memory, MiB: this process's, or the backend's child process's
        when it ran in one (CBC) and used more.
    backend
        The backend (or heuristic) whose answer is returned: ``"greedy"`` when the start already
        met the gap and the requested search was skipped.
    formulation
        The formulation's name, or ``"model"`` for a model solved directly.
    extra
        Details: the backend's own status and bound, node counts, model sizes, ``error``.
    solver
        The backend that was asked for.
    start_s
        Wall time of the start heuristic and the bounds computed before the search, seconds.
    skipped
        Why the requested backend did not run (e.g. the start was already within ``rel_gap``);
        empty when it ran.
    x
        The answer as a column vector of the compiled model (None when no model was built).
    _model, _compiled, _row_duals, _values
        Internal: the solved model, its compiled form, the LP duals and the start's values, which
        :meth:`value`, :meth:`dual` and :meth:`reduced_cost` read.
    """

    status: Termination
    limit: Limit
    primal_bound: float | None
    dual_bound: float | None
    gap: float | None
    assignment: np.ndarray | None
    multipliers: dict[str, np.ndarray] = field(default_factory=dict)
    build_s: float = 0.0
    solve_s: float = 0.0
    peak_mem_mb: float = 0.0
    backend: str = ""
    formulation: str = ""
    extra: dict = field(default_factory=dict)
    solver: str = ""
    start_s: float = 0.0
    skipped: str = ""
    x: np.ndarray | None = None
    _model: object = field(default=None, repr=False)
    _compiled: object = field(default=None, repr=False)
    _row_duals: np.ndarray | None = field(default=None, repr=False)
    _values: dict | None = field(default=None, repr=False)

    @property
    def total_s(self) -> float:
        """``start_s + build_s + solve_s``, seconds."""
        return self.start_s + self.build_s + self.solve_s

    @property
    def objective(self) -> float | None:
        """Objective of the returned answer (the same number as :attr:`primal_bound`)."""
        return self.primal_bound

    def summary(self) -> dict:
        """The JSON-ready row ``lloptim compare`` prints (no arrays)."""
        return {"backend": self.backend, "solver": self.solver or self.backend, "status": self.status.value,
                "limit": self.limit.value, "primal_bound": self.primal_bound, "dual_bound": self.dual_bound,
                "gap": self.gap, "start_s": self.start_s, "build_s": self.build_s, "solve_s": self.solve_s,
                "total_s": self.total_s, "peak_mem_mb": self.peak_mem_mb, "formulation": self.formulation,
                "skipped": self.skipped}

    # -- reading values back ----------------------------------------------------------------
    def _resolve_var(self, var):
        model = self._model
        name = var if isinstance(var, str) else getattr(var, "name", None)
        if name is None:
            raise SpecError("var", f"expected a variable or its name, got {type(var).__name__}",
                            "pass the Variable returned by add_variables, or its name")
        if model is None:
            return name, None
        if not isinstance(var, str) and getattr(getattr(var, "model", None), "_lineage", None) != model._lineage:
            raise SpecError("var", f"{name!r} belongs to model {var.model.name!r}, not to the solved model "
                            f"{model.name!r}", "read values with variables of the model that was solved")
        if isinstance(var, str):
            var = model[name]
            if not hasattr(var, "labels"):
                raise SpecError("var", f"{name!r} is a constraint family, not a variable", "use dual() for it")
        return name, var

    def value(self, var):
        """Values of a variable array (or of a linear expression) in the returned answer.

        Parameters
        ----------
        var : Variable or LinearExpression or str
            A variable (or a slice of one) of the solved model, an expression over them, or a
            variable's name.

        Returns
        -------
        numpy.ndarray or float
            Shaped like ``var`` (a float for a scalar), in the variables' own units.

        Raises
        ------
        SpecError
            No answer, or ``var`` is not part of the solved model.
        """
        if not self.status.has_solution:
            raise SpecError("value", f"the solve ended {self.status.value!r} without an answer",
                            "check status before reading values")
        if hasattr(var, "evaluate") and not isinstance(var, str) and not hasattr(var, "labels"):
            if self.x is None or self._compiled is None:
                raise SpecError("value", "expressions are evaluated on a built model's answer", "solve a Model")
            return _scalar(var.evaluate(self._compiled.meta["column_of_label"], self.x))
        name, v = self._resolve_var(var)
        if self.x is None or v is None:
            values = (self._values() if callable(self._values) else self._values) or {}
            if name not in values:
                raise SpecError("value", f"no value of {name!r} in this answer (no model was built)",
                                f"read one of {sorted(values)}" if values else "read assignment instead")
            full = np.asarray(values[name])
            return _scalar(full if v is None else full.reshape(-1)[v.labels - self._model._record(name).start])
        cols = self._compiled.meta["column_of_label"][v.labels]
        if np.any(cols < 0):
            raise SpecError("value", f"variable {name!r} is not part of the solved model",
                            "it was added after, or removed before, the solve")
        values = self.x[cols]
        if self._compiled.integrality[cols].all():
            # integer and binary variables come back as integers (the solvers return whole floats)
            values = np.rint(values).astype(np.int64)
        return _scalar(values)

    def dual(self, name):
        """Duals of a constraint family, shaped like it, in the sensitivity convention.

        The dual of a row is ``d(objective) / d(rhs)``: the change of the optimal objective per
        unit increase of its right-hand side (see the module docstring for the signs).

        Parameters
        ----------
        name : str or ConstraintFamily
            The family (or its name, the group of the compiled model).

        Returns
        -------
        numpy.ndarray or float
            Objective units per right-hand-side unit; shaped like the family (a float for a scalar).

        Raises
        ------
        SpecError
            The solve gave no duals (a MIP, a backend without LP duals, no optimal LP solution),
            or no family has that name.
        """
        name = getattr(name, "name", name)
        if self._row_duals is None:
            why = ("the model has integer variables: solve model.relaxed() for the duals of its LP relaxation"
                   if self._compiled is not None and self._compiled.is_mip else
                   f"the {self.backend or self.solver} solve ended {self.status.value!r} without LP duals")
            raise SpecError("dual", f"no duals: {why}", "solve the LP (relaxation) with highs, cbc or cvxpy")
        groups = self._compiled.con_groups
        if name not in groups:
            raise SpecError("dual", f"no constraint family {name!r}", f"use one of {sorted(groups)}")
        return _scalar(self._row_duals[groups[name]].reshape(self._compiled.group_shape(name)))

    def reduced_cost(self, var):
        """Reduced costs of a variable array, shaped like it: ``d(objective) / d(bound)`` (``c - A^T y``).

        Parameters
        ----------
        var : Variable or str
            A variable (or a slice of one) of the solved model, or a variable's name.

        Returns
        -------
        numpy.ndarray or float
            Objective units per unit of the variable's bound; shaped like ``var``.

        Raises
        ------
        SpecError
            The solve gave no duals, or ``var`` is not part of the solved model.
        """
        if self._row_duals is None:
            self.dual("")  # raises with the reason
        _name, v = self._resolve_var(var)
        lm = self._compiled
        rc = lm.c - lm.A.T @ self._row_duals
        cols = lm.meta["column_of_label"][v.labels]
        if np.any(cols < 0):
            raise SpecError("reduced_cost", f"variable {_name!r} is not part of the solved model",
                            "it was added after, or removed before, the solve")
        return _scalar(rc[cols])


def _scalar(a):
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        a = a.astype(np.float64)
    if a.ndim == 0:
        return int(a) if a.dtype.kind in "iu" else float(a)
    return a
