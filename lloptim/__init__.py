"""lloptim: LLM-inference serving as an optimization problem.

Offline bin packing of requests to clients with a provable lower bound, online request stealing
and Lagrangian prefill/decode decisions (arXiv 2502.15763), solver-agnostic formulations, a
discrete-event simulator and a real PyTorch backend.
"""

from lloptim.bounds import LowerBound, lower_bound
from lloptim.errors import LloptimError, PolicyError, ProfileError, SolverError, SpecError
from lloptim.hardware import HardwareProfile, LatencyModel, load_profile
from lloptim.metrics import RunMetrics, summarize
from lloptim.problem import Instance, Problem, Workload
from lloptim.simulator import run_policy, simulate
from lloptim.spec import default_problem, load_spec, parse_spec
from lloptim import workloads
from lloptim.formulations.model import Model
from lloptim.solvers import SolveParams, SolveResult, register_formulation, solve

__version__ = "0.1.0"

__all__ = [
    "LowerBound", "lower_bound", "LloptimError", "PolicyError", "ProfileError", "SolverError", "SpecError",
    "HardwareProfile", "LatencyModel", "load_profile", "RunMetrics", "summarize", "Instance", "Problem",
    "Workload", "run_policy", "simulate", "default_problem", "load_spec", "parse_spec", "workloads",
    "Model", "solve", "SolveParams", "SolveResult", "register_formulation",
]
