from datetime import timedelta

import numpy as np
from ortools.math_opt.python import mathopt


def build(w, prompt, inst, cap=10, relax=False):
    R, C = len(w), len(inst)
    m = mathopt.Model(name="side")
    x = [[m.add_variable(lb=0, ub=1, is_integer=not relax, name=f"x_{r}_{c}") for c in range(C)]
         for r in range(R)]
    T = m.add_variable(lb=-np.inf, name="T")
    for r in range(R):
        m.add_linear_constraint(mathopt.fast_sum(x[r]) == 1, name=f"assign_{r}")
    load = [m.add_linear_constraint(mathopt.fast_sum(float(w[r]) * x[r][c] for r in range(R)) - T <= 0,
                                    name=f"load_{c}") for c in range(C)]
    for r in np.flatnonzero(prompt > 100):
        for c in np.flatnonzero(inst != 0):
            m.add_linear_constraint(x[r][c] == 0, name=f"eligible_{r}_{c}")
    for c in np.flatnonzero(inst == 1):
        m.add_linear_constraint(mathopt.fast_sum(x[r][c] for r in range(R)) <= cap, name=f"cap_{c}")
    m.minimize(T)
    return m, x, load


def solve(model, time_limit):
    m, x, _ = model
    params = mathopt.SolveParameters(time_limit=timedelta(seconds=time_limit), relative_gap_tolerance=1e-4)
    res = mathopt.solve(m, mathopt.SolverType.HIGHS, params=params)
    values = res.variable_values()
    return {"objective": res.objective_value(), "bound": res.termination.objective_bounds.dual_bound,
            "status": res.termination.reason.name, "x": np.array([[values[v] for v in row] for row in x])}


def load_duals(model):
    m, _, load = model
    duals = mathopt.solve(m, mathopt.SolverType.GLOP).dual_values()
    return np.array([duals[c] for c in load])              # MathOpt's sign: d(objective)/d(rhs)
