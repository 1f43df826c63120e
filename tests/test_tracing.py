"""Tracing: the caller's W3C trace continued, a span per retrieval and per source, the trace passed on to HTTP
sources and written in the access log; exported through the standard OTEL_* variables."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from aggregator.web.api import create_app
from aggregator.retrieval.breaker import CircuitBreaker
from aggregator.cli import main
from aggregator.retrieval.fanout import SourcePolicy, SourceSlot, ask_sources
from aggregator.ops.tracing import Tracing, TracingConfigError, exporters_from_env
from connectors.base import CircuitSettings, SourceQuery

from testkit.fakes.dify import FakeUpstream
from testkit.gateway import ask, retrieval_body
from testkit.loopback import serve, wait_ready

from .conftest import KEY, make_config, write_docs
from .test_fanout import OK, Scripted

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
SECRET = "upstream-secret-in-the-url"
BODY = retrieval_body("rotate signing keys", top_k=3)


def in_memory() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


def federated(tmp_path: Path, upstream_url: str):
    endpoint = upstream_url.replace("http://", f"http://user:{SECRET}@")  # a secret of the config, also in the URL
    extra = f"""
    partner:
      type: dify
      endpoint: {endpoint}
      api_key: {SECRET}
      knowledge_id: kb
      retries: 0
    """
    return make_config(write_docs(tmp_path / "docs"), extra, kb_connectors="[docs, partner]", cache_ttl_s=0)


def post(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    response = ask(url, BODY["query"], top_k=3, headers=headers)
    assert response.status_code == 200
    return response


@pytest.fixture
def upstream():
    fake = FakeUpstream()
    with serve(fake.app()) as url:
        yield fake, url


def access_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "aggregator.access"]


def test_a_retrieval_continues_the_callers_trace_with_a_span_per_source(tmp_path: Path, upstream, caplog):
    caplog.set_level(logging.INFO, logger="aggregator.access")
    fake, upstream_url = upstream
    tracing, exporter = in_memory()
    with serve(create_app(lambda: federated(tmp_path, upstream_url), tracing=tracing)) as url:
        wait_ready(url)
        assert post(url, {"traceparent": TRACEPARENT, "baggage": "user.id=alice"}).headers["X-Sources"] == "docs=ok;partner=ok"

    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"POST /retrieval", "search docs", "search partner"}
    assert {format(s.context.trace_id, "032x") for s in spans.values()} == {TRACE_ID}, "all under the caller's trace"
    retrieval = spans["POST /retrieval"]
    assert retrieval.kind == SpanKind.SERVER and format(retrieval.parent.span_id, "016x") == CALLER_SPAN
    assert retrieval.attributes["gateway.knowledge_id"] == "demo" and retrieval.attributes["http.response.status_code"] == 200
    for name, source_type in (("docs", "files"), ("partner", "dify")):
        span = spans[f"search {name}"]
        assert span.parent.span_id == retrieval.context.span_id and span.kind == SpanKind.CLIENT
        assert span.attributes["gateway.source.name"] == name and span.attributes["gateway.source.type"] == source_type
        assert span.attributes["gateway.source.outcome"] == "ok" and span.attributes["gateway.source.records"] >= 1
        assert span.attributes["gateway.source.retries"] == 0

    assert BODY["query"] not in str([s.attributes for s in spans.values()]), "the query text stays out of traces"

    [sent] = fake.headers
    version, trace_id, parent_id, flags = sent["traceparent"].split("-")
    assert (trace_id, parent_id) == (TRACE_ID, format(spans["search partner"].context.span_id, "016x")), "the upstream joins the trace"
    assert "baggage" not in sent, "what callers put in baggage is not handed to sources"

    [line] = access_lines(caplog)
    assert f"trace={TRACE_ID}" in line.getMessage() and line.fields["trace_id"] == TRACE_ID


def test_a_failing_source_is_an_error_span_with_a_scrubbed_message(tmp_path: Path, upstream):
    fake, upstream_url = upstream
    fake.mode = "error"
    tracing, exporter = in_memory()
    with serve(create_app(lambda: federated(tmp_path, upstream_url), tracing=tracing)) as url:
        wait_ready(url)
        assert post(url).headers["X-Sources"] == "docs=ok;partner=error"
    spans = {span.name: span for span in exporter.get_finished_spans()}
    partner = spans["search partner"]
    assert partner.attributes["gateway.source.outcome"] == "error" and partner.status.status_code == StatusCode.ERROR
    assert "HTTP 500" in partner.status.description and "***" in partner.status.description
    assert SECRET not in str([(s.status.description, s.attributes) for s in spans.values()])
    assert spans["search docs"].status.status_code == StatusCode.UNSET
    assert len({s.context.trace_id for s in spans.values()}) == 1, "no traceparent came in: a new trace"


async def test_sources_cut_at_the_deadline_and_skipped_by_their_breaker_have_spans_too():
    tracing, exporter = in_memory()
    open_breaker = CircuitBreaker(CircuitSettings(failures=1))
    open_breaker.record_failure()
    policy = SourcePolicy(timeout_s=5, retries=0)
    slots = [SourceSlot(Scripted("quick", OK), policy, CircuitBreaker()), SourceSlot(Scripted("hung", 30), policy, CircuitBreaker()),
             SourceSlot(Scripted("broken", OK), policy, open_breaker)]  # fmt: skip
    with tracing.retrieval({"traceparent": TRACEPARENT}, lambda message: message):
        results = await ask_sources(slots, SourceQuery("q", 5), asyncio.get_running_loop().time() + 0.2)
    assert [r.outcome for r in results] == ["ok", "timeout", "skipped"]
    outcomes = {s.name: s.attributes["gateway.source.outcome"] for s in exporter.get_finished_spans() if s.name.startswith("search")}
    assert outcomes == {"search quick": "ok", "search hung": "timeout", "search broken": "skipped"}


def test_tracing_off_still_continues_the_callers_trace_to_sources_and_logs(tmp_path: Path, upstream, caplog):
    caplog.set_level(logging.INFO, logger="aggregator.access")
    fake, upstream_url = upstream
    with serve(create_app(lambda: federated(tmp_path, upstream_url), tracing=Tracing())) as url:
        wait_ready(url)
        post(url, {"traceparent": TRACEPARENT})
        post(url)
    with_trace, without = fake.headers
    assert with_trace["traceparent"] == TRACEPARENT, "no span of ours: the caller's context goes on as it came"
    assert "traceparent" not in without, "no trace came in and none is made"
    first, second = access_lines(caplog)
    assert f"trace={TRACE_ID}" in first.getMessage() and second.fields["trace_id"] is None and "trace=" not in second.getMessage()


# -- configured by the environment -----------------------------------------------------------------


def test_otlp_export_is_configured_by_the_standard_environment_variables(tmp_path: Path, monkeypatch):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[ExportTraceServiceRequest] = []
    collector = FastAPI()

    @collector.post("/v1/traces")
    async def traces(request: Request) -> dict:
        received.append(ExportTraceServiceRequest.FromString(await request.body()))
        return {}

    config = make_config(write_docs(tmp_path / "docs"))
    with serve(collector) as collector_url:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector_url)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-under-test")
        with TestClient(create_app(lambda: config)) as client:
            assert client.app.state.service.tracing.enabled
            client.portal.call(client.app.state.service.gateway.slots["docs"].connector.wait_ready, 10)
            response = client.post("/retrieval", json=BODY, headers={"Authorization": f"Bearer {KEY}", "traceparent": TRACEPARENT})
            assert response.status_code == 200
        # leaving the app shuts the provider down, which exports what it holds

    spans = [(resource.resource, span) for batch in received for resource in batch.resource_spans
             for scope in resource.scope_spans for span in scope.spans]  # fmt: skip
    assert {span.name for _, span in spans} == {"POST /retrieval", "search docs"}
    assert {span.trace_id.hex() for _, span in spans} == {TRACE_ID}
    names = {a.value.string_value for resource, _ in spans for a in resource.attributes if a.key == "service.name"}
    assert names == {"gateway-under-test"}


def test_off_unless_asked_and_clear_errors_when_the_exporter_is_missing(tmp_path: Path, monkeypatch, capsys):
    assert exporters_from_env({}) == [] and exporters_from_env({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert exporters_from_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) == []
    assert type(exporters_from_env({"OTEL_TRACES_EXPORTER": "console"})[0]).__name__ == "ConsoleSpanExporter"

    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)  # as if not installed
    with pytest.raises(TracingConfigError, match=r"pip install 'dify-knowledge-gateway\[otlp\]'"):
        exporters_from_env({"OTEL_TRACES_EXPORTER": "otlp"})
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)
    with pytest.raises(TracingConfigError, match=r"\[otlp-grpc\]"):
        exporters_from_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    with pytest.raises(TracingConfigError, match="http/protobuf, grpc"):
        exporters_from_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    with pytest.raises(TracingConfigError, match="'zipkin': no such exporter"):
        exporters_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})

    config = tmp_path / "connectors.yaml"
    config.write_text(f"server:\n  api_keys: [{{key: {KEY}}}]\nknowledge_bases:\n  kb: {{connectors: [docs]}}\nconnectors:\n  docs: {{type: files, path: .}}\n")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    assert main(["serve", "--config", str(config)]) == 1, "serve refuses to start rather than trace nowhere"
    assert "dify-knowledge-gateway[otlp]" in capsys.readouterr().err
