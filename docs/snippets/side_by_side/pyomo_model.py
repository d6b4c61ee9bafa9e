import numpy as np
import pyomo.environ as pyo
from pyomo.contrib.appsi.solvers import Highs


def build(w, prompt, inst, cap=10, relax=False):
    R, C = len(w), len(inst)
    m = pyo.ConcreteModel()
    m.R, m.C = pyo.RangeSet(0, R - 1), pyo.RangeSet(0, C - 1)
    m.x = pyo.Var(m.R, m.C, domain=pyo.UnitInterval if relax else pyo.Binary)
    m.T = pyo.Var()
    m.assign = pyo.Constraint(m.R, rule=lambda m, r: sum(m.x[r, c] for c in m.C) == 1)
    m.loads = pyo.Constraint(m.C, rule=lambda m, c: sum(float(w[r]) * m.x[r, c] for r in m.R) <= m.T)  # "load" is taken
    pairs = [(r, c) for r in np.flatnonzero(prompt > 100) for c in np.flatnonzero(inst != 0)]
    m.eligible = pyo.Constraint(pairs, rule=lambda m, r, c: m.x[r, c] == 0)
    m.cap = pyo.Constraint(np.flatnonzero(inst == 1).tolist(),
                           rule=lambda m, c: sum(m.x[r, c] for r in m.R) <= cap)
    m.obj = pyo.Objective(expr=m.T, sense=pyo.minimize)
    return m


def solve(m, time_limit):
    opt = Highs()
    opt.config.time_limit, opt.config.mip_gap = time_limit, 1e-4
    opt.config.load_solution = False
    res = opt.solve(m)
    if res.best_feasible_objective is not None:
        res.solution_loader.load_vars()
    R, C = len(m.R), len(m.C)
    return {"objective": res.best_feasible_objective, "bound": res.best_objective_bound,
            "status": str(res.termination_condition),
            "x": np.array([[pyo.value(m.x[r, c]) for c in range(C)] for r in range(R)])}


def load_duals(m):
    opt = Highs()
    opt.solve(m)
    duals = opt.get_duals([m.loads[c] for c in m.C])
    return np.array([duals[m.loads[c]] for c in m.C])     # the solver's sign (HiGHS: d(objective)/d(rhs))
