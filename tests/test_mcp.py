"""MCP at /mcp, through the official SDK's client over real loopback HTTP: what an agent sees.

The gateway under test federates a folder and a second real gateway (`partner`); the goals are checked
as a user would: search answers the very records /retrieval answers, and no key reads through MCP a
knowledge base it cannot read through /retrieval.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from aggregator.web import mcp_lane
from aggregator.web.api import create_app
from aggregator.web.mcp import McpEndpoint
from aggregator.runtime.config import GatewayConfig, parse_config

from .conftest import KEY, SCOPED_KEY, make_config, write_docs
from testkit.loopback import free_port, serve, wait_ready

PARTNER_DOCS = {
    "partner/runbook.md": "# Partner runbook\n\nTo rotate the partner API signing keys, open the partner console.",
    "partner/holidays.md": "# Partner holidays\n\nThe partner office is closed on public holidays.",
}
DESCRIPTION = "Engineering runbooks and the partner's knowledge base.\nSecond line, not shown."


def gateway_config(tmp_path: Path, partner: str, *, extra_server: str = "", cache_ttl_s: float = 0.0) -> GatewayConfig:
    """`demo` spans the folder and the partner gateway; SCOPED_KEY may read `other` only. Cache off unless asked:
    a test comparing MCP with /retrieval must see both computed, not one served from the other."""
    docs = write_docs(tmp_path / "docs")
    text = f"""
    server:
      api_keys:
        - key: {KEY}
        - key: {SCOPED_KEY}
          knowledge_ids: [other]
      cache_ttl_s: {cache_ttl_s}
      {extra_server}
    defaults:
      timeout_s: 2.0
      retries: 0
    knowledge_bases:
      demo:
        connectors: [docs, partner]
        description: "{DESCRIPTION.replace(chr(10), chr(92) + 'n')}"
      other:
        connectors: [docs]
    connectors:
      docs:
        type: files
        path: {docs}
      partner:
        type: dify
        endpoint: {partner}
        api_key: {KEY}
        knowledge_id: demo
    """
    return parse_config(textwrap.dedent(text), {})


@pytest.fixture(scope="module")
def partner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The upstream: a real gateway serving its own folder."""
    folder = tmp_path_factory.mktemp("partner")
    config = make_config(write_docs(folder / "docs", PARTNER_DOCS))
    with serve(create_app(lambda: config)) as url:
        wait_ready(url)
        yield url


@pytest.fixture
def gateway(tmp_path: Path, partner: str) -> Iterator[str]:
    with serve(create_app(lambda: gateway_config(tmp_path, partner))) as url:
        wait_ready(url)
        yield url


@asynccontextmanager
async def mcp_client(base_url: str, key: str = KEY, mode: str = "legacy", path: str = "/mcp") -> AsyncIterator[Client]:
    """The SDK's client over streamable HTTP with the key as a Bearer header (no client-side cache: every call is asked)."""
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=20) as http:
        async with Client(streamable_http_client(base_url + path, http_client=http), mode=mode, cache=None) as client:  # type: ignore[arg-type]
            yield client


def retrieval(base_url: str, body: dict[str, Any], key: str = KEY) -> httpx.Response:
    return httpx.post(base_url + "/retrieval", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def as_retrieval_body(arguments: dict[str, Any]) -> dict[str, Any]:
    """The /retrieval body an MCP search stands for."""
    body: dict[str, Any] = {"knowledge_id": arguments["knowledge_base"], "query": arguments["query"],
                            "retrieval_setting": {"top_k": arguments.get("top_k"), "score_threshold": arguments.get("score_threshold")}}  # fmt: skip
    if "metadata_condition" in arguments:
        body["metadata_condition"] = arguments["metadata_condition"]
    return body


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content)


# -- initialize, list, call ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "auto"])  # the initialize handshake, and 2026-07-28's discover
async def test_an_agent_connects_lists_the_tools_and_searches(gateway: str, mode: str):
    async with mcp_client(gateway, mode=mode) as client:
        assert client.server_info is not None and client.server_info.name == "dify-knowledge-gateway"
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        # A loopback caller with no ops token set may open /explain, so it sees explain too.
        assert set(tools) == {"search", "list_knowledge_bases", "explain"}
        assert tools["search"].input_schema["required"] == ["knowledge_base", "query"]
        assert "$ref" not in json.dumps(tools["search"].input_schema)  # inlined: some clients resolve no references
        assert tools["search"].annotations is not None and tools["search"].annotations.read_only_hint

        result = await client.call_tool("search", {"knowledge_base": "demo", "query": "how do we rotate the signing keys?", "top_k": 3})
        assert not result.is_error
        text = text_of(result)
        # Citable: numbered, with the title, the source and where to find it, then the passage.
        assert text.startswith("[1] ")
        assert "Key rotation" in text and "source: docs" in text and "path: keys.md" in text
        assert "Partner runbook" in text  # the upstream gateway's record (its metadata kept whole, source and all)
        records = result.structured_content["records"]
        assert 1 <= len(records) <= 3 and records[0]["score"] >= records[-1]["score"]
        assert result.structured_content["sources"] == "docs=ok;partner=ok"


async def test_list_knowledge_bases_gives_the_descriptions_and_sources(gateway: str):
    async with mcp_client(gateway) as client:
        result = await client.call_tool("list_knowledge_bases", {})
    assert not result.is_error
    found = {kb["knowledge_base"]: kb for kb in result.structured_content["knowledge_bases"]}
    assert found["demo"]["description"] == "Engineering runbooks and the partner's knowledge base."
    assert found["demo"]["sources"] == [{"name": "docs", "type": "files"}, {"name": "partner", "type": "dify"}]
    assert "- demo: Engineering runbooks and the partner's knowledge base. (sources: docs (files), partner (dify))" in text_of(result)


async def test_explain_shows_the_fate_of_every_passage(gateway: str):
    async with mcp_client(gateway) as client:
        result = await client.call_tool("explain", {"knowledge_base": "demo", "query": "signing keys", "top_k": 1})
    assert not result.is_error
    data = result.structured_content
    assert data["knowledge_id"] == "demo" and {s["name"] for s in data["sources"]} == {"docs", "partner"}
    assert {p["outcome"] for p in data["passages"]} >= {"record", "beyond top_k"}
    assert "Key rotation" in text_of(result)


# -- the goals: the same records, no wider scope --------------------------------------------------------


SAME_REQUESTS = [
    {"knowledge_base": "demo", "query": "how do we rotate the signing keys?"},
    {"knowledge_base": "demo", "query": "signing keys", "top_k": 10, "score_threshold": 0.1},
    {"knowledge_base": "demo", "query": "签名密钥多久轮换一次", "top_k": 2},
    {"knowledge_base": "demo", "query": "holidays VPN expenses", "top_k": 10,
     "metadata_condition": {"logical_operator": "or", "conditions": [{"name": "source", "comparison_operator": "is", "value": "partner"},
                                                                    {"name": ["path"], "comparison_operator": "start with", "value": "vpn"}]}},
    {"knowledge_base": "other", "query": "expense receipts", "top_k": 0},
    {"knowledge_base": "demo", "query": "zzzz qqqq nothing matches"},
]  # fmt: skip


async def test_every_search_gives_the_records_retrieval_gives_for_the_same_request(gateway: str):
    async with mcp_client(gateway) as client:
        for arguments in SAME_REQUESTS:
            result = await client.call_tool("search", arguments)
            response = retrieval(gateway, as_retrieval_body(arguments))
            assert response.status_code == 200
            assert not result.is_error, text_of(result)
            assert result.structured_content["records"] == response.json()["records"], arguments
            assert result.structured_content["sources"] == response.headers["x-sources"]
            assert text_of(result).count("\n[") + text_of(result).startswith("[") == len(response.json()["records"])


async def test_a_search_and_a_retrieval_share_the_response_cache(tmp_path: Path, partner: str):
    with serve(create_app(lambda: gateway_config(tmp_path, partner, cache_ttl_s=30))) as url:
        wait_ready(url)
        async with mcp_client(url) as client:
            result = await client.call_tool("search", {"knowledge_base": "demo", "query": "signing keys"})
        response = retrieval(url, {"knowledge_id": "demo", "query": "signing keys", "retrieval_setting": {"top_k": None, "score_threshold": None}})
        assert response.headers["x-cache"] == "hit"
        assert response.json()["records"] == result.structured_content["records"]


async def test_no_knowledge_base_is_read_through_mcp_that_the_key_cannot_read_through_retrieval(gateway: str):
    """SCOPED_KEY may read `other` only: every way to name another one is refused, as /retrieval refuses it."""
    async with mcp_client(gateway, key=SCOPED_KEY) as client:
        listed = await client.call_tool("list_knowledge_bases", {})
        assert [kb["knowledge_base"] for kb in listed.structured_content["knowledge_bases"]] == ["other"]
        assert not (await client.call_tool("search", {"knowledge_base": "other", "query": "expense receipts"})).is_error
        for name in ("demo", "no-such-kb", "*", "Demo", "demo ", ""):
            arguments = {"knowledge_base": name, "query": "signing keys"}
            answer = retrieval(gateway, as_retrieval_body(arguments), key=SCOPED_KEY)
            assert answer.status_code in (400, 403)
            for tool in ("search", "explain"):
                result = await client.call_tool(tool, arguments)
                assert result.is_error and result.structured_content is None, (tool, name)
                assert "Key rotation" not in text_of(result)
            if answer.status_code == 403:  # the same words as /retrieval; nothing says whether the base exists
                assert answer.json()["error_msg"] in text_of(result)


async def test_a_wrong_or_missing_key_is_refused_before_mcp_starts(gateway: str):
    # The client's handshake fails with the gateway's words (its task groups wrap the error in exception groups).
    with pytest.RaisesGroup(pytest.RaisesExc(MCPError, match="^the API key is not valid$"), flatten_subgroups=True):
        async with mcp_client(gateway, key="not-a-key"):
            pass
    raw = httpx.post(gateway + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                     headers={"Accept": "application/json, text/event-stream"})  # fmt: skip
    assert raw.status_code == 401 and raw.headers["www-authenticate"] == "Bearer"
    assert raw.json()["error_code"] == 1001 and "Authorization" in raw.json()["error_msg"]
    wrong = httpx.post(gateway + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                       headers={"Authorization": "Bearer nope", "Accept": "application/json"})  # fmt: skip
    assert wrong.status_code == 401 and wrong.json()["error_code"] == 1002


async def test_bad_arguments_are_told_to_the_model_not_a_500(gateway: str):
    async with mcp_client(gateway) as client:
        for arguments, field in [({"knowledge_base": "demo"}, "query"), ({"knowledge_base": "demo", "query": "x", "top_k": -1}, "top_k"),
                                 ({"knowledge_base": "demo", "query": "x", "score_threshold": 2}, "score_threshold"),
                                 ({"query": "x"}, "knowledge_base"),
                                 ({"knowledge_base": "demo", "query": "x", "metadata_condition": {"conditions": [{"name": "a", "comparison_operator": "like"}]}}, "comparison_operator")]:  # fmt: skip
            result = await client.call_tool("search", arguments)
            assert result.is_error and field in text_of(result), (arguments, text_of(result))
        with pytest.raises(MCPError, match="no tool named 'delete'"):
            await client.call_tool("delete", {})
    # Malformed JSON-RPC on the wire: the SDK's error, never a 500.
    garbage = httpx.post(gateway + "/mcp", content=b"{not json", headers={"Authorization": f"Bearer {KEY}",
                         "Content-Type": "application/json", "Accept": "application/json"})  # fmt: skip
    assert garbage.status_code < 500


async def test_a_bug_is_an_error_the_model_sees_without_internals(gateway: str, monkeypatch: pytest.MonkeyPatch):
    import aggregator.web.api

    async def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(aggregator.web.api, "retrieve", broken)  # the server runs in this process, on a thread
    async with mcp_client(gateway) as client:
        result = await client.call_tool("search", {"knowledge_base": "demo", "query": "signing keys"})
    assert result.is_error and text_of(result) == "internal error (RuntimeError); see the service log"
    assert 'gateway_mcp_calls_total{call="search",outcome="error"} 1.0' in httpx.get(gateway + "/metrics").text


# -- a failing source, operations --------------------------------------------------------------------------


async def test_a_failing_source_leaves_the_others_answering_and_is_named(tmp_path: Path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    with serve(create_app(lambda: gateway_config(tmp_path, dead))) as url:
        wait_ready(url)
        async with mcp_client(url) as client:
            result = await client.call_tool("search", {"knowledge_base": "demo", "query": "signing keys"})
        assert not result.is_error
        assert result.structured_content["sources"] == "docs=ok;partner=error"
        assert "Key rotation" in text_of(result)
        assert "Some sources did not answer, so results may be incomplete: partner=error" in text_of(result)
        status = httpx.get(url + "/status").json()
        partner = next(s for s in status["sources"] if s["name"] == "partner")
        assert partner["calls"]["error"] >= 1  # the same health as /retrieval's


async def test_mcp_calls_are_counted_apart_and_logged_as_such(gateway: str, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="aggregator.access")
    async with mcp_client(gateway) as client:
        await client.call_tool("search", {"knowledge_base": "demo", "query": "signing keys"})
        await client.call_tool("list_knowledge_bases", {})
    metrics = httpx.get(gateway + "/metrics").text
    assert 'gateway_mcp_calls_total{call="search",outcome="ok"} 1.0' in metrics
    assert 'gateway_mcp_calls_total{call="list_knowledge_bases",outcome="ok"} 1.0' in metrics
    assert 'gateway_mcp_call_latency_seconds_count{call="search"} 1.0' in metrics
    assert "gateway_requests_total{" not in metrics  # /retrieval's counter saw nothing
    assert 'gateway_source_calls_total{outcome="ok",source="docs"} 1.0' in metrics  # the sources' own counters are shared
    lines = [r for r in caplog.records if r.name == "aggregator.access"]
    assert any(" via=mcp kb=demo records=" in r.getMessage() and r.fields["via"] == "mcp" for r in lines)  # type: ignore[attr-defined]
    assert any(r.getMessage().startswith("mcp tool=list_knowledge_bases") for r in lines)


async def test_a_search_is_traced_like_a_retrieval_continuing_the_callers_trace(tmp_path: Path, partner: str):
    from .test_tracing import TRACE_ID, TRACEPARENT, in_memory

    tracing, exporter = in_memory()
    with serve(create_app(lambda: gateway_config(tmp_path, partner), tracing=tracing)) as url:
        wait_ready(url)
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}", "traceparent": TRACEPARENT}, timeout=20) as http:
            async with Client(streamable_http_client(url + "/mcp", http_client=http), mode="legacy", cache=None) as client:  # type: ignore[arg-type]
                await client.call_tool("search", {"knowledge_base": "demo", "query": "signing keys"})
    spans = {span.name: span for span in exporter.get_finished_spans()}
    root = spans["POST /mcp"]
    assert format(root.context.trace_id, "032x") == TRACE_ID and root.attributes["gateway.mcp.tool"] == "search"
    assert root.attributes["gateway.knowledge_id"] == "demo" and root.attributes["http.response.status_code"] == 200
    for source in ("docs", "partner"):  # the sources' spans, children of the search's
        assert spans[f"search {source}"].parent.span_id == root.context.span_id


async def test_explain_is_only_for_callers_who_may_open_explain(tmp_path: Path, partner: str):
    """With an ops token set, /explain wants it; an MCP caller with only an API key neither sees nor calls explain."""
    config = lambda: gateway_config(tmp_path, partner, extra_server="ops_token: ops-secret-123456")  # noqa: E731
    with serve(create_app(config)) as url:
        wait_ready(url)
        assert httpx.get(url + "/explain", params={"q": "keys", "format": "json"}).status_code == 403
        async with mcp_client(url) as client:
            assert {t.name for t in (await client.list_tools()).tools} == {"search", "list_knowledge_bases"}
            with pytest.raises(MCPError, match="no tool named 'explain'"):
                await client.call_tool("explain", {"knowledge_base": "demo", "query": "signing keys"})
        # The ops token in the URL, as /explain takes it from a browser: explain is listed and answers.
        async with mcp_client(url, path="/mcp?token=ops-secret-123456") as client:
            assert "explain" in {t.name for t in (await client.list_tools()).tools}
            result = await client.call_tool("explain", {"knowledge_base": "demo", "query": "signing keys"})
            assert not result.is_error and result.structured_content["knowledge_id"] == "demo"


async def test_server_mcp_false_turns_the_endpoint_off(tmp_path: Path, partner: str):
    with serve(create_app(lambda: gateway_config(tmp_path, partner, extra_server="mcp: false"))) as url:
        wait_ready(url)
        answer = httpx.post(url + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                            headers={"Authorization": f"Bearer {KEY}", "Accept": "application/json"})  # fmt: skip
        assert answer.status_code == 404 and answer.json()["error_code"] == 4004
        assert retrieval(url, {"knowledge_id": "demo", "query": "keys"}).status_code == 200


def test_an_oversized_body_is_refused_as_retrieval_refuses_it(gateway: str):
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search",
               "arguments": {"knowledge_base": "demo", "query": "x" * (2 * 1024 * 1024)}}}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}", "Accept": "application/json", "Content-Type": "application/json"}
    answer = httpx.post(gateway + "/mcp", json=message, headers=headers, timeout=10)
    assert answer.status_code == 413 and answer.json()["error_code"] == 3002
    chunked = httpx.post(gateway + "/mcp", content=iter([json.dumps(message).encode()]), headers=headers, timeout=10)
    assert chunked.status_code == 413 and chunked.json()["error_code"] == 3002  # no Content-Length: counted as it comes


async def test_a_body_trickled_in_is_cut_off_as_retrieval_cuts_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import asyncio

    import aggregator.web.mcp

    monkeypatch.setattr(aggregator.web.mcp, "BODY_TIMEOUT_S", 0.3)
    app = create_app(lambda: make_config(write_docs(tmp_path / "docs")))

    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"jsonrpc": "2.0", "id": 1, '
        await asyncio.sleep(5)  # never reached: the gateway gives up first
        yield b'"method": "tools/list"}'

    headers = {"Authorization": f"Bearer {KEY}", "Accept": "application/json", "Content-Type": "application/json"}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            answer = await asyncio.wait_for(client.post("/mcp", content=trickle(), headers=headers), 3)
    assert answer.status_code == 408 and answer.json()["error_code"] == 3003


def test_no_event_stream_is_held_open(gateway: str):
    """Stateless: a GET (the optional server-to-client stream) is refused at once, so it cannot hold a connection."""
    answer = httpx.get(gateway + "/mcp", headers={"Authorization": f"Bearer {KEY}", "Accept": "text/event-stream"}, timeout=5)
    assert answer.status_code == 405 and answer.headers["allow"] == "POST" and answer.json()["error_code"] == 4005


def test_an_edit_of_connectors_yaml_applies_to_mcp_without_a_restart(tmp_path: Path):
    """The switch and the keys are read on every request: turning MCP off, or removing a key, takes effect at once."""
    from .test_reload import eventually

    config = tmp_path / "connectors.yaml"
    text = "server:\n  api_keys: [{{key: {key}}}, {{key: other-key-123456}}]\n  mcp: {mcp}\n" \
           f"knowledge_bases:\n  demo: {{{{connectors: [docs]}}}}\nconnectors:\n  docs: {{{{type: files, path: '{write_docs(tmp_path / 'docs')}'}}}}\n"
    config.write_text(text.format(key=KEY, mcp="true"))
    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    headers = {"Accept": "application/json", "Content-Type": "application/json"}

    def status(key: str) -> int:
        return httpx.post(url + "/mcp", json=listing, headers={**headers, "Authorization": f"Bearer {key}"}).status_code

    with serve(create_app(config_path=config)) as url:
        wait_ready(url)
        assert status(KEY) == 200 and status("other-key-123456") == 200
        config.write_text(text.format(key="a-new-key-7890", mcp="true"))
        eventually(lambda: status(KEY) == 401)  # the removed key is refused
        assert status("a-new-key-7890") == 200
        config.write_text(text.format(key="a-new-key-7890", mcp="false"))
        eventually(lambda: status("a-new-key-7890") == 404)


async def test_a_trailing_slash_url_is_served_too(gateway: str):
    async with mcp_client(gateway, path="/mcp/") as client:
        assert {t.name for t in (await client.list_tools()).tools} >= {"search"}


# -- the fast lane (aggregator/web/mcp_lane.py): the SDK's answers, request by request ------------------


HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
           "MCP-Protocol-Version": "2025-11-25"}  # fmt: skip


def call(name: str, arguments: Any, id_: Any = 1, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": name, "arguments": arguments, **params}}


@dataclass(frozen=True)
class Asked:
    """One POST to /mcp, and who should answer it with the lane on: the lane, the SDK, or the gateway before either."""

    what: str
    body: Any
    headers: dict[str, str | None] = field(default_factory=dict)  # over HEADERS; None removes one
    by: str = "lane"


SEARCH = {"knowledge_base": "demo", "query": "how do we rotate the signing keys?"}
FILTER = {"logical_operator": "or", "conditions": [{"name": "source", "comparison_operator": "is", "value": "partner"},
                                                   {"name": ["path"], "comparison_operator": "start with", "value": "vpn"}]}  # fmt: skip
LANE_REQUESTS = [
    Asked("a search", call("search", SEARCH)),
    Asked("top_k and a threshold", call("search", {**SEARCH, "top_k": 10, "score_threshold": 0.1})),
    Asked("top_k 0, another base", call("search", {"knowledge_base": "other", "query": "expense receipts", "top_k": 0})),
    Asked("top_k as a float", call("search", {**SEARCH, "top_k": 2.0})),
    Asked("a metadata filter", call("search", {"knowledge_base": "demo", "query": "holidays VPN expenses", "top_k": 10, "metadata_condition": FILTER})),
    Asked("no match", call("search", {"knowledge_base": "demo", "query": "zzzz qqqq nothing matches"})),
    Asked("a string id and a progress token", call("search", SEARCH, id_="call-7", _meta={"progressToken": "p1"})),
    Asked("an id beyond 64 bits", call("list_knowledge_bases", {}, id_=2**70)),
    Asked("list_knowledge_bases", call("list_knowledge_bases", {})),
    Asked("explain", call("explain", {**SEARCH, "top_k": 1})),
    Asked("explain for a caller /explain refuses", call("explain", SEARCH), {"X-Forwarded-For": "203.0.113.9"}),
    Asked("an unknown tool", call("delete", {})),
    Asked("no query", call("search", {"knowledge_base": "demo"})),
    Asked("top_k -1", call("search", {**SEARCH, "top_k": -1})),
    Asked("a threshold of 2", call("search", {**SEARCH, "score_threshold": 2})),
    Asked("an unknown operator", call("search", {**SEARCH, "metadata_condition": {"conditions": [{"name": "a", "comparison_operator": "like"}]}})),
    Asked("arguments not an object", call("search", "rotate keys")),
    Asked("no tool name", {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"arguments": SEARCH}}),
    Asked("no params", {"jsonrpc": "2.0", "id": 4, "method": "tools/call"}),
    Asked("a knowledge base outside the key's scope", call("search", SEARCH), {"Authorization": f"Bearer {SCOPED_KEY}"}),
    Asked("an older protocol version", call("search", SEARCH), {"MCP-Protocol-Version": "2025-06-18"}),
    Asked("the oldest protocol version", call("search", SEARCH), {"MCP-Protocol-Version": "2024-11-05"}),
    Asked("no protocol version header", call("search", SEARCH), {"MCP-Protocol-Version": None}),
    Asked("JSON only, with a charset", call("search", SEARCH), {"Accept": "application/json", "Content-Type": "application/json; charset=utf-8"}),
    Asked("any type accepted", call("search", SEARCH), {"Accept": "*/*"}),
    Asked("an unknown protocol version", call("search", SEARCH), {"MCP-Protocol-Version": "1999-01-01"}, by="sdk"),
    Asked("a 2026-07-28 call without its envelope", call("search", SEARCH), {"MCP-Protocol-Version": "2026-07-28"}, by="sdk"),
    Asked("an event stream only", call("search", SEARCH), {"Accept": "text/event-stream"}, by="sdk"),
    Asked("no JSON content type", call("search", SEARCH), {"Content-Type": "text/plain"}, by="sdk"),
    Asked("a batch", [call("search", SEARCH)], by="sdk"),
    Asked("a notification", {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "search", "arguments": SEARCH}}, by="sdk"),
    Asked("bad JSON", b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", ', by="sdk"),
    Asked("tools/list", {"jsonrpc": "2.0", "id": 5, "method": "tools/list"}, by="sdk"),
    Asked("initialize", {"jsonrpc": "2.0", "id": 6, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                                                                     "clientInfo": {"name": "t", "version": "1"}}}, by="sdk"),  # fmt: skip
    Asked("a wrong key", call("search", SEARCH), {"Authorization": "Bearer not-a-key"}, by="gateway"),
]  # fmt: skip


def _timeless(value: Any) -> Any:
    """An answer without its timings (explain reports how long each step took), so that two runs compare equal."""
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if k != "ms"}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return re.sub(r"\d+ ms\b", "N ms", value) if isinstance(value, str) else value


def _answer(url: str, asked: Asked) -> tuple[int, dict[str, str], Any]:
    """Status, the headers a client reads (content type, MCP's own, auth and allow), and the body, parsed when JSON."""
    headers = {name: value for name, value in {**HEADERS, **asked.headers}.items() if value is not None}
    content = asked.body if isinstance(asked.body, bytes) else json.dumps(asked.body).encode()
    response = httpx.post(url + "/mcp", content=content, headers=headers, timeout=20)
    kept = {name: value for name, value in response.headers.items()
            if name in ("content-type", "www-authenticate", "allow") or name.startswith("mcp")}  # fmt: skip
    is_json = response.content and response.headers.get("content-type", "").startswith("application/json")
    body = _timeless(response.json()) if is_json else response.text
    return response.status_code, kept, body


@contextmanager
def sdk_calls(app: Any) -> Iterator[list[int]]:
    """Counts the requests the SDK's transport is handed (one element each), for as long as the block runs."""
    manager = app.mcp.manager
    calls: list[int] = []
    handle = manager.handle_request

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        calls.append(1)
        await handle(scope, receive, send)

    manager.handle_request = counted
    try:
        yield calls
    finally:
        del manager.handle_request


def assert_lane_answers_as_the_sdk(url: str, app: Any, requests: list[Asked]) -> dict[str, tuple[int, dict[str, str], Any]]:
    """Each request asked with the lane off, then on: the same status, headers and body, each answered by whom it should be."""
    answers = {}
    for asked in requests:
        app.mcp.fast_lane = False
        with sdk_calls(app) as calls:
            expected = _answer(url, asked)
        assert len(calls) == (asked.by != "gateway"), asked.what
        app.mcp.fast_lane = True
        with sdk_calls(app) as calls:
            answered = _answer(url, asked)
        assert len(calls) == (asked.by == "sdk"), f"{asked.what}: expected to be answered by the {asked.by}"
        assert answered == expected, asked.what
        answers[asked.what] = answered
    return answers


@pytest.mark.parametrize("path", ["direct", "kernel"])  # the lane's own steps, and the SDK's kernel when it has more to do
def test_the_fast_lane_answers_every_request_as_the_sdk_does(tmp_path: Path, partner: str, path: str, monkeypatch: pytest.MonkeyPatch):
    app = create_app(lambda: gateway_config(tmp_path, partner))
    assert mcp_lane.kernel_adds_nothing(app.mcp.server)  # type: ignore[union-attr]  # as served: the direct steps
    if path == "kernel":
        monkeypatch.setattr(mcp_lane, "kernel_adds_nothing", lambda _server: False)
    with serve(app) as url:
        wait_ready(url)
        answers = assert_lane_answers_as_the_sdk(url, app, LANE_REQUESTS)
    # Real answers on both sides, not two alike refusals: records, the SDK's errors, tool errors, version sieving.
    status, headers, body = answers["a search"]
    assert status == 200 and headers == {"content-type": "application/json"} and body["id"] == 1
    assert body["result"]["structuredContent"]["sources"] == "docs=ok;partner=ok" and "Key rotation" in body["result"]["content"][0]["text"]
    assert answers["a string id and a progress token"][2]["id"] == "call-7"
    assert answers["an unknown tool"][2]["error"]["code"] == -32602 and "no tool named 'delete'" in answers["an unknown tool"][2]["error"]["message"]
    assert answers["explain for a caller /explain refuses"][2]["error"]["message"].startswith("no tool named 'explain'")
    assert answers["no query"][2]["result"]["isError"] and "query" in answers["no query"][2]["result"]["content"][0]["text"]
    assert answers["no params"][2]["error"]["code"] == -32602
    assert "may not read knowledge base 'demo'" in answers["a knowledge base outside the key's scope"][2]["result"]["content"][0]["text"]
    assert "resultType" not in body["result"]  # the handler adds it for 2026-07-28; the SDK's sieve drops it before
    assert answers["an event stream only"][0] == 406 and answers["a wrong key"][0] == 401


def test_the_fast_lane_leaves_the_call_to_the_sdk_kernel_when_the_kernel_has_more_to_do(monkeypatch: pytest.MonkeyPatch):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    server = McpEndpoint(None).server  # type: ignore[arg-type]  # the server alone; no request is served
    assert mcp_lane.kernel_adds_nothing(server)
    monkeypatch.setattr(trace, "get_tracer_provider", TracerProvider)  # a provider installed: the SDK's span records
    assert not mcp_lane.kernel_adds_nothing(server)
    monkeypatch.undo()
    server.middleware.append(lambda ctx, call_next: call_next(ctx))  # a middleware of its own
    assert not mcp_lane.kernel_adds_nothing(server)
    server.middleware.pop()
    server.cache_hints["tools/call"] = object()  # type: ignore[assignment]  # a cache hint to fill in
    assert not mcp_lane.kernel_adds_nothing(server)


def test_the_fast_lane_answers_a_failing_source_and_a_bug_as_the_sdk_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import aggregator.web.api

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    app = create_app(lambda: gateway_config(tmp_path, dead))
    with serve(app) as url:
        wait_ready(url)
        assert_lane_answers_as_the_sdk(url, app, [Asked("a failing source", call("search", {**SEARCH, "query": "signing keys"}))])

        async def broken(*_args: Any, **_kwargs: Any) -> None:
            raise RuntimeError("secret internals")

        monkeypatch.setattr(aggregator.web.api, "retrieve", broken)
        assert_lane_answers_as_the_sdk(url, app, [Asked("a bug", call("search", SEARCH))])


# -- the MCP Inspector, the reference client, in CLI mode ---------------------------------------------------


#: Its 2.x CLI takes --header (0.x had none, so it could not send the key); npx fetches it from the npm registry.
INSPECTOR = "@modelcontextprotocol/inspector@2"


def _inspector(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = ["npx", "-y", INSPECTOR, "--cli", url, "--transport", "http",
               "--header", f"Authorization: Bearer {KEY}", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env={**os.environ, "NO_UPDATE_NOTIFIER": "1"})


def test_the_mcp_inspector_cli_lists_and_calls_the_tools(gateway: str):
    if shutil.which("npx") is None:
        pytest.skip("npx is not installed (Node.js): the MCP Inspector cannot run here")
    try:
        listed = _inspector(gateway + "/mcp", "--method", "tools/list")
    except subprocess.TimeoutExpired:
        pytest.skip("npx could not fetch and start @modelcontextprotocol/inspector within 240 s (no npm registry?)")
    if listed.returncode != 0 and ("npm ERR" in listed.stderr or "ENOTFOUND" in listed.stderr or "EAI_AGAIN" in listed.stderr):
        pytest.skip(f"npx could not install @modelcontextprotocol/inspector: {listed.stderr.strip()[-300:]}")
    assert listed.returncode == 0, listed.stderr
    assert {t["name"] for t in json.loads(listed.stdout)["tools"]} == {"search", "list_knowledge_bases", "explain"}
    called = _inspector(gateway + "/mcp", "--method", "tools/call", "--tool-name", "search",
                        "--tool-arg", "knowledge_base=demo", "--tool-arg", "query=signing keys")  # fmt: skip
    assert called.returncode == 0, called.stderr
    answer = json.loads(called.stdout)
    assert not answer.get("isError") and "Key rotation" in answer["content"][0]["text"]
