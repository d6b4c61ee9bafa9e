"""How fast can a compiled model get into CBC? Five paths, the GSM8K bin packing at 1319 x 200.

python-mip has no matrix loader. Measured here, each in a fresh process (seconds to load, and the
growth of the process's resident memory while loading, MiB):

* ``linexpr``: ``add_vars`` per run of equal columns, then one ``add_constr(LinExpr(vars, coefs))``
  per row (lloptim before the modeling layer);
* ``xsum``: the same with ``add_constr(xsum(c * v for ...) <= b)``, python-mip's documented idiom;
* ``addrow``: ``add_vars``, then CBC's C ``Cbc_addRow`` once per row through cffi, from the CSR arrays;
* ``loadproblem``: CBC's C ``Cbc_loadProblem``, the whole CSC matrix in one call (what
  :mod:`lloptim.solvers.cbc` does);
* ``mps``: write a free-MPS file (:mod:`lloptim.formulations.io`) and ``Model.read`` it.

Every path is checked to load the same number of non-zeros. Run: ``python benchmarks/cbc_loading.py``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time

import numpy as np
import psutil

PATHS = ("linexpr", "xsum", "addrow", "loadproblem", "mps")


def _model():
    from lloptim import Problem, workloads
    from lloptim.formulations.binpacking import binpacking_data, build_binpacking

    return build_binpacking(binpacking_data(Problem.single(workloads.gsm8k("test"), clients=200)))


def _columns(m, lm):
    import mip

    xs = m.add_vars(lm.n_cols - 1, lb=0.0, ub=1.0, obj=0.0, var_type=mip.BINARY)
    xs += m.add_vars(1, lb=-mip.INF, ub=mip.INF, obj=1.0)
    return xs


def _load(path: str, lm) -> object:
    import mip
    from mip.cbc import cbclib, ffi

    m = mip.Model(solver_name="CBC")
    m.verbose = 0
    A = lm.A
    if path in ("linexpr", "xsum"):
        xs = _columns(m, lm)
        ind, val, ptr = A.indices.tolist(), A.data.tolist(), A.indptr.tolist()
        for i in range(lm.n_rows):
            vs = [xs[j] for j in ind[ptr[i]:ptr[i + 1]]]
            cs = val[ptr[i]:ptr[i + 1]]
            lo, hi = lm.row_lo[i], lm.row_hi[i]
            if path == "linexpr":
                sense = mip.EQUAL if lo == hi else mip.LESS_OR_EQUAL
                m.add_constr(mip.LinExpr(vs, cs, -float(hi), sense=sense))
            else:
                expr = mip.xsum(c * v for c, v in zip(cs, vs))
                m.add_constr(expr == float(lo) if lo == hi else expr <= float(hi))
    elif path == "addrow":
        _columns(m, lm)
        for i in range(lm.n_rows):
            sl = slice(A.indptr[i], A.indptr[i + 1])
            idx = np.ascontiguousarray(A.indices[sl], dtype=np.int32)
            val = np.ascontiguousarray(A.data[sl], dtype=np.float64)
            lo, hi = lm.row_lo[i], lm.row_hi[i]
            sense, rhs = (b"E", lo) if lo == hi else (b"L", hi)
            cbclib.Cbc_addRow(m.solver._model, b"", idx.size, ffi.cast("int *", ffi.from_buffer(idx)),
                              ffi.cast("double *", ffi.from_buffer(val)), sense, float(rhs))
    elif path == "loadproblem":
        from lloptim.solvers.cbc import load_into_cbc

        m = load_into_cbc(lm)
    elif path == "mps":
        from lloptim.formulations.io import write_mps

        with tempfile.TemporaryDirectory() as tmp:
            f = write_mps(lm, os.path.join(tmp, "m.mps"))
            m.read(str(f))
    return m


def _measure(path: str, conn) -> None:
    from mip.cbc import cbclib

    lm = _model()
    proc = psutil.Process()
    before = proc.memory_info().rss
    t = time.perf_counter()
    m = _load(path, lm)
    secs = time.perf_counter() - t
    grown = (proc.memory_info().rss - before) / 2**20
    nnz = cbclib.Cbc_getNumElements(m.solver._model)
    conn.send((secs, grown, nnz, lm.nnz))
    conn.close()


def main() -> None:
    ctx = mp.get_context("spawn")
    print(f"{'path':>12s} {'load s':>8s} {'memory MiB':>11s} {'non-zeros':>10s}")
    for path in PATHS:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_measure, args=(path, child))
        proc.start()
        child.close()
        secs, grown, nnz, want = parent.recv()
        proc.join()
        note = "" if nnz == want else f"  (expected {want})"
        print(f"{path:>12s} {secs:>8.2f} {grown:>11,.0f} {nnz:>10,d}{note}")


if __name__ == "__main__":
    main()
