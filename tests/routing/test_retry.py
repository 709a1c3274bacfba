"""The retry policy: exponential back-off with equal jitter, capped; Retry-After honoured when reasonable."""

from __future__ import annotations

import random

import pytest

from atajo.routing.retry import RetryPolicy
from atajo.settings import RetrySettings


def test_backoff_doubles_and_each_delay_lies_in_its_jitter_window() -> None:
    policy = RetryPolicy(max_retries=5, base_s=0.1, max_s=100.0, rng=random.Random(1))
    for retry in range(6):
        cap = 0.1 * 2**retry
        delays = [policy.delay_s(retry) for _ in range(200)]
        assert all(d is not None and cap / 2 <= d <= cap for d in delays), retry


def test_jitter_spreads_retries_out() -> None:
    policy = RetryPolicy(base_s=1.0, max_s=10.0, rng=random.Random(7))
    delays = [policy.delay_s(0) for _ in range(500)]
    assert len(set(delays)) > 400  # not a fixed delay: a crowd of clients does not retry in lockstep
    values = [d for d in delays if d is not None]
    assert min(values) < 0.55 and max(values) > 0.95  # the whole [cap/2, cap] window is used
    assert sum(values) / len(values) == pytest.approx(0.75, abs=0.05)


def test_backoff_is_capped_at_max() -> None:
    policy = RetryPolicy(max_retries=10, base_s=0.1, max_s=1.0, rng=random.Random(3))
    delays = [policy.delay_s(10) for _ in range(200)]
    assert all(d is not None and 0.5 <= d <= 1.0 for d in delays)


def test_same_seed_same_delays() -> None:
    a = RetryPolicy(rng=random.Random(42))
    b = RetryPolicy(rng=random.Random(42))
    assert [a.delay_s(i % 3) for i in range(20)] == [b.delay_s(i % 3) for i in range(20)]


def test_retry_after_wins_over_backoff() -> None:
    policy = RetryPolicy(base_s=0.1, max_s=5.0, max_retry_after_s=10.0)
    assert policy.delay_s(0, 3.0) == 3.0
    assert policy.delay_s(2, 0.0) == 0.0
    assert policy.delay_s(0, 10.0) == 10.0


def test_retry_after_longer_than_we_will_wait_moves_on() -> None:
    policy = RetryPolicy(max_retry_after_s=10.0)
    assert policy.delay_s(0, 10.5) is None
    assert policy.delay_s(0, 3600.0) is None


def test_zero_base_means_immediate_retries() -> None:
    assert RetryPolicy(base_s=0.0).delay_s(3) == 0.0


def test_from_settings_converts_milliseconds() -> None:
    policy = RetryPolicy.from_settings(
        RetrySettings(max_retries=4, backoff_base_ms=250, backoff_max_ms=2000, max_retry_after_s=3)
    )
    assert (policy.max_retries, policy.base_s, policy.max_s, policy.max_retry_after_s) == (4, 0.25, 2.0, 3.0)
    assert policy.delay_s(0, 3.5) is None
    d = policy.delay_s(5)
    assert d is not None and 1.0 <= d <= 2.0
