"""What tracing costs: off (the default), off with an incoming traceparent, and on, against no tracing code at all.

    python -m bench.tracing

Two measurements, variants interleaved in rounds so that drift hits them all alike:
- fan-out only: one retrieval span and the fan-out over three sources that answer at once, in process,
  so the tracing code is all that differs (microseconds per retrieval);
- end to end: `POST /retrieval` over loopback to an in-process gateway over three Dify-compatible
  upstreams (each its own process), so every source call also goes through the traceparent hook.
"No tracing code" is the same code with the tracing hooks replaced by pass-throughs. "On" exports
through the SDK's batch processor into an exporter that drops the spans: what tracing costs the
request path, without the exporter's encoding and network (those run in the processor's thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402

import aggregator.retrieval.fanout as fanout  # noqa: E402
import aggregator.runtime.service as service_module  # noqa: E402
from aggregator.ops.tracing import Tracing  # noqa: E402
from bench.perf import KEY, upstreams  # noqa: E402
from connectors import http as connectors_http  # noqa: E402
from testkit.loopback import serve, wait_ready  # noqa: E402

TRACEPARENT = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
VARIANTS = ("no tracing code", "off", "off, traceparent in", "on, traceparent in")


class Dropping(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def tracing_on() -> Tracing:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropping(), max_queue_size=1 << 16))  # keep every span
    return Tracing(provider)


@contextlib.contextmanager
def no_tracing_code() -> Iterator[None]:
    """The tracing hooks replaced by pass-throughs: the code path as it was before tracing."""

    class NoSpan:
        def set_attribute(self, *_: Any) -> None:
            pass

    @contextlib.contextmanager
    def retrieval(_self: Tracing, _headers: Any, _scrub: Any) -> Iterator[NoSpan]:
        yield NoSpan()

    patches = [
        (Tracing, "retrieval", retrieval),
        (service_module, "current_trace_id", lambda: None),
        (service_module, "annotate", lambda _attributes: None),
        (connectors_http.TRACE_CONTEXT, "inject", lambda *_args, **_kwargs: None),
    ]
    saved = [(target, name, getattr(target, name)) for target, name, _ in patches]
    for target, name, replacement in patches:
        setattr(target, name, replacement)
    try:
        yield
    finally:
        for target, name, original in saved:
            setattr(target, name, original)
        if "inject" in vars(connectors_http.TRACE_CONTEXT):
            del connectors_http.TRACE_CONTEXT.inject  # back to the class's method


@contextlib.contextmanager
def variant(name: str, set_tracing: Any) -> Iterator[dict[str, str]]:
    """Put the service (via `set_tracing`) in the state `name` describes; yields the headers to send."""
    if name == "no tracing code":
        set_tracing(Tracing())
        with no_tracing_code():
            yield {}
        return
    set_tracing(tracing_on() if name.startswith("on") else Tracing())
    yield TRACEPARENT if "traceparent" in name else {}


def report(title: str, unit: str, samples: dict[str, list[float]]) -> None:
    base = statistics.median(samples[VARIANTS[0]])
    print(f"\n## {title}\n\n| tracing | median {unit} | ratio to no tracing code |\n| --- | ---: | ---: |")
    for name in VARIANTS:
        median = statistics.median(samples[name])
        print(f"| {name} | {median:.1f} | {median / base:.3f} |")


async def fanout_only(rounds: int = 7, per_round: int = 3000) -> dict[str, list[float]]:
    from aggregator.retrieval.breaker import CircuitBreaker
    from connectors.base import Connector, ConnectorSettings, Passage, SourceQuery

    class Instant(Connector):
        settings_model = ConnectorSettings

        async def search(self, query: SourceQuery) -> list[Passage]:
            return [Passage("text", "title", "doc")]

    slots = [fanout.SourceSlot(Instant(f"s{i}", ConnectorSettings(type="instant")), fanout.SourcePolicy(3.0, 0), CircuitBreaker()) for i in range(3)]
    query = SourceQuery("q", 20)
    loop = asyncio.get_running_loop()
    current: list[Tracing] = [Tracing()]
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name in VARIANTS:
            with variant(name, lambda t: current.__setitem__(0, t)) as headers:
                started = time.perf_counter()
                for _ in range(per_round):
                    with current[0].retrieval(headers, str) as span:
                        await fanout.ask_sources(slots, query, loop.time() + 3.0)
                        span.set_attribute("http.response.status_code", 200)
                samples[name].append((time.perf_counter() - started) / per_round * 1e6)
            current[0].shutdown()
    return samples


async def end_to_end(url: str, set_tracing: Any, rounds: int = 5, per_round: int = 200) -> dict[str, list[float]]:
    body = {"knowledge_id": "kb", "query": "rotate signing keys", "retrieval_setting": {"top_k": 5, "score_threshold": 0}}
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as client:
        for _ in range(20):
            await client.post(url + "/retrieval", json=body)
        for _ in range(rounds):
            for name in VARIANTS:
                with variant(name, set_tracing) as headers:
                    for _ in range(per_round):
                        started = time.perf_counter()
                        response = await client.post(url + "/retrieval", json=body, headers=headers)
                        samples[name].append((time.perf_counter() - started) * 1000)
                        assert response.status_code == 200 and response.headers["X-Sources"].count("=ok") == 3
    return samples


def main() -> None:
    from aggregator.web.api import create_app
    from aggregator.runtime.config import load_config

    report("Fan-out only: a retrieval span over three instant sources", "µs per retrieval", asyncio.run(fanout_only()))
    with upstreams(3, 0.0) as urls, tempfile.TemporaryDirectory() as folder:
        connectors = "".join(f"  up{i}: {{type: dify, endpoint: '{u}', api_key: x, knowledge_id: kb, candidates: 20, retries: 0}}\n" for i, u in enumerate(urls))
        path = Path(folder) / "connectors.yaml"
        path.write_text(f"server:\n  api_keys: [{{key: {KEY}}}]\n  watch_config: false\n  cache_ttl_s: 0\nknowledge_bases:\n  kb: {{connectors: [up0, up1, up2]}}\nconnectors:\n{connectors}")
        config = load_config(path)
        app = create_app(lambda: config, tracing=Tracing())
        with serve(app) as url:
            wait_ready(url)
            samples = asyncio.run(end_to_end(url, lambda t: setattr(app.state.service, "tracing", t)))
    report("End to end: POST /retrieval over three loopback upstreams", "ms per request", samples)


if __name__ == "__main__":
    main()
