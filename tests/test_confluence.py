"""The `confluence` source: request building and real HTTP against a fake Confluence, all over loopback."""

from __future__ import annotations

import asyncio
import base64

import pytest

from connectors.base import AuthFailed, BadResponse, RateLimited, SourceQuery
from connectors.confluence import ConfluenceConnector, ConfluenceSettings, cql_text, pushdown_clauses

from testkit.fakes.confluence import FakeConfluence, Page, app
from testkit.fakes.recorder import Recorder
from testkit.loopback import serve

TOKEN = "confluence-token-secret"
BASIC = "Basic " + base64.b64encode(f"ops@example.com:{TOKEN}".encode()).decode()


def settings(base_url: str, **overrides) -> ConfluenceSettings:
    values = {"base_url": base_url, "email": "ops@example.com", "api_token": TOKEN, "spaces": ["ENG", "OPS"]}
    return ConfluenceSettings(**{**values, **overrides})


# -- request building ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query,expected",
    [
        ("rotate keys", '"rotate keys"'),
        ('say "hi"', '"say hi"'),
        ("back\\slash", '"back slash"'),
        ('x" OR space = SECRET OR text ~ "y', '"x or space = SECRET or text ~ y"'.replace("~ ", "")),
        ("NOT (a AND b*)", '"not a and b"'),
        ("  spaced\tout  ", '"spaced out"'),
    ],
)
def test_user_text_cannot_change_the_cql(query, expected):
    assert cql_text(query) == expected


def test_cql_restricts_to_spaces_types_labels_and_pushed_down_conditions():
    connector = ConfluenceConnector("c", settings("https://x.example/wiki", content_types=["page", "blogpost"], labels=["runbook"]))
    condition = {"logical_operator": "and", "conditions": [
        {"name": ["space"], "comparison_operator": "is", "value": "OPS"},
        {"name": ["updated_at"], "comparison_operator": "after", "value": "2025-01-01"},
        {"name": ["author"], "comparison_operator": "is", "value": "not pushable"},
    ]}  # fmt: skip
    cql = connector.cql(SourceQuery('rotate "keys"', 10, metadata_condition=condition))
    assert cql == (
        'type in (page, blogpost) AND space in ("ENG", "OPS") AND label in ("runbook") AND space = "OPS" '
        'AND lastmodified > "2025-01-01 00:00" AND text ~ "rotate keys"'
    )


def test_or_conditions_are_not_pushed_down():
    assert pushdown_clauses({"logical_operator": "or", "conditions": [{"name": ["space"], "comparison_operator": "is", "value": "A"}]}) == []


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({}, BASIC),  # Cloud: email + API token
        ({"email": None}, f"Bearer {TOKEN}"),  # Data Center: personal access token
        ({"auth": "bearer"}, f"Bearer {TOKEN}"),
    ],
)
async def test_auth_variants(overrides, expected):
    recorder = Recorder({("GET", "/wiki/rest/api/content/search"): (200, {"results": [], "_links": {}})})
    with serve(recorder.app()) as url:
        async with ConfluenceConnector("c", settings(url + "/wiki", **overrides)) as connector:
            assert await connector.search(SourceQuery("x", 5)) == []
    request = recorder.requests[-1]
    assert request.headers["authorization"] == expected
    assert request.params["expand"] == "version,space,metadata.labels"


async def test_401_is_an_auth_failure_without_the_token():
    recorder = Recorder({("GET", "/wiki/rest/api/content/search"): (401, {"message": "nope"})})
    with serve(recorder.app()) as url:
        async with ConfluenceConnector("c", settings(url + "/wiki")) as connector:
            with pytest.raises(AuthFailed) as caught:
                await connector.search(SourceQuery("x", 5))
    assert TOKEN not in str(caught.value)


# -- real HTTP against the fake ------------------------------------------------------------------


@pytest.fixture
def fake():
    state = FakeConfluence(expected_auth=BASIC)
    state.add(Page("101", "Key rotation", "OPS", "<h1>Rotation</h1><p>Rotate the <b>signing keys</b> yearly.</p>"
                   '<ac:structured-macro ac:name="info"><ac:parameter ac:name="title">macro noise</ac:parameter></ac:structured-macro>'
                   "<ul><li>step one</li><li>step two</li></ul><table><tr><th>Key</th><th>Owner</th></tr><tr><td>release</td><td>security</td></tr></table>",
                   labels=["security", "runbook"]))  # fmt: skip
    for i in range(5):
        state.add(Page(str(200 + i), f"Keys note {i}", "ENG", f"<p>More about keys, number {i}.</p>"))
    state.add(Page("300", "Elsewhere", "HR", "<p>keys to the office</p>"))
    with serve(app(state)) as url:
        yield state, url + "/wiki"


async def test_search_reads_pages_follows_pagination_and_maps_metadata(fake):
    state, base = fake
    async with ConfluenceConnector("confluence-eng", settings(base, max_results=4)) as connector:
        passages = await connector.search(SourceQuery("signing keys", 20))
    assert [p.document_id for p in passages] == ["101", "200", "201", "202"], "max_results pages, over two result pages"
    assert len(state.searches) == 2
    first = passages[0]
    assert first.title == "Key rotation" and first.source_rank == 1
    assert "Rotate the signing keys yearly." in first.content and "- step one" in first.content
    assert "release | security" in first.content and "macro noise" not in first.content
    meta = first.metadata
    assert meta["space"] == "OPS" and meta["labels"] == ["security", "runbook"] and meta["author"] == "Ada Lovelace"
    assert meta["url"] == base + "/spaces/OPS/pages/101"
    assert first.updated_at == "2025-03-10T12:00:00.000Z"
    assert all(p.document_id != "300" for p in passages), "only the configured spaces"


async def test_bodies_are_cached_by_version(fake):
    state, base = fake
    async with ConfluenceConnector("c", settings(base, max_results=1)) as connector:
        await connector.search(SourceQuery("signing keys", 5))
        await connector.search(SourceQuery("signing keys", 5))
        assert state.body_fetches == ["101"]
        state.pages["101"].version = 2
        state.pages["101"].html = "<p>Signing keys are now rotated every six months.</p>"
        [passage] = await connector.search(SourceQuery("signing keys", 5))
    assert state.body_fetches == ["101", "101"] and "six months" in passage.content


async def test_429_carries_retry_after_and_the_fan_out_waits_for_it(fake):
    from aggregator.retrieval.fanout import SourcePolicy, call_source

    state, base = fake
    state.rate_limit_next, state.retry_after = 1, "1"
    async with ConfluenceConnector("c", settings(base)) as connector:
        with pytest.raises(RateLimited) as caught:
            await connector.search(SourceQuery("keys", 5))
        assert caught.value.retry_after == 1.0
        state.rate_limit_next = 1
        loop = asyncio.get_running_loop()
        result = await call_source(connector, SourceQuery("keys", 5), SourcePolicy(timeout_s=3, retries=1), loop.time() + 3.5)
    assert result.outcome == "ok" and result.attempts == 2


async def test_wrong_token_is_auth_failed(fake):
    _, base = fake
    async with ConfluenceConnector("c", settings(base, api_token="wrong")) as connector:
        with pytest.raises(AuthFailed):
            await connector.search(SourceQuery("keys", 5))


async def test_a_page_deleted_between_search_and_fetch_is_skipped():
    hits = [{"id": i, "type": "page", "title": f"Page {i}", "version": {"number": 1}, "_links": {"webui": f"/p/{i}"}} for i in ("1", "2")]
    recorder = Recorder({
        ("GET", "/wiki/rest/api/content/search"): (200, {"results": hits, "_links": {}}),
        ("GET", "/wiki/rest/api/content/1"): (200, {"id": "1", "body": {"storage": {"value": "<p>keys</p>"}}}),
        ("GET", "/wiki/rest/api/content/2"): (404, {"message": "No content found"}),
    })  # fmt: skip
    with serve(recorder.app()) as url:
        async with ConfluenceConnector("c", settings(url + "/wiki")) as connector:
            passages = await connector.search(SourceQuery("keys", 10))
    assert [p.document_id for p in passages] == ["1"]


async def test_a_next_link_to_another_origin_is_not_followed_with_the_token():
    """A search answer whose `_links.next` names another server must not make the gateway send it the token."""
    elsewhere = Recorder({("GET", "/wiki/rest/api/content/search"): (200, {"results": [], "_links": {}})})
    with serve(elsewhere.app()) as other:
        hits = [{"id": "1", "type": "page", "title": "Page 1", "version": {"number": 1}}]
        site = Recorder({
            ("GET", "/wiki/rest/api/content/search"): (200, {"results": hits, "_links": {"next": f"{other}/wiki/rest/api/content/search?cursor=2"}}),
            ("GET", "/wiki/rest/api/content/1"): (200, {"id": "1", "body": {"storage": {"value": "<p>keys</p>"}}}),
        })  # fmt: skip
        with serve(site.app()) as url:
            async with ConfluenceConnector("c", settings(url + "/wiki", email=None, max_results=50)) as connector:
                with pytest.raises(BadResponse, match="not followed"):
                    await connector.search(SourceQuery("keys", 10))
    assert site.requests and site.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert elsewhere.requests == [], "nothing, and no token, went to the other origin"
