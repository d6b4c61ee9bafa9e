"""Online runtime: stealing, the Lagrangian rule, information discipline, decision latency."""

import numpy as np
import pytest

from lloptim import Problem, Workload, lower_bound, run_policy, summarize, workloads
from lloptim.runtime.engine import Engine
from lloptim.runtime.hybrid import hybrid_policy
from lloptim.runtime.iteration_schedulers import PrefillFirst
from lloptim.runtime.lagrangian import LagrangianIterations, survival_function
from lloptim.runtime.policy import DECODE, Policy, Prefill
from lloptim.runtime.request_schedulers import AssignedQueues


def test_stealing_moves_unstarted_work_and_loses_nothing(gsm8k_small):
    # everything planned on client 0: only stealing can use the other clients
    lopsided = np.zeros(gsm8k_small.n_requests, dtype=np.int64)
    rs = AssignedQueues(lopsided, steal=True)
    res = Engine(gsm8k_small, Policy("steal", rs, PrefillFirst())).run()
    assert rs.steals > 0
    assert np.all(~np.isnan(res.done_s)) and res.generated_tokens == gsm8k_small.workload.total_output_tokens
    assert len(set(res.client.tolist())) == gsm8k_small.n_clients  # every client served something
    no_steal = Engine(gsm8k_small, Policy("static", AssignedQueues(lopsided, steal=False), PrefillFirst())).run()
    assert set(no_steal.client.tolist()) == {0}
    assert res.makespan_s < no_steal.makespan_s / 5


def test_hybrid_beats_baseline_and_approaches_the_bound():
    problem = Problem.single(workloads.gsm8k("test"), "llama-65b")
    base, hyb = summarize(run_policy(problem, "baseline")), summarize(run_policy(problem, "hybrid"))
    assert hyb.makespan_s < base.makespan_s and hyb.utilization > base.utilization
    assert hyb.gap_to_bound < 0.02  # benchmarks report the exact figure; CI guards a margin
    assert hyb.decision_latency_us_p99 < 5000  # the paper's bound, with room for a slow CI machine


class _FakeEngine:
    def __init__(self, requests):
        self.client_request = requests
        self.prompt = [10] * len(requests)
        self.context = [10] * len(requests)
        self.generated_before = [0] * len(requests)
        self.client_epoch = [0] * len(requests)


class _FakeState:
    """The parts of an InstanceState the iteration rules read: room for everything, 1-token blocks."""

    def __init__(self, waiting, n_running, requests):
        self.index = 0
        self.clients = range(len(requests))
        self.waiting = dict.fromkeys(waiting)
        self.n_running = n_running
        self.kv_free_blocks = 10_000
        self.kv_unbound = False
        self.kv_block = 1
        self.decode_steps = 0
        self.prefilled = {}
        self.engine = _FakeEngine(requests)

    def growth_blocks(self):
        return self.n_running

    def admission_blocks(self, client):
        return 11

    def held_blocks(self, request, tokens):
        return tokens

    def context(self, client):
        return self.engine.context[self.engine.client_request[client]]


def test_lagrangian_rule_prices_prefill_against_waiting():
    problem = Problem.single(Workload.from_arrays([10] * 8, [50] * 8), "llama-65b", clients=4)
    lat = problem.instances[0].profile.latency
    sched = LagrangianIterations(forecast="none", setup_weight=1.0)
    from lloptim.runtime.policy import RunContext

    class _Pending:
        def pending(self):
            return 4

    ctx = RunContext(problem, np.full(8, 50.0), True, problem.client_instance())
    ctx.extra["request_scheduler"] = _Pending()
    sched.setup(ctx)
    per_step = lat.decode_base_s / 4  # one waiting client's slot, priced at mu = 1/C
    state = _FakeState([0], 3, [0, 1, 2, 3])
    steps_until_prefill = int(np.ceil(lat.prefill_base_s / per_step))
    decisions = [sched.decide(state) for _ in range(steps_until_prefill)]
    assert all(d is DECODE for d in decisions[:-1])
    assert isinstance(decisions[-1], Prefill) and list(decisions[-1].clients) == [0]
    # two waiting clients accrue twice as fast
    state2 = _FakeState([0, 1], 2, [0, 1, 2, 3])
    d2 = [sched.decide(state2) for _ in range(int(np.ceil(steps_until_prefill / 2)))]
    assert isinstance(d2[-1], Prefill)


def test_fused_lagrangian_inserts_prompts_at_once_and_beats_separate_prefills_with_unknown_lengths():
    problem = Problem.single(Workload.from_arrays([10] * 8, [50] * 8), "llama-65b", clients=4)
    from lloptim.runtime.policy import Mixed, RunContext

    class _Pending:
        def pending(self):
            return 4

    ctx = RunContext(problem, np.full(8, 50.0), True, problem.client_instance())
    ctx.extra["request_scheduler"] = _Pending()
    fused = LagrangianIterations(fused=True)
    fused.setup(ctx)
    state = _FakeState([0, 2], 2, [0, 1, 2, 3])
    state.prefilled = {}
    # a fused insertion has no fixed cost (C_p = 0): both waiting prompts join the next iteration whole
    assert fused.decide(state) == Mixed({0: 10, 2: 10})
    assert fused.decide(_FakeState([], 2, [0, 1, 2, 3])) is DECODE
    budgeted = LagrangianIterations(fused=True, token_budget=15)
    budgeted.setup(ctx)
    assert budgeted.decide(state) == Mixed({0: 10, 2: 5})
    # end to end with unknown lengths: no prefill/idle trade-off left to lose on
    w = workloads.gsm8k("test", limit=400)
    p = Problem.single(w, "llama-65b", clients=16)
    from lloptim.runtime.estimators import estimate

    est = estimate(w, "bucket-quantile", train=workloads.gsm8k("train"))
    bound = lower_bound(p)
    a = summarize(run_policy(p, "hybrid", estimates=est), bound)
    b_res = run_policy(p, "hybrid-fused", estimates=est)
    b = summarize(b_res, bound)
    assert b.requests_completed == 400 and b.output_tokens == int(w.output_tokens.sum())
    assert b.mixed_iterations > 0 and b.prefill_iterations == 0
    assert b.lower_bound_s == bound.fused_s and b.makespan_s >= bound.fused_s
    assert b.makespan_s < a.makespan_s


def test_unknown_lengths_are_revealed_only_at_finish():
    # two workloads that differ only in the true length of request 0 (20 vs 200 tokens)
    p = [30] * 12
    o1 = [20] + [60] * 11
    o2 = [200] + [60] * 11
    est = np.full(12, 60.0)
    r1 = run_policy(Problem.single(Workload.from_arrays(p, o1), "llama-65b", clients=4), "hybrid", estimates=est)
    r2 = run_policy(Problem.single(Workload.from_arrays(p, o2, max_output_tokens=[200] * 12), "llama-65b",
                                   clients=4), "hybrid", estimates=est)
    first_finish = min(r1.done_s.min(), r2.done_s.min())
    before = r1.trace_start_s < first_finish - 1e-12
    n = int(before.sum())
    # every decision before anything finished is identical: the policy could not see the truth
    assert np.array_equal(r1.trace_kind[:n], r2.trace_kind[:n])
    assert np.array_equal(r1.trace_participants[:n], r2.trace_participants[:n])
    assert not r1.known_lengths


def test_hybrid_with_estimates_and_survival():
    problem = Problem.single(workloads.gsm8k("test", limit=300), "llama-65b", clients=12)
    train = workloads.gsm8k("train")
    surv = survival_function(train.output_tokens)
    assert surv[0] == pytest.approx(1.0) and surv[-1] == 0.0 and np.all(np.diff(surv) <= 0)
    from lloptim.runtime.estimators import estimate

    est = estimate(problem.workload, "bucket-quantile", train=train)
    for pol in (hybrid_policy(), hybrid_policy(survival=surv), hybrid_policy(forecast="none")):
        m = summarize(run_policy(problem, pol, estimates=est))
        assert m.requests_completed == 300 and m.makespan_s >= lower_bound(problem).total_s


@pytest.mark.parametrize("prompt, output", [([12, 30, 7], [2, 3, 4]), ([25, 9, 14], [4, 1, 3])])
def test_hybrid_within_stated_factor_of_full_mip_optimum(prompt, output):
    """With perfect information on tiny instances the hybrid is within 10 % of the full MIP optimum."""
    from lloptim.solvers import SolveParams, solve
    from lloptim.solvers.result import Termination

    problem = Problem.single(Workload.from_arrays(prompt, output), "llama-65b", clients=2)
    mip = solve(problem, "highs", SolveParams(time_limit_s=60), formulation="full_mip")
    assert mip.status == Termination.OPTIMAL
    hybrid = summarize(run_policy(problem, "hybrid"))
    assert mip.dual_bound <= hybrid.makespan_s * (1 + 1e-9)  # nothing beats the proven optimum
    assert hybrid.makespan_s <= 1.10 * mip.primal_bound
    assert lower_bound(problem).total_s <= mip.primal_bound * (1 + 1e-9)
