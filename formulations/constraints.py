"""Constraint families: arrays of linear rows ``lhs (<=, >=, ==) rhs`` built by comparing expressions.

A comparison such as ``x.sum("client") == 1`` gives a :class:`Constraint`: one row per entry of
the broadcast shape, the variable terms on the left (``coeffs``/``vars`` of shape ``S + (K,)``),
every constant moved to the right (``rhs`` of shape ``S``). It belongs to no model until
:meth:`lloptim.Model.add_constraints` names it; the model then keeps it as a
:class:`ConstraintFamily`, the unit that duals are reported for
(:meth:`lloptim.solvers.SolveResult.dual`).
"""

from __future__ import annotations

import numpy as np

from lloptim.errors import SpecError

__all__ = ["Constraint", "ConstraintFamily", "SIGNS"]

#: The comparison signs a constraint family can have.
SIGNS = ("<=", ">=", "==")


class Constraint:
    """An unnamed family of linear constraints ``sum_k coeffs[..., k] x[vars[..., k]] (sign) rhs``.

    Made by comparing expressions, variables, numbers and arrays; add it to a model with
    :meth:`~lloptim.formulations.model.Model.add_constraints`.

    Parameters
    ----------
    model : Model or None
        The model whose variables the labels refer to.
    coeffs : numpy.ndarray
        Coefficients, shape ``S + (K,)``.
    vars : numpy.ndarray
        Variable labels, shape ``S + (K,)`` (``-1`` for an empty term).
    sign : str
        ``"<="``, ``">="`` or ``"=="``.
    rhs : numpy.ndarray
        Right-hand sides, shape ``S`` (same unit as the left-hand side).
    dims : tuple or None
        Axis names.
    coords : dict or None
        Coordinates of named axes.
    """

    __slots__ = ("model", "coeffs", "vars", "sign", "rhs", "dims", "coords")

    def __init__(self, model, coeffs: np.ndarray, vars: np.ndarray, sign: str, rhs: np.ndarray,
                 dims: tuple | None = None, coords: dict | None = None) -> None:
        if sign not in SIGNS:
            raise SpecError("sign", f"unknown comparison {sign!r}", f"use one of {list(SIGNS)}")
        self.model = model
        self.coeffs = coeffs
        self.vars = vars
        self.sign = sign
        self.rhs = np.asarray(rhs, dtype=np.float64)
        self.dims = tuple(dims) if dims is not None else (None,) * self.rhs.ndim
        self.coords = dict(coords or {})

    @property
    def shape(self) -> tuple:
        """Shape of the family (one row per entry)."""
        return self.rhs.shape

    @property
    def size(self) -> int:
        """Number of rows (count)."""
        return int(self.rhs.size)

    def __bool__(self) -> bool:
        raise SpecError("constraint", "a constraint has no truth value (chained comparisons such as "
                        "0 <= x <= 1 are not supported)",
                        "write two constraints, or put bounds on add_variables")

    def __repr__(self) -> str:
        named = ", ".join(f"{d}: {n}" if d else str(n) for d, n in zip(self.dims, self.shape))
        return f"<Constraint ({named}) lhs {self.sign} rhs, {self.vars.shape[-1]} terms per row>"

    def check(self, name: str) -> None:
        """Refuse a right-hand side that makes the family meaningless, naming the first bad row.

        Parameters
        ----------
        name : str
            The family's name, for the message.

        Raises
        ------
        SpecError
            A NaN right-hand side, an infinite one on an equality, ``<= -inf`` or ``>= +inf``.
        """
        rhs = self.rhs
        bad = np.isnan(rhs)
        if self.sign == "==":
            bad |= np.isinf(rhs)
        elif self.sign == "<=":
            bad |= rhs == -np.inf
        else:
            bad |= rhs == np.inf
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0]) if rhs.ndim else ()
            raise SpecError(f"{name}{list(at) if at else ''}", f"has right-hand side {rhs[at]} with {self.sign}",
                            "give finite right-hand sides (an infinite one only where it leaves the row free)")


class ConstraintFamily:
    """A named constraint family of a model (what :meth:`Model.add_constraints` returns).

    Parameters
    ----------
    model : Model
        The model it belongs to.
    name : str
        Its name: the key of :meth:`~lloptim.solvers.SolveResult.dual` and the row group of the
        compiled model.
    constraint : Constraint
        The rows.
    """

    __slots__ = ("model", "name", "constraint")

    def __init__(self, model, name: str, constraint: Constraint) -> None:
        self.model = model
        self.name = name
        self.constraint = constraint

    @property
    def shape(self) -> tuple:
        """Shape of the family (one row per entry)."""
        return self.constraint.shape

    @property
    def size(self) -> int:
        """Number of rows (count)."""
        return self.constraint.size

    @property
    def sign(self) -> str:
        """``"<="``, ``">="`` or ``"=="``."""
        return self.constraint.sign

    @property
    def rhs(self) -> np.ndarray:
        """Right-hand sides, shaped like the family."""
        return self.constraint.rhs

    @property
    def dims(self) -> tuple:
        """Axis names of the family."""
        return self.constraint.dims

    @property
    def coords(self) -> dict:
        """Coordinates of its named axes."""
        return self.constraint.coords

    def __repr__(self) -> str:
        named = ", ".join(f"{d}: {n}" if d else str(n) for d, n in zip(self.dims, self.shape))
        return f"<ConstraintFamily {self.name!r} ({named}) {self.sign} of model {self.model.name!r}>"
