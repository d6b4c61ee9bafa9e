"""COIN-OR CBC, the build that python-mip ships (``pip install lloptim[cbc]``).

**Loading.** python-mip has no matrix loader: its fastest public path still builds one Python
``Var`` per column and one ``LinExpr`` per row (1.0 s and ~100 MiB for the 264k-column bin
packing). CBC's C interface has one, ``Cbc_loadProblem`` (CSC arrays, bounds, costs), so the
compiled model is handed over in a single call through cffi on python-mip's own CBC library
(0.15 s); integrality is set per integer column, the MIP start with ``Cbc_setMIPStartI``
(indices, not names). python-mip's ``Model`` is kept as the carrier of CBC's parameters and of its
``optimize`` (time limit, gap, threads, seed, cuts...), so ``solver_options`` still name
``mip.Model`` attributes.

**Limits.** CBC measures its time limit in CPU seconds unless told otherwise (on a busy machine
a 20 s limit took 25-38 s of wall clock): lloptim switches it to elapsed time
(``INT_PARAM_ELAPSED_TIME``). CBC also checks the limit only between phases (its root cut loop on
the 1319 x 200 bin packing grew to 6 GiB without checking). The search therefore always runs in a
child process (:meth:`CbcBackend.isolated`, :func:`~lloptim.solvers.base.run_backend`), told to
stop slightly before the deadline and killed at it, or as soon as its memory grows past the
allowance; the pipeline then returns its start and bound on time (``limit="time"`` or
``"memory"``).

**Duals.** ``Cbc_getRowPrice`` (python-mip's ``Constr.pi``) is ``d(objective)/d(rhs)`` for
minimization and maximization alike: lloptim's convention, no conversion.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np

from lloptim.errors import SolverError
from lloptim.formulations.compiled import LinearModel
from lloptim.solvers.registry import Backend, Capabilities, Outcome, register_backend
from lloptim.solvers.result import Limit, Termination

__all__ = ["CbcBackend", "CBC_MB_PER_INTEGER", "load_into_cbc"]

#: CBC's memory per integer column, MiB (about 0.037 MiB): at the 264k binaries of a 1319-request x
#: 200-client bin packing its search grew to 4.1 GiB after 10 s, 6.4 GiB after 20 s and 9.6 GiB in
#: longer runs; used by :meth:`CbcBackend.estimate_mem_mb` (the child process is also stopped if it
#: outgrows the allowance while it runs).
CBC_MB_PER_INTEGER = 9.6 * 1024 / 264_000
#: Seconds before the deadline at which CBC is asked to stop, so it can hand its answer back.
STOP_EARLY_S = 0.3
#: CBC's integer parameter that makes its time limit wall-clock time (``INT_PARAM_ELAPSED_TIME``).
INT_PARAM_ELAPSED_TIME = 16

_LOADER = None


def _loader():
    """``Cbc_loadProblem`` of the CBC library python-mip loaded (declared once, here)."""
    global _LOADER
    if _LOADER is None:
        from cffi import FFI

        import mip.cbc as mcbc

        ffi = FFI()
        ffi.cdef("""void Cbc_loadProblem(void *model, const int numcols, const int numrows,
                    const int *start, const int *index, const double *value,
                    const double *collb, const double *colub, const double *obj,
                    const double *rowlb, const double *rowub);""")
        # the same shared object python-mip opened: dlopen returns the loaded library
        lib = ffi.dlopen(mcbc.libfile) if getattr(mcbc, "libfile", "") else None
        if lib is None:
            raise SolverError("cbc: cannot locate python-mip's CBC library (fix: pip install 'mip>=2.0,<2.1')")
        _LOADER = (ffi, lib)
    return _LOADER


def _finite(v: np.ndarray) -> np.ndarray:
    """Infinite bounds as CBC's infinity (``DBL_MAX``)."""
    big = np.finfo(np.float64).max
    return np.ascontiguousarray(np.clip(np.asarray(v, dtype=np.float64), -big, big))


def load_into_cbc(model: LinearModel, x_start: np.ndarray | None = None):
    """A ``mip.Model`` (CBC) holding ``model``, loaded in one ``Cbc_loadProblem`` call.

    Parameters
    ----------
    model : LinearModel
        The compiled model.
    x_start : numpy.ndarray or None
        A column vector to use as the MIP start (every integer column and the non-zero continuous
        ones are passed), or None.

    Returns
    -------
    mip.Model
        The python-mip model; its variables are not Python objects (use the C interface to read
        the solution).
    """
    import mip
    from mip.cbc import cbclib, ffi as mffi

    ffi, lib = _loader()
    m = mip.Model(sense=mip.MINIMIZE, solver_name="CBC")
    m.verbose = 0
    ptr = m.solver._model
    cptr = ffi.cast("void *", int(mffi.cast("uintptr_t", ptr)))
    A = model.csc()
    keep = []

    def buf(ctype: str, arr: np.ndarray):
        keep.append(arr)
        return ffi.cast(f"{ctype} *", ffi.from_buffer(arr))

    lib.Cbc_loadProblem(cptr, model.n_cols, model.n_rows,
                        buf("int", np.ascontiguousarray(A.indptr, dtype=np.int32)),
                        buf("int", np.ascontiguousarray(A.indices, dtype=np.int32)),
                        buf("double", np.ascontiguousarray(A.data, dtype=np.float64)),
                        buf("double", _finite(model.col_lo)), buf("double", _finite(model.col_hi)),
                        buf("double", np.ascontiguousarray(model.c, dtype=np.float64)),
                        buf("double", _finite(model.row_lo)), buf("double", _finite(model.row_hi)))
    cbclib.Cbc_setObjSense(ptr, 1.0 if model.sense == "min" else -1.0)
    for j in np.flatnonzero(model.integrality).tolist():
        cbclib.Cbc_setInteger(ptr, j)
    if x_start is not None:
        xs = np.asarray(x_start, dtype=np.float64)
        idx = np.flatnonzero(model.integrality | (xs != 0)).astype(np.int32)
        vals = np.ascontiguousarray(xs[idx])
        cbclib.Cbc_setMIPStartI(ptr, int(idx.size), mffi.cast("int *", mffi.from_buffer(idx)),
                                mffi.cast("double *", mffi.from_buffer(vals)))
    if cbclib.Cbc_getNumElements(ptr) != model.nnz or cbclib.Cbc_getNumCols(ptr) != model.n_cols:
        raise SolverError("cbc: the model did not load intact (its CBC build may use 64-bit indices)")
    return m


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Silence CBC's C-level printing (its LP path logs whatever the log level) on file descriptor 1."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _cbc_search(model: LinearModel, x_start, params, deadline_at: float | None) -> dict:
    """Load, search and read back (runs in the child process); a picklable dict."""
    with _quiet(not params.verbose):
        return _cbc_search_loud(model, x_start, params, deadline_at)


def _cbc_search_loud(model: LinearModel, x_start, params, deadline_at: float | None) -> dict:
    import mip
    from mip.cbc import cbclib, ffi as mffi

    m = load_into_cbc(model, x_start)
    m.verbose = 1 if params.verbose else 0
    m.seed = int(params.seed)
    if params.threads is not None:
        m.threads = int(params.threads)
    m.max_mip_gap = params.rel_gap
    for k, v in params.backend_options().items():
        setattr(m, k, v)
    ptr = m.solver._model
    # CBC counts CPU seconds unless told otherwise: on a busy machine that is far less than the
    # wall-clock seconds a time limit means
    cbclib.Cbc_setIntParam(ptr, INT_PARAM_ELAPSED_TIME, 1)
    left = mip.INF if deadline_at is None else max(0.05, deadline_at - time.perf_counter() - STOP_EARLY_S)
    status = m.optimize(max_seconds=left)
    x = None
    if m.num_solutions > 0:
        sol = cbclib.Cbc_getColSolution(ptr)
        if sol != mffi.NULL:
            x = np.frombuffer(mffi.buffer(sol, 8 * model.n_cols), dtype=np.float64).copy()
    duals = None
    if not model.is_mip and status == mip.OptimizationStatus.OPTIMAL:
        pi = cbclib.Cbc_getRowPrice(ptr)
        if pi != mffi.NULL and model.n_rows:
            duals = np.frombuffer(mffi.buffer(pi, 8 * model.n_rows), dtype=np.float64).copy()
        elif not model.n_rows:
            duals = np.zeros(0)
    bound = m.objective_bound
    obj = m.objective_value if x is not None else None
    return {"status": status.name, "x": x, "bound": None if bound is None else float(bound) + model.offset,
            "objective": None if obj is None else float(obj) + model.offset, "duals": duals}


class CbcBackend(Backend):
    """CBC branch and cut (python-mip's build), loaded in one C call, searched in a child process."""

    name = "cbc"
    description = "COIN-OR CBC via python-mip's library (one Cbc_loadProblem call, MIP start, LP duals, hard limits)"
    capabilities = Capabilities(supports_mip=True, supports_lp_duals=True, supports_time_limit=True,
                                supports_mip_start=True, needs_package="mip", pip_extra="cbc")
    formulations = ("binpacking", "full_mip")

    def estimate_mem_mb(self, model: LinearModel) -> float:
        """``38 KiB`` per integer column (9.6 GiB measured at 264k binaries) + ``0.5 KiB`` per non-zero + 150 MiB."""
        return 150.0 + CBC_MB_PER_INTEGER * model.n_integer + model.nnz / 2048.0

    def isolated(self, model, params) -> bool:
        """Always: CBC can only be stopped (at the deadline, past its memory) from outside its process.

        Parameters
        ----------
        model : LinearModel
            The compiled model about to be solved.
        params : SolveParams
            Its parameters (``time_limit_s`` in seconds).

        Returns
        -------
        bool
            Whether the search runs in a child process.
        """
        return True

    def solve_model(self, model, x_start, params):
        """Solve ``model`` with CBC (the pipeline runs this in a child process, see :meth:`isolated`).

        Parameters
        ----------
        model : LinearModel
            The compiled model.
        x_start : numpy.ndarray or None
            A column vector of ``model``, shape ``(n_cols,)``, given to CBC as its MIP start;
            None: no start.
        params : SolveParams
            ``time_limit_s`` (seconds left of the solve: CBC, counting wall-clock seconds, is told to
            stop :data:`STOP_EARLY_S` before the deadline), ``rel_gap`` (``max_mip_gap``), ``seed``,
            ``threads``, ``verbose``; each ``solver_options`` entry sets the ``mip.Model`` attribute
            of that name.

        Returns
        -------
        Outcome
            ``x`` when CBC found a solution, its objective and ``objective_bound``, the
            termination, an LP's row duals (``Cbc_getRowPrice``, already ``d(objective)/d(rhs)``)
            and ``extra["cbc_status"]``.

        Raises
        ------
        SolverError
            A ``solver_options`` key that is not an attribute of ``mip.Model``.
        """
        import mip

        for k in params.backend_options():
            if not hasattr(mip.Model, k):
                raise SolverError(f"cbc: unknown option {k!r} (use an attribute of mip.Model, e.g. 'cuts')")
        deadline_at = None if params.time_limit_s is None else time.perf_counter() + params.time_limit_s
        res = _cbc_search(model, x_start, params, deadline_at)
        status = res["status"]
        bound = res["bound"]
        bound = bound if bound is not None and np.isfinite(bound) and abs(bound) < 1e30 else None
        if status == "OPTIMAL":
            term, limit = Termination.OPTIMAL, Limit.NONE
        elif status in ("INFEASIBLE", "INT_INFEASIBLE"):
            term, limit = Termination.INFEASIBLE, Limit.NONE
        elif status == "UNBOUNDED":
            term, limit = Termination.UNBOUNDED, Limit.NONE
        elif status in ("FEASIBLE", "NO_SOLUTION_FOUND"):
            term, limit = Termination.FEASIBLE, Limit.TIME
        else:
            term, limit = Termination.ERROR, Limit.NONE
        if not model.is_mip and term is not Termination.OPTIMAL:
            bound = None
        return Outcome(x=res["x"], objective=res["objective"], bound=bound, termination=term, limit=limit,
                       row_duals=res["duals"], extra={"cbc_status": status})


register_backend(CbcBackend())
