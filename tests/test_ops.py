"""What an operator sees: /status, the status page, /metrics, the ops token, logs, and no secret anywhere."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from aggregator.web.api import create_app
from aggregator.runtime.config import parse_config
from aggregator.ops.logs import JsonFormatter

from testkit.gateway import retrieval_body
from testkit.loopback import eventually

from .conftest import KEY, write_docs

SECRET = "upstream-secret-value-42"
OPS = "ops-token-for-tests"


def config_text(folder: Path, extra_server: str = "") -> str:
    return textwrap.dedent(f"""
    server:
      api_keys:
        - key: {KEY}
      deadline_s: 1.0
    {extra_server}
    knowledge_bases:
      demo:
        connectors: [docs, partner]
    connectors:
      docs:
        type: files
        path: {folder}
      partner:
        type: dify
        endpoint: http://{SECRET}@127.0.0.1:9/api
        api_key: {SECRET}
        knowledge_id: kb
        retries: 0
      spare:
        type: files
        path: {folder}
    """)


def client_for(text: str, **kwargs) -> TestClient:
    config = parse_config(text, {})
    return TestClient(create_app(lambda: config), **kwargs)


def ask(client: TestClient, query: str = "rotate signing keys") -> None:
    assert client.post("/retrieval", json=retrieval_body(query, top_k=3), headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_docs(tmp_path / "docs")


def wait_ready(client: TestClient) -> None:
    for slot in client.app.state.service.gateway.slots.values():
        wait = getattr(slot.connector, "wait_ready", None)
        if wait:
            client.portal.call(wait, 10)


def test_status_reports_each_source(folder: Path):
    with client_for(config_text(folder)) as client:
        wait_ready(client)
        ask(client)
        status = client.get("/status").json()
    assert status["ready"] is True and len(status["config_version"]) == 12
    by_name = {s["name"]: s for s in status["sources"]}
    assert by_name["docs"]["state"] == "ok" and by_name["docs"]["calls"]["ok"] == 1
    assert by_name["docs"]["index"]["documents"] == 5 and by_name["docs"]["index"]["last_refresh"]
    assert by_name["docs"]["latency_ms"]["p50"] is not None
    assert by_name["partner"]["state"] == "degraded" and by_name["partner"]["calls"]["error"] == 1
    assert by_name["partner"]["last_error"]["message"] and by_name["partner"]["circuit"]["state"] == "closed"
    assert by_name["spare"]["state"] == "disabled", "defined but in no knowledge base"
    assert status["knowledge_bases"] == {"demo": ["docs", "partner"]}


def test_status_page_shows_a_row_per_source_without_scripts(folder: Path):
    with client_for(config_text(folder)) as client:
        wait_ready(client)
        ask(client)
        page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert '<meta http-equiv="refresh"' in html and "<script" not in html
    assert 'data-source="docs"' in html and 'data-source="partner"' in html
    assert ">degraded<" in html and ">ok<" in html


def test_no_secret_in_status_page_metrics_or_logs(folder: Path, caplog):
    caplog.set_level(logging.DEBUG)
    with client_for(config_text(folder)) as client:
        wait_ready(client)
        ask(client)
        ask(client)
        seen = client.get("/status").text + client.get("/").text + client.get("/metrics").text
    seen += "\n".join(r.getMessage() + json.dumps(getattr(r, "fields", {})) for r in caplog.records)
    assert SECRET not in seen
    assert "***" in seen, "the endpoint's credentials were scrubbed from the error message"


def test_ops_endpoints_are_loopback_only_without_a_token(folder: Path):
    with client_for(config_text(folder), client=("203.0.113.7", 4000)) as remote:
        for path in ("/status", "/metrics", "/"):
            response = remote.get(path)
            assert response.status_code == 403 and response.json()["error_code"] == 1001
        assert remote.get("/healthz").status_code == 200, "probes stay open"
    with client_for(config_text(folder), client=("127.0.0.1", 4000)) as local:
        assert local.get("/status").status_code == 200


def test_ops_token_opens_them_to_others(folder: Path):
    text = config_text(folder, extra_server=f"  ops_token: {OPS}")
    with client_for(text, client=("203.0.113.7", 4000)) as remote:
        assert remote.get("/status").status_code == 403
        assert remote.get("/status", headers={"Authorization": "Bearer wrong-token"}).status_code == 403
        assert remote.get("/status", headers={"Authorization": f"Bearer {OPS}"}).status_code == 200
        assert remote.get("/metrics", headers={"Authorization": f"Bearer {OPS}"}).status_code == 200
        assert remote.get(f"/?token={OPS}").status_code == 200, "a browser can pass it in the URL"
    with client_for(text, client=("127.0.0.1", 4000)) as local:
        assert local.get("/status").status_code == 403, "with a token set, loopback needs it too"


def test_hashed_api_keys(folder: Path):
    import hashlib

    digest = hashlib.sha256(KEY.encode()).hexdigest()
    text = config_text(folder).replace(f"- key: {KEY}", f"- key_sha256: {digest}")
    with client_for(text) as client:
        wait_ready(client)
        ask(client)
        bad = client.post("/retrieval", json={"knowledge_id": "demo", "query": "x"}, headers={"Authorization": f"Bearer {digest}"})
        assert bad.status_code == 403 and bad.json()["error_code"] == 1002


def test_one_log_line_per_retrieval_without_the_query_unless_asked(folder: Path, caplog):
    caplog.set_level(logging.INFO, logger="aggregator.access")
    with client_for(config_text(folder)) as client:
        wait_ready(client)
        ask(client, "a very private question about keys")
    [line] = [r for r in caplog.records if r.name == "aggregator.access"]
    fields = line.fields
    assert fields["knowledge_id"] == "demo" and fields["request_id"] and fields["ms"] >= 0
    assert fields["sources"]["docs"]["outcome"] == "ok" and fields["sources"]["partner"]["outcome"] == "error"
    assert "private question" not in line.getMessage() and "query" not in fields
    entry = json.loads(JsonFormatter().format(line))
    assert entry["event"] == "retrieval" and entry["level"] == "info"

    caplog.clear()
    with client_for(config_text(folder, extra_server="  log_queries: true")) as client:
        wait_ready(client)
        ask(client, "a very private question about keys")
    [line] = [r for r in caplog.records if r.name == "aggregator.access"]
    assert line.fields["query"] == "a very private question about keys"


def test_a_retrieval_answered_from_the_cache_has_its_own_line_when_the_access_log_is_on(folder: Path, caplog):
    text = config_text(folder).replace("connectors: [docs, partner]", "connectors: [docs]")  # every answer complete: kept
    caplog.set_level(logging.INFO, logger="aggregator.access")
    with client_for(text) as client:
        wait_ready(client)
        ask(client)
        ask(client)
        caplog.set_level(logging.WARNING, logger="aggregator.access")
        ask(client)
        metrics = client.get("/metrics").text
    first, hit = [r for r in caplog.records if r.name == "aggregator.access"]
    assert "sources" in first.fields and hit.fields["cache"] == "hit" and "cache=hit" in hit.getMessage()
    assert 'gateway_response_cache_total{outcome="hit"} 2.0' in metrics and 'outcome="coalesced"' not in metrics, "a count per outcome seen"

def test_the_status_page_shows_an_index_being_built():
    from aggregator.ops import statuspage

    source = {
        "name": "docs", "type": "files", "state": "ok", "latency_ms": {"p50": 1.0, "p95": 2.0},
        "calls": {"ok": 1, "empty": 0, "timeout": 0, "error": 0, "rate_limited": 0, "auth_failed": 0, "skipped": 0},
        "last_error": None,
        "index": {"documents": 120, "passages": 4000, "store_bytes": 3 * 2**20, "last_refresh": None, "last_refresh_error": None,
                  "syncing": True, "sync_progress": {"done": 40, "total": 100}, "passages_per_s": 9500.0, "syncer": True,
                  "skipped": 1, "skipped_paths": ["escape.md"]},
    }  # fmt: skip
    page = statuspage.render({"ready": False, "config_version": "abc", "uptime_s": 3, "sources": [source]})
    for text in ("120 docs, 4000 passages, 3.0 MiB on disk", "syncing: 40 of 100 documents, 9500 passages/s",
                 "this worker syncs it", "1 skipped (escape.md)"):  # fmt: skip
        assert text in page, text


def test_a_service_without_the_compiled_kernel_says_so_at_start_and_still_ranks(folder: Path, caplog, monkeypatch):
    from aggregator.ranking import pool

    caplog.set_level(logging.WARNING, logger="aggregator")
    monkeypatch.setattr(pool, "_kernel", None)
    body = {"knowledge_id": "demo", "query": "rotate signing keys", "retrieval_setting": {"top_k": 3, "score_threshold": 0}}
    with client_for(config_text(folder)) as client:
        wait_ready(client)
        records = client.post("/retrieval", json=body, headers={"Authorization": f"Bearer {KEY}"}).json()["records"]
    assert records and records[0]["score"] > 0, "the numpy and Python path answers"
    assert any("compiled kernel was not built" in r.getMessage() for r in caplog.records if r.name == "aggregator")


def test_what_other_replicas_see_of_this_one_is_what_its_status_says(folder: Path, redis_url: str):
    with client_for(config_text(folder, f"  redis_url: {redis_url}")) as client:
        wait_ready(client)
        ask(client)
        service = client.app.state.service
        eventually(lambda: client.portal.call(service.peers.current), timeout=5, what="this replica's summary through Redis")
        status = client.get("/status").json()
        summary = json.loads(json.dumps(client.portal.call(service.summary)))
    assert summary["config_version"] == status["config_version"]
    fields = ("state", "calls", "latency_ms", "last_success", "last_error", "circuit")
    shown = {s["name"]: {**{k: s[k] for k in fields}, "syncer": (s["index"] or {}).get("syncer")} for s in status["sources"]}
    assert summary["sources"] == shown and shown["docs"]["syncer"] is True and shown["partner"]["last_error"]
    for source in status["sources"]:
        [mine] = [view for view in source["replicas"] if view["replica"] == status["replica"]]
        assert {k: v for k, v in mine.items() if k not in ("replica", "updated")} == summary["sources"][source["name"]]


def test_a_sources_error_is_logged_scrubbed_once_per_change_of_error(caplog):
    """The reason a source fails was in /status alone: now the log says it when it changes, never every call."""
    from aggregator.retrieval.fanout import SourceResult
    from aggregator.ops.health import HealthRecorder

    health = HealthRecorder()
    caplog.set_level(logging.INFO, logger="aggregator.sources")

    def record(outcome: str, error: str | None = None) -> None:
        health.record([SourceResult("handbook", outcome, [], 5.0, error)], {"handbook": "dify_dataset"}, [SECRET])

    record("error", f"POST https://dify/v1/datasets/x/retrieve: HTTP 400 (invalid_param: embedding model; key {SECRET})")
    record("error", f"POST https://dify/v1/datasets/x/retrieve: HTTP 400 (invalid_param: embedding model; key {SECRET})")
    record("timeout", "no answer within 2.87 s")
    record("timeout", "no answer within 2.91 s")  # the same error, numbers aside
    record("ok")
    record("ok")
    record("timeout", "no answer within 2.95 s")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "aggregator.sources"]
    assert lines == [
        ("WARNING", "source handbook failed (error): POST https://dify/v1/datasets/x/retrieve: HTTP 400 (invalid_param: embedding model; key ***)"),
        ("WARNING", "source handbook failed (timeout): no answer within 2.87 s"),
        ("INFO", "source handbook answers again (ok)"),
        ("WARNING", "source handbook failed (timeout): no answer within 2.95 s"),
    ]
    assert SECRET not in caplog.text


def test_a_dify_dataset_refusing_every_query_is_in_the_log_once_not_only_in_status(caplog):
    """Issue 24: an economy dataset asked with semantic search showed only as `handbook=error` and in /status."""
    from testkit.fakes.dify_dataset import FakeDify, Segment, app as dify_app
    from testkit.loopback import serve

    fake = FakeDify("dataset-key-for-ops", indexing_technique="economy")
    fake.segments = [Segment("s1", "d1", "keys.md", "We rotate the release signing keys every year.")]
    caplog.set_level(logging.INFO, logger="aggregator.sources")
    with serve(dify_app(fake)) as url:
        text = textwrap.dedent(f"""
        server:
          api_keys: [{{key: {KEY}}}]
          cache_ttl_s: 0
        knowledge_bases:
          demo: {{connectors: [handbook]}}
        connectors:
          handbook: {{type: dify_dataset, api_base: "{url}/v1", api_key: dataset-key-for-ops, dataset_id: {fake.dataset_id}, search_method: semantic_search, retries: 0}}
        """)
        with client_for(text) as client:
            for query in ("signing keys", "rotate keys", "release keys"):
                ask(client, query)
            failures = [r.getMessage() for r in caplog.records if r.name == "aggregator.sources"]
            assert len(failures) == 1 and "source handbook failed (error)" in failures[0] and "invalid_param" in failures[0]
            assert client.get("/status").json()["sources"][0]["last_error"]["message"] in failures[0]


def test_the_ops_token_is_traded_for_a_cookie_and_never_logged(folder: Path, tmp_path: Path):
    """`?token=` on a page answers a redirect without it and a cookie; the token and the query never reach the log."""
    import httpx

    from testkit.loopback import serve_cli

    config = tmp_path / "c.yaml"
    config.write_text(config_text(folder, extra_server=f"  ops_token: {OPS}"))
    query = "which-query-text-must-stay-private"
    with serve_cli("--config", str(config), "--host", "127.0.0.1") as (url, server):
        moved = httpx.get(url + "/", params={"token": OPS})
        assert moved.status_code == 303 and moved.headers["location"] == "/"
        cookie = moved.cookies["gateway_ops"]
        assert OPS not in cookie and "httponly" in moved.headers["set-cookie"].lower()
        assert httpx.get(url + "/", cookies={"gateway_ops": cookie}).status_code == 200
        assert httpx.get(url + "/", cookies={"gateway_ops": "forged"}).status_code == 403
        explained = httpx.get(url + "/explain", params={"q": query, "kb": "demo", "token": OPS})
        assert explained.status_code == 303 and OPS not in explained.headers["location"] and query in explained.headers["location"]
        page = httpx.get(url + explained.headers["location"], cookies={"gateway_ops": cookie})
        assert page.status_code == 200 and OPS not in page.text and 'name="token"' not in page.text
        assert httpx.get(url + "/status", params={"token": OPS}).status_code == 200, "JSON routes take it as before"
        assert httpx.get(url + "/explain", params={"q": query, "format": "json"}, headers={"Authorization": f"Bearer {OPS}"}).status_code == 200
    output = server.stdout.read()
    assert '"GET /explain HTTP/1.1" 303' in output, "access lines are still written, without their query string"
    assert OPS not in output and query not in output


@pytest.mark.parametrize("header", [
    {"X-Forwarded-For": "8.8.8.8"}, {"X-Real-IP": "8.8.8.8"}, {"Forwarded": "for=8.8.8.8"},
    {"X-Forwarded-For": "127.0.0.1"}, {"True-Client-IP": "8.8.8.8"},
])  # fmt: skip
def test_a_request_a_proxy_forwarded_is_not_local(folder: Path, header: dict[str, str]):
    """Without an ops token, "from loopback" means no proxy in between, whatever forwarding header the proxy sets."""
    with client_for(config_text(folder), client=("127.0.0.1", 4000)) as local:
        for path in ("/status", "/metrics", "/", "/explain"):
            response = local.get(path, headers=header)
            assert response.status_code == 403 and response.json()["error_code"] == 1001, (path, header)
        assert local.get("/status").status_code == 200


def test_the_api_documents_are_ops_routes(folder: Path):
    """/openapi.json, /docs and /redoc answer whom /status answers: loopback callers, or holders of the ops token."""
    with client_for(config_text(folder), client=("203.0.113.7", 4000)) as remote:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert remote.get(path).status_code == 403, path
    with client_for(config_text(folder), client=("127.0.0.1", 4000)) as local:
        assert "/retrieval" in local.get("/openapi.json").json()["paths"]
        assert "swagger-ui" in local.get("/docs").text and "redoc" in local.get("/redoc").text
    with client_for(config_text(folder, extra_server=f"  ops_token: {OPS}"), client=("203.0.113.7", 4000)) as remote:
        assert remote.get("/openapi.json", headers={"Authorization": f"Bearer {OPS}"}).status_code == 200
        assert remote.get(f"/docs?token={OPS}").status_code == 200, "traded for the cookie, as on the pages"
