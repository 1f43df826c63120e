"""Explain a query: "why did this document not show up?", answered over two real sources."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from aggregator.web.api import create_app
from aggregator.cli import main as cli

from testkit.gateway import ask
from testkit.loopback import serve, wait_ready

from .conftest import DOCS, KEY, dify_source, make_config, write_docs
from .test_browser import ARTIFACTS, CHROMIUM, chromium

QUERY = "rotate the signing keys"
ARCHIVED = {"title": "Key rotation (archived)", "content": "Old procedure: rotate the signing keys by hand on the build host."}


def partner_app() -> FastAPI:
    """A partner knowledge API: one passage that the local folder holds too, one archived page, one weak match."""
    app = FastAPI()

    @app.post("/retrieval")
    async def retrieval() -> dict:
        return {"records": [
            {"title": "Key rotation", "content": DOCS["keys.md"], "score": 0.92, "metadata": {"document_id": "keys"}},
            {**ARCHIVED, "score": 0.85, "metadata": {"document_id": "archive/keys"}},
            {"title": "Canteen", "content": "The canteen rotates its menu every week.", "score": 0.41, "metadata": {"document_id": "canteen"}},
        ]}  # fmt: skip

    return app


@pytest.fixture
def gateway_url(tmp_path: Path):
    with serve(partner_app()) as partner:
        config = make_config(write_docs(tmp_path / "docs"), dify_source("partner", partner), kb_connectors="[docs, partner]")
        config.server.ops_token = SecretStr(OPS_TOKEN)
        with serve(create_app(lambda: config)) as url:
            wait_ready(url)
            yield url


OPS_TOKEN = "ops-token-123"
OPS = {"Authorization": f"Bearer {OPS_TOKEN}"}
FILTER = {"conditions": [{"name": "title", "comparison_operator": "not contains", "value": "archived"}]}
PARAMS = {"kb": "demo", "q": QUERY, "top_k": "3", "threshold": "0.45", "filter": json.dumps(FILTER)}


def test_explain_json_shows_the_filter_the_duplicate_and_the_cut(gateway_url: str):
    data = httpx.get(gateway_url + "/explain", params={**PARAMS, "format": "json"}, headers=OPS).json()
    assert set(data) >= {"knowledge_id", "query", "sources", "passages", "records", "ms"}
    sources = {s["name"]: s for s in data["sources"]}
    assert sources["partner"]["outcome"] == "ok" and sources["docs"]["outcome"] == "ok"
    fates = {e["title"]: e["fate"] for e in sources["partner"]["returned"]}
    assert fates["Key rotation (archived)"] == "removed by metadata_condition"
    assert fates["Key rotation"].startswith("merged into ") or fates["Key rotation"].startswith("record")
    merged = next(p for p in data["passages"] if p["title"] == "Key rotation")
    assert {c["source"] for c in merged["copies"]} == {"docs", "partner"} and merged["also_in"]
    assert merged["outcome"] == "record" and merged["position"] == 1
    assert any(p["outcome"] == "below threshold" for p in data["passages"]), [(p["title"], p["score"]) for p in data["passages"]]
    for p in data["passages"]:
        assert set(p) >= {"score", "relevance", "bm25", "proximity", "calibrated", "calibration", "copies", "outcome"}
        assert (p["outcome"] == "record") == (p["score"] >= 0.45 and p["position"] is not None)
    assert [r["title"] for r in data["records"]] == [p["title"] for p in data["passages"] if p["outcome"] == "record"]


def test_explain_ranks_exactly_as_the_retrieval_does(gateway_url: str):
    explained = httpx.get(gateway_url + "/explain", params={**PARAMS, "format": "json"}, headers=OPS).json()["records"]
    answered = ask(gateway_url, QUERY, top_k=3, threshold=0.45, metadata_condition=FILTER).json()["records"]
    assert [(r["title"], r["score"]) for r in explained] == [(r["title"], r["score"]) for r in answered]
    first = answered[0]["metadata"]
    assert answered[0]["title"] == "Key rotation" and first["also_in"] == sorted({"docs", "partner"} - {first["source"]}), "a merged copy names the other source"


def test_explain_page_errors_are_shown_not_raised(gateway_url: str):
    page = httpx.get(gateway_url + "/explain", headers=OPS)
    assert page.status_code == 200 and "<form" in page.text and "<script" not in page.text
    bad = httpx.get(gateway_url + "/explain", params={**PARAMS, "top_k": "many"}, headers=OPS)
    assert bad.status_code == 400 and "retrieval_setting.top_k" in bad.text and "<form" in bad.text
    assert httpx.get(gateway_url + "/explain", params={**PARAMS, "filter": "{oops", "format": "json"}, headers=OPS).json()["error_code"] == 3001
    assert httpx.get(gateway_url + "/explain", params={**PARAMS, "kb": "nope", "format": "json"}, headers=OPS).status_code == 404


def test_explain_needs_ops_access(tmp_path: Path):
    config = make_config(write_docs(tmp_path / "docs"))
    config.server.ops_token = None
    with serve(create_app(lambda: config)) as url:
        wait_ready(url)
        assert httpx.get(url + "/explain", params={"q": "keys"}, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200  # loopback
    config.server.ops_token = SecretStr("ops-token-123")
    with serve(create_app(lambda: config)) as url:
        wait_ready(url)
        assert httpx.get(url + "/explain", params={"q": "keys"}).status_code == 403
        assert httpx.get(url + "/explain", params={"q": "keys", "token": "ops-token-123"}, follow_redirects=True).status_code == 200
        assert httpx.get(url + "/explain", params={"q": "keys"}, headers={"Authorization": "Bearer ops-token-123"}).status_code == 200


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
def test_a_person_sees_why_a_passage_did_not_show_up(tmp_path: Path, gateway_url: str):
    url = gateway_url + "/explain?" + httpx.QueryParams({**PARAMS, "token": OPS_TOKEN}).__str__()  # traded for a cookie
    dom = chromium(tmp_path, "--dump-dom", url).stdout
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "explain-page.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,1000", url)
    assert re.search(r'<input name="q" value="rotate the signing keys"', dom), "the query stays in the form"
    assert "removed by metadata_condition" in dom and "below threshold" in dom and "merged into" in dom
    records = httpx.get(gateway_url + "/explain", params={**PARAMS, "format": "json"}, headers=OPS).json()["records"]
    assert len(re.findall(r'<tr class="record">', dom)) == len(records) >= 1, "the records Dify gets are marked"
    assert len(re.findall(r'<tr class="cut">', dom)) == 1, "one line marks the cut"
    assert shot.exists() and shot.stat().st_size > 5000


def test_explain_command(tmp_path: Path, capsys):
    config = tmp_path / "connectors.yaml"
    write_docs(tmp_path / "docs")
    config.write_text(
        f"server:\n  api_keys: [{{key: {KEY}}}]\nknowledge_bases:\n  demo: {{connectors: [docs]}}\n"
        f"connectors:\n  docs: {{type: files, path: {tmp_path / 'docs'}}}\n"
    )
    assert cli(["explain", "--config", str(config), "--kb", "demo", "--top-k", "1", "rotate the keys, renew the VPN profile"]) == 0
    out = capsys.readouterr().out
    assert "docs (files): ok" in out and "cut: beyond top_k" in out and "Key rotation" in out
    assert cli(["explain", "--config", str(config), "--kb", "demo", "--json", QUERY]) == 0
    assert json.loads(capsys.readouterr().out)["records"][0]["title"] == "Key rotation"
    assert cli(["explain", "--config", str(config), "--kb", "demo", "--filter", "{nope", QUERY]) == 2


def echoing_upstream() -> FastAPI:
    """An upstream that fails, and whose error repeats the key it was sent, late in a long message."""
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def fail(request: Request) -> JSONResponse:
        key = request.headers.get("x-api-key", "")
        return JSONResponse({"message": "upstream trouble " + "." * 200 + f" while checking key {key}"}, status_code=500)

    return app


def test_explain_scrubs_secrets_before_it_clips(tmp_path: Path):
    """A password in a source's URL and a key an upstream echoes are scrubbed from explain as from /status, whole:
    the secret sits across the 300-character cut, so clipping before scrubbing would leave its first part."""

    password, key = "pa55word-of-the-partner", "KEY-0123456789abcdef-echoed"
    with serve(echoing_upstream()) as upstream:
        port = upstream.rsplit(":", 1)[1]
        http_source = (
            f"echo:\n  type: http\n  url: {upstream}/search?q={{query}}\n  headers: {{X-Api-Key: {key}}}\n"
            "  results: items\n  record: {content: text}\n"
        )
        partner = dify_source("partner", f"http://gw:{password}@127.0.0.1:{port}")
        config = make_config(write_docs(tmp_path / "docs"), partner + http_source, kb_connectors="[docs, partner, echo]")
        config.server.ops_token = SecretStr("ops-token-123")
        with serve(create_app(lambda: config)) as url:
            wait_ready(url)
            ops = {"Authorization": "Bearer ops-token-123"}
            answer = httpx.get(url + "/explain", params={"q": QUERY, "format": "json"}, headers=ops)
            page = httpx.get(url + "/explain", params={"q": QUERY}, headers=ops)
            status = httpx.get(url + "/status", headers=ops)
    errors = {s["name"]: s["error"] for s in answer.json()["sources"]}
    assert errors["partner"] and errors["echo"] and "***" in errors["partner"] and "***" in errors["echo"], errors
    assert max(len(e) for e in errors.values() if e) <= 300
    for text in (answer.text, page.text, status.text):
        assert password not in text and key[:12] not in text
    config_file = tmp_path / "connectors.yaml"
    config_file.write_text(
        f"server:\n  api_keys: [{{key: {KEY}}}]\nknowledge_bases:\n  demo: {{connectors: [partner]}}\n"
        f"connectors:\n  partner: {{type: dify, endpoint: 'http://gw:{password}@127.0.0.1:9', api_key: k, knowledge_id: x}}\n"
    )
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["explain", "--config", str(config_file), "--kb", "demo", QUERY]) == 0
    assert "partner (dify): error" in out.getvalue() and password not in out.getvalue()


def test_without_an_ops_token_explain_shows_what_the_callers_api_key_may_read(tmp_path: Path):
    """Being on this host is not enough to read every knowledge base: /explain wants an API key and keeps to its scope."""
    from .conftest import SCOPED_KEY

    config = make_config(write_docs(tmp_path / "docs"))
    with serve(create_app(lambda: config)) as url:
        wait_ready(url)
        ask = lambda kb, headers: httpx.get(url + "/explain", params={"q": "keys", "kb": kb, "format": "json"}, headers=headers)  # noqa: E731
        assert ask("demo", {}).status_code == 403 and ask("demo", {}).json()["error_code"] == 1001
        scoped = {"Authorization": f"Bearer {SCOPED_KEY}"}
        assert ask("other", scoped).status_code == 200
        for kb in ("demo", "no-such-kb"):
            assert ask(kb, scoped).status_code == 403 and ask(kb, scoped).json()["error_code"] == 1002, kb
        page = httpx.get(url + "/explain", headers=scoped).text
        assert 'value="other"' in page and 'value="demo"' not in page, "the form offers only what the key may read"
        assert ask("demo", {"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert ask("demo", {"Authorization": "Bearer wrong"}).status_code == 403
