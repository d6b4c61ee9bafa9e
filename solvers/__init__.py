"""One ``solve`` for every model and every backend, and the backends themselves.

>>> from lloptim.solvers import solve, SolveParams, available_solvers
>>> from lloptim import Problem, workloads
>>> res = solve(Problem.single(workloads.gsm8k("test", limit=100), clients=8), "greedy")
>>> bool(res.gap < 0.01)
True

:func:`solve` takes a :class:`lloptim.Model` (solved as it is) or a problem (solved through a
registered formulation: ``"binpacking"``, ``"full_mip"``, or one of yours,
:func:`register_formulation`) and returns one :class:`SolveResult`.

Backends: ``greedy`` (LPT + local search), ``lagrangian`` (subgradient / volume on the relaxed
``load`` rows), ``highs`` (highspy), ``cbc`` (python-mip's CBC, ``pip install lloptim[cbc]``) and
``cvxpy`` (``pip install lloptim[cvxpy]``).
"""

from lloptim.solvers.params import SolveParams
from lloptim.solvers.result import DUAL_CONVENTION, Limit, SolveResult, Status, Termination
from lloptim.solvers.registry import (Backend, Capabilities, Outcome, all_solvers, available_solvers, get_backend,
                                      register_backend)
from lloptim.solvers.formulation_registry import (Formulation, Incumbent, all_formulations, get_formulation,
                                                  register_formulation)
from lloptim.solvers.base import solve
from lloptim.solvers import builtin_formulations  # noqa: F401  (register the built-in formulations)
from lloptim.solvers import greedy, lagrangian, highs, cbc, cvxpy_backend  # noqa: F401  (register the backends)

__all__ = ["solve", "SolveParams", "SolveResult", "Termination", "Status", "Limit", "DUAL_CONVENTION",
           "available_solvers", "all_solvers", "get_backend", "register_backend", "Backend", "Capabilities",
           "Outcome", "Formulation", "Incumbent", "register_formulation", "get_formulation", "all_formulations"]
