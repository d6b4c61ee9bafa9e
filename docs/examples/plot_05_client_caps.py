"""
Per-client caps: at most 6 requests on each client of instance 1
=================================================================

A count cap per client (an instance whose clients are recycled after a few requests, or a rate
limit per slot) is one more constraint family on the bin packing. The cap binds: it pushes work
onto instance 0, and the LP relaxation's duals say what one more request of headroom per client
would be worth. Every MIP backend solves the model through :func:`lloptim.solve`;
:meth:`~lloptim.Model.remove` takes the cap out again to measure its cost.
"""

# %%
# Data and model
# --------------
# 60 GSM8K requests on two instances of 3 clients; weights in decode steps (output tokens).
import numpy as np

import lloptim

problem = lloptim.Problem.single(lloptim.workloads.gsm8k("test", limit=60), clients=3, instances=2)
w = problem.workload.output_tokens.astype(float)
inst = problem.client_instance()
CAP = 6

m = lloptim.Model("caps")
x = m.add_variables("x", coords={"request": len(w), "client": inst.size}, binary=True)
T = m.add_variables("T")
m.add_constraints("assign", x.sum("client") == 1)
m.add_constraints("load", (w[:, None] * x).sum("request") <= T)
cap = m.add_constraints("cap", x[:, inst == 1].sum("request") <= CAP)
m.minimize(T)
print(m, "\ncap family:", cap)

# %%
# Solved by every MIP backend
# ---------------------------
params = lloptim.SolveParams(time_limit_s=5, rel_gap=0.01)
print(f"{'backend':8s} {'status':9s} {'makespan':>9s} {'bound':>8s} {'gap %':>6s} {'time s':>7s} "
      f"{'requests per client':>28s}")
solutions = {}
for solver in ("highs", "cbc", "cvxpy"):
    res = lloptim.solve(m, solver, params)
    X = np.round(res.value(x))
    counts = X.sum(axis=0).astype(int)
    assert (X.sum(axis=1) == 1).all() and (counts[inst == 1] <= CAP).all()
    assert res.dual_bound <= res.primal_bound + 1e-9
    solutions[solver] = X
    print(f"{solver:8s} {res.status.value:9s} {res.primal_bound:9.0f} {res.dual_bound:8.1f} {100 * res.gap:6.2f} "
          f"{res.total_s:7.2f} {str(counts.tolist()):>28s}")

# %%
# What the cap costs, and what it is worth to loosen it
# -----------------------------------------------------
# ``dual("cap")`` of the LP relaxation is ``d(objective)/d(rhs)``: makespan steps gained per
# extra request allowed on each capped client (``<= 0``: loosening helps).
lp = lloptim.solve(m.relaxed(), "highs")
print("LP makespan", round(lp.primal_bound, 2), "| cap duals:", np.round(lp.dual("cap"), 3),
      "| load duals:", np.round(lp.dual("load"), 3))
capped = lloptim.solve(m, "highs", params).primal_bound
m.remove("cap")
uncapped = lloptim.solve(m, "highs", params).primal_bound
print(f"makespan with the cap {capped:.0f} steps, without {uncapped:.0f} steps")

import matplotlib.pyplot as plt

X = solutions["highs"]
fig, ax = plt.subplots(1, 2, figsize=(8, 3), constrained_layout=True)
ax[0].bar(np.arange(inst.size), X.sum(axis=0), color=["C0" if i == 0 else "C1" for i in inst])
ax[0].axhline(CAP, color="k", ls="--", lw=1, label=f"cap on instance 1 ({CAP})")
ax[0].set_xlabel("client")
ax[0].set_ylabel("requests")
ax[0].legend(fontsize=8)
ax[1].bar(np.arange(inst.size), (w[:, None] * X).sum(axis=0), color=["C0" if i == 0 else "C1" for i in inst])
ax[1].set_xlabel("client")
ax[1].set_ylabel("load (decode steps)")
fig.suptitle("Instance 1's clients hit the cap; instance 0 takes the rest")
