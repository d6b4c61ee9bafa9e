"""Interchangeable solver backends for lloptim's formulations.

>>> from lloptim.solvers import solve, SolveParams, available_solvers
>>> from lloptim import Problem, workloads
>>> res = solve(Problem.single(workloads.gsm8k("test", limit=100), clients=8), "greedy")
>>> bool(res.gap < 0.01)
True

Backends: ``greedy`` (LPT + local search), ``lagrangian`` (subgradient / volume on the relaxed
``load`` rows), ``highs`` (highspy), ``cbc`` (python-mip, ``pip install lloptim[cbc]``) and
``cvxpy`` (``pip install lloptim[cvxpy]``).
"""

from lloptim.solvers.params import SolveParams
from lloptim.solvers.result import Limit, SolveResult, Termination
from lloptim.solvers.registry import Backend, Capabilities, all_solvers, available_solvers, get_backend, register_backend
from lloptim.solvers.base import solve
from lloptim.solvers import greedy, lagrangian, highs, cbc, cvxpy_backend  # noqa: F401  (register the backends)

__all__ = ["solve", "SolveParams", "SolveResult", "Termination", "Limit", "available_solvers", "all_solvers",
           "get_backend", "register_backend", "Backend", "Capabilities"]
