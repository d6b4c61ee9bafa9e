import linopy
import numpy as np
import pandas as pd
import xarray as xr


def build(w, prompt, inst, cap=10, relax=False):
    req = pd.RangeIndex(len(w), name="request")
    cli = pd.RangeIndex(len(inst), name="client")
    m = linopy.Model()
    x = m.add_variables(0, 1, coords=[req, cli], name="x", binary=not relax)
    T = m.add_variables(name="T")
    m.add_constraints(x.sum("client") == 1, name="assign")
    m.add_constraints((xr.DataArray(w, coords=[req]) * x).sum("request") <= T, name="load")
    long, other = np.flatnonzero(prompt > 100), np.flatnonzero(inst != 0)
    m.add_constraints(x.sel(request=long, client=other) == 0, name="eligible")
    m.add_constraints(x.sel(client=np.flatnonzero(inst == 1)).sum("request") <= cap, name="cap")
    m.add_objective(1 * T)
    return m


def solve(m, time_limit):
    m.solve(solver_name="highs", io_api="direct", time_limit=time_limit, mip_rel_gap=1e-4, output_flag=False)
    return {"objective": float(m.objective.value), "bound": float(m.solver_model.getInfo().mip_dual_bound),
            "status": str(m.termination_condition), "x": m.variables["x"].solution.values}


def load_duals(m):
    m.solve(solver_name="highs", io_api="direct", output_flag=False)
    return m.constraints["load"].dual.values               # the solver's sign (HiGHS: d(objective)/d(rhs))
