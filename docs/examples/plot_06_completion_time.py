"""
Total weighted completion time on identical clients
===================================================

Not every objective is a makespan. Here interactive requests (weight 3) and batch requests
(weight 1) share the 3 clients of one instance, and the goal is the total weighted completion
time ``sum_r w_r C_r``: finish the interactive ones early without starving the rest. It is a
different formulation on the same layer: a *time-indexed* model with one binary per request and
start slot, a capacity row per slot built with a sparse matrix product, and a linear objective.
Every MIP backend solves it through :func:`lloptim.solve`; Smith's rule (WSPT list scheduling)
is the heuristic to beat, and the LP relaxation bounds both.
"""

# %%
# Data
# ----
# 12 GSM8K requests; a request's processing time is its decode steps in units of 20 tokens.
import numpy as np
import scipy.sparse as sp

import lloptim

wl = lloptim.workloads.gsm8k("test", limit=12)
p = np.ceil(wl.output_tokens / 20).astype(int)          # slots of 20 decode steps
weight = np.where(np.arange(12) % 3 == 0, 3.0, 1.0)     # every third request is interactive
C = 3
H = int(np.ceil(p.sum() / C) + p.max())                 # no optimal schedule ends later
print("processing times", p.tolist(), "| weights", weight.astype(int).tolist(), "| horizon", H)

# %%
# The model
# ---------
# ``s[r, t] = 1`` when request ``r`` starts in slot ``t`` (starts that would run past the horizon
# are fixed to 0 by the ``fits`` family). Request ``r`` is running in slot ``t`` when it started in
# ``(t - p_r, t]``: a band matrix ``A`` (slots x request-slots) counts the running requests, and
# ``A @ s.flatten() <= C`` is the capacity family. At most ``C`` overlapping intervals can always
# be dealt to ``C`` identical clients, so no assignment variables are needed.
R = len(p)
t = np.arange(H)
m = lloptim.Model("completion")
s = m.add_variables("s", coords={"request": R, "slot": H}, binary=True)
m.add_constraints("start_once", s.sum("slot") == 1)
m.add_constraints("fits", s[t[None, :] + p[:, None] > H] == 0)
r_idx, u_idx, t_idx = [], [], []
for r in range(R):
    for k in range(p[r]):                                # running in slot u + k after starting in u
        u = np.arange(H - k)
        r_idx.append(np.full(u.size, r)), u_idx.append(u), t_idx.append(u + k)
cols = np.concatenate(r_idx) * H + np.concatenate(u_idx)
A = sp.csr_matrix((np.ones(cols.size), (np.concatenate(t_idx), cols)), shape=(H, R * H))
m.add_constraints("capacity", A @ s.flatten() <= C)
completion = t[None, :] + p[:, None]                      # completion slot of each start
m.minimize((weight[:, None] * completion * s).sum())
print(m)

# %%
# Smith's rule, the heuristic
# ---------------------------
# Longest weight per unit of time first, each to the client that frees up first: optimal on one
# client, a heuristic on several.
free_at = np.zeros(C)
start_wspt = np.zeros(R, dtype=int)
for r in np.argsort(-weight / p, kind="stable"):
    c = int(np.argmin(free_at))
    start_wspt[r], free_at[c] = free_at[c], free_at[c] + p[r]
wspt = float((weight * (start_wspt + p)).sum())

# %%
# Solved by every MIP backend, started from Smith's rule
# -------------------------------------------------------
# ``start=`` hands the heuristic's schedule to the backends that take MIP starts (HiGHS, CBC) and
# keeps it as the answer if a search finds nothing better.
start = {"s": np.eye(H)[start_wspt]}
params = lloptim.SolveParams(time_limit_s=10, rel_gap=1e-4)
lp = lloptim.solve(m.relaxed(), "highs")
print(f"{'method':8s} {'status':9s} {'sum w C':>8s} {'bound':>8s} {'gap %':>6s} {'time s':>6s}")
print(f"{'WSPT':8s} {'-':9s} {wspt:8.0f} {lp.primal_bound:8.1f} {100 * (wspt - lp.primal_bound) / wspt:6.2f} {'-':>6s}")
best = None
for solver in ("highs", "cbc", "cvxpy"):
    res = lloptim.solve(m, solver, params, start=start)
    S = np.round(res.value(s))
    starts = S.argmax(axis=1)
    running = np.array([((starts <= k) & (k < starts + p)).sum() for k in range(H)])
    assert (S.sum(axis=1) == 1).all() and running.max() <= C and (starts + p <= H).all()
    assert res.primal_bound == float((weight * (starts + p)).sum())
    assert lp.primal_bound <= res.dual_bound + 1e-6 and res.dual_bound <= res.primal_bound + 1e-9
    print(f"{solver:8s} {res.status.value:9s} {res.primal_bound:8.0f} {res.dual_bound:8.1f} {100 * res.gap:6.2f} "
          f"{res.total_s:6.2f}")
    best = best or (starts, res.primal_bound)

# %%
# The schedule
# ------------
# Interval colouring turns the start slots into one timeline per client.
import matplotlib.pyplot as plt

starts, total = best
client_free = np.zeros(C)
fig, ax = plt.subplots(figsize=(8, 2.6), constrained_layout=True)
for r in np.argsort(starts, kind="stable"):
    c = int(np.flatnonzero(client_free <= starts[r])[0])
    client_free[c] = starts[r] + p[r]
    ax.barh(c, p[r], left=starts[r], color="C3" if weight[r] > 1 else "C0", edgecolor="white")
    ax.text(starts[r] + p[r] / 2, c, str(r), ha="center", va="center", color="white", fontsize=8)
ax.set_yticks(range(C), [f"client {c}" for c in range(C)])
ax.set_xlabel("slot (20 decode steps)")
ax.set_title(f"Optimal schedule, sum w C = {total:.0f} (red: interactive, weight 3)")
