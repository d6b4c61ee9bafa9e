"""The forecast of a request's hold past the fleet horizon (:func:`lloptim.runtime.fleet._forecast_hold`)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from lloptim.hardware import load_profile
from lloptim.runtime.fleet import FORECAST_STRIDE, FleetPrices, _by_steps_left, _forecast_hold

LAT = load_profile("llama-65b").latency


def _exact(ctx, left, prompt, steps):
    """The same model step by step (no stride), seconds."""
    total = LAT.prefill_per_token_s * prompt
    for j in range(int(steps)):
        alive = [c + j for c, n in zip(ctx, left) if n > j]
        total += LAT.decode_time(len(alive) + 1, sum(alive) + prompt + j)
    return total


def test_the_strided_forecast_is_the_step_by_step_model_within_a_stride():
    ctx = np.array([500.0, 3000.0, 40.0])
    left = np.array([30.0, 2500.0, 700.0])
    got = _forecast_hold(ctx, left, 200.0, 1000.0, LAT)
    exact = _exact(ctx, left, 200.0, 1000.0)
    # each stride reads the contexts at its first step (short by under a stride of growth per
    # request per step), and counts a request that finishes within it for all of it (over by
    # under a stride of steps each)
    under = 1000 * LAT.decode_per_kv_token_s * (len(ctx) + 1) * FORECAST_STRIDE
    over = len(ctx) * FORECAST_STRIDE * (LAT.decode_per_seq_s + LAT.decode_per_kv_token_s * (ctx.max() + 1000.0))
    assert exact - under <= got <= exact + over
    # alone: prefill plus its own steps at one running request
    alone = _forecast_hold(np.zeros(0), np.zeros(0), 200.0, 160.0, LAT)
    assert _exact([], [], 200.0, 160.0) - 160 * LAT.decode_per_kv_token_s * FORECAST_STRIDE <= alone
    assert alone <= _exact([], [], 200.0, 160.0)


def test_long_contexts_that_stay_cost_more_than_their_size_now_and_finished_ones_nothing():
    """What crowding is: long contexts that stay and grow slow every step; requests that finish do not."""
    p, o = 100.0, 4000.0
    alone = _forecast_hold(np.zeros(0), np.zeros(0), p, o, LAT)
    ten_long = _forecast_hold(np.full(10, 1000.0), np.full(10, 3000.0), p, o, LAT)
    ten_short = _forecast_hold(np.full(10, 1000.0), np.full(10, 50.0), p, o, LAT)
    assert alone < ten_short < ten_long
    # the current-step estimate (ten contexts as they are now, for every step) misses their growth
    now_step = (o + 1) * LAT.decode_time(11, 10 * 1000.0 + p + o / 2) + LAT.prefill_per_token_s * p
    assert ten_long > now_step
    # ten short ones are gone after 50 steps: within 2 % of running alone
    assert ten_short < 1.02 * alone


def test_while_the_queue_lasts_finished_requests_are_replaced():
    """Refilling for 0 steps is no refill; for all the steps, the batch keeps its size and mean context."""
    ctx, left = np.array([300.0, 100.0, 2000.0]), np.array([20.0, 40.0, 5000.0])
    p, o = 50.0, 800.0
    bare = _forecast_hold(ctx, left, p, o, LAT)
    assert _forecast_hold(ctx, left, p, o, LAT, refill_steps=0.0) == bare
    part = _forecast_hold(ctx, left, p, o, LAT, refill_steps=400.0)
    full = _forecast_hold(ctx, left, p, o, LAT, refill_steps=np.inf)
    assert bare < part < full
    # for all the steps: four running at every step; the short ones' places held at the mean context
    mean = ctx.mean()
    exact = LAT.prefill_per_token_s * p
    for j in range(int(o)):
        alive = [c + j for c, n in zip(ctx, left) if n > j]
        exact += LAT.decode_time(4, sum(alive) + (3 - len(alive)) * mean + p + j)
    under = o * LAT.decode_per_kv_token_s * 4 * FORECAST_STRIDE
    over = 2 * FORECAST_STRIDE * LAT.decode_per_kv_token_s * (mean + o)
    assert exact - under <= full <= exact + over


def test_a_request_that_starts_later_meets_the_instance_as_it_will_be_then():
    """``delay_steps``: held requests that finish before it starts do not run beside it."""
    ctx, left = np.full(60, 2000.0), np.full(60, 1000.0)
    p, o = 100.0, 4000.0
    alone = _forecast_hold(np.zeros(0), np.zeros(0), p, o, LAT)
    now = _forecast_hold(ctx, left, p, o, LAT)
    assert _forecast_hold(ctx, left, p, o, LAT, delay_steps=0.0) == now
    # all of them gone by its start: as alone; half-way: in between
    assert _forecast_hold(ctx, left, p, o, LAT, delay_steps=1000.0) == alone
    assert alone < _forecast_hold(ctx, left, p, o, LAT, delay_steps=500.0) < now
    # the queue is served from now: a refill that ends before it starts replaces nothing beside it,
    # one that goes on past its start does
    assert _forecast_hold(ctx, left, p, o, LAT, refill_steps=1000.0, delay_steps=1000.0) == alone
    assert _forecast_hold(ctx, left, p, o, LAT, refill_steps=2000.0, delay_steps=1000.0) > alone


def test_past_the_horizon_a_later_start_on_a_fast_instance_beats_a_slow_one_free_now():
    """:meth:`FleetPrices.place_past_horizon` forecasts from the request's start on each instance.

    Instance 0 (speed 1) frees a client in 1,000 of its current steps, when the 60 requests it
    holds (1,000 steps left each) are done; instance 1, 2.2 times slower, is free and empty now.
    The request (4,000 steps) completes first on instance 0 (about 256 s against 285 s); read as
    meeting instance 0 as it is now, the 60 requests would decode beside it for 1,000 steps
    (371 s), and it went to the slow one.
    """
    fp = object.__new__(FleetPrices)
    fp.m = 2
    fp.slowness = np.array([1.0, 2.2])
    fp._prompts = np.array([100.0])
    fp._estimates = np.array([4000.0])
    held = [_by_steps_left(np.full(60, 2000.0), np.full(60, 1000.0)), _by_steps_left(np.zeros(0), np.zeros(0))]
    fp._corunners = lambda now, states: (held, 0.0)
    states = [SimpleNamespace(latency=LAT), SimpleNamespace(latency=LAT)]
    t0 = 50.0
    delay = 1000 * LAT.decode_time(60, 60 * 2000.0)
    finish, where = fp.place_past_horizon(0, [t0 + delay, t0], 1, t0, states)
    assert where == 0
    alone = _forecast_hold(np.zeros(0), np.zeros(0), 100.0, 4000.0, LAT)
    assert finish == pytest.approx(t0 + delay + alone)
    assert finish < t0 + 2.2 * alone
