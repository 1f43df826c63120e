"""One knowledge base over Confluence, Notion and a folder, through POST /retrieval over real HTTP."""

from __future__ import annotations

import textwrap
from pathlib import Path

import httpx

from aggregator.web.api import create_app
from aggregator.runtime.config import parse_config

from testkit.fakes import confluence, notion
from testkit.gateway import ask
from testkit.loopback import serve, wait_ready

from .conftest import KEY, write_docs
from .test_confluence import BASIC


def test_records_from_confluence_notion_and_files_are_merged(tmp_path: Path):
    wiki = confluence.FakeConfluence(expected_auth=BASIC)
    wiki.add(confluence.Page("101", "Signing key rotation (Confluence)", "OPS", "<p>Rotate the release signing keys every twelve months.</p>"))
    workspace = notion.FakeNotion(token="notion-secret")
    workspace.add_page("n-1", "Signing keys checklist (Notion)", [notion.block("x", "paragraph", "Checklist to rotate signing keys: generate, publish, revoke.")])
    docs = write_docs(tmp_path / "docs")

    with serve(confluence.app(wiki)) as wiki_url, serve(notion.app(workspace)) as notion_url:
        config = parse_config(textwrap.dedent(f"""
        server:
          api_keys: [{{key: {KEY}}}]
        knowledge_bases:
          eng: {{connectors: [confluence-eng, notion-wiki, docs]}}
        connectors:
          confluence-eng:
            type: confluence
            base_url: {wiki_url}/wiki
            email: ops@example.com
            api_token: ${{CONFLUENCE_TOKEN}}
            spaces: [OPS]
          notion-wiki:
            type: notion
            token: ${{NOTION_TOKEN}}
            base_url: {notion_url}
            requests_per_second: 20
          docs:
            type: files
            path: {docs}
        """), {"CONFLUENCE_TOKEN": "confluence-token-secret", "NOTION_TOKEN": "notion-secret"})  # fmt: skip
        with serve(create_app(lambda: config)) as url:
            wait_ready(url)
            response = ask(url, kb="eng", threshold=0.1)
            status = httpx.get(url + "/status").text
    assert response.status_code == 200
    assert response.headers["X-Sources"] == "confluence-eng=ok;notion-wiki=ok;docs=ok"
    records = response.json()["records"]
    by_source = {r["metadata"]["source"]: r for r in records}
    assert set(by_source) == {"confluence-eng", "notion-wiki", "docs"}
    assert by_source["confluence-eng"]["metadata"]["space"] == "OPS"
    assert by_source["notion-wiki"]["metadata"]["source_type"] == "notion"
    assert by_source["docs"]["title"] == "Key rotation"
    scores = [r["score"] for r in records]
    assert scores == sorted(scores, reverse=True) and all(0.1 <= s <= 1 for s in scores)
    assert "confluence-token-secret" not in status and "notion-secret" not in status
