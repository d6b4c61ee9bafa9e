import lloptim


def build(w, prompt, inst, cap=10, relax=False):
    m = lloptim.Model("side")
    x = m.add_variables("x", coords={"request": len(w), "client": len(inst)}, binary=True)
    T = m.add_variables("T")
    m.add_constraints("assign", x.sum("client") == 1)
    m.add_constraints("load", (w[:, None] * x).sum("request") <= T)
    m.add_constraints("eligible", x[prompt > 100][:, inst != 0] == 0)
    m.add_constraints("cap", x[:, inst == 1].sum("request") <= cap)
    m.minimize(T)
    return m.relaxed() if relax else m


def solve(m, time_limit):
    res = lloptim.solve(m, "highs", lloptim.SolveParams(time_limit_s=time_limit, rel_gap=1e-4))
    return {"objective": res.primal_bound, "bound": res.dual_bound, "status": res.status.value,
            "x": res.value("x") if res.status.has_solution else None}


def load_duals(m):
    return lloptim.solve(m, "highs").dual("load")         # d(objective)/d(rhs), any backend
