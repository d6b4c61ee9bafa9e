"""The KV memory price on fleets: the priced headroom of a cache is capped by the cheapest memory elsewhere.

On a fleet the LP gives every cache the full memory weight wherever memory binds in aggregate,
and the online subgradient drives a small cache's weight to 1 (its memory fills, its clients do
not), so an uncapped headroom projects the small cache most optimistically: it then takes long
requests that a large cache beside it holds without preemption (docs *KV memory*, the fleet
ablation). :meth:`LagrangianIterations.headroom_weight` caps the weight by the price of the
cheapest other cache, ``kappa_j = beta_j nu_j decode_base_s_j / M_j`` (makespan seconds per
token-step, ``nu``: the LP's time shares). These tests fail if the cap is removed.
"""

from __future__ import annotations

import numpy as np
import pytest

from lloptim import Problem, Workload
from lloptim.formulations.binpacking_kv import kv_price_weights, kv_prices
from lloptim.runtime.engine import Engine
from lloptim.runtime.estimators import noisy_estimates
from lloptim.runtime.lagrangian import HEADROOM_Z, LagrangianIterations
from lloptim.runtime.registry import make_policy
from memory_cases import check_conserved


def _workload(seed: int, n: int = 240) -> Workload:
    rng = np.random.default_rng(seed)
    return Workload.from_arrays(rng.integers(20, 200, n), np.clip(np.rint(rng.lognormal(np.log(100), 1.2, n)), 1, 900))


def _fleet(seed: int, small: int = 3072, large: int = 8192, n: int = 240) -> Problem:
    """A small cache beside a large one, 24 clients each; memory can fill both."""
    wl = _workload(seed, n)
    insts = tuple(Problem.single(wl, "llama-65b", clients=24, kv_capacity_tokens=cap).instances[0]
                  for cap in (small, large))
    return Problem(wl, insts)


_check_conservation = check_conserved


def test_kv_prices_give_the_weights_and_the_time_shares():
    problem = _fleet(1)
    prices = kv_prices(problem)
    assert prices.weights.shape == prices.time_shares.shape == (2,)
    np.testing.assert_array_equal(prices.weights, kv_price_weights(problem))
    assert np.all(prices.time_shares >= 0) and prices.time_shares.sum() <= 1 + 1e-9
    assert prices.time_shares.sum() > 0
    # one instance: its time row carries the whole makespan price
    one = Problem(problem.workload, problem.instances[:1])
    assert kv_prices(one).time_shares == pytest.approx([1.0])


def _ran(problem: Problem, seed: int, **options):
    est = noisy_estimates(problem.workload, 0.5, seed=seed)
    pol = make_policy("hybrid", **options)
    engine = Engine(problem, pol, estimates=est, check=True)
    res = engine.run()
    return pol, engine, res


def test_headroom_on_a_fleet_is_capped_by_the_cheapest_memory_elsewhere():
    """The small cache's headroom weight is its weight times kappa_large / kappa_small; the large one's is its own."""
    problem = _fleet(2)
    pol, engine, _ = _ran(problem, 2, memory_prices="lp", price_updates=False)
    its = pol.iterations
    assert all(its.memory_binds) and all(its.pricing)
    small, large = engine.states
    its.beta[:] = [1.0, 1.0]
    nu = its.time_share
    kappa = [nu[k] * its.token_price[k] for k in range(2)]
    assert kappa[0] > kappa[1]  # the small cache's memory is dearer per token-step
    assert its.headroom_weight(small) == pytest.approx(kappa[1] / kappa[0])
    assert its.headroom_weight(small) < 1.0
    assert its.headroom_weight(large) == pytest.approx(1.0)
    # so the small cache projects less optimistically than the uncapped weight would
    assert its.projection_scale(small) > np.exp(its.sigma * HEADROOM_Z[1])
    assert its.projection_scale(large) == pytest.approx(np.exp(its.sigma * HEADROOM_Z[1]))
    # memory that costs nothing elsewhere: no optimism anywhere it could be placed instead
    its.beta[:] = [1.0, 0.0]
    assert its.headroom_weight(small) == 0.0 and its.projection_scale(small) == pytest.approx(1.0)
    assert its.headroom_weight(large) == 0.0  # its own weight is 0
    # never above the instance's own weight
    its.beta[:] = [0.3, 1.0]
    assert its.headroom_weight(small) == pytest.approx(0.3)


def test_headroom_is_the_memory_weight_on_one_instance_and_between_equal_caches():
    wl = _workload(3)
    one = Problem.single(wl, "llama-65b", clients=24, kv_capacity_tokens=3072)
    pol, engine, _ = _ran(one, 3, memory_prices="lp", price_updates=False)
    its = pol.iterations
    for beta in (0.0, 0.4, 1.0):
        its.beta[0] = beta
        assert its.headroom_weight(engine.states[0]) == its.memory_weight(engine.states[0]) == beta
    twins = Problem.single(wl, "llama-65b", clients=24, kv_capacity_tokens=3072, instances=2)
    pol, engine, _ = _ran(twins, 3, memory_prices="uniform", price_updates=False)
    its = pol.iterations
    assert its.time_share == [0.5, 0.5]  # no LP: equal shares
    its.beta[:] = [0.5, 0.5]
    assert [its.headroom_weight(s) for s in engine.states] == [0.5, 0.5]


@pytest.mark.parametrize("prices", ["lp", "uniform"])
@pytest.mark.parametrize("seed", [4, 5])
def test_capped_headroom_changes_the_fleets_admissions_and_conserves(seed, prices):
    """A run on the fleet: the cap binds on the small cache during the run, the admissions differ from
    the uncapped rule's, every request and token is served once and KV never exceeds a cache."""
    problem = _fleet(seed)
    capped = []

    class Recording(LagrangianIterations):
        def headroom_weight(self, state):
            h = super().headroom_weight(state)
            capped.append((state.index, h < self.memory_weight(state) - 1e-12))
            return h

    class Uncapped(LagrangianIterations):
        def headroom_weight(self, state):
            return self.memory_weight(state)

    est = noisy_estimates(problem.workload, 0.5, seed=seed)
    runs = {}
    for name, cls in (("capped", Recording), ("uncapped", Uncapped)):
        pol = make_policy("hybrid", memory_prices=prices)
        pol.iterations = cls(fused="auto", memory_prices=prices)
        res = runs[name] = Engine(problem, pol, estimates=est, check=True).run()
        _check_conservation(problem, res)
    assert any(c for k, c in capped if k == 0)  # the small cache's headroom was damped
    assert not np.array_equal(runs["capped"].assign_s, runs["uncapped"].assign_s)
