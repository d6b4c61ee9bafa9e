"""
Write your own policy
=====================

A policy makes two decisions (:doc:`/runtime`): a **request scheduler** says which client serves
which request, an **iteration scheduler** says whether an instance's next iteration is a prefill
or a decode. Here we write one of each from scratch, compose them into a
:class:`~lloptim.runtime.policy.Policy`, run it with :func:`~lloptim.simulator.run_policy` and compare it
with the built-in policies using :func:`~lloptim.metrics.summarize`.
"""

# %%
# A request scheduler: longest job first
# --------------------------------------
# One shared pool; an idle client takes the ready request with the longest *estimated* output
# (the policy never sees the true lengths unless the run says they are known). The engine tells
# the scheduler of each request once, when it becomes ready
# (:meth:`~lloptim.runtime.policy.RequestScheduler.on_ready`: at its arrival, or when its last
# predecessor finishes in a workflow), calls
# :meth:`~lloptim.runtime.policy.RequestScheduler.next_request` for every idle client, and
# :meth:`~lloptim.runtime.policy.RequestScheduler.pending` to know whether ready work remains.
# The scheduler never needs an arrival time.
import heapq

import lloptim
from lloptim.runtime.iteration_schedulers import admissible
from lloptim.runtime.policy import DECODE, IterationScheduler, Policy, Prefill, RequestScheduler


class LongestFirst(RequestScheduler):
    """Hand out the ready request with the longest estimated output first."""

    def setup(self, ctx):
        super().setup(ctx)
        self.ready = []  # heap of (-estimate, request)

    def on_ready(self, request, now):  # the engine announces each request once, when it is ready
        heapq.heappush(self.ready, (-self.ctx.estimates[request], request))

    def pending(self):
        return len(self.ready)

    def next_request(self, state, client):
        return heapq.heappop(self.ready)[1] if self.ready else None

    def requeue(self, request, now):  # a fault handed the request back
        heapq.heappush(self.ready, (-self.ctx.estimates[request], request))


# %%
# An iteration scheduler: batch the prefills
# ------------------------------------------
# Prefill-first runs a prefill whenever a single client waits, and every prefill stalls all the
# decodes. This one waits until ``k`` clients wait (each prefill then pays its fixed cost once for
# ``k`` requests), unless nothing runs or no request is left to hand out: then a waiting client is
# on the critical path and the prefill goes in at once. The
# :class:`~lloptim.runtime.engine.InstanceState` it reads is the engine's live view; ``admissible``
# keeps the prefill within the free KV cache.
class BatchedPrefill(IterationScheduler):
    """Prefill when at least ``k`` clients wait (or nothing else can run); decode otherwise."""

    def __init__(self, k=4):
        self.k = k

    def setup(self, ctx):
        super().setup(ctx)
        self.requests = ctx.extra["request_scheduler"]  # Policy.setup puts it there

    def decide(self, state):
        if not state.waiting:
            return DECODE
        if len(state.waiting) >= self.k or state.n_running == 0 or self.requests.pending() == 0:
            chosen = admissible(state, state.waiting)
            if chosen:
                return Prefill(chosen)
        return DECODE


# %%
# Run it
# ------
# The whole GSM8K test split on the fitted LLaMA-65B profile (40 clients); a simulation takes a
# few hundredths of a second.
problem = lloptim.Problem.single(lloptim.workloads.gsm8k("test"), "llama-65b")
bound = lloptim.lower_bound(problem)

mine = Policy("longest-first + batched(4)", LongestFirst(), BatchedPrefill(k=4))
result = lloptim.run_policy(problem, mine)
m = lloptim.summarize(result, bound)
print(f"{m.policy}: makespan {m.makespan_s:.2f} s, utilization {100 * m.utilization:.1f} %, "
      f"{m.prefill_iterations} prefills, gap to T^LB {100 * m.gap_to_bound:.2f} %")

# %%
# How large should the batch be?
# ------------------------------
# Sweep ``k`` and set the result beside the built-in baseline and hybrid. Small ``k`` stalls the
# decodes too often; large ``k`` leaves clients idle too long. The hybrid's Lagrangian rule makes
# this trade-off with prices instead of a fixed ``k``.
import matplotlib.pyplot as plt

ks = [1, 2, 4, 8, 12, 16, 24, 32]
sweep = [lloptim.summarize(lloptim.run_policy(problem, Policy(f"k={k}", LongestFirst(), BatchedPrefill(k))), bound)
         for k in ks]
reference = {name: lloptim.simulate(problem, name) for name in ("baseline", "lpt", "hybrid")}

fig, ax = plt.subplots(figsize=(7, 3.4), constrained_layout=True)
ax.plot(ks, [s.makespan_s for s in sweep], "o-", label="LongestFirst + BatchedPrefill(k)")
for (name, ref), style in zip(reference.items(), (":", "-.", "--")):
    ax.axhline(ref.makespan_s, ls=style, color="gray" if name == "baseline" else None,
               label=f"{name}: {ref.makespan_s:.2f} s")
ax.axhline(bound.total_s, color="k", lw=1, label=f"lower bound: {bound.total_s:.2f} s")
ax.set_xlabel("k (waiting clients before a prefill)")
ax.set_ylabel("makespan (s)")
ax.legend(fontsize=8)
ax.set_title("A hand-written policy on GSM8K test")

for k, s in zip(ks, sweep):
    print(f"k={k:2d}: makespan {s.makespan_s:7.2f} s, utilization {100 * s.utilization:5.1f} %, {s.prefill_iterations:4d} prefills")

# %%
# Make it a named policy
# ----------------------
# Registered policies work everywhere a name does, including :func:`~lloptim.simulator.simulate` and the
# ``--policy`` option of the command line (in the process that registered them).
from lloptim.runtime.registry import register_policy

register_policy("longest-batched", lambda k=8: Policy("longest-batched", LongestFirst(), BatchedPrefill(k)),
                "longest estimated output first, prefill when k clients wait")
print(lloptim.simulate(problem, "longest-batched", k=12).makespan_s)
