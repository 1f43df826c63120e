"""The `elasticsearch` source: query building, filter pushdown, and real HTTP against a fake cluster."""

from __future__ import annotations

import base64
import textwrap

import pytest

from aggregator.runtime.config import ConfigError, parse_config
from connectors.base import AuthFailed, BadResponse, NotFound, RateLimited, SourceQuery
from connectors.elasticsearch import ElasticsearchConnector, ElasticsearchSettings, filter_clause

from testkit.fakes.elasticsearch import FakeCluster, app
from .conftest import condition
from testkit.loopback import serve

API_KEY_PAIR = "key-id:es-api-key-secret"
ENCODED = base64.b64encode(API_KEY_PAIR.encode()).decode()
FILTERS = {"space": "space", "labels": "labels", "year": "year", "updated_at": "modified"}
LONG_BODY = " ".join(f"Filler sentence number {i} about nothing much." for i in range(60))


def settings(url: str, **overrides) -> ElasticsearchSettings:
    values = {
        "url": url, "index": "docs", "api_key": API_KEY_PAIR, "metadata_fields": ["space", "labels", "year"],
        "filter_fields": FILTERS, "updated_field": "modified", "url_template": "https://wiki.example.com/{space}/{_id}",
        "fragment_chars": 200, "fragments": 2,
    }  # fmt: skip
    return ElasticsearchSettings(**{**values, **overrides})


# -- query building -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op,value,expected",
    [
        ("is", "OPS", {"term": {"space": "OPS"}}),
        ("is", ["OPS", "ENG"], {"terms": {"space": ["OPS", "ENG"]}}),
        ("in", "OPS, ENG", {"terms": {"space": ["OPS", "ENG"]}}),
        ("start with", "OP", {"prefix": {"space": {"value": "OP"}}}),
        ("contains", "a*b?", {"wildcard": {"space": {"value": "*a\\*b\\?*"}}}),
        ("end with", "PS", {"wildcard": {"space": {"value": "*PS"}}}),
        ("not empty", None, {"exists": {"field": "space"}}),
        ("is not", "OPS", {"bool": {"must_not": [{"term": {"space": "OPS"}}]}}),
        ("not in", ["A", "B"], {"bool": {"must_not": [{"terms": {"space": ["A", "B"]}}]}}),
        ("≥", "2020", {"range": {"space": {"gte": 2020.0}}}),
        ("≠", 3, {"bool": {"must_not": [{"term": {"space": 3.0}}]}}),
        ("after", "2025-01-01", {"range": {"space": {"gt": "2025-01-01T00:00:00.000Z"}}}),
        ("before", 0, {"range": {"space": {"lt": "1970-01-01T00:00:00.000Z"}}}),
        ("empty", None, None),  # the gateway counts "" as empty; must_not exists would not
        (">", "abc", None),  # nothing to compare with: left to the gateway
    ],
)
def test_each_operator_maps_onto_the_query_dsl(op, value, expected):
    assert filter_clause({"space": "space"}, "space", op, value) == expected


def test_request_body_pushes_down_mapped_conditions_and_asks_for_fragments():
    connector = ElasticsearchConnector("es", settings("https://es.example:9200"))
    body = connector.request_body(SourceQuery("signing keys", 20, metadata_condition=condition(
        ("space", "is", "OPS"), ("author", "is", "not mapped"), ("year", "≥", 2020),
    )))  # fmt: skip
    assert body["query"]["bool"]["must"] == [
        {"multi_match": {"query": "signing keys", "fields": ["title", "content"], "type": "best_fields", "operator": "or"}}
    ]
    assert body["query"]["bool"]["filter"] == [{"term": {"space": "OPS"}}, {"range": {"year": {"gte": 2020.0}}}]
    assert body["size"] == 20 and body["track_total_hits"] is False
    assert body["_source"] == {"includes": ["title", "modified", "space", "labels", "year"]}
    assert body["highlight"]["fields"]["content"] == {
        "type": "unified", "fragment_size": 200, "number_of_fragments": 2, "no_match_size": 200, "order": "score"
    }  # fmt: skip
    assert body["highlight"]["max_analyzed_offset"] == 999_999


def test_or_is_pushed_only_when_every_part_translates():
    connector = ElasticsearchConnector("es", settings("https://es.example:9200"))
    whole = connector.request_body(SourceQuery("x", 5, metadata_condition=condition(("space", "is", "A"), ("year", ">", 1), logical="or")))
    assert whole["query"]["bool"]["filter"] == [{"bool": {"should": [{"term": {"space": "A"}}, {"range": {"year": {"gt": 1.0}}}], "minimum_should_match": 1}}]
    partial = connector.request_body(SourceQuery("x", 5, metadata_condition=condition(("space", "is", "A"), ("author", "is", "b"), logical="or")))
    assert "filter" not in partial["query"]["bool"]


def test_opensearch_flavor_spells_the_highlight_bound_its_own_way_and_has_no_api_keys():
    connector = ElasticsearchConnector("os", settings("https://os.example:9200", flavor="opensearch", api_key=None, username="u", password="p"))
    highlight = connector.request_body(SourceQuery("x", 5))["highlight"]
    assert "max_analyzer_offset" in highlight and "max_analyzed_offset" not in highlight
    with pytest.raises(ValueError, match="OpenSearch 2 has no API keys"):
        settings("https://os.example:9200", flavor="opensearch")


def test_config_errors_name_their_place():
    text = textwrap.dedent("""
    server: {api_keys: [{key: k}]}
    knowledge_bases: {kb: {connectors: [es]}}
    connectors:
      es: {type: elasticsearch, url: "https://u:p@es.example", index: docs, filter_fields: {owner: owner.keyword}}
    """)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, {})
    message = str(caught.value)
    assert "connectors.es.url" in message and "credentials" in message
    assert "u:p@" not in message, "the refused URL, credentials and all, is not echoed"
    with pytest.raises(ValueError, match=r"\['source'\] are set by the gateway itself"):
        settings("https://es.example", metadata_fields=["source"], filter_fields={"source": "source"})


# -- real HTTP against the fake cluster ---------------------------------------------------------


@pytest.fixture
def cluster():
    state = FakeCluster(api_key=ENCODED)
    state.add("k1", title="Key rotation runbook", space="OPS", labels=["security"], year=2025, modified="2025-03-10T12:00:00Z",
              content=LONG_BODY + " We rotate the release signing keys every twelve months. " + LONG_BODY)  # fmt: skip
    state.add("k2", title="Keys to the office", space="HR", labels=["facilities"], year=2019, content="Office keys are at the front desk.")
    state.add("v1", title="VPN setup", space="OPS", labels=[], year=2024, content="Install WireGuard and import the profile.")
    with serve(app(state)) as url:
        yield state, url


async def test_known_item_comes_first_with_raw_score_and_a_fragment_not_the_document(cluster):
    state, url = cluster
    async with ElasticsearchConnector("es", settings(url)) as connector:
        passages = await connector.search(SourceQuery("rotate signing keys", 20))
    first = passages[0]
    assert first.document_id == "k1" and first.source_rank == 1 and first.title == "Key rotation runbook"
    assert first.source_score is not None and first.source_score > 1, "the raw _score, never clamped to [0, 1]"
    assert "rotate the release signing keys" in first.content
    assert len(first.content) <= 200 < len(LONG_BODY), "a highlighter fragment, not the whole field"
    assert first.metadata["url"] == "https://wiki.example.com/OPS/k1"
    assert first.metadata["space"] == "OPS" and first.metadata["labels"] == ["security"] and first.metadata["index"] == "docs"
    assert first.updated_at == "2025-03-10T12:00:00Z"
    assert [p.source_rank for p in passages] == sorted(p.source_rank for p in passages)
    assert state.auth_headers[-1] == f"ApiKey {ENCODED}"
    assert "content" not in state.bodies[-1]["_source"]["includes"], "long fields are not downloaded whole"


async def test_filter_is_pushed_down_and_applied_by_the_engine(cluster):
    state, url = cluster
    async with ElasticsearchConnector("es", settings(url)) as connector:
        passages = await connector.search(SourceQuery("keys", 20, metadata_condition=condition(("space", "is", "OPS"), ("labels", "not in", "facilities"))))
    assert {p.document_id for p in passages} == {"k1"}
    assert state.bodies[-1]["query"]["bool"]["filter"] == [
        {"term": {"space": "OPS"}}, {"bool": {"must_not": [{"terms": {"labels": ["facilities"]}}]}}
    ]  # fmt: skip


async def test_whole_field_split_into_passages_when_highlighting_is_off(cluster):
    _, url = cluster
    async with ElasticsearchConnector("es", settings(url, highlight=False, chunk_chars=500)) as connector:
        passages = await connector.search(SourceQuery("rotate signing keys", 20))
    k1 = [p for p in passages if p.document_id == "k1"]
    assert len(k1) > 1 and all(len(p.content) <= 700 for p in k1) and [p.chunk_index for p in k1] == list(range(len(k1)))


async def test_wrong_key_is_auth_failed_without_the_key(cluster):
    _, url = cluster
    async with ElasticsearchConnector("es", settings(url, api_key="other:wrong-secret")) as connector:
        with pytest.raises(AuthFailed) as caught:
            await connector.search(SourceQuery("keys", 5))
    assert "security_exception" in str(caught.value) and "wrong-secret" not in str(caught.value)


async def test_429_carries_retry_after(cluster):
    state, url = cluster
    state.rate_limit_next, state.retry_after = 1, "2"
    async with ElasticsearchConnector("es", settings(url)) as connector:
        with pytest.raises(RateLimited) as caught:
            await connector.search(SourceQuery("keys", 5))
    assert caught.value.retry_after == 2.0 and "es_rejected_execution_exception" in str(caught.value)


async def test_engine_errors_say_what_the_engine_said(cluster):
    state, url = cluster
    async with ElasticsearchConnector("es", settings(url, index="missing")) as connector:
        with pytest.raises(NotFound, match="index_not_found_exception: no such index"):
            await connector.search(SourceQuery("keys", 5))
    state.malformed = True
    async with ElasticsearchConnector("es", settings(url)) as connector:
        with pytest.raises(BadResponse, match="no hits.hits list"):
            await connector.search(SourceQuery("keys", 5))


async def test_opensearch_with_basic_auth():
    state = FakeCluster(flavor="opensearch", basic=("reader", "os-secret"))
    state.add("d1", title="Signing keys", content="Rotate the signing keys yearly.")
    with serve(app(state)) as url:
        good = settings(url, flavor="opensearch", api_key=None, username="reader", password="os-secret", url_template=None)
        async with ElasticsearchConnector("os", good) as connector:
            [passage] = await connector.search(SourceQuery("signing keys", 5))
        assert passage.content == "Rotate the signing keys yearly." and "url" not in passage.metadata
        wrong_flavor = settings(url, api_key=None, username="reader", password="os-secret")
        async with ElasticsearchConnector("es", wrong_flavor) as connector:
            with pytest.raises(BadResponse, match=r"HTTP 400 \(x_content_parse_exception"):
                await connector.search(SourceQuery("signing keys", 5))


def test_values_over_the_bounds_are_left_to_the_gateway():
    """A 1 MiB value or a list longer than a cluster takes is not pushed down; the gateway's own filter applies it."""
    from connectors.elasticsearch import MAX_PUSHED_CHARS, MAX_PUSHED_TERMS

    fields = {"space": "space"}
    huge = "x" * (1024 * 1024)
    for op, value in (("is", huge), ("contains", huge), ("start with", huge), ("is", [huge]),
                      ("in", [f"v{i}" for i in range(MAX_PUSHED_TERMS + 1)]), ("not in", ",".join(["v"] * (MAX_PUSHED_TERMS + 1)))):
        assert filter_clause(fields, "space", op, value) is None, (op, len(value))
    assert filter_clause(fields, "space", "in", [f"v{i}" for i in range(MAX_PUSHED_TERMS)]) is not None
    assert filter_clause(fields, "space", "is", "x" * MAX_PUSHED_CHARS) is not None
    body = ElasticsearchConnector("es", settings("https://es.example")).request_body(
        SourceQuery("keys", 5, metadata_condition=condition(("space", "is", huge), ("space", "is", "OPS")))
    )
    assert body["query"]["bool"]["filter"] == [{"term": {"space": "OPS"}}], "the rest of an `and` is still pushed"


async def test_a_cluster_that_refuses_expensive_queries_gets_them_filtered_by_the_gateway(cluster):
    """`search.allow_expensive_queries: false`: a pushed-down `contains` is refused with a 400; the connector asks
    again without wildcard and prefix clauses, and keeps doing so, so the source answers instead of failing."""
    state, url = cluster
    state.expensive_queries = False
    wanted = condition(("space", "contains", "OP"), ("labels", "is", "security"))
    async with ElasticsearchConnector("es", settings(url)) as connector:
        first = await connector.search(SourceQuery("keys", 20, metadata_condition=wanted))
        asked = len(state.bodies)
        again = await connector.search(SourceQuery("keys", 20, metadata_condition=wanted))
    assert {p.document_id for p in first} == {p.document_id for p in again} == {"k1"}
    assert len(state.bodies) == asked + 1, "refused once, then asked without them straight away"
    assert state.bodies[-1]["query"]["bool"]["filter"] == [{"term": {"labels": "security"}}]
