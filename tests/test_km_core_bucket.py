"""TokenBucket: refill arithmetic, the rate x time + size bound, reconfiguration. Time is explicit."""
from __future__ import annotations

import math

import pytest

from agents.core.bucket import TokenBucket


def test_starts_full_and_empties():
    b = TokenBucket(1000, 4096, now=10.0)
    assert b.tokens(10.0) == 4096
    assert b.try_take(4096, 10.0)
    assert not b.try_take(1, 10.0)
    assert b.tokens(10.0) == 0


def test_refill_is_rate_times_elapsed_and_capped_at_size():
    b = TokenBucket(1000, 5000, now=0.0)
    assert b.try_take(5000, 0.0)
    assert b.tokens(1.5) == pytest.approx(1500)
    assert not b.try_take(2000, 1.5)  # a refused take takes nothing
    assert b.tokens(1.5) == pytest.approx(1500)
    assert b.try_take(2000, 2.0)
    assert b.tokens(2.0) == pytest.approx(0)
    assert b.tokens(1000.0) == 5000  # never above size


def test_time_until():
    b = TokenBucket(250, 1000, now=0.0)
    assert b.time_until(1000, 0.0) == 0.0
    assert b.try_take(1000, 0.0)
    assert b.time_until(500, 0.0) == pytest.approx(2.0)
    assert b.time_until(500, 1.0) == pytest.approx(1.0)
    assert b.ready_at(500) == pytest.approx(2.0)
    assert b.time_until(1001, 1.0) == math.inf  # larger than the bucket: never
    idle = TokenBucket(0, 1000, now=0.0)
    assert idle.try_take(1000, 0.0)
    assert idle.time_until(1, 50.0) == math.inf  # rate 0 never refills


def test_caller_waking_at_time_until_gets_its_tokens():
    b = TokenBucket(333.3, 700, now=0.0)
    t = 0.0
    for _ in range(500):
        t += b.time_until(256, t)
        assert b.try_take(256, t), t
    # 500 chunks: the first two came from the initial burst, the rest at the rate.
    assert t == pytest.approx((500 * 256 - 700) / 333.3, rel=1e-9)


def test_greedy_caller_is_limited_to_rate_times_time_plus_size():
    rate, size, chunk = 1000.0, 512, 64
    b = TokenBucket(rate, size, now=0.0)
    total = 0
    t = 0.0
    for step in range(0, 1001):  # from t=0: a full bucket left idle would overflow
        t = step * 0.013
        while b.try_take(chunk, t):
            total += chunk
        assert total <= rate * t + size + 1e-6, (t, total)
    # and it does get (almost) all of it: it can only miss less than one chunk.
    assert total > rate * t + size - chunk


def test_clock_going_backwards_earns_nothing():
    b = TokenBucket(100, 100, now=5.0)
    assert b.try_take(100, 5.0)
    assert b.tokens(4.0) == 0
    assert b.tokens(5.5) == pytest.approx(50)


def test_reconfigure_keeps_earned_tokens_and_never_grants_a_burst():
    b = TokenBucket(100, 1000, now=0.0)
    assert b.try_take(1000, 0.0)
    b.reconfigure(1000, 2000, now=2.0)  # 200 earned at the old rate
    assert b.tokens(2.0) == pytest.approx(200)
    assert b.tokens(3.0) == pytest.approx(1200)  # new rate from now on
    b.reconfigure(1000, 500, now=3.0)  # smaller bucket: clamped
    assert b.tokens(3.0) == 500
    assert (b.rate_bps, b.size_bits) == (1000.0, 500)


@pytest.mark.parametrize("rate,size", [(-1, 10), (math.inf, 10), (math.nan, 10), (True, 10), (1, -1), (1, 2.5)])
def test_invalid_parameters(rate, size):
    with pytest.raises(ValueError):
        TokenBucket(rate, size, now=0.0)


@pytest.mark.parametrize("bits", [-1, 1.5, True])
def test_invalid_bits(bits):
    b = TokenBucket(1, 10, now=0.0)
    with pytest.raises(ValueError):
        b.try_take(bits, 0.0)
