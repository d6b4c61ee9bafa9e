"""The compiled (matrix) form of a model: what every MIP/LP backend consumes.

A :class:`LinearModel` is plain arrays (in the spirit of OR-Tools MathOpt's model protos and
linopy's matrix view): a cost vector, one sparse constraint matrix with two-sided row bounds,
column bounds and integrality. Variables come in named *blocks* (contiguous column slices) and
constraints in named *groups* (contiguous row slices), so a backend can address a whole family at
once, e.g. drop the ``"load"`` group for a Lagrangian relaxation, without per-variable Python
objects.

Models are written with :class:`lloptim.Model` (:mod:`lloptim.formulations.model`), which
compiles to a :class:`LinearModel` with :meth:`~lloptim.formulations.model.Model.compile`.
:class:`ModelBuilder`, which takes each group as COO triplets in *block-local* indices, is the
low-level path kept for code written before the modeling layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from lloptim.errors import SpecError

__all__ = ["LinearModel", "ModelBuilder"]

INF = np.inf


@dataclass(frozen=True, eq=False)
class LinearModel:
    """``min (or max) c @ x + offset`` s.t. ``row_lo <= A @ x <= row_hi``, ``col_lo <= x <= col_hi``.

    Attributes
    ----------
    name
        Name of the formulation (``"binpacking"``, ``"full_mip"``...).
    c
        Objective coefficients, one per column (float64). Units are the formulation's (seconds for
        every lloptim formulation).
    A
        Constraint matrix, ``scipy.sparse.csr_matrix`` of shape ``(n_rows, n_cols)``.
    row_lo, row_hi
        Row bounds (``-inf``/``inf`` where absent); equal for an equality row.
    col_lo, col_hi
        Column bounds.
    integrality
        ``True`` for integer columns (binaries are integer columns with bounds ``[0, 1]``).
    var_blocks
        Block name -> column slice.
    con_groups
        Group name -> row slice.
    sense
        ``"min"`` or ``"max"``.
    offset
        Constant added to the objective.
    meta
        Formulation-specific data (shapes, the data the model was built from).
    var_shapes
        Block name -> shape of the variable array it holds (row-major in the block's columns);
        a block missing here is one-dimensional.
    con_shapes
        Group name -> shape of the constraint family it holds (row-major in the group's rows); a
        group missing here is one-dimensional.
    """

    name: str
    c: np.ndarray
    A: sp.csr_matrix
    row_lo: np.ndarray
    row_hi: np.ndarray
    col_lo: np.ndarray
    col_hi: np.ndarray
    integrality: np.ndarray
    var_blocks: dict[str, slice]
    con_groups: dict[str, slice]
    sense: str = "min"
    offset: float = 0.0
    meta: dict = field(default_factory=dict)
    var_shapes: dict[str, tuple] = field(default_factory=dict)
    con_shapes: dict[str, tuple] = field(default_factory=dict)

    @property
    def n_cols(self) -> int:
        """Number of variables."""
        return int(self.c.size)

    @property
    def n_rows(self) -> int:
        """Number of constraints."""
        return int(self.A.shape[0])

    @property
    def n_integer(self) -> int:
        """Number of integer (incl. binary) variables."""
        return int(self.integrality.sum())

    @property
    def nnz(self) -> int:
        """Non-zeros of the constraint matrix."""
        return int(self.A.nnz)

    @property
    def is_mip(self) -> bool:
        """Whether any column is integer."""
        return bool(self.integrality.any())

    def csc(self) -> sp.csc_matrix:
        """The constraint matrix in compressed-column form (what HiGHS and CBC load fastest)."""
        return self.A.tocsc()

    def block(self, x: np.ndarray, name: str) -> np.ndarray:
        """The values of block ``name`` in the full column vector ``x``.

        Parameters
        ----------
        x : numpy.ndarray
            Full column vector of the model, one value per column (length :attr:`n_cols`), in the
            columns' own units (e.g. 0/1 for binaries, seconds for a makespan column).
        name : str
            Block name, a key of :attr:`var_blocks`.

        Returns
        -------
        numpy.ndarray
            The entries of ``x`` in the block's column slice (a view when ``x`` is an array).

        Raises
        ------
        KeyError
            ``name`` is not a block of the model.
        """
        return np.asarray(x)[self.var_blocks[name]]

    def group(self, name: str) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        """Rows of group ``name``: ``(A_g, lo_g, hi_g)``."""
        sl = self.con_groups[name]
        return self.A[sl], self.row_lo[sl], self.row_hi[sl]

    def objective(self, x: np.ndarray) -> float:
        """Objective value of the column vector ``x``."""
        return float(self.c @ np.asarray(x, dtype=np.float64) + self.offset)

    def max_violation(self, x: np.ndarray) -> float:
        """Largest violation of a row bound, column bound or integrality by ``x`` (0 when feasible)."""
        x = np.asarray(x, dtype=np.float64)
        ax = self.A @ x
        viol = [np.max(self.row_lo - ax, initial=0.0), np.max(ax - self.row_hi, initial=0.0),
                np.max(self.col_lo - x, initial=0.0), np.max(x - self.col_hi, initial=0.0)]
        xi = x[self.integrality]
        viol.append(float(np.max(np.abs(xi - np.round(xi)), initial=0.0)))
        return float(max(viol))

    def without_groups(self, *names: str) -> "LinearModel":
        """A copy with the row groups ``names`` removed (e.g. the coupling rows a Lagrangian relaxes)."""
        unknown = [n for n in names if n not in self.con_groups]
        if unknown:
            raise SpecError("con_groups", f"unknown constraint group {unknown[0]!r}",
                            f"use one of {sorted(self.con_groups)}")
        keep = np.ones(self.n_rows, dtype=bool)
        for n in names:
            keep[self.con_groups[n]] = False
        groups, start = {}, 0
        for g, sl in sorted(self.con_groups.items(), key=lambda kv: kv[1].start):
            if g in names:
                continue
            size = sl.stop - sl.start
            groups[g] = slice(start, start + size)
            start += size
        return replace(self, A=self.A[keep], row_lo=self.row_lo[keep], row_hi=self.row_hi[keep], con_groups=groups,
                       con_shapes={g: s for g, s in self.con_shapes.items() if g in groups})

    def relaxed(self) -> "LinearModel":
        """The LP relaxation: same model, every column continuous."""
        return replace(self, integrality=np.zeros(self.n_cols, dtype=bool), name=f"{self.name}-lp")

    def with_col_bounds(self, block: str, lo=None, hi=None) -> "LinearModel":
        """A copy with new bounds on every column of ``block`` (scalars or arrays).

        Parameters
        ----------
        block : str
            Block name, a key of :attr:`var_blocks`.
        lo : float or numpy.ndarray or None
            New lower bound(s) of the block's columns, in the columns' units (seconds for a
            makespan column): a scalar for all of them or one value per column; ``None`` keeps the
            current lower bounds.
        hi : float or numpy.ndarray or None
            New upper bound(s), same form and units as ``lo``; ``None`` keeps the current upper
            bounds.

        Returns
        -------
        LinearModel
            A new model; ``self`` is unchanged.
        """
        col_lo, col_hi = self.col_lo.copy(), self.col_hi.copy()
        sl = self.var_blocks[block]
        if lo is not None:
            col_lo[sl] = lo
        if hi is not None:
            col_hi[sl] = hi
        return replace(self, col_lo=col_lo, col_hi=col_hi)

    def block_shape(self, name: str) -> tuple:
        """Shape of the variable array in block ``name`` (``(size,)`` unless recorded otherwise)."""
        sl = self.var_blocks[name]
        return tuple(self.var_shapes.get(name, (sl.stop - sl.start,)))

    def group_shape(self, name: str) -> tuple:
        """Shape of the constraint family in group ``name`` (``(size,)`` unless recorded otherwise)."""
        sl = self.con_groups[name]
        return tuple(self.con_shapes.get(name, (sl.stop - sl.start,)))

    def col_names(self) -> list[str]:
        """One name per column: ``block(i,j)`` for an array block, the block's name for a scalar.

        These are the names :func:`~lloptim.formulations.io.write_lp` and
        :func:`~lloptim.formulations.io.write_mps` write.
        """
        return _names(self.var_blocks, self.block_shape, self.n_cols, "x")

    def row_names(self) -> list[str]:
        """One name per row, like :meth:`col_names` (``group(i)``, or the group's name for one row)."""
        return _names(self.con_groups, self.group_shape, self.n_rows, "r")

    def summary(self) -> dict:
        """Sizes, for reports: columns, integer columns, rows, non-zeros, blocks and groups."""
        return {"name": self.name, "n_cols": self.n_cols, "n_integer": self.n_integer, "n_rows": self.n_rows,
                "nnz": self.nnz, "blocks": {k: v.stop - v.start for k, v in self.var_blocks.items()},
                "groups": {k: v.stop - v.start for k, v in self.con_groups.items()}}


class ModelBuilder:
    """Assembles a :class:`LinearModel` from vectorized blocks and groups.

    Parameters
    ----------
    name : str
        Name of the formulation, becomes :attr:`LinearModel.name` of the built model.

    Examples
    --------
    >>> b = ModelBuilder("toy")
    >>> x = b.add_block("x", 3, lo=0, hi=1, integer=True)
    >>> rows = b.add_group("pick", blocks={"x": ([0, 0, 0], [0, 1, 2], [1.0, 1.0, 1.0])}, n_rows=1, lo=1, hi=1)
    >>> m = b.build(c=np.array([1.0, 2.0, 3.0]))
    >>> m.A.shape
    (1, 3)
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._blocks: dict[str, slice] = {}
        self._lo: list[np.ndarray] = []
        self._hi: list[np.ndarray] = []
        self._int: list[np.ndarray] = []
        self._groups: dict[str, slice] = {}
        self._rows: list[np.ndarray] = []
        self._cols: list[np.ndarray] = []
        self._vals: list[np.ndarray] = []
        self._rlo: list[np.ndarray] = []
        self._rhi: list[np.ndarray] = []
        self.n_cols = 0
        self.n_rows = 0

    def add_block(self, name: str, size: int, lo=0.0, hi=INF, integer: bool = False) -> slice:
        """Add ``size`` columns named ``name`` with bounds ``lo``/``hi`` (scalars or arrays); return their slice.

        Parameters
        ----------
        name : str
            Block name, its key in :attr:`LinearModel.var_blocks`.
        size : int
            Number of columns in the block (count).
        lo : float or numpy.ndarray
            Lower bound(s) of the columns, in the variables' units: a scalar for all or one value per
            column (default ``0``).
        hi : float or numpy.ndarray
            Upper bound(s), same form and units as ``lo`` (default ``inf``: unbounded).
        integer : bool
            Whether the columns are integer (binaries: ``integer=True`` with bounds ``[0, 1]``).

        Returns
        -------
        slice
            The block's columns in the model's column vector.
        """
        sl = slice(self.n_cols, self.n_cols + int(size))
        self._blocks[name] = sl
        self._lo.append(np.broadcast_to(np.asarray(lo, dtype=np.float64), (size,)).copy())
        self._hi.append(np.broadcast_to(np.asarray(hi, dtype=np.float64), (size,)).copy())
        self._int.append(np.full(size, bool(integer)))
        self.n_cols += int(size)
        return sl

    def add_group(self, name: str, n_rows: int, blocks: dict[str, tuple], lo=-INF, hi=INF) -> slice:
        """Add ``n_rows`` constraints named ``name``.

        Parameters
        ----------
        name
            Group name.
        n_rows
            Rows in the group.
        blocks
            Block name -> ``(local_row, local_col, value)`` arrays: the coefficients of that block's
            columns in this group, indices local to the group and to the block. Duplicates are summed.
        lo, hi
            Row bounds (scalars or arrays of ``n_rows``).
        """
        base = self.n_rows
        for bname, (r, c, v) in blocks.items():
            sl = self._blocks[bname]
            r = np.asarray(r, dtype=np.int64)
            c = np.asarray(c, dtype=np.int64)
            v = np.broadcast_to(np.asarray(v, dtype=np.float64), r.shape)
            self._rows.append(r + base)
            self._cols.append(c + sl.start)
            self._vals.append(v)
        self._rlo.append(np.broadcast_to(np.asarray(lo, dtype=np.float64), (n_rows,)).copy())
        self._rhi.append(np.broadcast_to(np.asarray(hi, dtype=np.float64), (n_rows,)).copy())
        sl = slice(base, base + int(n_rows))
        self._groups[name] = sl
        self.n_rows += int(n_rows)
        return sl

    def build(self, c: np.ndarray, sense: str = "min", offset: float = 0.0, meta: dict | None = None) -> LinearModel:
        """The assembled model with objective ``c`` (one coefficient per column).

        Parameters
        ----------
        c : numpy.ndarray
            Objective coefficients, shape ``(n_cols,)`` (float64); the objective's units are the
            formulation's (seconds for every lloptim formulation).
        sense : str
            ``"min"`` (default) or ``"max"``.
        offset : float
            Constant added to the objective, in the objective's units (default 0).
        meta : dict or None
            Formulation-specific data stored (copied) in :attr:`LinearModel.meta`.

        Returns
        -------
        LinearModel
            The model, with every group's coefficients in one CSR matrix (duplicates summed).

        Raises
        ------
        SpecError
            ``c`` does not have one coefficient per column.
        """
        c = np.asarray(c, dtype=np.float64)
        if c.shape != (self.n_cols,):
            raise SpecError("objective", f"has {c.size} coefficients for {self.n_cols} columns",
                            "give one coefficient per column")
        cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dtype=dt))
        A = sp.csr_matrix((cat(self._vals, np.float64), (cat(self._rows, np.int64), cat(self._cols, np.int64))),
                          shape=(self.n_rows, self.n_cols))
        A.sum_duplicates()
        return LinearModel(self.name, c, A, cat(self._rlo, np.float64), cat(self._rhi, np.float64),
                           cat(self._lo, np.float64), cat(self._hi, np.float64), cat(self._int, bool),
                           dict(self._blocks), dict(self._groups), sense, float(offset), dict(meta or {}))


def _names(parts: dict[str, slice], shape_of, total: int, fallback: str) -> list[str]:
    """Names of every column (or row): ``name(i,j)`` by position in its block's shape."""
    out = [f"{fallback}{i}" for i in range(total)]
    for name, sl in parts.items():
        shape = shape_of(name)
        n = sl.stop - sl.start
        if shape == ():
            out[sl.start] = name
            continue
        idx = np.unravel_index(np.arange(n), shape)
        cols = [c.astype(str) for c in idx]
        joined = cols[0]
        for c in cols[1:]:
            joined = np.char.add(np.char.add(joined, ","), c)
        out[sl] = np.char.add(np.char.add(f"{name}(", joined), ")").tolist()
    return out
