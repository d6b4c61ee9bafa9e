import cvxpy as cp
import numpy as np


def build(w, prompt, inst, cap=10, relax=False):
    R, C = len(w), len(inst)
    x = cp.Variable((R, C), boolean=not relax)
    T = cp.Variable()
    load = w @ x <= T                                      # one row per client
    cons = [cp.sum(x, axis=1) == 1, load,
            x[np.ix_(np.flatnonzero(prompt > 100), np.flatnonzero(inst != 0))] == 0,
            cp.sum(x[:, np.flatnonzero(inst == 1)], axis=0) <= cap]
    if relax:
        cons += [x >= 0, x <= 1]
    return cp.Problem(cp.Minimize(T), cons), x, load


def solve(model, time_limit):
    prob, x, _ = model
    prob.solve(solver="HIGHS", time_limit=time_limit, mip_rel_gap=1e-4)
    return {"objective": prob.value, "bound": prob.solver_stats.extra_stats.mip_dual_bound,
            "status": prob.status, "x": x.value}


def load_duals(model):
    prob, _, load = model
    prob.solve(solver="HIGHS")
    return load.dual_value                                 # >= 0 on <= rows: -d(objective)/d(rhs)
