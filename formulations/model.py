"""The modeling layer: :class:`Model`, with named variable arrays and constraint families.

>>> import numpy as np, lloptim
>>> w = np.array([3.0, 2.0, 2.0, 1.0])                       # seconds per request
>>> m = lloptim.Model("binpacking")
>>> x = m.add_variables("x", coords={"request": 4, "client": 2}, binary=True)
>>> T = m.add_variables("T")
>>> assign = m.add_constraints("assign", x.sum("client") == 1)
>>> load = m.add_constraints("load", (w[:, None] * x).sum("request") <= T)
>>> m.minimize(T)
>>> res = lloptim.solve(m, solver="highs")
>>> res.status.value, res.primal_bound, res.value(x).sum(axis=1).tolist()
('optimal', 4.0, [1.0, 1.0, 1.0, 1.0])

A model keeps each variable array as a block of consecutive *labels* with bounds and integrality,
each constraint family as arrays of terms and right-hand sides, and one objective. Nothing is
solved or flattened until :meth:`Model.compile` turns it into the matrix form
(:class:`~lloptim.formulations.compiled.LinearModel`) that every backend consumes: one block of
columns per variable array, one group of rows per constraint family, in the order they were added.
:func:`lloptim.solve` does that for you and maps the answers back (``value(x)`` shaped like ``x``,
``dual("load")`` shaped like the family).

The matrix form and its low-level builder stay importable from here for older code
(``from lloptim.formulations.model import LinearModel, ModelBuilder``).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from lloptim.errors import SpecError
from lloptim.formulations.compiled import LinearModel
from lloptim.formulations.constraints import Constraint, ConstraintFamily
from lloptim.formulations.expressions import LinearExpression, as_expression
from lloptim.formulations.indexing import check_coords
from lloptim.formulations.variables import Variable

__all__ = ["Model"]  # LinearModel and ModelBuilder stay importable from here for older code

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def __getattr__(name: str):
    # ``from lloptim.formulations.model import ModelBuilder`` (code written before the modeling layer)
    if name == "ModelBuilder":
        from lloptim.formulations.compiled import ModelBuilder

        return ModelBuilder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
_LINEAGE = itertools.count()


@dataclass(frozen=True)
class _VarRecord:
    """What a model keeps of one variable array (internal)."""

    name: str
    start: int
    shape: tuple
    lower: np.ndarray
    upper: np.ndarray
    integer: bool
    binary: bool
    dims: tuple
    coords: dict

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def labels(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.size, dtype=np.int64).reshape(self.shape)


def _check_name(name, what: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(what, f"name {name!r} is not a valid name",
                        "start with a letter, then letters, digits or '_' (it is written into LP/MPS files)")
    return name


class Model:
    """A linear or mixed-integer model: variable arrays, constraint families and an objective.

    Parameters
    ----------
    name : str
        Name of the model (in reports and LP/MPS files).

    Examples
    --------
    >>> import lloptim
    >>> m = lloptim.Model("toy")
    >>> x = m.add_variables("x", shape=3, upper=1)
    >>> c = m.add_constraints("budget", x.sum() <= 2)
    >>> m.maximize(x @ [1.0, 2.0, 3.0])
    >>> lloptim.solve(m, "highs").primal_bound
    5.0
    """

    def __init__(self, name: str = "model") -> None:
        if not isinstance(name, str) or not name.strip() or any(ch.isspace() for ch in name):
            raise SpecError("name", f"model name {name!r} must be a non-empty string without spaces",
                            "give e.g. Model('binpacking')")
        self.name = name
        self._vars: dict[str, _VarRecord] = {}
        self._cons: dict[str, ConstraintFamily] = {}
        self._obj: LinearExpression | None = None
        self._sense = "min"
        self._counter = [0]  # next free label, shared with copies: labels never collide in a lineage
        self._relaxed = False
        self._lineage = next(_LINEAGE)
        self._compiled: LinearModel | None = None
        self.meta: dict = {}

    # -- contents ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        n = sum(r.size for r in self._vars.values())
        rows = sum(c.size for c in self._cons.values())
        kind = "LP" if self._relaxed or not any(r.integer for r in self._vars.values()) else "MIP"
        return (f"<Model {self.name!r}: {kind}, {len(self._vars)} variable arrays ({n:,} variables), "
                f"{len(self._cons)} constraint families ({rows:,} rows), {self._sense}imize>")

    @property
    def variables(self) -> dict[str, Variable]:
        """Every variable array by name, in the order added."""
        return {n: self._variable(r) for n, r in self._vars.items()}

    @property
    def constraints(self) -> dict[str, ConstraintFamily]:
        """Every constraint family by name, in the order added."""
        return dict(self._cons)

    @property
    def objective(self) -> LinearExpression | None:
        """The objective expression (scalar), or None before :meth:`minimize`/:meth:`maximize`."""
        return self._obj

    @property
    def sense(self) -> str:
        """``"min"`` or ``"max"``."""
        return self._sense

    @property
    def is_mip(self) -> bool:
        """Whether the model has integer variables (False for a :meth:`relaxed` copy)."""
        return not self._relaxed and any(r.integer for r in self._vars.values())

    def __getitem__(self, name: str):
        """The variable array or constraint family called ``name``."""
        if name in self._vars:
            return self._variable(self._vars[name])
        if name in self._cons:
            return self._cons[name]
        raise SpecError("name", f"model {self.name!r} has no variable or constraint {name!r}",
                        f"use one of {sorted(self._vars) + sorted(self._cons)}")

    def __contains__(self, name: str) -> bool:
        return name in self._vars or name in self._cons

    def _variable(self, rec: _VarRecord) -> Variable:
        return Variable(self, rec.name, rec.labels(), rec.dims, rec.coords)

    def _record(self, name: str) -> _VarRecord:
        if name not in self._vars:
            raise SpecError("variable", f"{name!r} is not (or no longer) a variable of model {self.name!r}",
                            f"use one of {sorted(self._vars)}")
        return self._vars[name]

    def _bounds_of(self, var: Variable) -> tuple[np.ndarray, np.ndarray]:
        rec = self._record(var.name)
        local = var.labels - rec.start
        return rec.lower[local], rec.upper[local]

    def _changed(self) -> None:
        self._compiled = None

    # -- building ---------------------------------------------------------------------------
    def add_variables(self, name: str, shape=None, lower=0.0, upper=np.inf, binary: bool = False,
                      integer: bool = False, coords: dict | None = None) -> Variable:
        """Add an array of variables and return it.

        Parameters
        ----------
        name : str
            Name of the array (letters, digits and ``_``, starting with a letter; unique in the
            model).
        shape : int or tuple or None
            Shape of the array; ``None`` or ``()`` gives one scalar variable, unless ``coords``
            gives the shape.
        lower, upper : float or array_like
            Bounds, scalars or arrays broadcastable to ``shape`` (``-inf``/``inf`` for none), in
            the variables' own units. Defaults: ``0`` and ``inf``.
        binary : bool
            0/1 variables (bounds must be left at their defaults).
        integer : bool
            Integer variables with the given bounds.
        coords : dict or None
            Axis name -> labels (or an int length) per axis, in order, e.g.
            ``{"request": request_ids, "client": 40}``: names let ``x.sum("client")`` and
            ``x.sel(request=...)`` say what they mean.

        Returns
        -------
        Variable
            The new variables, shaped ``shape``.

        Raises
        ------
        SpecError
            A bad or repeated name, a shape that disagrees with ``coords``, bounds that do not
            broadcast, are NaN, or have ``lower > upper`` (the first offending index is named),
            or ``binary`` with custom bounds or together with ``integer``.
        """
        _check_name(name, "variable")
        if name in self:
            raise SpecError(f"variable {name!r}", "is already a variable or constraint of this model",
                            "give each variable array and constraint family its own name")
        if shape is None:
            shape = ()
        elif isinstance(shape, (int, np.integer)):
            shape = (int(shape),)
        try:
            shape = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise SpecError(f"{name}.shape", f"must be an int or a tuple of ints, got {shape!r}",
                            "give e.g. shape=(1319, 40)") from None
        if any(s < 0 for s in shape):
            raise SpecError(f"{name}.shape", f"has a negative length: {shape}", "give non-negative lengths")
        shape, dims, cds = check_coords(shape if (shape or coords is None) else None, coords)
        if binary:
            if integer:
                raise SpecError(f"{name}", "is binary and integer at once", "give binary=True or integer=True")
            if not (np.all(np.asarray(lower) == 0) and np.all(np.asarray(upper) == np.inf)):
                raise SpecError(f"{name}", "binary variables take no bounds", "leave lower/upper out, or use integer=True")
            lower, upper = 0.0, 1.0
        size = int(np.prod(shape, dtype=np.int64))
        bounds = []
        for what, b in (("lower", lower), ("upper", upper)):
            try:
                arr = np.broadcast_to(np.asarray(b, dtype=np.float64), shape).reshape(size).copy()
            except (ValueError, TypeError):
                raise SpecError(f"{name}.{what}", f"of shape {np.shape(b)} does not broadcast to {shape}",
                                "give a scalar or an array of the variable's shape") from None
            if np.isnan(arr).any():
                raise SpecError(f"{name}.{what}", "has a NaN bound", "give numbers (-inf/inf for none)")
            bounds.append(arr)
        bad = np.flatnonzero(bounds[0] > bounds[1])
        if bad.size:
            at = np.unravel_index(int(bad[0]), shape) if shape else ()
            raise SpecError(f"{name}{list(int(i) for i in at) if shape else ''}",
                            f"has lower bound {bounds[0][bad[0]]} above upper bound {bounds[1][bad[0]]}",
                            "give lower <= upper")
        rec = _VarRecord(name, self._counter[0], shape, bounds[0], bounds[1], bool(binary or integer), bool(binary),
                         dims, cds)
        self._counter[0] += size
        self._vars[name] = rec
        self._changed()
        return self._variable(rec)

    def add_constraints(self, name: str, constraint: Constraint) -> ConstraintFamily:
        """Add a family of constraints (one row per entry of ``constraint``) under ``name``.

        Parameters
        ----------
        name : str
            Name of the family (letters, digits and ``_``, starting with a letter; unique in the
            model): the key of :meth:`~lloptim.solvers.SolveResult.dual`.
        constraint : Constraint
            A comparison of expressions, e.g. ``x.sum("client") == 1``.

        Returns
        -------
        ConstraintFamily
            The family as the model keeps it.

        Raises
        ------
        SpecError
            A bad or repeated name, something that is not a comparison (e.g. a plain ``bool``,
            from comparing two numbers), variables of another model, or a meaningless right-hand
            side (NaN, infinite on an equality).
        """
        _check_name(name, "constraint")
        if name in self:
            raise SpecError(f"constraint {name!r}", "is already a variable or constraint of this model",
                            "give each variable array and constraint family its own name")
        if not isinstance(constraint, Constraint):
            raise SpecError(f"constraint {name!r}", f"is a {type(constraint).__name__}, not a comparison of "
                            "expressions", "write e.g. x.sum('client') == 1 with at least one variable")
        if constraint.model is not None and constraint.model._lineage != self._lineage:
            raise SpecError(f"constraint {name!r}", f"uses variables of model {constraint.model.name!r}",
                            f"build it from variables of model {self.name!r}")
        constraint.check(name)
        fam = ConstraintFamily(self, name, constraint)
        self._cons[name] = fam
        self._changed()
        return fam

    def remove(self, name: str) -> None:
        """Remove the variable array or constraint family called ``name``.

        Removing variables also removes their terms from every constraint and the objective
        (the rows stay, without those terms); their labels are never reused.

        Parameters
        ----------
        name : str
            Name of a variable array or constraint family.

        Raises
        ------
        SpecError
            No such name.
        """
        if name in self._vars:
            del self._vars[name]
        elif name in self._cons:
            del self._cons[name]
        else:
            raise SpecError("name", f"model {self.name!r} has no variable or constraint {name!r}",
                            f"use one of {sorted(self._vars) + sorted(self._cons)}")
        self._changed()

    def _set_objective(self, expr, sense: str) -> None:
        e = as_expression(expr, self)
        if e.model is not None and e.model._lineage != self._lineage:
            raise SpecError("objective", f"uses variables of model {e.model.name!r}",
                            f"build it from variables of model {self.name!r}")
        if not np.isfinite(e.const).all():
            raise SpecError("objective", "has an infinite constant", "give a finite constant")
        if e.ndim:
            e = e.sum()
        self._obj = e
        self._sense = sense
        self._changed()

    def minimize(self, expr) -> None:
        """Make ``expr`` the objective, minimized (an array expression is summed).

        Parameters
        ----------
        expr : Variable or LinearExpression or float
            The objective.
        """
        self._set_objective(expr, "min")

    def maximize(self, expr) -> None:
        """Make ``expr`` the objective, maximized (an array expression is summed).

        Parameters
        ----------
        expr : Variable or LinearExpression or float
            The objective.
        """
        self._set_objective(expr, "max")

    def copy(self) -> "Model":
        """A copy that can be changed independently; variables of either work with results of both."""
        other = Model.__new__(Model)
        other.__dict__.update(self.__dict__)
        other._vars = dict(self._vars)
        other._cons = dict(self._cons)
        other.meta = dict(self.meta)
        other._compiled = None
        return other

    def relaxed(self) -> "Model":
        """The LP relaxation: a copy with every variable continuous (binaries keep ``[0, 1]``)."""
        other = self.copy()
        other._relaxed = True
        other.name = f"{self.name}-lp" if not self.name.endswith("-lp") else self.name
        return other

    # -- compiling ---------------------------------------------------------------------------
    def column_of_label(self) -> np.ndarray:
        """The compiled column of every label ever allocated (``-1`` for removed variables)."""
        colmap = np.full(self._counter[0], -1, dtype=np.int64)
        col = 0
        for rec in self._vars.values():
            colmap[rec.start:rec.start + rec.size] = np.arange(col, col + rec.size)
            col += rec.size
        return colmap

    def compile(self) -> LinearModel:
        """The matrix form of the model, what the backends consume (cached until the model changes).

        Returns
        -------
        LinearModel
            Columns in the order the variable arrays were added (each a block named like the
            array, row-major), rows in the order the constraint families were added (each a group
            named like the family); ``var_shapes``/``con_shapes`` record the array shapes and
            ``meta["column_of_label"]`` maps labels to columns.

        Raises
        ------
        SpecError
            The model has no variables.
        """
        if self._compiled is not None:
            return self._compiled
        if not self._vars:
            raise SpecError("model", f"{self.name!r} has no variables", "add variables before solving")
        colmap = self.column_of_label()
        n_cols = int(sum(r.size for r in self._vars.values()))
        blocks, shapes, lo, hi, integ = {}, {}, [], [], []
        col = 0
        for rec in self._vars.values():
            blocks[rec.name] = slice(col, col + rec.size)
            shapes[rec.name] = rec.shape
            lo.append(rec.lower)
            hi.append(rec.upper)
            integ.append(np.full(rec.size, rec.integer and not self._relaxed))
            col += rec.size
        rows, cols, vals, row_lo, row_hi = [], [], [], [], []
        groups, gshapes, base = {}, {}, 0
        for name, fam in self._cons.items():
            c = fam.constraint
            n, K = c.size, c.vars.shape[-1]
            if K:
                v = np.ascontiguousarray(c.vars).reshape(-1)
                cf = np.ascontiguousarray(c.coeffs).reshape(-1)
                cc = np.where(v >= 0, colmap[np.maximum(v, 0)], -1)
                keep = (cc >= 0) & (cf != 0)
                rows.append(np.repeat(np.arange(base, base + n, dtype=np.int64), K)[keep])
                cols.append(cc[keep])
                vals.append(cf[keep])
            rhs = c.rhs.reshape(-1)
            row_lo.append(rhs if c.sign in (">=", "==") else np.full(n, -np.inf))
            row_hi.append(rhs if c.sign in ("<=", "==") else np.full(n, np.inf))
            groups[name] = slice(base, base + n)
            gshapes[name] = c.shape
            base += n
        cat = (lambda parts, dt: np.concatenate(parts).astype(dt, copy=False) if parts else np.zeros(0, dtype=dt))
        A = sp.csr_matrix((cat(vals, np.float64), (cat(rows, np.int64), cat(cols, np.int64))), shape=(base, n_cols))
        A.sum_duplicates()
        A.eliminate_zeros()
        cost, offset = np.zeros(n_cols), 0.0
        if self._obj is not None:
            v = self._obj.vars.reshape(-1)
            cf = self._obj.coeffs.reshape(-1)
            cc = np.where(v >= 0, colmap[np.maximum(v, 0)], -1)
            keep = cc >= 0
            cost = np.bincount(cc[keep], weights=cf[keep], minlength=n_cols).astype(np.float64)
            offset = float(self._obj.const)
        meta = dict(self.meta)
        meta["column_of_label"] = colmap
        self._compiled = LinearModel(self.name, cost, A, cat(row_lo, np.float64), cat(row_hi, np.float64),
                                     cat(lo, np.float64), cat(hi, np.float64), cat(integ, bool), blocks, groups,
                                     self._sense, offset, meta, shapes, gshapes)
        return self._compiled

    def start_vector(self, values: dict) -> np.ndarray:
        """A column vector of the compiled model from values per variable array (e.g. a MIP start).

        Parameters
        ----------
        values : dict
            Variable name (or :class:`Variable`) -> values, shaped like the variable array.
            Arrays not given take their lower bound where finite, else 0 (clipped to the upper
            bound).

        Returns
        -------
        numpy.ndarray
            One value per column of :meth:`compile`'s model.

        Raises
        ------
        SpecError
            An unknown name or values of the wrong shape.
        """
        lm = self.compile()
        x = np.clip(np.where(np.isfinite(lm.col_lo), lm.col_lo, 0.0), lm.col_lo, lm.col_hi)
        for key, val in values.items():
            name = key.name if isinstance(key, Variable) else key
            rec = self._record(name)
            try:
                arr = np.broadcast_to(np.asarray(val, dtype=np.float64), rec.shape).reshape(-1)
            except ValueError:
                raise SpecError(f"start.{name}", f"has shape {np.shape(val)} for a variable of shape {rec.shape}",
                                "give one value per variable") from None
            x[lm.var_blocks[name]] = arr
        return x

    # -- files ------------------------------------------------------------------------------
    def to_lp(self, path) -> Path:
        """Write the model in CPLEX LP format (readable by HiGHS, CBC, Gurobi, CPLEX...).

        Parameters
        ----------
        path : str or pathlib.Path
            Output file.

        Returns
        -------
        pathlib.Path
            The file written.
        """
        from lloptim.formulations.io import write_lp

        return write_lp(self.compile(), path)

    def to_mps(self, path) -> Path:
        """Write the model in free MPS format (readable by HiGHS, CBC, Gurobi, CPLEX...).

        Parameters
        ----------
        path : str or pathlib.Path
            Output file.

        Returns
        -------
        pathlib.Path
            The file written.
        """
        from lloptim.formulations.io import write_mps

        return write_mps(self.compile(), path)
