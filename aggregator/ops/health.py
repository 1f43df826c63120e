"""Per-source health, fed by every source call: what /status, the status page and metrics report.

A source's `state`, from worst to best reason:
- `disabled`: defined in connectors.yaml but used by no knowledge base;
- `auth_failed`: its last call was refused (401/403), or its last sync was;
- `circuit_open`: the breaker is skipping it;
- `down`: its last `DOWN_AFTER` calls failed, or its index could not sync at all;
- `degraded`: a recent call failed, or its last sync did;
- `ok`.
Messages are scrubbed of every secret in the config before they are kept, and logged once per change:
a source that starts failing, fails differently, or answers again says so in the log (the same error
repeated, numbers aside, is not logged again: /status and the page count it).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from connectors.base import SourceStats, iso_utc

from aggregator.contract.outcomes import FAILURES, OUTCOMES, SourceResult
from aggregator.retrieval.fanout import SourceSlot
from aggregator.ops.history import History

log = logging.getLogger("aggregator.sources")
#: Numbers in a message (elapsed seconds, retry-after, counts) do not make it another error.
_NUMBERS = re.compile(r"\d+(?:\.\d+)?")

LATENCY_WINDOW = 256
RECENT_WINDOW = 20
#: Consecutive failures after which a source is `down` rather than `degraded`.
DOWN_AFTER = 3


def _iso_or_none(at: float | None) -> str | None:
    return None if at is None else iso_utc(at)


def percentile(values: Iterable[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    rank = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[rank], 1)


#: Longest message any output keeps (/status, the page, explain, spans, the CLI): cut after scrubbing.
MESSAGE_CHARS = 300


def redact(message: str | None, secrets: Iterable[str], limit: int | None = MESSAGE_CHARS) -> str | None:
    """The one scrub of every output: each secret replaced by `***`, then the text put on one line and cut at
    `limit` characters. In that order, since a secret cut in two by the clip would keep its first part."""
    if message is None:
        return None
    for secret in secrets:
        if secret:
            message = message.replace(secret, "***")
    if limit is None:
        return message
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 1] + "…"


@dataclass
class SourceHealth:
    name: str
    source_type: str
    calls: Counter[str] = field(default_factory=Counter)
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_WINDOW))
    consecutive_failures: int = 0
    last_outcome: str | None = None
    last_success_at: float | None = None  # Unix times: written as ISO 8601 when read, not on every call
    last_error: str | None = None
    last_error_at: float | None = None
    history: History = field(default_factory=History)
    #: The last error logged (outcome and message, numbers blanked); None while the source answers.
    logged_error: str | None = None

    def record(self, result: SourceResult, secrets: Iterable[str] = (), at: float | None = None) -> None:
        """Count one call that ended at `at` (Unix time; now if None)."""
        at = time.time() if at is None else at
        self.calls[result.outcome] += 1
        skipped = result.outcome == "skipped"  # not a call: it has no latency
        self.history.add(at, result.outcome, None if skipped else result.elapsed_ms)
        if skipped:
            return
        self.last_outcome = result.outcome
        self.recent.append(result.outcome)
        self.latencies_ms.append(result.elapsed_ms)
        if result.outcome in FAILURES:
            self.consecutive_failures += 1
            self.last_error = redact(result.error or result.outcome, secrets)
            self.last_error_at = at
            self.history.add_error(at, result.outcome, self.last_error or result.outcome)
            key = f"{result.outcome}: {_NUMBERS.sub('#', self.last_error or '')}"
            if key != self.logged_error:
                self.logged_error = key
                log.warning("source %s failed (%s): %s", self.name, result.outcome, self.last_error)
        else:
            self.consecutive_failures = 0
            self.last_success_at = at
            if self.logged_error is not None:
                self.logged_error = None
                log.info("source %s answers again (%s)", self.name, result.outcome)

    def state(self, slot: SourceSlot | None, used: bool, stats: SourceStats | None) -> str:
        """`stats`: the slot's connector.stats(), read once by the caller."""
        sync_error = stats.last_refresh_error if stats else None
        if not used:
            return "disabled"
        if self.last_outcome == "auth_failed" or (stats is not None and stats.last_refresh_outcome == "auth_failed"):
            return "auth_failed"
        if slot is not None and slot.breaker.state == "open":
            return "circuit_open"
        if self.consecutive_failures >= DOWN_AFTER or (sync_error and stats is not None and stats.documents == 0):
            return "down"
        if any(outcome in FAILURES for outcome in self.recent) or sync_error:
            return "degraded"
        return "ok"

    def summary(self, slot: SourceSlot | None, used: bool) -> dict[str, Any]:
        """What other replicas show of this one (`Peers`, every second): `summary_of(snapshot)`, with only those
        fields computed (no hour of history, no index details, no secrets to scrub)."""
        stats = slot.connector.stats() if slot else None
        return {
            "state": self.state(slot, used, stats),
            "calls": self._calls(),
            "latency_ms": self._latency(),
            "last_success": _iso_or_none(self.last_success_at),
            "last_error": self._last_error(),
            "circuit": _circuit(slot),
            "syncer": None if stats is None else stats.syncer,
        }

    def snapshot(self, slot: SourceSlot | None, used: bool, secrets: Iterable[str], now: float | None = None) -> dict[str, Any]:
        secrets = list(secrets)
        stats = slot.connector.stats() if slot else None
        return {
            "name": self.name,
            "type": self.source_type,
            "state": self.state(slot, used, stats),
            "ready": slot.connector.ready if slot else None,
            "last_success": _iso_or_none(self.last_success_at),
            "last_error": self._last_error(),
            "latency_ms": self._latency(),
            "calls": self._calls(),
            "history": self.history.snapshot(time.time() if now is None else now),
            "circuit": _circuit(slot),
            "index": None if stats is None else {
                "documents": stats.documents,
                "passages": stats.passages,
                "skipped": stats.skipped,
                "skipped_paths": stats.skipped_paths,
                "store_bytes": stats.store_bytes,
                "last_refresh": stats.last_refresh,
                "syncs": stats.syncs,
                "last_refresh_error": redact(stats.last_refresh_error, secrets),
                "syncing": stats.syncing,
                "sync_progress": {"done": stats.sync_done, "total": stats.sync_total},
                "passages_per_s": stats.passages_per_s,
                "syncer": stats.syncer,
            },
        }  # fmt: skip

    def _last_error(self) -> dict[str, Any] | None:
        return {"at": _iso_or_none(self.last_error_at), "message": self.last_error} if self.last_error else None

    def _latency(self) -> dict[str, Any]:
        window = list(self.latencies_ms)
        return {"p50": percentile(window, 0.5), "p95": percentile(window, 0.95), "window": len(window)}

    def _calls(self) -> dict[str, int]:
        return {outcome: self.calls.get(outcome, 0) for outcome in OUTCOMES}


#: The fields of a snapshot that other replicas show (`SourceHealth.summary`), with the index's `syncer`.
SUMMARY_FIELDS = ("state", "calls", "latency_ms", "last_success", "last_error", "circuit")


def summary_of(snapshot: dict[str, Any]) -> dict[str, Any]:
    """`SourceHealth.summary()` out of a snapshot already taken (/status has one)."""
    return {**{k: snapshot[k] for k in SUMMARY_FIELDS}, "syncer": (snapshot["index"] or {}).get("syncer")}


def _circuit(slot: SourceSlot | None) -> dict[str, Any] | None:
    breaker = slot.breaker if slot else None
    if breaker is None:
        return None
    until_trial = breaker.seconds_until_trial()
    return {
        "state": breaker.state,
        "consecutive_failures": breaker.consecutive_failures,
        "next_trial_in_s": None if until_trial is None else round(until_trial or 0.0, 1),
    }


@dataclass
class ReloadRecord:
    at: str
    result: str  # "ok" or "error"
    error: str | None = None


class HealthRecorder:
    """Outlives config reloads: a source keeps its history while its name and type stay the same.

    `clock` (Unix time) stamps every call recorded; tests replace it to place calls in given minutes.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.sources: dict[str, SourceHealth] = {}
        self.started = time.time()
        self.last_reload: ReloadRecord | None = None

    def source(self, name: str, source_type: str) -> SourceHealth:
        health = self.sources.get(name)
        if health is None or health.source_type != source_type:
            health = self.sources[name] = SourceHealth(name, source_type)
        return health

    def record(self, results: list[SourceResult], types: dict[str, str], secrets: Iterable[str] = ()) -> None:
        secrets = list(secrets)
        at = self.clock()
        for result in results:
            self.source(result.name, types.get(result.name, "?")).record(result, secrets, at)
