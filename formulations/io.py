"""Write a compiled model as an LP (CPLEX format) or free-MPS file, from its arrays.

Names come from :meth:`~lloptim.formulations.compiled.LinearModel.col_names` and
:meth:`~lloptim.formulations.compiled.LinearModel.row_names`: ``x(3,5)`` for entry ``(3, 5)`` of
variable array ``x``, ``load(7)`` for row 7 of the family ``load``, the bare name for a scalar.
The objective row is called ``obj``. Lines are assembled with numpy string operations over the
sparse matrix, so writing the 264k-column bin packing takes about a second.

* LP: ``Minimize``/``Maximize`` (with the objective constant), ``Subject To``, ``Bounds``,
  ``General``, ``Binary``, ``End``. LP has no ranged rows: a row with two different finite bounds
  is written as two rows, ``name#lo`` (``>=``) and ``name#hi`` (``<=``); models built with
  :class:`lloptim.Model` have none.
* MPS (free format): ``OBJSENSE`` (for a maximization), ``ROWS``, ``COLUMNS`` with ``MARKER``
  lines around integer columns, ``RHS`` (the objective constant as minus the objective row's
  right-hand side), ``RANGES``, ``BOUNDS`` (every integer column's bounds written explicitly,
  since readers disagree about the default upper bound of an integer column).

Both read back into HiGHS (``highspy.Highs().readModel(path)``) to the same model; the tests check
the optimum round-trips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lloptim.formulations.compiled import LinearModel

__all__ = ["write_lp", "write_mps", "OBJECTIVE_ROW"]

#: Name of the objective row in the files written.
OBJECTIVE_ROW = "obj"


def _num(values: np.ndarray) -> np.ndarray:
    """Numbers as shortest round-trip strings (``repr`` of float64)."""
    return np.array([repr(float(v)) for v in np.asarray(values, dtype=np.float64).tolist()], dtype=object)


def _terms(coefs: np.ndarray, names: np.ndarray) -> str:
    """``+ 2.0 x(0) - 1.5 y`` from parallel arrays."""
    if coefs.size == 0:
        return ""
    signs = np.where(coefs < 0, "- ", "+ ")
    mags = _num(np.abs(coefs))
    return " ".join((signs.astype(object) + mags + " " + names).tolist())


def write_lp(model: LinearModel, path) -> Path:
    """Write ``model`` in CPLEX LP format.

    Parameters
    ----------
    model : LinearModel
        The compiled model.
    path : str or pathlib.Path
        Output file (overwritten).

    Returns
    -------
    pathlib.Path
        The file written.
    """
    path = Path(path)
    cols = np.array(model.col_names(), dtype=object)
    rows = model.row_names()
    A = model.A.tocsr()
    out = [f"\\ model {model.name}: {model.n_cols} columns, {model.n_rows} rows, written by lloptim",
           "Maximize" if model.sense == "max" else "Minimize"]
    nz = np.flatnonzero(model.c)
    obj = _terms(model.c[nz], cols[nz])
    if model.offset:
        obj = (obj + " " if obj else "") + ("- " if model.offset < 0 else "+ ") + repr(abs(float(model.offset)))
    out.append(f" {OBJECTIVE_ROW}: {obj if obj else '0 ' + cols[0]}")
    out.append("Subject To")
    for i in range(model.n_rows):
        lo, hi = float(model.row_lo[i]), float(model.row_hi[i])
        sl = slice(A.indptr[i], A.indptr[i + 1])
        lhs = _terms(A.data[sl], cols[A.indices[sl]]) or f"0 {cols[0]}"
        if lo == hi:
            out.append(f" {rows[i]}: {lhs} = {lo!r}")
        elif np.isfinite(lo) and np.isfinite(hi):
            out.append(f" {rows[i]}#lo: {lhs} >= {lo!r}")
            out.append(f" {rows[i]}#hi: {lhs} <= {hi!r}")
        elif np.isfinite(hi):
            out.append(f" {rows[i]}: {lhs} <= {hi!r}")
        elif np.isfinite(lo):
            out.append(f" {rows[i]}: {lhs} >= {lo!r}")
        else:
            out.append(f" {rows[i]}: {lhs} >= -inf")
    out.append("Bounds")
    lo, hi = model.col_lo, model.col_hi
    binary = model.integrality & (lo == 0) & (hi == 1)
    for j in np.flatnonzero(~binary & ~((lo == 0) & (hi == np.inf))).tolist():
        name, l, h = cols[j], float(lo[j]), float(hi[j])
        if l == h:
            out.append(f" {name} = {l!r}")
        elif l == -np.inf and h == np.inf:
            out.append(f" {name} free")
        else:
            out.append(f" {'-inf' if l == -np.inf else repr(l)} <= {name} <= {'inf' if h == np.inf else repr(h)}")
    general = np.flatnonzero(model.integrality & ~binary)
    if general.size:
        out.append("General")
        out.extend(" " + n for n in cols[general].tolist())
    if binary.any():
        out.append("Binary")
        out.extend(" " + n for n in cols[binary].tolist())
    out.append("End")
    path.write_text("\n".join(out) + "\n")
    return path


def write_mps(model: LinearModel, path) -> Path:
    """Write ``model`` in free MPS format.

    Parameters
    ----------
    model : LinearModel
        The compiled model.
    path : str or pathlib.Path
        Output file (overwritten).

    Returns
    -------
    pathlib.Path
        The file written.
    """
    path = Path(path)
    cols = np.array(model.col_names(), dtype=object)
    rows = np.array(model.row_names(), dtype=object)
    lo_r, hi_r = model.row_lo, model.row_hi
    out = [f"NAME {model.name}"]
    if model.sense == "max":
        out += ["OBJSENSE", "    MAX"]
    kind = np.where(lo_r == hi_r, "E", np.where(np.isfinite(hi_r), "L", np.where(np.isfinite(lo_r), "G", "N")))
    out.append("ROWS")
    out.append(f" N {OBJECTIVE_ROW}")
    out.extend((" " + kind.astype(object) + " " + rows).tolist())
    out.append("COLUMNS")
    A = model.A.tocsc()
    n = model.n_cols
    per_col = np.diff(A.indptr)
    # every line of the COLUMNS section with a sort key (column, kind): markers, objective, matrix
    col_m = np.repeat(np.arange(n), per_col)
    text_m = "    " + cols[col_m] + " " + rows[A.indices] + " " + _num(A.data)
    obj_cols = np.flatnonzero((model.c != 0) | (per_col == 0))  # a column must appear to exist
    text_o = "    " + cols[obj_cols] + f" {OBJECTIVE_ROW} " + _num(model.c[obj_cols])
    integ = model.integrality.astype(np.int8)
    edges = np.diff(np.r_[0, integ, 0])
    opens, closes = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    text_k = np.r_[np.full(opens.size, "    MARKER 'MARKER' 'INTORG'", dtype=object),
                   np.full(closes.size, "    MARKER 'MARKER' 'INTEND'", dtype=object)]
    key_col = np.r_[np.r_[opens, closes], obj_cols, col_m]
    key_kind = np.r_[np.full(opens.size + closes.size, -1), np.zeros(obj_cols.size, int), np.ones(col_m.size, int)]
    lines = np.r_[text_k, text_o, text_m]
    out.extend(lines[np.lexsort((key_kind, key_col))].tolist())
    out.append("RHS")
    if model.offset:
        out.append(f"    RHS {OBJECTIVE_ROW} {-float(model.offset)!r}")
    rhs = np.where(kind == "G", lo_r, np.where(kind == "N", 0.0, hi_r))
    has = (rhs != 0) & (kind != "N")
    out.extend(("    RHS " + rows[has] + " " + _num(rhs[has])).tolist())
    ranged = (kind == "L") & np.isfinite(lo_r)
    if ranged.any():
        out.append("RANGES")
        out.extend(("    RNG " + rows[ranged] + " " + _num((hi_r - lo_r)[ranged])).tolist())
    out.append("BOUNDS")
    lo, hi, integer = model.col_lo, model.col_hi, model.integrality
    binary = integer & (lo == 0) & (hi == 1)
    fixed = ~binary & (lo == hi)
    free = (lo == -np.inf) & (hi == np.inf)
    rest = ~binary & ~fixed & ~free
    out.extend((" BV BND " + cols[binary]).tolist())
    out.extend((" FX BND " + cols[fixed] + " " + _num(lo[fixed])).tolist())
    out.extend((" FR BND " + cols[free]).tolist())
    m = rest & (lo == -np.inf)
    out.extend((" MI BND " + cols[m]).tolist())
    m = rest & np.isfinite(lo) & ((lo != 0) | integer)
    out.extend((" LO BND " + cols[m] + " " + _num(lo[m])).tolist())
    m = rest & np.isfinite(hi)
    out.extend((" UP BND " + cols[m] + " " + _num(hi[m])).tolist())
    m = rest & integer & (hi == np.inf)
    out.extend((" PL BND " + cols[m]).tolist())
    out.append("ENDATA")
    path.write_text("\n".join(out) + "\n")
    return path
