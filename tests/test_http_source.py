"""The `http` source: a JSON search API described in connectors.yaml, against a fake search service."""

from __future__ import annotations

import logging
import textwrap

import pytest

from aggregator.runtime.config import ConfigError, parse_config
from connectors.base import AuthFailed, BadResponse, RateLimited, SourceQuery
from connectors.http_search import HttpSearchConnector, HttpSearchSettings

from testkit.fakes.search_api import FakeSearchApi, app
from testkit.loopback import serve

KEY = "intranet-search-key-secret"
RECORD = {
    "content": "snippet", "title": "title", "url": "links.self", "score": "relevance", "id": "id",
    "updated_at": "modified", "metadata": "{team: owner.team, tags: tags, source: origin}",
}  # fmt: skip


def settings(base: str, **overrides) -> HttpSearchSettings:
    values = {
        "url": base + "/api/search?q={query}", "params": {"size": "{limit}", "lang": "en"}, "headers": {"X-Api-Key": KEY},
        "results": "data.items", "record": RECORD,
    }  # fmt: skip
    return HttpSearchSettings(**{**values, **overrides})


def test_validate_reports_broken_expressions_and_templates_with_their_place():
    text = textwrap.dedent("""
    server: {api_keys: [{key: k}]}
    knowledge_bases: {kb: {connectors: [intranet]}}
    connectors:
      intranet:
        type: http
        url: https://search.example/api?x=1
        results: "data.items["
        record: {content: "snippet", title: "title ||"}
    """)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, {})
    errors = caught.value.errors
    assert any(e.startswith("connectors.intranet.results: ") and "not a valid JMESPath expression" in e for e in errors)
    assert any(e.startswith("connectors.intranet.record.title: ") for e in errors)
    with pytest.raises(ConfigError, match=r"connectors.intranet: .*\{query\} must appear in url, params or body"):
        parse_config(text.replace("data.items[", "data.items").replace("title ||", "title"), {})


@pytest.fixture
def service():
    state = FakeSearchApi(KEY)
    state.items = [
        {"id": "kb-17", "title": "Signing key rotation", "snippet": "Rotate the release signing keys every twelve months.",
         "links": {"self": "https://intranet.example/kb/17"}, "owner": {"team": "security"}, "tags": ["keys"],
         "modified": "2025-05-01T08:00:00Z", "origin": "wiki"},
        {"id": "kb-3", "title": "Office", "snippet": "The office keys are at the desk.", "links": {"self": "https://intranet.example/kb/3"},
         "owner": {"team": "facilities"}, "tags": [], "modified": 1735689600},
    ]  # fmt: skip
    with serve(app(state)) as url:
        yield state, url


async def test_get_maps_each_result_and_encodes_the_query(service):
    state, url = service
    async with HttpSearchConnector("intranet", settings(url)) as connector:
        passages = await connector.search(SourceQuery("signing keys & rotation/2?", 20))
    assert state.requests[-1]["params"] == {"q": "signing keys & rotation/2?", "size": "20", "lang": "en"}
    first = passages[0]
    assert first.document_id == "kb-17" and first.title == "Signing key rotation" and first.source_rank == 1
    assert first.content == "Rotate the release signing keys every twelve months."
    assert first.source_score == 17.0, "the API's relevance, unscaled"
    assert first.metadata == {"team": "security", "tags": ["keys"], "http_source": "wiki", "url": "https://intranet.example/kb/17"}
    assert first.updated_at == "2025-05-01T08:00:00Z"
    assert passages[1].updated_at == "2025-01-01T00:00:00Z", "Unix seconds become ISO 8601"


async def test_post_fills_the_body_template(service):
    state, url = service
    body = {"query": {"text": "{query}"}, "size": "{limit}"}
    async with HttpSearchConnector("intranet", settings(url, method="POST", url=url + "/api/query", params={}, body=body)) as connector:
        [passage] = await connector.search(SourceQuery('rotate "signing"', 5))
    assert state.requests[-1]["body"] == {"query": {"text": 'rotate "signing"'}, "size": 5}
    assert passage.document_id == "kb-17"


async def test_wrong_key_is_auth_failed_with_the_apis_words_and_no_secret(service):
    _, url = service
    async with HttpSearchConnector("intranet", settings(url, headers={"X-Api-Key": "intranet-wrong"})) as connector:
        with pytest.raises(AuthFailed) as caught:
            await connector.search(SourceQuery("keys", 5))
    message = str(caught.value)
    assert message.startswith(f"GET {url}/api/search: HTTP 401"), "named by its template, without the query string"
    assert "missing or invalid API key" in message and "intranet-wrong" not in message


async def test_429_carries_retry_after(service):
    state, url = service
    state.rate_limit_next, state.retry_after = 1, "4"
    async with HttpSearchConnector("intranet", settings(url)) as connector:
        with pytest.raises(RateLimited) as caught:
            await connector.search(SourceQuery("keys", 5))
    assert caught.value.retry_after == 4.0


async def test_answers_of_the_wrong_shape_are_bad_responses(service):
    state, url = service
    async with HttpSearchConnector("intranet", settings(url, record={**RECORD, "metadata": "title"})) as connector:
        with pytest.raises(BadResponse, match="record.metadata gave str, not an object"):
            await connector.search(SourceQuery("keys", 5))
    state.malformed = True
    async with HttpSearchConnector("intranet", settings(url)) as connector:
        with pytest.raises(BadResponse, match="`results` gave str, not a list"):
            await connector.search(SourceQuery("keys", 5))


def test_request_urls_stay_out_of_the_logs():
    """httpx logs each request's URL at INFO, query string (and any ?api_key=) included: the service mutes it."""
    from aggregator.ops.logs import configure_logging

    root, httpx_log = logging.getLogger(), logging.getLogger("httpx")
    saved = root.handlers[:], root.level, httpx_log.level
    try:
        configure_logging("debug")
        assert not httpx_log.isEnabledFor(logging.INFO) and httpx_log.isEnabledFor(logging.WARNING)
    finally:
        root.handlers[:], _, _ = saved
        root.setLevel(saved[1])
        httpx_log.setLevel(saved[2])


@pytest.mark.parametrize("text", ["..", ".", "a/../b", "{limit}"])
async def test_the_query_is_filled_once_and_stays_opaque(text: str):
    """`{query}` as a whole path segment: `..` or `.` is the value of that segment, not a step up that removes
    the one before; and a `{limit}` the user typed is text, in the URL, the params and the body alike."""
    from testkit.fakes.recorder import Recorder

    recorder = Recorder({})
    with serve(recorder.app()) as url:
        got = HttpSearchSettings(
            url=url + "/api/items/{query}/search?size={limit}", params={"q": "{query}", "n": "{limit}"}, method="POST",
            body={"text": "{query}", "size": "{limit}", "both": "{query} x {limit}"}, results="items", record={"content": "text"},
        )  # fmt: skip
        async with HttpSearchConnector("intranet", got) as connector:
            with pytest.raises(BadResponse):  # the recorder answers 404: only the request matters here
                await connector.search(SourceQuery(text, 7))
    [sent] = recorder.requests
    assert sent.path == f"/api/items/{text}/search"
    assert sent.params == {"size": "7", "q": text, "n": "7"}
    assert sent.json() == {"text": text, "size": 7, "both": f"{text} x 7"}
