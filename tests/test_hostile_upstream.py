"""A hostile upstream cannot crash the gateway, slow it past its budget, or put bad scores in its answer."""

from __future__ import annotations

import math

import json
import time
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from aggregator.web.api import create_app

from testkit.gateway import ask
from testkit.loopback import serve, wait_ready

from .conftest import make_config, write_docs

LIMIT = 64 * 1024


def record(content: str = "hostile text about signing keys", **fields) -> dict:
    return {"content": content, "title": "Hostile", "score": 0.5, "metadata": {}, **fields}


ANSWERS = {
    "huge": json.dumps({"records": [record("keys " * 50_000)]}).encode(),
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "records-not-a-list": json.dumps({"records": {"a": 1}}).encode(),
    "wrong-types": json.dumps({"records": [1, "x", None, {"content": 5}, {"content": ["a"]}, record(title=7, metadata="no")]}).encode(),
    "bad-scores": b'{"records": [' + b",".join(
        json.dumps(record(f"signing keys score {s}")).replace('"score": 0.5', f'"score": {s}').encode()
        for s in ("NaN", "Infinity", "-Infinity", "-3", "7", '"high"', "null", "true")
    ) + b"]}",
    "html": json.dumps({"records": [record("<script>alert('x')</script><b>signing keys</b>")]}).encode(),
    "invalid-utf8": b'{"records": [{"content": "\xff\xfe signing keys", "score": 0.5}]}',
    "nan-metadata": b'{"records": [{"content": "hostile text about signing keys", "title": "Hostile", "score": 0.5, '
                    b'"metadata": {"ratio": NaN, "huge": 123456789012345678901234567890}}]}',
}


def hostile_app() -> Starlette:
    async def answer(request: Request) -> Response:
        kind = request.path_params["kind"]
        if kind == "redirect":
            return RedirectResponse("http://203.0.113.9/retrieval", status_code=307)
        return Response(ANSWERS[kind], media_type="application/json")

    return Starlette(routes=[Route("/{kind}/retrieval", answer, methods=["POST"])])


@pytest.mark.parametrize(
    "kind,outcome",
    [("huge", "error"), ("deep", "error"), ("records-not-a-list", "error"), ("wrong-types", "ok"),
     ("bad-scores", "ok"), ("html", "ok"), ("invalid-utf8", "error"), ("redirect", "error"), ("nan-metadata", "ok")],
)  # fmt: skip
def test_hostile_answers_are_contained(tmp_path: Path, kind: str, outcome: str):
    with serve(hostile_app()) as hostile_url:
        extra = f"""
        hostile:
          type: dify
          endpoint: {hostile_url}/{kind}
          api_key: k
          knowledge_id: kb
          max_response_bytes: {LIMIT}
          retries: 0
        """
        config = make_config(write_docs(tmp_path / "docs"), extra, kb_connectors="[docs, hostile]", deadline_s=1.5)
        with serve(create_app(lambda: config)) as url:
            wait_ready(url)
            started = time.monotonic()
            response = ask(url, "signing keys", top_k=10)
            elapsed = time.monotonic() - started
            status = {s["name"]: s for s in httpx.get(url + "/status").json()["sources"]}["hostile"]
    assert response.status_code == 200 and elapsed < 2.0
    assert response.headers["X-Sources"] == f"docs=ok;hostile={outcome}"
    records = response.json()["records"]
    assert "Key rotation" in {r["title"] for r in records}, "the healthy source's answer is there"
    assert all(0.0 <= r["score"] <= 1.0 and isinstance(r["title"], str) and isinstance(r["metadata"], dict) for r in records)
    if outcome == "error":
        assert status["last_error"]["message"]
    if kind == "bad-scores":
        details = [r["metadata"]["score_detail"]["source_score"] for r in records if r["title"] == "Hostile"]
        assert details and all(d is None or math.isfinite(d) for d in details), "NaN and infinities are dropped"
    if kind == "redirect":
        assert "redirect not followed" in status["last_error"]["message"]
    if kind == "nan-metadata":  # kept whole, and still valid JSON: NaN goes out as null, a huge integer exactly
        [hostile] = [r["metadata"] for r in records if r["title"] == "Hostile"]
        assert hostile["ratio"] is None and hostile["huge"] == 123456789012345678901234567890
