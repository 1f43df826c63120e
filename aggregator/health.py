"""Per-source health, fed by every source call: what /status, the status page and /readyz report."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .fanout import OUTCOMES, SourceResult

LATENCY_WINDOW = 256
#: Consecutive failures after which a source is `down` rather than `degraded`.
DOWN_AFTER = 3
FAILURES = frozenset({"timeout", "error", "rate_limited", "auth_failed"})


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[rank]


@dataclass
class SourceHealth:
    name: str
    source_type: str
    calls: Counter[str] = field(default_factory=Counter)
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    consecutive_failures: int = 0
    last_outcome: str | None = None
    last_success: str | None = None
    last_error: str | None = None
    last_error_at: str | None = None

    def record(self, result: SourceResult) -> None:
        self.calls[result.outcome] += 1
        self.last_outcome = result.outcome
        self.recent.append(result.outcome)
        if result.outcome == "skipped":
            return
        self.latencies_ms.append(result.elapsed_ms)
        if result.outcome in FAILURES:
            self.consecutive_failures += 1
            self.last_error = result.error or result.outcome
            self.last_error_at = _now_iso()
        else:
            self.consecutive_failures = 0
            self.last_success = _now_iso()

    @property
    def state(self) -> str:
        if self.last_outcome is None:
            return "ok"
        if self.last_outcome == "auth_failed":
            return "auth_failed"
        if self.consecutive_failures >= DOWN_AFTER:
            return "down"
        if any(outcome in FAILURES for outcome in self.recent):
            return "degraded"
        return "ok"

    def snapshot(self) -> dict[str, Any]:
        window = list(self.latencies_ms)
        return {
            "name": self.name,
            "type": self.source_type,
            "state": self.state,
            "last_success": self.last_success,
            "last_error": {"at": self.last_error_at, "message": self.last_error} if self.last_error else None,
            "latency_ms": {"p50": percentile(window, 0.5), "p95": percentile(window, 0.95), "window": len(window)},
            "calls": {outcome: self.calls.get(outcome, 0) for outcome in OUTCOMES},
        }


class HealthRecorder:
    """Outlives config reloads: a source keeps its history while its name and type stay the same."""

    def __init__(self) -> None:
        self.sources: dict[str, SourceHealth] = {}
        self.started = time.time()

    def source(self, name: str, source_type: str) -> SourceHealth:
        health = self.sources.get(name)
        if health is None or health.source_type != source_type:
            health = self.sources[name] = SourceHealth(name, source_type)
        return health

    def record(self, results: list[SourceResult], types: dict[str, str]) -> None:
        for result in results:
            self.source(result.name, types.get(result.name, "?")).record(result)
