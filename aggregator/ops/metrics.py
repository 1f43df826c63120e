"""Prometheus metrics, with `prometheus-client`. One registry per service, so tests can run several.

Counters and histograms are updated as requests happen; gauges that describe
current state (circuit, indexed documents, readiness) are read from the live
gateway at scrape time, so they can never drift from what /status says.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aggregator.contract.outcomes import SourceResult

if TYPE_CHECKING:
    from aggregator.runtime.gateway import Gateway

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0)
CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class _LiveState(Collector):
    def __init__(self, current: Callable[[], "Gateway | None"], shared: Callable[[], "SharedView"]) -> None:
        self._current = current
        self._shared = shared

    def collect(self) -> Iterator[Metric]:
        gateway = self._current()
        circuit = GaugeMetricFamily("gateway_circuit_state", "Circuit breaker per source: 0 closed, 1 half-open, 2 open.", labels=["source"])
        documents = GaugeMetricFamily("gateway_indexed_documents", "Documents in an indexed source's local index.", labels=["source"])
        passages = GaugeMetricFamily("gateway_indexed_passages", "Passages in an indexed source's local index.", labels=["source"])
        store = GaugeMetricFamily("gateway_index_store_bytes", "Size on disk of an indexed source's persisted index.", labels=["source"])
        ready = GaugeMetricFamily("gateway_ready", "1 once every index has finished its first sync.")
        if gateway is not None:
            for name, slot in gateway.slots.items():
                circuit.add_metric([name], CIRCUIT_VALUES[slot.breaker.state])
                stats = slot.connector.stats()
                if stats is not None:
                    documents.add_metric([name], stats.documents)
                    passages.add_metric([name], stats.passages)
                    store.add_metric([name], stats.store_bytes)
            ready.add_metric([], 1 if gateway.ready else 0)
        view = self._shared()
        up = GaugeMetricFamily("gateway_shared_state_up", "1 while the shared store answers (index: PostgreSQL; redis), 0 while it does not.", labels=["backend"])
        for backend, reachable in view.up.items():
            up.add_metric([backend], 1 if reachable else 0)
        ratio = GaugeMetricFamily("gateway_response_cache_hit_ratio", "Share of retrievals this process answered from the cache (hit or coalesced).")
        if view.cache_hit_ratio is not None:
            ratio.add_metric([], view.cache_hit_ratio)
        yield from (circuit, documents, passages, store, ready, up, ratio)


class SharedView:
    """What the metrics read of the shared state: which shared stores answer, and the cache's hit ratio."""

    def __init__(self, up: dict[str, bool] | None = None, cache_hit_ratio: float | None = None) -> None:
        self.up = up or {}
        self.cache_hit_ratio = cache_hit_ratio


class Metrics:
    def __init__(self, current: Callable[[], "Gateway | None"], shared: Callable[[], SharedView] = SharedView) -> None:
        self.registry = CollectorRegistry()
        self.source_calls = Counter(
            "gateway_source_calls", "Source calls by outcome.", ["source", "outcome"], registry=self.registry
        )
        self.source_latency = Histogram(
            "gateway_source_latency_seconds", "Time of one source's part of a request.", ["source"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.requests = Counter("gateway_requests", "Retrieval requests by HTTP status.", ["status"], registry=self.registry)
        self.request_latency = Histogram(
            "gateway_request_latency_seconds", "Time to answer a retrieval.", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.mcp_calls = Counter(
            "gateway_mcp_calls", "MCP calls at /mcp by method or tool and outcome (ok, error, refused); apart from gateway_requests.",
            ["call", "outcome"], registry=self.registry,
        )  # fmt: skip
        self.mcp_latency = Histogram(
            "gateway_mcp_call_latency_seconds", "Time to answer an MCP tool call.", ["call"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.reloads = Counter("gateway_config_reloads", "Config reloads by result.", ["result"], registry=self.registry)
        self.cache = Counter(
            "gateway_response_cache", "Retrievals by response cache outcome: hit, coalesced (waited for an identical one), miss.",
            ["outcome"], registry=self.registry,
        )  # fmt: skip
        self._live = _LiveState(current, shared)
        self.registry.register(self._live)
        # Each label set's child, looked up once: `labels()` costs more than the observation itself, per source
        # of every request. A child is made on first use, as `labels()` would; none is ever removed.
        self._calls: dict[tuple[str, str], Any] = {}
        self._latencies: dict[str, Any] = {}
        self._statuses: dict[int, Any] = {}
        self._cache_outcomes: dict[str, Any] = {}

    def observe_sources(self, results: list[SourceResult]) -> None:
        calls, latencies = self._calls, self._latencies
        for result in results:
            name, outcome = result.name, result.outcome
            counter = calls.get((name, outcome))
            if counter is None:
                counter = calls[(name, outcome)] = self.source_calls.labels(name, outcome)
            counter.inc()
            if outcome != "skipped":
                histogram = latencies.get(name)
                if histogram is None:
                    histogram = latencies[name] = self.source_latency.labels(name)
                histogram.observe(result.elapsed_ms / 1000.0)

    def observe_request(self, status: int, seconds: float) -> None:
        counter = self._statuses.get(status)
        if counter is None:
            counter = self._statuses[status] = self.requests.labels(str(status))
        counter.inc()
        self.request_latency.observe(seconds)

    def observe_mcp(self, call: str, outcome: str, seconds: float | None = None) -> None:
        """One MCP call: `call` is a tool's name (`search`) or a method (`tools/list`, `http` for one refused before MCP)."""
        self.mcp_calls.labels(call, outcome).inc()
        if seconds is not None:
            self.mcp_latency.labels(call).observe(seconds)

    def observe_cache(self, outcome: str) -> None:
        counter = self._cache_outcomes.get(outcome)
        if counter is None:
            counter = self._cache_outcomes[outcome] = self.cache.labels(outcome)
        counter.inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition. With several workers, counters and histograms are summed over all of them
        (prometheus-client multiprocess mode); live-state gauges are those of the worker answering."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)
        combined.register(self._live)
        return generate_latest(combined), CONTENT_TYPE_LATEST
