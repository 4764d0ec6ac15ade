"""Per-client token buckets with an injected clock, and the bounded LRU of clients."""

from __future__ import annotations

import pytest

from clock import FakeClock
from edge_agent.api.app import limiter_from_config
from edge_agent.common.ratelimit import RateLimiter, TokenBucket
from edge_agent.config import ApiConfig
from edge_agent.errors import ConfigError, RateLimitedError


def test_burst_then_refusal_with_wait_time() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=10.0, burst=3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.1)
    clock.now += 0.05
    assert limiter.acquire("a") == pytest.approx(0.05)  # half a token came back; none taken


def test_refill_at_rate_and_capped_at_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=10.0, burst=3, clock=clock)
    for _ in range(3):
        limiter.acquire("a")
    clock.now += 0.1
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") > 0
    clock.now += 3600  # a long quiet period refills to the burst, no more
    assert [limiter.acquire("a") for _ in range(4)].count(0.0) == 3


def test_clients_are_independent() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, clock=FakeClock())
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") > 0
    assert limiter.acquire("b") == 0.0


def test_clock_stepping_back_neither_refills_nor_breaks() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=1, clock=clock)
    limiter.acquire("a")
    clock.now -= 100
    assert limiter.acquire("a") == pytest.approx(1.0)


def test_tracked_clients_are_bounded_least_recent_evicted() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, clock=FakeClock(), max_clients=2)
    limiter.acquire("a")
    limiter.acquire("b")
    limiter.acquire("a")  # refused, but "a" is now the most recent
    limiter.acquire("c")  # evicts "b"
    assert len(limiter) == 2
    assert limiter.acquire("a") > 0  # still tracked: still empty
    assert limiter.acquire("b") == 0.0  # evicted: starts again with a full bucket


def test_many_clients_stay_bounded() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, clock=FakeClock(), max_clients=100)
    for i in range(10_000):
        limiter.acquire(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 100


def test_check_raises_rate_limited() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, clock=FakeClock())
    limiter.check("a")
    with pytest.raises(RateLimitedError, match="retry in"):
        limiter.check("a")


def test_from_config() -> None:
    clock = FakeClock()
    limiter = limiter_from_config(
        ApiConfig(rate_limit_per_second=5.0, rate_limit_burst=2), clock=clock
    )
    assert (limiter.rate, limiter.burst) == (5.0, 2.0)
    assert limiter.acquire("x") == limiter.acquire("x") == 0.0
    assert limiter.acquire("x") == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("rate", "burst", "clients"), [(0.0, 1, 1), (-1.0, 1, 1), (1.0, 0, 1), (1.0, 1, 0)]
)
def test_invalid_settings_are_config_errors(rate: float, burst: int, clients: int) -> None:
    with pytest.raises(ConfigError):
        RateLimiter(rate, burst, max_clients=clients)


# --------------------------------------------------------------------------- one bucket
def test_a_bucket_starts_full_takes_n_and_says_when_n_is_due() -> None:
    bucket = TokenBucket(rate=100.0, burst=300.0, now=0.0)
    assert bucket.take(0.0, 256) == 0.0
    assert bucket.take(0.0, 256) == pytest.approx(212 / 100)  # 44 left, nothing taken
    assert bucket.tokens == pytest.approx(44.0)
    assert bucket.take(2.12, 256) == 0.0
    assert bucket.take(1000.0, 301) == pytest.approx(0.01)  # refilled to the burst, no more


def test_a_bucket_within_tolerance_is_admitted_and_left_empty_not_negative() -> None:
    bucket = TokenBucket(rate=10.0, burst=1.0, now=0.0)
    bucket.take(0.0)
    assert bucket.take(0.09999999995, tolerance=1e-9) == 0.0
    assert bucket.tokens == 0.0
    assert bucket.take(0.09999999995) > 0  # without the tolerance it waits


def test_a_bucket_ignores_a_clock_stepping_back() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0, now=100.0)
    bucket.take(100.0)
    assert bucket.take(50.0) == 0.0  # the one token left, neither refilled nor drained
    assert bucket.take(50.0) == pytest.approx(1.0)
    assert bucket.stamp == 100.0
