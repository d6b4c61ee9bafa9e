"""
Eligibility: long prompts only on instance 0
============================================

Your own formulation on :class:`lloptim.Model`: the makespan bin packing of a two-instance fleet,
where requests whose prompt exceeds 100 tokens may only run on instance 0 (say it is the one
configured with the long context). The model is a handful of lines; every MIP backend solves it
through :func:`lloptim.solve`; the answers are checked against every constraint; and the same
model, registered as a formulation, gets the MIP start and bound the built-in ones get.
"""

# %%
# Data: 36 GSM8K requests on 2 instances x 3 clients
# ---------------------------------------------------
# A client produces one token per decode step, so a request's output length is the number of
# steps it holds its client: the weights are in decode steps.
import numpy as np

import lloptim

problem = lloptim.Problem.single(lloptim.workloads.gsm8k("test", limit=36), clients=3, instances=2)
w = problem.workload.output_tokens.astype(float)  # decode steps per request
prompt = problem.workload.prompt_tokens       # tokens
inst = problem.client_instance()              # instance of each of the 6 clients
long = prompt > 100
print(f"{long.sum()} of {len(w)} requests have prompts over 100 tokens; clients per instance: {np.bincount(inst)}")

# %%
# The model
# ---------
# ``x[r, c]`` says request ``r`` runs on client ``c``; ``T`` is the makespan. The eligibility
# rule is one constraint family: the variables of long requests on clients outside instance 0,
# selected by two boolean masks, are zero.
m = lloptim.Model("eligibility")
x = m.add_variables("x", coords={"request": len(w), "client": inst.size}, binary=True)
T = m.add_variables("T")
m.add_constraints("assign", x.sum("client") == 1)
m.add_constraints("load", (w[:, None] * x).sum("request") <= T)
m.add_constraints("eligible", x[long][:, inst != 0] == 0)
m.minimize(T)
print(m)

# %%
# Solved by every MIP backend
# ---------------------------
# One call, one result type. ``value(x)`` comes back shaped like ``x``; the checks below read it.
params = lloptim.SolveParams(time_limit_s=5, rel_gap=0.01)  # stop within 1 % of the bound, or at 5 s
rows = []
for solver in ("highs", "cbc", "cvxpy"):
    res = lloptim.solve(m, solver, params)
    X = np.round(res.value(x))
    feasible = bool((X.sum(axis=1) == 1).all() and (X[long][:, inst != 0] == 0).all()
                    and res.value(T) >= (w[:, None] * X).sum(axis=0).max() - 1e-6)
    rows.append((solver, res.status.value, res.primal_bound, res.dual_bound, res.gap, res.total_s, feasible))
    loads = (w[:, None] * X).sum(axis=0)
print(f"{'backend':8s} {'status':9s} {'makespan':>11s} {'bound':>9s} {'gap %':>7s} {'time s':>7s} feasible")
for solver, status, primal, dual, gap, secs, ok in rows:
    print(f"{solver:8s} {status:9s} {primal:11.4f} {dual:9.4f} {100 * gap:7.3f} {secs:7.2f} {ok}")

# %%
# What the rule costs
# -------------------
# The LP relaxation's duals price each client's time in makespan steps per step of capacity
# (``d(objective)/d(rhs)``, so ``<= 0`` on these ``<=`` rows); they sum to -1. Without the rule
# the optimum of this instance is barely different: three long requests fit on instance 0.
lp = lloptim.solve(m.relaxed(), "highs")
print("LP bound", round(lp.primal_bound, 4), "; load duals by client:", np.round(lp.dual("load"), 4))
free = lloptim.Model("free")
xf = free.add_variables("x", coords={"request": len(w), "client": inst.size}, binary=True)
Tf = free.add_variables("T")
free.add_constraints("assign", xf.sum("client") == 1)
free.add_constraints("load", (w[:, None] * xf).sum("request") <= Tf)
free.minimize(Tf)
unconstrained = lloptim.solve(free, "highs", params).primal_bound
print(f"makespan without the rule {unconstrained:.0f} steps, with it {rows[0][2]:.0f} steps")

import matplotlib.pyplot as plt

X = np.round(lloptim.solve(m, "highs", params).value(x))
fig, ax = plt.subplots(figsize=(7, 3), constrained_layout=True)
short_load = (w[~long, None] * X[~long]).sum(axis=0)
long_load = (w[long, None] * X[long]).sum(axis=0)
ax.bar(np.arange(inst.size), short_load, label="prompt <= 100 tokens")
ax.bar(np.arange(inst.size), long_load, bottom=short_load, label="prompt > 100 tokens")
ax.set_xticks(np.arange(inst.size), [f"{c}\n(inst {i})" for c, i in enumerate(inst)])
ax.set_ylabel("load (decode steps)")
ax.legend(fontsize=8, loc="lower right")
ax.set_title("Long prompts stay on instance 0")

# %%
# The same model as a registered formulation
# ------------------------------------------
# Registered, it is solved from a problem like the built-in bin packing: a start heuristic that
# respects the rule (LPT over allowed clients) becomes the MIP start and the fallback answer, a
# closed-form bound joins the backend's, and a start that already meets the gap skips the search.
from lloptim.solvers import Incumbent, register_formulation


def prepare(problem):
    return {"w": problem.workload.output_tokens.astype(float), "long": problem.workload.prompt_tokens > 100,
            "inst": problem.client_instance()}


def build(d, bound, cutoff):
    model = lloptim.Model("eligibility")
    x = model.add_variables("x", coords={"request": len(d["w"]), "client": d["inst"].size}, binary=True)
    T = model.add_variables("T", lower=bound if bound is not None else -np.inf)
    model.add_constraints("assign", x.sum("client") == 1)
    model.add_constraints("load", (d["w"][:, None] * x).sum("request") <= T)
    model.add_constraints("eligible", x[d["long"]][:, d["inst"] != 0] == 0)
    model.minimize(T)
    return model


def decode(d, model, xvec):
    a = model.compile().block(xvec, "x").reshape(len(d["w"]), -1).argmax(axis=1)
    return a, float(np.bincount(a, weights=d["w"], minlength=d["inst"].size).max())


def start(d, params, deadline):
    load, a = np.zeros(d["inst"].size), np.zeros(len(d["w"]), dtype=int)
    for r in np.argsort(-d["w"]):
        allowed = np.flatnonzero(~d["long"][r] | (d["inst"] == 0))
        a[r] = allowed[np.argmin(load[allowed])]
        load[a[r]] += d["w"][r]
    return Incumbent(a, float(load.max()), values=lambda model: {"x": np.eye(load.size)[a], "T": load.max()},
                     source="eligible-lpt")


register_formulation("eligibility", build=build, decode=decode, prepare=prepare, incumbent=start,
                     bound=lambda d: float(d["w"].sum() / d["inst"].size))
res = lloptim.solve(problem, "highs", lloptim.SolveParams(time_limit_s=5, rel_gap=1e-3), formulation="eligibility")
print(f"{res.backend} from the {res.extra['start_source']} start ({res.extra['start_objective']:.0f} steps): "
      f"{res.status.value}, makespan {res.primal_bound:.0f}, bound {res.dual_bound:.1f}")
print(lloptim.solve(problem, "highs", lloptim.SolveParams(rel_gap=0.02), formulation="eligibility").skipped)
