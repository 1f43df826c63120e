"""What a real Dify (1.13) sends, taken from its request log: every shape its models can serialize answers 200.

Dify turns any status but 200 into an error page for its user, so the gateway
is strict only where a request is really wrong (no key, wrong key, unknown
knowledge base, malformed JSON) and reads Dify's nulls as "not given".
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.web.api import create_app
from aggregator.runtime.config import GatewayConfig
from aggregator.contract.models import DEFAULT_TOP_K, MAX_TOP_K

from .conftest import KEY

AUTH = {"Authorization": f"Bearer {KEY}"}
QUERY = "keys rotate VPN expenses reimbursed"

#: Dify's hit testing without a filter, exactly as its logging proxy saw it.
AS_DIFY = {"retrieval_setting": {"top_k": 4, "score_threshold": 0.0}, "query": QUERY, "knowledge_id": "demo", "metadata_condition": None}


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> TestClient:
    from .conftest import DOCS, make_config, write_docs

    more = {f"notes/{i}.md": f"# Note {i}\n\nRotate keys and check the VPN; expenses are reimbursed monthly ({i})." for i in range(3)}
    config: GatewayConfig = make_config(write_docs(tmp_path_factory.mktemp("docs"), {**DOCS, **more}))
    with TestClient(create_app(lambda: config)) as c:
        for connector in c.app.state.service.gateway.connectors.values():
            c.portal.call(connector.wait_ready, 10)
        yield c


def post(client: TestClient, body: dict) -> list[dict]:
    response = client.post("/retrieval", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    records = response.json()["records"]
    assert all(set(r) == {"content", "score", "title", "metadata"} for r in records)
    return records


def titles(records: list[dict]) -> list[str]:
    return [r["title"] for r in records]


def test_hit_testing_without_a_filter(client):
    records = post(client, AS_DIFY)
    assert len(records) == 4


@pytest.mark.parametrize(
    "condition",
    [
        {"logical_operator": "and", "conditions": None},
        {"logical_operator": None, "conditions": None},
        {"logical_operator": None, "conditions": []},
        {"logical_operator": "or", "conditions": []},
        {"conditions": None},
        {},
    ],
)
def test_a_filter_with_no_conditions_is_no_filter(client, condition):
    assert post(client, {**AS_DIFY, "metadata_condition": condition}) == post(client, AS_DIFY)


def test_hit_testing_without_a_retrieval_model_uses_the_default_top_k(client):
    records = post(client, {**AS_DIFY, "retrieval_setting": {"top_k": None, "score_threshold": None}})
    assert len(records) == DEFAULT_TOP_K == 4
    assert titles(records) == titles(post(client, AS_DIFY))
    assert len(post(client, {**AS_DIFY, "retrieval_setting": None})) == DEFAULT_TOP_K
    assert len(post(client, {"query": QUERY, "knowledge_id": "demo"})) == DEFAULT_TOP_K


def test_top_k_zero_answers_no_records(client):
    response = client.post("/retrieval", json={**AS_DIFY, "retrieval_setting": {"top_k": 0, "score_threshold": 0.0}}, headers=AUTH)
    assert response.status_code == 200 and response.json() == {"records": []}


def test_a_top_k_over_the_maximum_is_served_as_the_maximum(client):
    assert len(post(client, {**AS_DIFY, "retrieval_setting": {"top_k": 10_000, "score_threshold": 0.0}})) <= MAX_TOP_K


def test_a_null_threshold_is_no_threshold(client):
    records = post(client, {**AS_DIFY, "retrieval_setting": {"top_k": 4, "score_threshold": None}})
    assert titles(records) == titles(post(client, AS_DIFY))


def test_a_string_name_filters_like_the_list_form(client):
    as_string = {"logical_operator": "and", "conditions": [{"name": "document_id", "comparison_operator": "is", "value": "docs:keys.md"}]}
    as_list = {"logical_operator": "and", "conditions": [{"name": ["document_id"], "comparison_operator": "is", "value": "docs:keys.md"}]}
    records = post(client, {**AS_DIFY, "metadata_condition": as_string})
    assert records and {r["metadata"]["document_id"] for r in records} == {"docs:keys.md"}
    assert records == post(client, {**AS_DIFY, "metadata_condition": as_list})


def test_a_filter_on_the_title(client):
    condition = {"logical_operator": "and", "conditions": [{"name": "title", "comparison_operator": "contains", "value": "rotation"}]}
    records = post(client, {**AS_DIFY, "metadata_condition": condition})
    assert titles(records) == ["Key rotation"]
    assert records[0]["metadata"]["title"] == "Key rotation"


@pytest.mark.parametrize(
    "value,expected",
    [
        (None, True),  # a condition with no value yet: left out, as Dify does
        ("abc", False),  # no number is greater than "abc"
        ("0", False),  # numeric text compares as a number; every chunk_index here is 0
        (-1, True),
        ([5, -1], True),  # a list holds when any item does
    ],
)
def test_values_of_every_type_dify_allows(client, value, expected):
    condition = {"logical_operator": "and", "conditions": [{"name": "chunk_index", "comparison_operator": ">", "value": value}]}
    unfiltered = post(client, AS_DIFY)
    assert post(client, {**AS_DIFY, "metadata_condition": condition}) == (unfiltered if expected else [])


def test_what_stays_strict(client):
    """Really wrong requests keep their errors: Dify's models cannot produce these."""
    assert client.post("/retrieval", json=AS_DIFY).status_code == 403
    assert client.post("/retrieval", json=AS_DIFY, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.post("/retrieval", json={**AS_DIFY, "knowledge_id": "nope"}, headers=AUTH).status_code == 404
    assert client.post("/retrieval", content=b"{not json", headers=AUTH).status_code == 400
    # newer Dify's registration probe: empty knowledge_id and query, answered 400 (not 403/404) so registration passes
    probe = {"knowledge_id": "", "query": "", "retrieval_setting": {"top_k": 1, "score_threshold": 0.0}}
    assert client.post("/retrieval", json=probe, headers=AUTH).status_code == 400


# Dify's models (api/core/rag/entities/metadata_entities.py and the external retrieval settings):
#   Condition: name: str, comparison_operator: one of 18, value: str | list[str] | list[int] | list[float] | int | float | None
#   MetadataCondition: logical_operator: "and" | "or" | None, conditions: list[Condition] | None
#   retrieval_setting: top_k: int | None, score_threshold: float | None
OPERATORS = ["contains", "not contains", "start with", "end with", "is", "is not", "empty", "not empty", "in", "not in",
             "=", "≠", ">", "<", "≥", "≤", "before", "after"]  # fmt: skip
NAMES = st.sampled_from(["title", "document_id", "source", "chunk_index", "updated_at", "path", "size", "category", ""]) | st.text(max_size=20)
VALUES = (
    st.none() | st.text(max_size=20) | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.lists(st.text(max_size=10), max_size=4) | st.lists(st.integers(-1000, 1000), max_size=4)
    | st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=4)
    | st.sampled_from(["2024-01-01", "2025-03-10T12:00:00Z", "1741608000", "3", "ENG,OPS", ""])
)  # fmt: skip
CONDITIONS = st.fixed_dictionaries({"name": NAMES, "comparison_operator": st.sampled_from(OPERATORS), "value": VALUES})
METADATA_CONDITIONS = st.none() | st.fixed_dictionaries(
    {"logical_operator": st.sampled_from(["and", "or", None]), "conditions": st.none() | st.lists(CONDITIONS, max_size=5)}
)
BODIES = st.fixed_dictionaries(
    {
        "retrieval_setting": st.fixed_dictionaries(
            {"top_k": st.none() | st.integers(0, 200), "score_threshold": st.none() | st.floats(0.0, 1.0)}
        ),
        "query": st.sampled_from([QUERY, "签名密钥多久轮换", "vpn", "zzqx"]) | st.text(min_size=1, max_size=50).filter(str.strip),
        "knowledge_id": st.just("demo"),
        "metadata_condition": METADATA_CONDITIONS,
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES)
def test_any_body_difys_models_can_serialize_is_answered_200(client, body):
    records = post(client, body)
    top_k = body["retrieval_setting"]["top_k"]
    threshold = body["retrieval_setting"]["score_threshold"] or 0.0
    assert len(records) <= min(MAX_TOP_K, DEFAULT_TOP_K if top_k is None else top_k)
    assert all(threshold <= r["score"] <= 1.0 for r in records)
