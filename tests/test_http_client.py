"""The one HTTP client factory (`connectors/http.py`), over real loopback HTTP: what every HTTP source relies on."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from aggregator.retrieval.fanout import SourcePolicy, call_source
from connectors.base import BOUNDED_CALL, AuthFailed, BadResponse, NotFound, RateLimited, SourceQuery, SourceTimeout, Unavailable
from connectors.http import decode_json, make_client, request_json, send

from testkit.fakes.recorder import Recorder
from testkit.loopback import free_port, serve, until

LIMIT = 4096


def bounded_app() -> Starlette:
    """Answers of every size, declared (Content-Length) or streamed in chunks (no length)."""

    async def declared(request: Request) -> Response:
        return Response(b"[" + b" " * (int(request.query_params["size"]) - 2) + b"]", media_type="application/json")

    async def streamed(request: Request) -> StreamingResponse:
        size = int(request.query_params["size"])

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, size, 1000):
                yield b" " * min(1000, size - start)
            yield b"[]"

        return StreamingResponse(chunks(), media_type="application/json")

    async def peer(request: Request) -> JSONResponse:
        return JSONResponse({"port": request.client.port if request.client else None})

    return Starlette(routes=[Route("/declared", declared), Route("/streamed", streamed), Route("/peer", peer)])


class SilentServer:
    """Accepts connections and never answers; counts the connections still open."""

    def __init__(self) -> None:
        self.open = 0
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.open += 1
            try:
                while await reader.read(65536):
                    pass
            finally:
                self.open -= 1
                writer.close()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            server = self._loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", self.port))
            started.set()
            self._loop.run_until_complete(server.serve_forever())

        threading.Thread(target=run, daemon=True).start()
        started.wait(5)


@pytest.fixture(scope="module")
def bounded() -> Iterator[str]:
    with serve(bounded_app()) as url:
        yield url


# -- answers and errors ----------------------------------------------------------------------------------


async def test_an_error_answer_comes_back_with_its_bounded_body_when_not_checked():
    recorder = Recorder({("POST", "/retrieval"): (500, {"error_code": 5001, "error_msg": "boom"})})
    with serve(recorder.app()) as url:
        client = make_client(url)
        try:
            answer, body = await send(client, client.build_request("POST", "/retrieval", json={"q": 1}), "upstream", check=False)
            assert answer.status_code == 500 and json.loads(body) == {"error_code": 5001, "error_msg": "boom"}
            with pytest.raises(BadResponse, match="upstream: HTTP 500"):
                await send(client, client.build_request("POST", "/retrieval"), "upstream")
        finally:
            await client.aclose()


@pytest.mark.parametrize(
    "status,headers,error",
    [(401, {}, AuthFailed), (403, {}, AuthFailed), (429, {"Retry-After": "7"}, RateLimited), (502, {}, Unavailable),
     (503, {}, Unavailable), (504, {}, Unavailable), (404, {}, NotFound), (418, {}, BadResponse), (307, {"Location": "/elsewhere"}, BadResponse)],
)  # fmt: skip
async def test_statuses_are_typed_errors_and_redirects_are_not_followed(status: int, headers: dict[str, str], error: type):
    seen: list[str] = []

    async def answer(request: Request) -> Response:
        seen.append(request.url.path)
        return JSONResponse({"message": "no"}, status_code=status, headers=headers)

    with serve(Starlette(routes=[Route("/{path:path}", answer, methods=["GET"])])) as url:
        client = make_client(url)
        try:
            with pytest.raises(error) as caught:
                await request_json(client, "GET", "/search", "upstream")
        finally:
            await client.aclose()
    assert seen == ["/search"], "one request, no redirect followed"
    if status == 429:
        assert caught.value.retry_after == 7.0
    if status == 307:
        assert "redirect not followed" in str(caught.value)


@pytest.mark.parametrize("kind", ["declared", "streamed"])
async def test_answers_over_the_byte_limit_are_refused(bounded: str, kind: str):
    client = make_client(bounded)
    try:
        assert await request_json(client, "GET", f"/{kind}?size={LIMIT - 100}", "upstream", LIMIT) == []
        with pytest.raises(BadResponse, match=f"over the {LIMIT}-byte limit"):
            await request_json(client, "GET", f"/{kind}?size={LIMIT * 3}", "upstream", LIMIT)
    finally:
        await client.aclose()


async def test_a_refused_connection_is_unavailable():
    client = make_client(f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(Unavailable, match="cannot connect"):
            await request_json(client, "GET", "/", "upstream")
    finally:
        await client.aclose()


async def test_a_silent_source_times_out_at_its_timeout_and_a_cancelled_call_closes_its_connection():
    silent = SilentServer()
    client = make_client(f"http://127.0.0.1:{silent.port}", timeout_s=0.3)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(SourceTimeout):
            await request_json(client, "POST", "/retrieval", "upstream", json={})
        assert asyncio.get_running_loop().time() - started < 1.0
        call = asyncio.ensure_future(request_json(client, "POST", "/retrieval", "upstream", json={}))
        await asyncio.sleep(0.1)
        assert silent.open >= 1
        call.cancel()  # what the fan-out does at the request's deadline
        with pytest.raises(asyncio.CancelledError):
            await call
        await until(lambda: silent.open == 0, 1.0, "the cancelled call's connection closed, not kept in the pool")
    finally:
        await client.aclose()


async def test_under_the_fan_out_a_call_is_timed_by_its_budget_and_tasks_it_starts_keep_their_own_timeout():
    """Inside a source call the client starts no timer of its own (the fan-out's timeout always comes first);
    outside one, and in a task a call starts, the client's timeout still ends a silent request."""
    silent = SilentServer()
    client = make_client(f"http://127.0.0.1:{silent.port}", timeout_s=0.3)

    class Stalling:
        name, type = "silent", "dify"
        spawned: asyncio.Future | None = None

        async def search(self, query: SourceQuery) -> list:
            self.spawned = asyncio.ensure_future(request_json(client, "POST", "/retrieval", "spawned", json={}))
            return await request_json(client, "POST", "/retrieval", "upstream", json={})

    source = Stalling()
    try:
        loop = asyncio.get_running_loop()
        result = await call_source(source, SourceQuery("q", 5), SourcePolicy(timeout_s=0.3, retries=0), loop.time() + 5)  # type: ignore[arg-type]
        assert (result.outcome, result.error) == ("timeout", "no answer within 0.30 s")
        assert BOUNDED_CALL.get() is None, "the mark of a source call does not outlive it"
        assert source.spawned is not None
        with pytest.raises(SourceTimeout, match="spawned: timed out"):
            await asyncio.wait_for(source.spawned, 2.0)
    finally:
        await client.aclose()


async def test_connections_are_pooled(bounded: str):
    client = make_client(bounded)
    try:
        ports = {(await request_json(client, "GET", "/peer", "upstream"))["port"] for _ in range(5)}
    finally:
        await client.aclose()
    assert len(ports) == 1, "five calls in a row share one kept-alive connection"


# -- URLs, credentials, TLS, proxies ---------------------------------------------------------------------


async def test_relative_urls_join_the_base_path_and_params_encode_as_before():
    recorder = Recorder({("GET", "/api/v1/search"): (200, [])})
    with serve(recorder.app()) as url:
        client = make_client(url + "/api/v1/")
        try:
            await request_json(client, "GET", "/search", "upstream", params={"q": "a b&c", "flag": True, "off": False, "none": None})
        finally:
            await client.aclose()
    [request] = recorder.requests
    assert request.path == "/api/v1/search"
    assert request.params == {"q": "a b&c", "flag": "true", "off": "false", "none": ""}


async def test_credentials_in_a_url_are_sent_as_basic_auth_and_leave_the_url():
    recorder = Recorder({("POST", "/retrieval"): (200, {"records": []})})
    with serve(recorder.app()) as url:
        client = make_client(url.replace("http://", "http://reader:pa%24%24@"), headers={"Authorization": "Bearer key"})
        try:
            await request_json(client, "POST", "/retrieval", "upstream", json={})
        finally:
            await client.aclose()
    headers = recorder.requests[-1].headers
    assert headers["authorization"] == "Basic cmVhZGVyOnBhJCQ="  # reader:pa$$, as httpx sent it
    assert headers["user-agent"].startswith("dify-knowledge-gateway/")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An HTTPS server with a certificate from a private CA, and that CA's bundle."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    folder = tmp_path_factory.mktemp("tls")
    bundle, key, chain = folder / "ca.pem", folder / "key.pem", folder / "chain.pem"
    ca.cert_pem.write_to_path(str(bundle))
    cert.private_key_pem.write_to_path(str(key))
    cert.cert_chain_pems[0].write_to_path(str(chain))
    with serve(Recorder({("GET", "/ping"): (200, {"ok": True})}).app(), ssl_keyfile=str(key), ssl_certfile=str(chain)) as url:
        yield url.replace("http://", "https://"), bundle


async def test_tls_is_verified_against_the_default_roots_a_ca_bundle_or_not_at_all(tls: tuple[str, Path], monkeypatch: pytest.MonkeyPatch):
    url, bundle = tls
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)

    async def ping(verify: bool | str) -> object:
        client = make_client(url, verify=verify)
        try:
            return await request_json(client, "GET", "/ping", "upstream")
        finally:
            await client.aclose()

    with pytest.raises(Unavailable, match="cannot connect"):
        await ping(True)  # a private CA is not among the public roots
    assert await ping(str(bundle)) == {"ok": True}
    assert await ping(False) == {"ok": True}
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # as httpx did: the environment's bundle replaces the default roots
    assert await ping(True) == {"ok": True}


async def test_proxies_come_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    proxy = Recorder({("POST", "/retrieval"): (200, {"records": []})})  # a forward proxy sees the target in Host
    with serve(proxy.app()) as proxy_url:
        monkeypatch.setenv("HTTP_PROXY", proxy_url.replace("http://", "http://squid:s3cret@"))
        monkeypatch.delenv("http_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        client = make_client("http://kb.invalid:8080")
        try:
            assert await request_json(client, "POST", "/retrieval", "upstream", json={}) == {"records": []}
        finally:
            await client.aclose()
        headers = proxy.requests[-1].headers
        assert headers["host"] == "kb.invalid:8080" and headers["proxy-authorization"] == "Basic c3F1aWQ6czNjcmV0"

        monkeypatch.setenv("NO_PROXY", "kb.invalid")
        client = make_client("http://kb.invalid:8080")
        try:
            with pytest.raises(Unavailable):  # straight to a host that does not exist
                await request_json(client, "POST", "/retrieval", "upstream", json={})
        finally:
            await client.aclose()
    assert len(proxy.requests) == 1


# -- decoding ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b'{"records": [{"score": 0.5}]}', b'{"score": NaN, "other": -Infinity}', b'{"id": 123456789012345678901234567890}',
     '{"text": "caf\u00e9"}'.encode("utf-16"), b'\xef\xbb\xbf{"bom": true}', b'{"lone": "\\ud800"}'],
)  # fmt: skip
def test_answers_decode_exactly_as_the_standard_library_reads_them(body: bytes):
    expected = json.loads(body)
    decoded = decode_json(body, "upstream")
    assert repr(decoded) == repr(expected)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)
NUMBER = st.from_regex(r"-?(0|[1-9][0-9]{0,24})(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,3})?", fullmatch=True)


@given(JSON_VALUES)
def test_any_document_decodes_as_the_standard_library_reads_it(value: object):
    body = json.dumps(value, ensure_ascii=False).encode()
    assert repr(decode_json(body, "upstream")) == repr(json.loads(body))


@given(NUMBER)
def test_any_number_an_upstream_writes_decodes_to_the_same_float_or_integer(number: str):
    """Scores are compared and ranked: a last-bit difference from the standard library would change rankings."""
    body = f'{{"score": {number}}}'.encode()
    assert repr(decode_json(body, "upstream")) == repr(json.loads(body))


@pytest.mark.parametrize("body", [b'{"records": [ {"content": "cut', b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe{", b""])
def test_what_is_not_json_is_a_bad_response(body: bytes):
    with pytest.raises(BadResponse, match="not JSON"):
        decode_json(body, "upstream")
