"""The `dify_dataset` source: Dify's Knowledge API, over real HTTP against a fake Dify."""

from __future__ import annotations

import pytest

from connectors.base import AuthFailed, BadResponse, NotFound, RateLimited, SourceQuery
from connectors.dify_dataset import DifyDatasetConnector, DifyDatasetSettings, dify_condition

from testkit.fakes.dify_dataset import FakeDify, Segment, app
from .conftest import condition
from testkit.loopback import serve

KEY = "dataset-knowledge-key-secret"


def settings(url: str, **overrides) -> DifyDatasetSettings:
    values = {"api_base": url + "/v1", "api_key": KEY, "dataset_id": FakeDify(KEY).dataset_id}
    return DifyDatasetSettings(**{**values, **overrides})


@pytest.mark.parametrize(
    "name,op,value,expected",
    [
        ("team", "is", "ops", {"name": "team", "comparison_operator": "is", "value": "ops"}),
        ("team", "contains", 3, {"name": "team", "comparison_operator": "contains", "value": "3"}),
        ("team", "in", "ops, eng", {"name": "team", "comparison_operator": "in", "value": ["ops", "eng"]}),
        ("year", "≥", "2020", {"name": "year", "comparison_operator": "≥", "value": 2020.0}),
        ("upload_date", "after", "2025-01-01", {"name": "upload_date", "comparison_operator": "after", "value": 1735689600.0}),
        ("team", "not empty", None, {"name": "team", "comparison_operator": "not empty", "value": None}),
        ("team", "is not", "ops", None),  # Dify drops documents without the field; the gateway keeps them
        ("team", "empty", None, None),
        ("team", "is", ["a", "b"], None),
        ("title", "is", "x", None),  # the gateway's own field
        ("document_name", "is", "x", None),  # set from the segment, not from Dify's metadata
    ],
)
def test_only_conditions_dify_cannot_narrow_are_pushed(name, op, value, expected):
    assert dify_condition(name, op, value) == expected


def test_retrieval_model_is_sent_whole_with_dify_defaults():
    connector = DifyDatasetConnector("kb", settings("https://dify.example"))
    body = connector.request_body(SourceQuery("x" * 300, 40))
    assert len(body["query"]) == 250
    assert body["retrieval_model"] == {
        "search_method": "semantic_search", "reranking_enable": False, "top_k": 20,
        "score_threshold_enabled": False, "score_threshold": None,
    }  # fmt: skip
    tuned = DifyDatasetConnector("kb", settings(
        "https://dify.example", search_method="hybrid_search", reranking_enable=True, reranking_mode="reranking_model",
        reranking_model={"reranking_provider_name": "langgenius/cohere/cohere", "reranking_model_name": "rerank-v3.5"},
        score_threshold=0.3,
    ))  # fmt: skip
    model = tuned.request_body(SourceQuery("x", 5))["retrieval_model"]
    assert model["top_k"] == 5 and model["score_threshold_enabled"] is True and model["score_threshold"] == 0.3
    assert model["reranking_model"]["reranking_model_name"] == "rerank-v3.5" and model["reranking_mode"] == "reranking_model"


@pytest.fixture
def dify():
    state = FakeDify(KEY)
    state.segments = [
        Segment("s1", "d1", "key-rotation.md", "We rotate the release signing keys every twelve months.", position=3,
                doc_metadata={"team": "security", "year": 2025, "source": "upload_file", "last_update_date": 1741267200},
                child_chunks=[{"id": "c1", "content": "rotate the release signing keys", "position": 1, "score": 0.91}]),
        Segment("s2", "d2", "office.md", "Office keys are at the front desk.", doc_metadata={"team": "facilities", "year": 2019}),
        Segment("s3", "d3", "faq.md", "How often are signing keys rotated?", answer="Every twelve months.", doc_metadata=None),
    ]  # fmt: skip
    with serve(app(state)) as url:
        yield state, url


async def test_known_item_with_document_metadata_child_chunks_and_raw_score(dify):
    state, url = dify
    async with DifyDatasetConnector("kb", settings(url)) as connector:
        passages = await connector.search(SourceQuery("rotate the signing keys", 20))
    first = passages[0]
    assert first.document_id == "d1" and first.title == "key-rotation.md" and first.source_rank == 1
    assert first.content == "We rotate the release signing keys every twelve months."
    assert first.source_score == 0.95 and first.chunk_index == 2, "Dify's score as given; position 3 is chunk 2"
    meta = first.metadata
    assert meta["team"] == "security" and meta["year"] == 2025
    assert meta["dify_source"] == "upload_file" and "source" not in meta, "Dify's own `source` never hides the gateway's"
    assert meta["child_chunks"] == [{"content": "rotate the release signing keys", "score": 0.91, "position": 1}]
    assert meta["document_name"] == "key-rotation.md" and meta["segment_id"] == "s1"
    # Dify overwrites `dataset_id` and `dataset_name` of external records in a workflow: the source's own survives.
    assert meta["dify_dataset_id"] == state.dataset_id and "dataset_id" not in meta and "dataset_name" not in meta
    assert first.updated_at == "2025-03-06T13:20:00Z"
    faq = next(p for p in passages if p.document_id == "d3")
    assert faq.content == "How often are signing keys rotated?\nEvery twelve months."
    assert state.bodies[-1]["retrieval_model"]["top_k"] == 20


async def test_metadata_filter_is_pushed_down(dify):
    state, url = dify
    async with DifyDatasetConnector("kb", settings(url)) as connector:
        passages = await connector.search(SourceQuery("keys", 20, metadata_condition=condition(("team", "is", "security"), ("year", "≥", 2020))))
    assert [p.document_id for p in passages] == ["d1"]
    assert state.bodies[-1]["retrieval_model"]["metadata_filtering_conditions"] == {"logical_operator": "and", "conditions": [
        {"name": "team", "comparison_operator": "is", "value": "security"},
        {"name": "year", "comparison_operator": "≥", "value": 2020.0},
    ]}  # fmt: skip


async def test_wrong_key_is_auth_failed_without_the_key(dify):
    _, url = dify
    async with DifyDatasetConnector("kb", settings(url, api_key="dataset-wrong")) as connector:
        with pytest.raises(AuthFailed) as caught:
            await connector.search(SourceQuery("keys", 5))
    assert "unauthorized: Access token is invalid" in str(caught.value) and "dataset-wrong" not in str(caught.value)


async def test_rate_limits_429_and_the_plans_403(dify):
    state, url = dify
    state.rate_limit_next, state.retry_after = 1, "3"
    async with DifyDatasetConnector("kb", settings(url)) as connector:
        with pytest.raises(RateLimited) as caught:
            await connector.search(SourceQuery("keys", 5))
        assert caught.value.retry_after == 3.0
        state.plan_limit_next = 1
        with pytest.raises(RateLimited, match="rate limit of your subscription"):
            await connector.search(SourceQuery("keys", 5))


async def test_unknown_dataset_and_malformed_answers(dify):
    state, url = dify
    async with DifyDatasetConnector("kb", settings(url, dataset_id="00000000-0000-4000-8000-000000000000")) as connector:
        with pytest.raises(NotFound, match="not_found: Dataset not found"):
            await connector.search(SourceQuery("keys", 5))
    state.malformed = True
    async with DifyDatasetConnector("kb", settings(url)) as connector:
        with pytest.raises(BadResponse, match="no 'records' list"):
            await connector.search(SourceQuery("keys", 5))


async def test_an_economy_dataset_is_asked_with_keyword_search_read_once_from_its_detail(dify):
    state, url = dify
    state.indexing_technique = "economy"
    async with DifyDatasetConnector("kb", settings(url, search_method="semantic_search")) as connector:
        with pytest.raises(BadResponse, match="invalid_param"):  # what a real Dify answers, as the issue saw it
            await connector.search(SourceQuery("signing keys", 5))
    async with DifyDatasetConnector("kb", settings(url, score_threshold=0.9)) as connector:
        first = await connector.search(SourceQuery("signing keys", 5))
        again = await connector.search(SourceQuery("office keys", 5))
    assert first and again and state.detail_reads == 1, "the detail is read once per connector"
    assert [b["retrieval_model"]["search_method"] for b in state.bodies[-2:]] == ["keyword_search", "keyword_search"]
    assert {p.source_score for p in first} == {0.0}, "keyword search scores 0.0 and ignores the threshold"


async def test_a_high_quality_dataset_is_asked_with_its_own_method_and_an_older_dify_with_semantic_search(dify):
    state, url = dify
    state.search_method = "hybrid_search"
    async with DifyDatasetConnector("kb", settings(url)) as connector:
        assert await connector.search(SourceQuery("signing keys", 5))
    assert state.bodies[-1]["retrieval_model"]["search_method"] == "hybrid_search"
    state.detail_status = 405
    async with DifyDatasetConnector("kb", settings(url)) as connector:
        assert await connector.search(SourceQuery("signing keys", 5))
    assert state.bodies[-1]["retrieval_model"]["search_method"] == "semantic_search"


async def test_an_external_knowledge_base_is_refused_with_the_reason_not_answered_empty(dify):
    state, url = dify
    state.provider = "external"
    async with DifyDatasetConnector("kb", settings(url)) as connector:
        with pytest.raises(BadResponse, match="external knowledge bases: Dify's Knowledge API answers no records"):
            await connector.search(SourceQuery("signing keys", 5))
    async with DifyDatasetConnector("kb", settings(url, search_method="semantic_search")) as connector:
        assert await connector.search(SourceQuery("signing keys", 5)) == [], "told the method, the detail is not read"


def test_validate_refuses_a_dataset_id_that_is_not_a_uuid(tmp_path, capsys):
    from aggregator.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(
        "server:\n  api_keys: [{key: k}]\nknowledge_bases:\n  kb: {connectors: [handbook]}\n"
        "connectors:\n  handbook: {type: dify_dataset, api_key: dataset-x, dataset_id: handbook}\n"
    )
    assert main(["validate", "--config", str(config)]) == 1
    out = capsys.readouterr()
    assert "connectors.handbook.dataset_id" in out.out + out.err and "is not a dataset id: a UUID" in out.out + out.err


def test_check_says_why_a_dataset_may_answer_nothing(dify, tmp_path, capsys):
    from aggregator.cli import main

    state, url = dify
    config = tmp_path / "c.yaml"
    config.write_text(
        "server:\n  api_keys: [{key: gateway-key}]\nknowledge_bases:\n  kb: {connectors: [handbook]}\n"
        f"connectors:\n  handbook: {{type: dify_dataset, api_base: '{url}/v1', api_key: {KEY}, dataset_id: {state.dataset_id}}}\n"
    )
    assert main(["check", "--config", str(config), "--query", "nothing matches this"]) == 0
    assert "handbook: Dify answered no records: an economy dataset answers keyword_search only" in capsys.readouterr().out
    state.provider = "external"
    assert main(["check", "--config", str(config), "--query", "signing keys"]) == 1
    assert "one of Dify's external knowledge bases" in capsys.readouterr().out
