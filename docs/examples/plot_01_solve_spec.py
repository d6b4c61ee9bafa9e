"""
Build a problem and solve it with two backends
==============================================

A problem is a workload of requests and the instances that serve it. We build one in Python and
one from TOML text, solve the offline makespan bin packing (:ref:`binpacking`) with the ``greedy``
heuristic and with the HiGHS MIP solver, and compare what each proves.
"""

# %%
# A problem in Python
# -------------------
# The first 300 GSM8K test problems (LLaMA token counts), on one instance of the built-in
# ``llama-65b`` profile with 16 clients instead of the profile's 40.
import numpy as np

import lloptim

problem = lloptim.Problem.single(lloptim.workloads.gsm8k("test", limit=300), "llama-65b", clients=16)
w = problem.workload
print(f"{problem.n_requests} requests on {problem.n_clients} clients; "
      f"prompts {w.prompt_tokens.mean():.0f} tokens, outputs {w.output_tokens.mean():.0f} tokens on average")

# %%
# The same problem from a TOML spec
# ---------------------------------
# Specs are what the command line reads; :func:`~lloptim.spec.load_spec` takes a path or the text.
spec = """
name = "gsm8k-300 on 16 clients"

[workload]
source = "gsm8k"
split = "test"
limit = 300

[[instances]]
profile = "llama-65b"
clients = 16
"""
from_toml = lloptim.load_spec(text=spec)
assert np.array_equal(from_toml.workload.output_tokens, w.output_tokens)
print(from_toml.name, from_toml.n_clients)

# %%
# Solve with two backends
# -----------------------
# :func:`lloptim.solve` runs the same pipeline for every backend: the closed-form lower bound and
# an LPT + local-search start first, then the backend. ``greedy`` stops there; ``highs`` runs
# branch and bound on the MIP (300 x 16 binaries) from that start, under a time limit (which
# counts the whole call). A bound proven by either is a *dual bound*; the makespan of the
# returned assignment is the *primal bound*; the gap is their relative difference. When the start
# already meets the gap, ``solve`` skips the search and says so (``skipped``, and ``backend`` is
# ``"greedy"``); ``always_run=True`` runs HiGHS anyway, as here.
from lloptim.solvers import SolveParams, solve

results = {
    "greedy": solve(problem, solver="greedy"),
    "highs": solve(problem, solver="highs", params=SolveParams(time_limit_s=2, threads=1, always_run=True)),
}
print(f"{'backend':8s} {'status':9s} {'primal s':>9s} {'dual s':>9s} {'gap':>8s} {'start s':>8s} {'solve s':>8s}")
for name, res in results.items():
    print(f"{res.backend:8s} {res.status.value:9s} {res.primal_bound:9.3f} {res.dual_bound:9.3f} "
          f"{100 * res.gap:7.3f}% {res.start_s:8.3f} {res.solve_s:8.3f}")
print(solve(problem, solver="highs", params=SolveParams(time_limit_s=2, rel_gap=1e-3)).skipped)

# %%
# The loads behind the numbers
# ----------------------------
# ``assignment`` gives each request's client. Summing the weights the solver packed (seconds of
# client time, :func:`lloptim.work.request_work_s`) per client gives the loads; the largest is the
# primal bound.
import matplotlib.pyplot as plt

from lloptim.work import request_work_s

weights = request_work_s(problem)
fig, ax = plt.subplots(figsize=(8, 3.2), constrained_layout=True)
for k, (name, res) in enumerate(results.items()):
    load = np.bincount(res.assignment, weights=weights, minlength=problem.n_clients)
    ax.bar(np.arange(problem.n_clients) + 0.4 * k - 0.2, load, width=0.4, label=f"{name}: max {load.max():.2f} s")
ax.axhline(results["highs"].dual_bound, color="k", ls="--", lw=1, label="HiGHS dual bound")
ax.set_xlabel("client")
ax.set_ylabel("load (s of client time)")
ax.set_ylim(weights.sum() / problem.n_clients * 0.97, None)
ax.legend(fontsize=8, loc="lower right")
ax.set_title("Client loads of the two assignments")

# %%
# Prices of client time
# ---------------------
# ``multipliers["load"]`` are the prices of client time (:ref:`lp-duals`): makespan seconds per
# second of a client's capacity lost, summing to one. With identical clients they are uniform,
# ``1/C``; the hybrid's online iteration scheduler prices waiting clients with them.
for name, res in results.items():
    lam = res.multipliers["load"]
    print(f"{name}: prices sum to {lam.sum():.3f}, range [{lam.min():.4f}, {lam.max():.4f}] (1/C = {1 / problem.n_clients:.4f})")

# %%
# Plan and run
# ------------
# The offline plan is only half of the paper's method. Simulating the ``offline`` and ``hybrid``
# policies (which solve this bin packing internally) against the baseline shows what it is worth
# once prefill and decode iterations are scheduled too.
bound = lloptim.lower_bound(problem)
for policy in ("baseline", "offline", "hybrid"):
    m = lloptim.simulate(problem, policy)
    print(f"{policy:9s} makespan {m.makespan_s:7.2f} s  utilization {100 * m.utilization:5.1f} %  "
          f"gap to T^LB {100 * m.gap_to_bound:5.2f} %")
print(f"lower bound T^LB = {bound.total_s:.2f} s")
