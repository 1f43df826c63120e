"""The fault matrix: one knowledge base, one healthy source, and one source for each way a source fails.

Over real loopback HTTP. Whatever the sources do, Dify gets a 200 with the
healthy records inside the deadline, and X-Sources and /status say what
happened to each source.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from aggregator.web.api import create_app

from testkit.gateway import ask
from testkit.loopback import eventually, free_port, serve, wait_ready

from .conftest import make_config, write_docs

GOOD = {"records": [{"content": "upstream passage about rotating signing keys", "score": 0.8, "title": "Upstream", "metadata": {}}]}


def fault_server(state: dict[str, int]) -> FastAPI:
    app = FastAPI()

    def count(name: str) -> int:
        state[name] = state.get(name, 0) + 1
        return state[name]

    @app.post("/e500/retrieval")
    async def e500() -> JSONResponse:
        count("e500")
        if state.get("e500_fixed"):
            return JSONResponse(GOOD)
        return JSONResponse({"error": "boom"}, status_code=500)

    @app.post("/flaky/retrieval")
    async def flaky() -> JSONResponse:
        return JSONResponse({"error": "busy"}, status_code=503) if count("flaky") % 2 == 1 else JSONResponse(GOOD)

    @app.post("/limited/retrieval")
    async def limited() -> JSONResponse:
        count("limited")
        return JSONResponse({"error": "slow down"}, status_code=429, headers={"Retry-After": "120"})

    @app.post("/malformed/retrieval")
    async def malformed() -> PlainTextResponse:
        count("malformed")
        return PlainTextResponse('{"records": [ {"content": "cut', media_type="application/json")

    @app.post("/drip/retrieval")
    async def drip() -> StreamingResponse:
        count("drip")

        async def one_byte_at_a_time():
            for char in '{"records": []}':
                await asyncio.sleep(0.3)
                yield char.encode()

        return StreamingResponse(one_byte_at_a_time(), media_type="application/json")

    @app.post("/unauthorized/retrieval")
    async def unauthorized() -> JSONResponse:
        count("unauthorized")
        return JSONResponse({"error": "who are you"}, status_code=401)

    return app


EXPECTED = {
    "docs": "ok",
    "hang": "timeout",
    "e500": "error",
    "flaky": "ok",
    "limited": "rate_limited",
    "refused": "error",
    "malformed": "error",
    "drip": "timeout",
    "unauthorized": "auth_failed",
}


class SilentServer:
    """A raw TCP server that reads requests and never answers, counting the connections still open."""

    def __init__(self) -> None:
        self.open = 0
        self.accepted = 0
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._started.wait(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.accepted += 1
        try:
            while await reader.read(65536):  # until the client hangs up
                pass
        finally:
            self.open -= 1
            writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._started.set()
        self._loop.run_until_complete(server.serve_forever())


def config_for(tmp_path: Path, fault_url: str, silent_url: str):
    refused = f"http://127.0.0.1:{free_port()}"
    endpoints = {"refused": refused, "hang": silent_url}
    extra = "".join(
        f"""
    {name}:
      type: dify
      endpoint: {endpoints.get(name, f"{fault_url}/{name}")}
      api_key: upstream-secret-{name}
      knowledge_id: kb
      timeout_s: 1.0
      retries: 1
      circuit: {{failures: 2, cooldown_s: 1.0, max_cooldown_s: 4.0}}
    """
        for name in EXPECTED
        if name != "docs"
    )
    kb = "[" + ", ".join(EXPECTED) + "]"
    return make_config(write_docs(tmp_path / "docs"), extra, kb_connectors=kb, deadline_s=1.5, cache_ttl_s=0)


def timed_ask(url: str) -> tuple[httpx.Response, float]:
    """A retrieval, and how long it took."""
    started = time.monotonic()
    response = ask(url)
    return response, time.monotonic() - started


def outcomes(response: httpx.Response) -> dict[str, str]:
    return dict(part.split("=") for part in response.headers["X-Sources"].split(";"))


@pytest.fixture
def matrix(tmp_path: Path):
    state: dict[str, int] = {}
    silent = SilentServer()
    with serve(fault_server(state)) as fault_url:
        config = config_for(tmp_path, fault_url, f"http://127.0.0.1:{silent.port}")
        with serve(create_app(lambda: config)) as url:
            wait_ready(url)
            yield url, silent, state


def test_every_fault_is_contained_reported_and_the_breaker_opens_and_recovers(matrix):
    url, silent, state = matrix
    threads_before = threading.active_count()

    response, elapsed = timed_ask(url)
    assert response.status_code == 200
    assert elapsed < 2.0, "answered within the 1.5 s deadline (plus HTTP)"
    titles = {r["title"] for r in response.json()["records"]}
    assert "Key rotation" in titles and "Upstream" in titles  # the healthy file and the retried flaky upstream
    assert outcomes(response) == EXPECTED
    assert state["flaky"] == 2, "503 then ok: retried once"
    assert state["limited"] == 1, "Retry-After beyond the deadline: no retry"
    assert state["unauthorized"] == 1, "401 is not retried"

    status = httpx.get(url + "/status").json()
    by_name = {s["name"]: s for s in status["sources"]}
    assert by_name["docs"]["state"] == "ok" and by_name["flaky"]["state"] == "ok"
    assert by_name["unauthorized"]["state"] == "auth_failed"
    for name in ("hang", "e500", "limited", "refused", "malformed", "drip"):
        assert by_name[name]["state"] == "degraded", name
        assert by_name[name]["last_error"]["message"], name
    assert "HTTP 500" in by_name["e500"]["last_error"]["message"]
    assert "not JSON" in by_name["malformed"]["last_error"]["message"]

    # second failure in a row: the breakers of the failing sources open...
    response, _ = timed_ask(url)
    assert response.status_code == 200
    # ...so the third request skips them at no cost
    response, elapsed = timed_ask(url)
    skipped = {name for name, outcome in outcomes(response).items() if outcome == "skipped"}
    assert skipped == {"hang", "e500", "limited", "refused", "malformed", "drip", "unauthorized"}
    assert elapsed < 0.5, "skipped sources cost nothing"
    calls_before = state["e500"]
    assert {s["name"]: s["state"] for s in httpx.get(url + "/status").json()["sources"]}["e500"] == "circuit_open"

    # the source is repaired; after the cool-down one trial goes through and closes the circuit
    state["e500_fixed"] = 1
    time.sleep(1.1)
    response, _ = timed_ask(url)
    assert outcomes(response)["e500"] == "ok" and state["e500"] == calls_before + 1
    assert {s["name"]: s for s in httpx.get(url + "/status").json()["sources"]}["e500"]["circuit"]["state"] == "closed"

    # nothing left behind: the cancelled calls to the silent server closed their connections, no thread piled up
    assert silent.accepted >= 1
    eventually(lambda: silent.open == 0, timeout=3, what="the connections to the hanging source closed")
    assert threading.active_count() <= threads_before


def test_metrics_count_outcomes(matrix):
    url, _, _ = matrix
    ask(url)
    text = httpx.get(url + "/metrics").text
    assert 'gateway_source_calls_total{outcome="timeout",source="hang"} 1.0' in text
    assert 'gateway_source_calls_total{outcome="auth_failed",source="unauthorized"} 1.0' in text
    assert 'gateway_requests_total{status="200"} 1.0' in text
    assert "gateway_request_latency_seconds_bucket" in text
    assert 'gateway_circuit_state{source="docs"} 0.0' in text
    assert 'gateway_indexed_documents{source="docs"} 5.0' in text
    assert "upstream-secret" not in text
