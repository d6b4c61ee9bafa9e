"""Linear expressions: arrays of ``(coefficient, variable label)`` terms plus a constant.

A :class:`LinearExpression` of shape ``S`` holds three numpy arrays: ``coeffs`` and ``vars`` of
shape ``S + (K,)`` (``K`` terms per entry; label ``-1`` marks an empty term) and ``const`` of shape
``S``. Entry ``i`` reads ``sum_k coeffs[i, k] * x[vars[i, k]] + const[i]``. Every operation is a
numpy operation on these arrays (broadcasting concatenates terms along the last axis, a sum over
an axis moves that axis into the terms), so an expression over 264,000 variables costs a few array
copies and never one Python object per variable (the design of linopy's expressions).

Numbers and numpy arrays combine with expressions by numpy's broadcasting rules; arrays on the
left work too (``w * x``), because expressions opt out of numpy's ufunc machinery
(``__array_ufunc__ = None``). Products of two expressions are rejected: the layer is linear.
Comparisons (``<=``, ``>=``, ``==``) build :class:`~lloptim.formulations.constraints.Constraint`
families.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lloptim.errors import SpecError
from lloptim.formulations.constraints import Constraint
from lloptim.formulations.indexing import (LabelledArray, broadcast_axes, index_axes, normalize_key, resolve_axes,
                                           sel_key)

__all__ = ["LinearExpression", "as_expression"]


def _same_model(a, b):
    """The model two operands belong to (``None`` for constants); refuses two different models."""
    if a is None:
        return b
    if b is None or b is a or getattr(a, "_lineage", None) is getattr(b, "_lineage", 0):
        return a
    raise SpecError("expression", f"combines variables of model {a.name!r} with variables of model {b.name!r}",
                    "build each expression from one model's variables")


def _as_array(value, what: str, allow_inf: bool = False) -> np.ndarray:
    """``value`` as a float64 array; NaN (and, unless ``allow_inf``, infinities) refused by name."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise SpecError(what, f"is not numeric ({type(value).__name__})", "give numbers or numpy arrays") from None
    bad_mask = np.isnan(arr) if allow_inf else ~np.isfinite(arr)
    if bad_mask.any():
        bad = tuple(int(i) for i in np.argwhere(bad_mask)[0]) if arr.ndim else ()
        raise SpecError(what, f"has a {'NaN' if allow_inf else 'non-finite'} entry at index {bad}",
                        "give finite coefficients" + (" and constants" if not allow_inf else ""))
    return arr


def as_expression(value, model=None) -> "LinearExpression":
    """``value`` as a :class:`LinearExpression` (variables, expressions, numbers and arrays).

    Parameters
    ----------
    value : Variable or LinearExpression or array_like
        What to convert; numbers and arrays become constant expressions (no terms).
    model : Model or None
        The model a constant expression is attached to (``None``: none yet).

    Returns
    -------
    LinearExpression
        The expression (``value`` itself when it already is one).

    Raises
    ------
    SpecError
        ``value`` is neither numeric nor a variable or expression, or has non-finite entries.
    """
    if isinstance(value, LinearExpression):
        return value
    to_expr = getattr(value, "to_expr", None)
    if to_expr is not None:
        return to_expr()
    if isinstance(value, (Constraint,)):
        raise SpecError("expression", "a constraint is not an expression", "compare expressions, then add the result")
    if sp.issparse(value):
        raise SpecError("expression", "a sparse matrix cannot be added to an expression",
                        "multiply with @, or convert it with .toarray()")
    const = _as_array(value, "constant", allow_inf=True)
    return LinearExpression(model, np.zeros(const.shape + (0,)), np.zeros(const.shape + (0,), dtype=np.int64), const)


class LinearExpression(LabelledArray):
    """An array of linear expressions over one model's variables (numpy semantics).

    Built from variables (``2 * x + y``, ``x.sum("client")``, ``w @ x``), rarely directly.

    Parameters
    ----------
    model : Model or None
        The model whose variables the labels refer to (``None`` for a constant expression).
    coeffs : numpy.ndarray
        Coefficients, shape ``S + (K,)`` (float64).
    vars : numpy.ndarray
        Variable labels, shape ``S + (K,)`` (int64; ``-1`` for an empty term).
    const : numpy.ndarray
        Constants, shape ``S`` (float64).
    dims : tuple or None
        Axis names (``None`` for unnamed axes; ``None`` altogether: all unnamed).
    coords : dict or None
        Coordinates of named axes.

    Examples
    --------
    >>> import lloptim
    >>> m = lloptim.Model("demo")
    >>> x = m.add_variables("x", shape=(3, 2))
    >>> e = (2 * x).sum(axis=1) + 1
    >>> e.shape, e.nterm
    ((3,), 2)
    """

    __array_ufunc__ = None  # numpy defers to our reflected operators (array * expr, array <= expr)

    def __array__(self, dtype=None, copy=None):
        # an opaque scalar to numpy and scipy: a 0-d object array, so that ``sparse @ expr`` defers
        # to __rmatmul__ instead of iterating over the entries
        out = np.empty((), dtype=object)
        out[()] = self
        return out
    __slots__ = ("model", "coeffs", "vars", "const", "dims", "coords")
    _shape_of = "const"

    def __init__(self, model, coeffs: np.ndarray, vars: np.ndarray, const: np.ndarray, dims: tuple | None = None,
                 coords: dict | None = None) -> None:
        self.model = model
        self.coeffs = coeffs
        self.vars = vars
        self.const = const
        self._label(dims, coords, const.ndim)

    @property
    def nterm(self) -> int:
        """Terms per expression (count, the length of the term axis; some may be empty)."""
        return int(self.vars.shape[-1])

    def __repr__(self) -> str:
        named = ", ".join(f"{d}: {n}" if d else str(n) for d, n in zip(self.dims, self.shape))
        model = f" of model {self.model.name!r}" if self.model is not None else ""
        return f"<LinearExpression ({named}) with {self.nterm} terms each{model}>"

    def __bool__(self) -> bool:
        raise SpecError("expression", "a linear expression has no truth value",
                        "compare it (<=, >=, ==) and add the constraint to a model")

    def to_expr(self) -> "LinearExpression":
        """The expression itself (what variables convert to)."""
        return self

    # -- arithmetic -------------------------------------------------------------------------
    def _combine(self, other, sign: float) -> "LinearExpression":
        o = as_expression(other)
        model = _same_model(self.model, o.model)
        shape, dims, coords = broadcast_axes(self.dims, self.coords, self.shape, o.dims, o.coords, o.shape)
        parts_c, parts_v = [], []
        for e, s in ((self, 1.0), (o, sign)):
            if e.nterm:
                c = np.broadcast_to(e.coeffs, shape + (e.nterm,))
                parts_c.append(c if s == 1.0 else -c)
                parts_v.append(np.broadcast_to(e.vars, shape + (e.nterm,)))
        if len(parts_c) == 2:
            coeffs, labels = np.concatenate(parts_c, axis=-1), np.concatenate(parts_v, axis=-1)
        elif parts_c:
            coeffs, labels = parts_c[0], parts_v[0]
        else:
            coeffs, labels = np.zeros(shape + (0,)), np.zeros(shape + (0,), dtype=np.int64)
        const = np.broadcast_to(self.const + sign * o.const, shape)
        return LinearExpression(model, coeffs, labels, const, dims, coords)

    def __add__(self, other) -> "LinearExpression":
        return self._combine(other, 1.0)

    def __radd__(self, other) -> "LinearExpression":
        return self._combine(other, 1.0)

    def __sub__(self, other) -> "LinearExpression":
        return self._combine(other, -1.0)

    def __rsub__(self, other) -> "LinearExpression":
        return (-self)._combine(other, 1.0)

    def __neg__(self) -> "LinearExpression":
        return LinearExpression(self.model, -self.coeffs, self.vars, -self.const, self.dims, self.coords)

    def __pos__(self) -> "LinearExpression":
        return self

    def _scale(self, factor, divide: bool = False) -> "LinearExpression":
        if isinstance(factor, LinearExpression) or hasattr(factor, "to_expr"):
            raise SpecError("expression", "the product of two expressions is not linear",
                            "multiply expressions by numbers or numpy arrays only")
        if sp.issparse(factor):
            raise SpecError("expression", "elementwise product with a sparse matrix",
                            "use @ for a matrix product, or .toarray()")
        f = _as_array(factor, "factor")
        if divide:
            if np.any(f == 0):
                raise SpecError("divisor", "has a zero entry", "divide by non-zero numbers")
            f = 1.0 / f
        shape, dims, coords = broadcast_axes(self.dims, self.coords, self.shape, (None,) * f.ndim, {}, f.shape)
        coeffs = np.broadcast_to(self.coeffs * f[..., None], shape + (self.nterm,))
        labels = np.broadcast_to(self.vars, shape + (self.nterm,))
        return LinearExpression(self.model, coeffs, labels, np.broadcast_to(self.const * f, shape), dims, coords)

    def __mul__(self, other) -> "LinearExpression":
        return self._scale(other)

    def __rmul__(self, other) -> "LinearExpression":
        return self._scale(other)

    def __truediv__(self, other) -> "LinearExpression":
        return self._scale(other, divide=True)

    def __rtruediv__(self, other):
        raise SpecError("expression", "dividing by an expression is not linear", "divide expressions by numbers")

    def __pow__(self, other):
        raise SpecError("expression", "powers of expressions are not linear", "the modeling layer is linear")

    # -- matrix products --------------------------------------------------------------------
    def __rmatmul__(self, M) -> "LinearExpression":
        """``M @ expr``: ``M`` of shape ``(k, n)`` (dense or scipy sparse), ``expr`` of shape ``(n, ...)``."""
        if self.ndim == 0:
            raise SpecError("expression", "a scalar expression has no axis to multiply by a matrix",
                            "use * for scalars")
        n = self.shape[0]
        if sp.issparse(M):
            if self.ndim != 1:
                raise SpecError("expression", "a sparse matrix multiplies one-dimensional expressions only",
                                "use a dense matrix, or flatten the expression")
            A = sp.csr_matrix(M, dtype=np.float64)
            if A.shape[1] != n:
                raise SpecError("matrix", f"has {A.shape[1]} columns for an expression of length {n}",
                                "give a matrix with one column per entry")
            A.sum_duplicates()
            _as_array(A.data, "matrix")
            k = A.shape[0]
            per_row = np.diff(A.indptr)
            width = int(per_row.max(initial=0))
            slot = np.arange(A.nnz) - np.repeat(A.indptr[:-1], per_row)
            row = np.repeat(np.arange(k), per_row)
            idx = np.full((k, width), -1, dtype=np.int64)
            val = np.zeros((k, width))
            idx[row, slot] = A.indices
            val[row, slot] = A.data
            safe = np.maximum(idx, 0)
            coeffs = (val[:, :, None] * self.coeffs[safe]).reshape(k, width * self.nterm)
            labels = np.where(idx[:, :, None] >= 0, self.vars[safe], -1).reshape(k, width * self.nterm)
            return LinearExpression(self.model, coeffs, labels, A @ self.const)
        A = _as_array(M, "matrix")
        if A.ndim == 1 and A.shape[0] == n and self.ndim <= 2:  # a row vector: (n,) @ (n[, k])
            return (self * A.reshape((n,) + (1,) * (self.ndim - 1))).sum(axis=0)
        if A.ndim != 2 or A.shape[1] != n:
            raise SpecError("matrix", f"has shape {A.shape} for an expression of length {n} along its first axis",
                            "give a (k, n) matrix")
        rest = self.shape[1:]
        ext = (slice(None), slice(None)) + (None,) * (len(rest) + 1)
        coeffs = A[ext] * self.coeffs[None]                                # (k, n, *rest, K)
        labels = np.broadcast_to(self.vars[None], coeffs.shape)
        coeffs = np.moveaxis(coeffs, 1, -2).reshape((A.shape[0],) + rest + (n * self.nterm,))
        labels = np.moveaxis(labels, 1, -2).reshape(coeffs.shape)
        const = np.tensordot(A, self.const, axes=(1, 0))
        return LinearExpression(self.model, coeffs, labels, const, (None,) + self.dims[1:],
                                {d: c for d, c in self.coords.items() if d in self.dims[1:]})

    def __matmul__(self, M) -> "LinearExpression":
        """``expr @ M``: ``expr`` of shape ``(..., n)``, ``M`` of shape ``(n,)`` or ``(n, k)``."""
        if self.ndim == 0:
            raise SpecError("expression", "a scalar expression has no axis to multiply by a matrix",
                            "use * for scalars")
        if sp.issparse(M):
            if self.ndim != 1:
                raise SpecError("expression", "a sparse matrix multiplies one-dimensional expressions only",
                                "use a dense matrix, or flatten the expression")
            return self.__rmatmul__(sp.csr_matrix(M).T)
        B = _as_array(M, "matrix")
        if B.ndim == 1:
            return (self * B).sum(axis=-1)
        moved = LinearExpression(self.model, np.moveaxis(self.coeffs, -2, 0), np.moveaxis(self.vars, -2, 0),
                                 np.moveaxis(self.const, -1, 0), (self.dims[-1],) + self.dims[:-1], self.coords)
        out = moved.__rmatmul__(B.T)
        return LinearExpression(self.model, np.moveaxis(out.coeffs, 0, -2), np.moveaxis(out.vars, 0, -2),
                                np.moveaxis(out.const, 0, -1), out.dims[1:] + (None,), out.coords)

    # -- reductions and reshaping -------------------------------------------------------------
    def sum(self, axis=None) -> "LinearExpression":
        """Sum over ``axis``: an int, an axis name, a tuple of them, or ``None`` (everything).

        Parameters
        ----------
        axis : int or str or tuple or None
            Axes to sum over (names where the axes are named, e.g. ``"client"``).

        Returns
        -------
        LinearExpression
            The sums, with the summed axes removed; their terms are concatenated.
        """
        axes = resolve_axes(self.dims, axis)
        if not axes:
            return self
        nd = self.ndim
        keep = [a for a in range(nd) if a not in axes]
        order = keep + list(axes) + [nd]
        shape = tuple(self.shape[a] for a in keep)
        coeffs = np.transpose(self.coeffs, order).reshape(shape + (-1,))
        labels = np.transpose(self.vars, order).reshape(shape + (-1,))
        dims = tuple(self.dims[a] for a in keep)
        return LinearExpression(self.model, coeffs, labels, self.const.sum(axis=axes), dims,
                                {d: c for d, c in self.coords.items() if d in dims})

    def __getitem__(self, key) -> "LinearExpression":
        k = normalize_key(key, self.ndim)
        const = self.const[k]
        dims, coords = index_axes(self.dims, self.coords, k, np.ndim(const))
        full = k + (slice(None),)
        return LinearExpression(self.model, self.coeffs[full], self.vars[full], np.asarray(const), dims, coords)

    def sel(self, **labels) -> "LinearExpression":
        """Select by coordinate labels: ``e.sel(client=[3, 4])`` (a list keeps the axis, one label drops it).

        Parameters
        ----------
        **labels
            Axis name -> label or sequence of labels (see :func:`~lloptim.formulations.indexing.sel_key`).

        Returns
        -------
        LinearExpression
            The selected entries.
        """
        return self[sel_key(self.dims, self.coords, labels)]

    def shift(self, periods: int = 1, axis=-1) -> "LinearExpression":
        """Entries moved ``periods`` places along ``axis``; the places left empty hold no terms and 0.

        ``q.shift(1, "slot")[r, k]`` is ``q[r, k - 1]`` (and empty for ``k = 0``), the usual way to
        write a recurrence ``q[k] = q[k - 1] + ...`` as one constraint family.

        Parameters
        ----------
        periods : int
            Places to move (positive: towards higher indices).
        axis : int or str
            The axis (a name where axes are named).

        Returns
        -------
        LinearExpression
            Same shape as ``self``.
        """
        (ax,) = resolve_axes(self.dims, axis)
        n = self.shape[ax]
        p = int(periods)
        coeffs = np.zeros_like(self.coeffs)
        labels = np.full_like(self.vars, -1)
        const = np.zeros_like(self.const, dtype=np.float64)
        if abs(p) < n:
            src = [slice(None)] * self.ndim
            dst = [slice(None)] * self.ndim
            src[ax] = slice(0, n - p) if p >= 0 else slice(-p, n)
            dst[ax] = slice(p, n) if p >= 0 else slice(0, n + p)
            coeffs[tuple(dst)] = self.coeffs[tuple(src)]
            labels[tuple(dst)] = self.vars[tuple(src)]
            const[tuple(dst)] = self.const[tuple(src)]
        return LinearExpression(self.model, coeffs, labels, const, self.dims, self.coords)

    def reshape(self, *shape) -> "LinearExpression":
        """The same expressions in another shape (axis names are dropped).

        Parameters
        ----------
        *shape : int
            The new shape (numpy's rules, one ``-1`` allowed).

        Returns
        -------
        LinearExpression
            A reshaped view.
        """
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        const = self.const.reshape(shape)
        return LinearExpression(self.model, self.coeffs.reshape(const.shape + (self.nterm,)),
                                self.vars.reshape(const.shape + (self.nterm,)), const)

    def flatten(self) -> "LinearExpression":
        """The expressions as a one-dimensional array (row-major)."""
        return self.reshape(-1)

    @property
    def T(self) -> "LinearExpression":
        """The transpose (axes reversed, names and coordinates kept)."""
        order = list(range(self.ndim))[::-1]
        return LinearExpression(self.model, np.transpose(self.coeffs, order + [self.ndim]),
                                np.transpose(self.vars, order + [self.ndim]), self.const.T, self.dims[::-1],
                                self.coords)

    # -- comparisons ------------------------------------------------------------------------
    def _compare(self, other, sign: str) -> Constraint:
        if isinstance(other, Constraint):
            raise SpecError("constraint", "chained comparisons (a <= x <= b) are not supported",
                            "write two constraints, or put the bounds on add_variables")
        diff = self - other
        return Constraint(diff.model, diff.coeffs, diff.vars, sign, -np.asarray(diff.const, dtype=np.float64),
                          diff.dims, diff.coords)

    def __le__(self, other) -> Constraint:
        return self._compare(other, "<=")

    def __ge__(self, other) -> Constraint:
        return self._compare(other, ">=")

    def __eq__(self, other) -> Constraint:  # type: ignore[override]
        return self._compare(other, "==")

    __hash__ = None  # type: ignore[assignment]

    def __lt__(self, other):
        raise SpecError("constraint", "strict inequalities (<) are not linear programming constraints",
                        "use <= (with a margin if you need one)")

    __gt__ = __lt__

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, column_of_label: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The expressions' values at a solution.

        Parameters
        ----------
        column_of_label : numpy.ndarray
            Column index of every variable label (``-1`` for a label without a column).
        x : numpy.ndarray
            Values of the columns.

        Returns
        -------
        numpy.ndarray
            Shape :attr:`shape`, float64.
        """
        cols = np.where(self.vars >= 0, column_of_label[np.maximum(self.vars, 0)], -1)
        vals = np.where(cols >= 0, np.asarray(x, dtype=np.float64)[np.maximum(cols, 0)], 0.0)
        return (self.coeffs * vals).sum(axis=-1) + self.const
