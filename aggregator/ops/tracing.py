"""Tracing with OpenTelemetry: one span per retrieval, a child span per source call, W3C `traceparent` in and out.

Off by default. Turned on by the standard environment variables, read once when the service starts:
- `OTEL_TRACES_EXPORTER`: `none` (the default here), `otlp`, `console`, or the name an installed exporter
  package registers (entry point group `opentelemetry_traces_exporter`), several separated by commas;
- `OTEL_EXPORTER_OTLP_PROTOCOL` (or `..._TRACES_PROTOCOL`): `http/protobuf` (default; the `otlp` extra)
  or `grpc` (the `otlp-grpc` extra); endpoint, headers, timeout and TLS are the exporter's own
  `OTEL_EXPORTER_OTLP_*` variables;
- `OTEL_SERVICE_NAME` (default `dify-knowledge-gateway`) and `OTEL_RESOURCE_ATTRIBUTES`; `OTEL_TRACES_SAMPLER`
  and `OTEL_BSP_*` as the SDK reads them; `OTEL_SDK_DISABLED=true` turns it all off.
Propagation is W3C trace context (`traceparent`, `tracestate`) in and out; baggage is neither read nor
passed on, since sources are often someone else's service.

Off, the tracer is OpenTelemetry's no-op one and no source span is made at all; an incoming `traceparent`
is still continued, so the access log shows the caller's trace id and HTTP sources receive it.
The tracer of the request in flight travels in a context variable, so the fan-out needs no parameter for it
and several services (tests) can trace into different providers in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from aggregator.contract.outcomes import CALL_TRACER, FAILURES, SourceResult

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter


log = logging.getLogger(__name__)

SERVICE_NAME = "dify-knowledge-gateway"
TRACE_CONTEXT = TraceContextTextMapPropagator()
#: The OTLP exporters: protocol -> (module, extra that installs it).
OTLP = {
    "http/protobuf": ("opentelemetry.exporter.otlp.proto.http.trace_exporter", "otlp"),
    "grpc": ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "otlp-grpc"),
}


class TracingConfigError(ValueError):
    """The OTEL_* variables ask for something this installation cannot do; the message says what to change."""


#: Scrubs a message of the config's secrets before it goes into a span.
Scrub = Callable[[str], str]


@dataclass(slots=True, frozen=True)
class _CallTracer:
    """The `CallTracer` a traced request hands down to its fan-out and stages."""

    tracer: trace.Tracer
    scrub: Scrub

    def call(self, name: str, kind: str, call: Coroutine[Any, Any, SourceResult]) -> Coroutine[Any, Any, SourceResult]:
        return _traced_call(self, name, kind, call)

    def skipped(self, name: str, kind: str, result: SourceResult) -> None:
        span = self.tracer.start_span(f"search {name}", kind=SpanKind.CLIENT, attributes={"gateway.source.name": name, "gateway.source.type": kind})
        _describe(span, result, self.scrub)
        span.end()

#: A retrieval's span when tracing is off and the caller sent no trace: one shared, empty context.
_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)


def exporters_from_env(environ: Mapping[str, str] | None = None) -> list[SpanExporter]:
    """The span exporters OTEL_TRACES_EXPORTER names (none by default). Raises TracingConfigError."""
    environ = os.environ if environ is None else environ
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
    return [_exporter(name, environ) for name in dict.fromkeys(names) if name != "none"]


def _exporter(name: str, environ: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name == "otlp":
        protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
        if protocol not in OTLP:
            raise TracingConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported; use one of: {', '.join(OTLP)}")
        module, extra = OTLP[protocol]
        try:
            exporter: Any = importlib.import_module(module).OTLPSpanExporter
        except ImportError:
            raise TracingConfigError(
                f"OTEL_TRACES_EXPORTER=otlp over {protocol} needs the OTLP exporter: pip install 'dify-knowledge-gateway[{extra}]'"
            ) from None
        return exporter()
    found = entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={name!r}: no such exporter is installed; use otlp, console or none, "
            "or install a package that registers it"
        )
    return next(iter(found)).load()()


class Tracing:
    """The service's tracer. `Tracing()` is off; `Tracing(provider)` traces into that provider (tests pass one
    with an in-memory exporter); `Tracing.from_env()` is what the service uses."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self.tracer: trace.Tracer = provider.get_tracer("aggregator") if provider is not None else trace.NoOpTracer()

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    @classmethod
    def from_env(cls) -> "Tracing":
        exporters = exporters_from_env()
        if not exporters:
            return cls()
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME})
        provider = TracerProvider(resource=resource)
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("tracing on: exporting spans to %s", ", ".join(type(e).__name__ for e in exporters))
        return cls(provider)

    def shutdown(self) -> None:
        """Export what is still buffered and stop the exporters."""
        if self.provider is not None:
            self.provider.shutdown()

    def retrieval(self, headers: Mapping[str, str], scrub: Scrub, route: str = "/retrieval") -> contextlib.AbstractContextManager[trace.Span]:
        """The span of one retrieval, continuing the caller's `traceparent`. Error messages of its sources go
        into their spans through `scrub`, like every message the service keeps. `route`: `/mcp` for MCP's search."""
        if self.provider is None and "traceparent" not in headers:  # nothing to record and no trace to continue
            return _NO_SPAN
        return self._retrieval(headers, scrub, route)

    @contextlib.contextmanager
    def _retrieval(self, headers: Mapping[str, str], scrub: Scrub, route: str) -> Iterator[trace.Span]:
        parent = TRACE_CONTEXT.extract(headers)
        token = CALL_TRACER.set(_CallTracer(self.tracer, scrub)) if self.enabled else None
        try:
            with self.tracer.start_as_current_span(
                f"POST {route}", context=parent, kind=SpanKind.SERVER,
                attributes={"http.request.method": "POST", "http.route": route},
            ) as span:  # fmt: skip
                yield span
        finally:
            if token is not None:
                CALL_TRACER.reset(token)


def current_trace_id() -> str | None:
    """The trace id of the span in progress (the caller's when tracing is off), as 32 hex digits, or None."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


def annotate(attributes: Mapping[str, Any]) -> None:
    """Add attributes to the span in progress (nothing when it is not recorded)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(attributes)


async def _traced_call(active: _CallTracer, name: str, source_type: str, call: Coroutine[Any, Any, SourceResult]) -> SourceResult:
    """One source's call inside its own span, so that HTTP sources pass this span on as `traceparent`."""
    with active.tracer.start_as_current_span(
        f"search {name}", kind=SpanKind.CLIENT, record_exception=False, set_status_on_exception=False,
        attributes={"gateway.source.name": name, "gateway.source.type": source_type},
    ) as span:  # fmt: skip
        try:
            result = await call
        except asyncio.CancelledError:  # cut off at the request deadline
            span.set_attributes({"gateway.source.outcome": "timeout", "gateway.source.records": 0})
            span.set_status(Status(StatusCode.ERROR, "timeout: cut off at the request deadline"))
            raise
        _describe(span, result, active.scrub)
        return result


def _describe(span: trace.Span, result: SourceResult, scrub: Scrub) -> None:
    span.set_attributes({
        "gateway.source.outcome": result.outcome,
        "gateway.source.records": len(result.passages),
        "gateway.source.retries": max(0, result.attempts - 1),
    })  # fmt: skip
    if result.outcome in FAILURES:
        message = result.outcome if result.error is None else f"{result.outcome}: {scrub(result.error)}"
        span.set_status(Status(StatusCode.ERROR, message))
