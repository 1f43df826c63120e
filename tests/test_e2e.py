"""End to end over real loopback HTTP: a gateway whose `dify` source is a second real gateway."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi import FastAPI, Request

from aggregator.web.api import create_app

from testkit.gateway import ask
from testkit.loopback import free_port, serve, serve_cli, wait_ready

from .conftest import KEY, dify_source, make_config, write_docs

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = ROOT.parent / "shared" / "conformance" / "check.py"

PARTNER_DOCS = {
    "partner/runbook.md": "# Partner runbook\n\nTo rotate the partner API signing keys, open the partner console.",
    "partner/holidays.md": "# Partner holidays\n\nThe partner office is closed on public holidays.",
}


@pytest.fixture
def partner(tmp_path: Path):
    """The upstream: a real gateway serving its own folder."""
    config = make_config(write_docs(tmp_path / "partner-docs", PARTNER_DOCS))
    with serve(create_app(lambda: config)) as url:
        wait_ready(url)
        yield url


def federated_config(tmp_path: Path, endpoint: str, deadline_s: float = 4.0, timeout_s: float = 2.0):
    extra = f"""
    partner:
      type: dify
      endpoint: {endpoint}
      api_key: {KEY}
      knowledge_id: demo
      timeout_s: {timeout_s}
      retries: 0
    """
    return make_config(write_docs(tmp_path / "docs"), extra, kb_connectors="[docs, partner]", deadline_s=deadline_s)


def test_records_from_a_local_folder_and_a_remote_gateway_are_merged(tmp_path: Path, partner: str):
    config = federated_config(tmp_path, partner + "/")  # saved with a trailing slash, as users do
    with serve(create_app(lambda: config)) as url:
        wait_ready(url)
        response = ask(url, "rotate signing keys", top_k=10)
    assert response.status_code == 200
    assert response.headers["X-Sources"] == "docs=ok;partner=ok"
    records = response.json()["records"]
    by_title = {r["title"]: r for r in records}
    assert {"Key rotation", "Partner runbook"} <= set(by_title)
    remote = by_title["Partner runbook"]["metadata"]
    # the upstream's metadata is kept whole: it already named its own source
    assert remote["source"] == "docs" and remote["document_id"] == "partner:docs:partner/runbook.md"
    assert remote["score_detail"]["source_rank"] == 1 and 0 < remote["score_detail"]["source_score"] <= 1
    scores = [r["score"] for r in records]
    assert scores == sorted(scores, reverse=True)


def test_a_dead_upstream_never_fails_the_request(tmp_path: Path):
    config = federated_config(tmp_path, f"http://127.0.0.1:{free_port()}")
    with serve(create_app(lambda: config)) as url:
        wait_ready(url)
        response = ask(url, "rotate signing keys", top_k=10)
    assert response.status_code == 200
    assert response.headers["X-Sources"] == "docs=ok;partner=error"
    assert response.json()["records"][0]["title"] == "Key rotation"


def test_a_hanging_upstream_is_cut_at_the_deadline(tmp_path: Path):
    hang = FastAPI()

    @hang.post("/retrieval")
    async def never() -> None:
        import asyncio

        await asyncio.sleep(30)

    with serve(hang) as hang_url:
        config = federated_config(tmp_path, hang_url, deadline_s=1.0, timeout_s=5.0)
        with serve(create_app(lambda: config)) as url:
            wait_ready(url)
            started = time.monotonic()
            response = ask(url, "rotate signing keys", top_k=10)
            elapsed = time.monotonic() - started
    assert response.status_code == 200 and elapsed < 2.0
    assert response.headers["X-Sources"] == "docs=ok;partner=timeout"
    assert response.json()["records"]


def test_metadata_condition_is_passed_to_the_upstream(tmp_path: Path):
    seen: list[dict] = []
    upstream = FastAPI()

    @upstream.post("/retrieval")
    async def remember(request: Request) -> dict:
        seen.append(await request.json())
        return {"records": [{"content": "rotate keys with the partner console", "score": 0.9, "title": "Remote", "metadata": {"space": "OPS"}}]}

    condition = {"logical_operator": "and", "conditions": [
        {"name": ["space"], "comparison_operator": "is", "value": "OPS"},
        {"name": ["source"], "comparison_operator": "is", "value": "partner"},
    ]}  # fmt: skip
    with serve(upstream) as upstream_url:
        config = federated_config(tmp_path, upstream_url)
        with serve(create_app(lambda: config)) as url:
            wait_ready(url)
            response = ask(url, "rotate keys", top_k=3, metadata_condition=condition)
    assert response.status_code == 200
    [sent] = seen
    assert sent["knowledge_id"] == "demo" and sent["query"] == "rotate keys"
    assert sent["retrieval_setting"]["top_k"] > 3, "more candidates than top_k, for the rerank"
    assert sent["retrieval_setting"]["score_threshold"] == 0.0
    # `source` is ours, not the upstream's: only the space condition goes down
    assert sent["metadata_condition"]["conditions"] == [{"name": ["space"], "comparison_operator": "is", "value": "OPS"}]
    [record] = response.json()["records"]
    assert record["title"] == "Remote" and record["metadata"]["source"] == "partner"
    assert record["metadata"]["source_type"] == "dify" and record["metadata"]["space"] == "OPS"


@pytest.mark.skipif(not CONFORMANCE.exists(), reason="../shared/conformance/check.py is not beside this checkout (a user's clone has none)")
def test_conformance_check_passes_on_the_bundled_config():
    env = {**os.environ, "AGGREGATOR_API_KEY": "conformance-key"}
    with serve_cli("--config", str(ROOT / "connectors.yaml"), env=env) as (url, _):
        check = subprocess.run(
            [sys.executable, str(CONFORMANCE), "--url", url, "--key", "conformance-key", "--kb", "demo", "--query", "rotate the signing keys"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip().splitlines()[-1].endswith(" 0 failed")


def engine(records: list[tuple[str, str, float | None]]) -> FastAPI:
    """A third-party knowledge API that answers the same list whatever the query, with its own score convention."""
    app = FastAPI()

    @app.post("/retrieval")
    async def retrieval() -> dict:
        out = []
        for title, content, score in records:
            record: dict = {"title": title, "content": content, "metadata": {"document_id": title}}
            if score is not None:
                record["score"] = score
            out.append(record)
        return {"records": out}

    return app


def test_sources_with_different_score_scales_merge_by_relevance(tmp_path: Path):
    """A raw-score engine (12.7, 8.3, ...), a rank-only one and a local folder: relevance decides, not scale."""
    raw = engine([
        ("Lunch menu", "The canteen serves soup and the release party is on Friday.", 12.7),
        ("Parking", "Parking permits are renewed every twelve months at the front desk.", 8.3),
        ("HSM guide", "Signing keys live in the hardware security module; rotate signing keys yearly.", 3.1),
    ])  # fmt: skip
    ranks_only = engine([
        ("Rotation runbook", "To rotate the release signing keys, generate new signing keys and revoke the old.", None),
        ("Office plants", "Water the office plants on Mondays.", None),
    ])  # fmt: skip
    with serve(raw) as raw_url, serve(ranks_only) as rank_url:
        extra = dify_source("raw", raw_url) + dify_source("ranked", rank_url)
        config = make_config(write_docs(tmp_path / "docs"), extra, kb_connectors="[docs, raw, ranked]")
        with serve(create_app(lambda: config)) as url:
            wait_ready(url)
            response = ask(url, "rotate the release signing keys", top_k=4)
    assert response.status_code == 200 and response.headers["X-Sources"] == "docs=ok;raw=ok;ranked=ok"
    records = response.json()["records"]
    titles = [r["title"] for r in records]
    assert "Rotation runbook" in titles[:2], "the rank-only source's match is among the best"
    assert set(titles[:3]) == {"Rotation runbook", "Key rotation", "HSM guide"}, titles
    assert "Lunch menu" not in titles[:3], "the highest raw score does not buy a place"
    detail = {r["title"]: r["metadata"]["score_detail"] for r in records}
    assert detail["HSM guide"]["source_score"] == 3.1 and detail["HSM guide"]["calibration"] == "scores"
    assert detail["Rotation runbook"]["source_score"] is None and detail["Rotation runbook"]["calibration"] == "ranks"
    assert all(0.0 <= r["score"] <= 1.0 for r in records)
