"""The `ragflow` source: RAGFlow's retrieval API and its code/message envelope, against a fake RAGFlow."""

from __future__ import annotations

import pytest

from connectors.base import AuthFailed, BadResponse, RateLimited, SourceQuery, Unavailable
from connectors.ragflow import RagflowConnector, RagflowSettings, envelope_error, ragflow_condition

from testkit.fakes.ragflow import Chunk, FakeRagflow, app
from .conftest import condition
from testkit.loopback import serve

KEY = "ragflow-api-key-secret"


def settings(url: str, **overrides) -> RagflowSettings:
    return RagflowSettings(**{"base_url": url, "api_key": KEY, "dataset_ids": ["kb-1"], **overrides})


@pytest.mark.parametrize(
    "code,message,kind",
    [
        (109, "Authentication error: API key is invalid!", AuthFailed),
        (401, "<Unauthorized>", AuthFailed),
        (102, "You don't own the dataset kb-9.", AuthFailed),
        (102, "`dataset_ids` is required.", BadResponse),
        (105, "Connection error", Unavailable),
        (100, "index_not_found_exception", BadResponse),
    ],
)
def test_envelope_codes_map_to_typed_errors(code, message, kind):
    error = envelope_error({"code": code, "message": message}, "POST x")
    assert type(error) is kind and f"code {code}" in str(error)
    assert envelope_error({"code": 0, "data": {}}, "POST x") is None


@pytest.mark.parametrize(
    "op,value,expected",
    [
        ("contains", "bob", {"name": "author", "comparison_operator": "contains", "value": "bob"}),
        ("start with", "Bo", {"name": "author", "comparison_operator": "start with", "value": "Bo"}),
        ("is", "Bob", {"name": "author", "comparison_operator": "=", "value": "Bob"}),
        ("not empty", None, {"name": "author", "comparison_operator": "not empty", "value": ""}),
        ("is", "2024", None),  # RAGFlow compares numbers as numbers: "2024" may not equal 2024 there
        ("is not", "Bob", None),  # a document without the field never matches in RAGFlow
        (">", 3, None),
        ("in", ["a"], None),
    ],
)
def test_only_conditions_ragflow_cannot_narrow_are_pushed(op, value, expected):
    assert ragflow_condition("author", op, value) == expected


@pytest.fixture
def ragflow():
    state = FakeRagflow(KEY)
    state.chunks = [
        Chunk("c1", "doc-1", "keys.pdf", "We rotate the release signing keys every twelve months.", metadata={"author": "Bob", "title": "Keys"}),
        Chunk("c2", "doc-2", "office.txt", "Office keys are at the front desk.", metadata={"author": "Alice"}),
        Chunk("c3", "doc-3", "other.txt", "Signing keys for another team.", dataset_id="kb-2"),
    ]  # fmt: skip
    with serve(app(state)) as url:
        yield state, url


async def test_known_item_with_raw_similarity_and_document_metadata(ragflow):
    state, url = ragflow
    async with RagflowConnector("rf", settings(url)) as connector:
        passages = await connector.search(SourceQuery("rotate the signing keys", 20))
    first = passages[0]
    assert first.document_id == "doc-1" and first.title == "keys.pdf" and first.source_rank == 1
    assert first.source_score == pytest.approx(0.7 * 1.0 + 0.3 * 0.9), "similarity exactly as RAGFlow gave it"
    assert first.metadata["author"] == "Bob" and first.metadata["ragflow_title"] == "Keys" and "title" not in first.metadata
    assert first.metadata["chunk_id"] == "c1" and first.metadata["dataset_id"] == "kb-1"
    assert {p.document_id for p in passages} == {"doc-1", "doc-2"}, "only the configured dataset"
    sent = state.bodies[-1]
    assert sent["page"] == 1 and sent["page_size"] == 20 and sent["reference_metadata"] == {"include": True}
    assert sent["similarity_threshold"] == 0.2 and sent["vector_similarity_weight"] == 0.3 and sent["top_k"] == 1024


async def test_metadata_filter_is_pushed_down(ragflow):
    state, url = ragflow
    async with RagflowConnector("rf", settings(url)) as connector:
        passages = await connector.search(SourceQuery("keys", 20, metadata_condition=condition(("author", "is", "bob"), ("year", ">", 3))))
    assert [p.document_id for p in passages] == ["doc-1"]
    assert state.bodies[-1]["metadata_condition"] == {"logic": "and", "conditions": [{"name": "author", "comparison_operator": "=", "value": "bob"}]}


async def test_page_size_caps_the_answer(ragflow):
    state, url = ragflow
    async with RagflowConnector("rf", settings(url, page_size=1)) as connector:
        passages = await connector.search(SourceQuery("keys", 20))
    assert len(passages) == 1 and state.bodies[-1]["page_size"] == 1


@pytest.mark.parametrize("legacy", [False, True])
async def test_wrong_key_is_auth_failed_in_either_envelope(ragflow, legacy):
    state, url = ragflow
    state.legacy_auth = legacy
    async with RagflowConnector("rf", settings(url, api_key="ragflow-wrong")) as connector:
        with pytest.raises(AuthFailed) as caught:
            await connector.search(SourceQuery("keys", 5))
    assert ("code 109" if legacy else "HTTP 401") in str(caught.value) and "ragflow-wrong" not in str(caught.value)


async def test_a_dataset_the_key_does_not_own_is_auth_failed(ragflow):
    _, url = ragflow
    async with RagflowConnector("rf", settings(url, dataset_ids=["kb-9"])) as connector:
        with pytest.raises(AuthFailed, match="You don't own the dataset kb-9"):
            await connector.search(SourceQuery("keys", 5))


async def test_429_carries_retry_after(ragflow):
    state, url = ragflow
    state.rate_limit_next, state.retry_after = 1, "2"
    async with RagflowConnector("rf", settings(url)) as connector:
        with pytest.raises(RateLimited) as caught:
            await connector.search(SourceQuery("keys", 5))
    assert caught.value.retry_after == 2.0


async def test_malformed_answer_is_a_bad_response(ragflow):
    state, url = ragflow
    state.malformed = True
    async with RagflowConnector("rf", settings(url)) as connector:
        with pytest.raises(BadResponse, match="no data.chunks list"):
            await connector.search(SourceQuery("keys", 5))
