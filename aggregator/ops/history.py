"""The last hour of one source's calls, one bucket per minute: what /status and the page's charts show.

Memory stays bounded whatever the traffic: at most `MINUTES` buckets per source, each holding a count
per outcome and a latency histogram over log-spaced bins (never the calls themselves), plus the last
`ERRORS_KEPT` error messages. A bin is 10 % wide, so a minute's p50 and p95 are within 5 % of the
exact values, and exact when the minute holds a single call or calls of one latency.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from connectors.base import iso_utc

MINUTES = 60
ERRORS_KEPT = 20
_BIN_GROWTH = 1.1
_LOG_GROWTH = math.log(_BIN_GROWTH)
_SMALLEST_MS = 0.1  # latencies below this share the first bin


def _bin(ms: float) -> int:
    return int(math.log(max(ms, _SMALLEST_MS) / _SMALLEST_MS) / _LOG_GROWTH)


def _bin_middle(index: int) -> float:
    return _SMALLEST_MS * _BIN_GROWTH ** (index + 0.5)


@dataclass(slots=True)
class MinuteBucket:
    """The calls of one minute (`minute` is Unix time // 60)."""

    minute: int
    calls: Counter[str] = field(default_factory=Counter)
    bins: Counter[int] = field(default_factory=Counter)
    fastest_ms: float = math.inf
    slowest_ms: float = 0.0

    def add(self, outcome: str, elapsed_ms: float | None) -> None:
        self.calls[outcome] += 1
        if elapsed_ms is None:
            return
        self.bins[_bin(elapsed_ms)] += 1
        self.fastest_ms = min(self.fastest_ms, elapsed_ms)
        self.slowest_ms = max(self.slowest_ms, elapsed_ms)

    def percentile(self, q: float) -> float | None:
        """The nearest-rank percentile, as `health.percentile` computes it over exact values."""
        total = sum(self.bins.values())
        if total == 0:
            return None
        rank = min(total - 1, max(0, round(q * (total - 1))))
        seen = 0
        for index in sorted(self.bins):
            seen += self.bins[index]
            if seen > rank:
                return round(min(self.slowest_ms, max(self.fastest_ms, _bin_middle(index))), 1)
        return round(self.slowest_ms, 1)  # not reached: the ranks add up to total

    def snapshot(self) -> dict[str, Any]:
        return {
            "at": iso_utc(self.minute * 60),
            "calls": dict(self.calls),
            "latency_ms": {"p50": self.percentile(0.5), "p95": self.percentile(0.95)},
        }


@dataclass(slots=True)
class ErrorEntry:
    at: float
    outcome: str
    message: str


class History:
    """Minute buckets and recent errors of one source; the caller gives every time (an injectable clock)."""

    def __init__(self) -> None:
        self._buckets: deque[MinuteBucket] = deque(maxlen=MINUTES)
        self.errors: deque[ErrorEntry] = deque(maxlen=ERRORS_KEPT)

    def add(self, at: float, outcome: str, elapsed_ms: float | None) -> None:
        """Count one call that ended at `at` (Unix time); `elapsed_ms` None for calls not made (skipped)."""
        self._bucket(int(at // 60)).add(outcome, elapsed_ms)

    def add_error(self, at: float, outcome: str, message: str) -> None:
        self.errors.append(ErrorEntry(at, outcome, message))

    def _bucket(self, minute: int) -> MinuteBucket:
        for bucket in reversed(self._buckets):  # the newest, almost always
            if bucket.minute == minute:
                return bucket
            if bucket.minute < minute:
                break
        if self._buckets and minute < self._buckets[-1].minute:
            return self._buckets[-1]  # the clock stepped back: count it in the newest minute rather than reorder
        bucket = MinuteBucket(minute)
        self._buckets.append(bucket)
        return bucket

    def minutes(self, now: float) -> list[MinuteBucket]:
        """Buckets of the `MINUTES` minutes up to and including the current one, oldest first."""
        first = int(now // 60) - MINUTES + 1
        return [bucket for bucket in self._buckets if bucket.minute >= first]

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "window_minutes": MINUTES,
            "now": iso_utc(now),
            "minutes": [bucket.snapshot() for bucket in self.minutes(now)],
            "errors": [{"at": iso_utc(e.at), "outcome": e.outcome, "message": e.message} for e in reversed(self.errors)],
        }
