"""Variable arrays: integer labels into a model's columns, with numpy semantics.

``Model.add_variables("x", shape=(R, C), binary=True)`` reserves ``R * C`` consecutive *labels*
and returns a :class:`Variable` holding them as an ``(R, C)`` int64 array. Indexing a variable
(slices, integers, boolean masks, integer arrays) indexes that array, so ``x[long_prompt][:, 0]``
is again a :class:`Variable`, of the same model and name, over a subset of the labels. Arithmetic
turns variables into :class:`~lloptim.formulations.expressions.LinearExpression` objects; nothing
here ever creates one Python object per variable.
"""

from __future__ import annotations

import numpy as np

from lloptim.formulations.constraints import Constraint
from lloptim.formulations.expressions import LinearExpression
from lloptim.formulations.indexing import LabelledArray, index_axes, normalize_key, sel_key

__all__ = ["Variable"]


class Variable(LabelledArray):
    """An array of decision variables of one model (what :meth:`Model.add_variables` returns).

    Parameters
    ----------
    model : Model
        The model the variables belong to.
    name : str
        The name they were added under (a slice keeps its parent's name).
    labels : numpy.ndarray
        Their labels, int64, in the array's shape.
    dims : tuple or None
        Axis names (``None`` entries for unnamed axes).
    coords : dict or None
        Coordinates of named axes.

    Examples
    --------
    >>> import lloptim
    >>> m = lloptim.Model("demo")
    >>> x = m.add_variables("x", coords={"request": ["a", "b", "c"], "client": 2}, binary=True)
    >>> x.shape, x.dims
    ((3, 2), ('request', 'client'))
    >>> x.sel(request=["a", "c"]).sum("client").shape
    (2,)
    """

    __array_ufunc__ = None

    def __array__(self, dtype=None, copy=None):
        # an opaque scalar to numpy and scipy: a 0-d object array, so that ``sparse @ expr`` defers
        # to __rmatmul__ instead of iterating over the entries
        out = np.empty((), dtype=object)
        out[()] = self
        return out
    __slots__ = ("model", "name", "labels", "dims", "coords")
    _shape_of = "labels"

    def __init__(self, model, name: str, labels: np.ndarray, dims: tuple | None = None,
                 coords: dict | None = None) -> None:
        self.model = model
        self.name = name
        self.labels = labels
        self._label(dims, coords, labels.ndim)

    def __repr__(self) -> str:
        named = ", ".join(f"{d}: {n}" if d else str(n) for d, n in zip(self.dims, self.shape))
        return f"<Variable {self.name!r} ({named}) of model {self.model.name!r}>"

    def __bool__(self) -> bool:
        return self.to_expr().__bool__()

    @property
    def lower(self) -> np.ndarray:
        """Lower bounds, shaped like the array (in the variables' own units)."""
        return self.model._bounds_of(self)[0]

    @property
    def upper(self) -> np.ndarray:
        """Upper bounds, shaped like the array (in the variables' own units)."""
        return self.model._bounds_of(self)[1]

    @property
    def integer(self) -> bool:
        """Whether the variables are integer (binaries included)."""
        return self.model._record(self.name).integer

    def to_expr(self) -> LinearExpression:
        """The variables as a linear expression with one term each (coefficient 1)."""
        shape = self.shape
        return LinearExpression(self.model, np.ones(shape + (1,)), self.labels[..., None], np.zeros(shape),
                                self.dims, self.coords)

    # -- indexing ---------------------------------------------------------------------------
    def __getitem__(self, key) -> "Variable":
        k = normalize_key(key, self.ndim)
        labels = np.asarray(self.labels[k])
        dims, coords = index_axes(self.dims, self.coords, k, labels.ndim)
        return Variable(self.model, self.name, labels, dims, coords)

    def sel(self, **labels) -> "Variable":
        """Select by coordinate labels: ``x.sel(client=[3, 4])`` (a list keeps the axis, a label drops it).

        Parameters
        ----------
        **labels
            Axis name -> label or sequence of labels.

        Returns
        -------
        Variable
            The selected variables.
        """
        return self[sel_key(self.dims, self.coords, labels)]

    def flatten(self) -> "Variable":
        """The variables as a one-dimensional array (row-major; axis names are dropped)."""
        return Variable(self.model, self.name, self.labels.reshape(-1))

    def reshape(self, *shape) -> "Variable":
        """The same variables in another shape (axis names are dropped).

        Parameters
        ----------
        *shape : int
            The new shape (numpy's rules, one ``-1`` allowed).

        Returns
        -------
        Variable
            A reshaped view.
        """
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return Variable(self.model, self.name, self.labels.reshape(shape))

    @property
    def T(self) -> "Variable":
        """The transpose (axes reversed, names and coordinates kept)."""
        return Variable(self.model, self.name, self.labels.T, self.dims[::-1], self.coords)

    # -- everything else goes through the expression ------------------------------------------
    def sum(self, axis=None) -> LinearExpression:
        """Sum over ``axis`` (an int, an axis name, a tuple of them, or ``None`` for all).

        Parameters
        ----------
        axis : int or str or tuple or None
            Axes to sum over.

        Returns
        -------
        LinearExpression
            The sums.
        """
        return self.to_expr().sum(axis)

    def shift(self, periods: int = 1, axis=-1) -> LinearExpression:
        """The variables moved ``periods`` places along ``axis`` (see :meth:`LinearExpression.shift`).

        Parameters
        ----------
        periods : int
            Places to move (positive: towards higher indices).
        axis : int or str
            The axis.

        Returns
        -------
        LinearExpression
            Same shape as the variable; the places left empty hold no terms.
        """
        return self.to_expr().shift(periods, axis)

    def __add__(self, other) -> LinearExpression:
        return self.to_expr() + other

    def __radd__(self, other) -> LinearExpression:
        return other + self.to_expr()

    def __sub__(self, other) -> LinearExpression:
        return self.to_expr() - other

    def __rsub__(self, other) -> LinearExpression:
        return other - self.to_expr()

    def __neg__(self) -> LinearExpression:
        return -self.to_expr()

    def __pos__(self) -> LinearExpression:
        return self.to_expr()

    def __mul__(self, other) -> LinearExpression:
        return self.to_expr() * other

    def __rmul__(self, other) -> LinearExpression:
        return self.to_expr() * other

    def __truediv__(self, other) -> LinearExpression:
        return self.to_expr() / other

    def __rtruediv__(self, other):
        return self.to_expr().__rtruediv__(other)

    def __pow__(self, other):
        return self.to_expr() ** other

    def __matmul__(self, other) -> LinearExpression:
        return self.to_expr() @ other

    def __rmatmul__(self, other) -> LinearExpression:
        return self.to_expr().__rmatmul__(other)

    def __le__(self, other) -> Constraint:
        return self.to_expr() <= other

    def __ge__(self, other) -> Constraint:
        return self.to_expr() >= other

    def __eq__(self, other) -> Constraint:  # type: ignore[override]
        return self.to_expr() == other

    __hash__ = None  # type: ignore[assignment]

    def __lt__(self, other):
        return self.to_expr() < other

    def __gt__(self, other):
        return self.to_expr() > other
