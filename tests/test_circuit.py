"""The circuit breaker's state machine, on a clock the test controls."""

from __future__ import annotations

from aggregator.retrieval.breaker import CircuitBreaker
from connectors.base import CircuitSettings


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, failures: int = 3) -> CircuitBreaker:
    return CircuitBreaker(CircuitSettings(failures=failures, cooldown_s=10, max_cooldown_s=25), clock)


def test_opens_after_consecutive_failures_only():
    clock = Clock()
    b = breaker(clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    b.record_success()  # a success in between resets the count
    for _ in range(2):
        b.record_failure()
    assert b.state == "closed" and b.allow()
    b.record_failure()
    assert b.state == "open" and not b.allow()
    assert b.seconds_until_trial() == 10


def test_half_open_lets_one_trial_through_and_success_closes():
    clock = Clock()
    b = breaker(clock, failures=1)
    b.record_failure()
    clock.now = 9.9
    assert not b.allow()
    clock.now = 10.0
    assert b.allow() and b.state == "half_open"
    assert not b.allow(), "only one trial at a time"
    b.record_success()
    assert b.state == "closed" and b.allow()


def test_a_failed_trial_reopens_with_a_longer_capped_cooldown():
    clock = Clock()
    b = breaker(clock, failures=1)
    b.record_failure()
    expected = [20, 25, 25]  # doubled, then capped at max_cooldown_s
    for cooldown in expected:
        clock.now += 100
        assert b.allow()
        b.record_failure()
        assert b.state == "open" and b.seconds_until_trial() == cooldown
    clock.now += 25
    assert b.allow()
    b.record_success()
    b.record_failure()
    assert b.seconds_until_trial() == 10, "after closing, the cool-down starts again from cooldown_s"
