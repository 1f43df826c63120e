"""A circuit breaker per source: stop calling a source that keeps failing, try it again later.

closed --(`failures` failures in a row)--> open --(cool-down passes)--> half-open
half-open lets exactly one trial call through: success closes the circuit,
failure opens it again with the cool-down doubled (up to `max_cooldown_s`).
While open, calls are skipped at no cost and reported as `skipped`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Literal

from connectors.base import CircuitSettings

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(self, settings: CircuitSettings = CircuitSettings(), clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self.state: State = "closed"
        self.consecutive_failures = 0
        self.cooldown_s = settings.cooldown_s
        self.open_until = 0.0
        self._trial_in_flight = False

    def allow(self) -> bool:
        """May a call go through now? In half-open state only one trial at a time does."""
        if self.state == "closed":
            return True
        if self.state == "open":
            if self._clock() < self.open_until:
                return False
            self.state = "half_open"
            self._trial_in_flight = False
        if self._trial_in_flight:
            return False
        self._trial_in_flight = True
        return True

    def record_success(self) -> None:
        self.state = "closed"
        self.consecutive_failures = 0
        self.cooldown_s = self.settings.cooldown_s
        self._trial_in_flight = False

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        if self.state == "half_open":
            self.cooldown_s = min(self.cooldown_s * 2, self.settings.max_cooldown_s)
            self._open()
        elif self.state == "closed" and self.consecutive_failures >= self.settings.failures:
            self._open()

    async def admit(self) -> bool:
        """`allow()` for the fan-out; a breaker shared across replicas (aggregator/retrieval/shared_breaker.py) may ask Redis."""
        return self.allow()

    def report(self, success: bool) -> Awaitable[None] | None:
        """One call's verdict, for the fan-out, recorded at once. A shared breaker that must also tell the other
        replicas returns that telling, to be awaited; None when there is nothing to wait for (always, here)."""
        if success:
            self.record_success()
        else:
            self.record_failure()
        return None

    def release(self) -> None:
        """A trial that ended without a verdict (cancelled): let the next call try."""
        self._trial_in_flight = False

    def _open(self) -> None:
        self.state = "open"
        self.open_until = self._clock() + self.cooldown_s
        self._trial_in_flight = False

    def seconds_until_trial(self) -> float | None:
        return max(0.0, self.open_until - self._clock()) if self.state == "open" else None
