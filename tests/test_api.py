"""POST /retrieval through the ASGI app: every row of the contract table in DESIGN section 1."""

from __future__ import annotations

import json

import pytest
from fastapi.responses import JSONResponse as StarletteJSONResponse
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from aggregator.web.api import create_app, parse_request
from aggregator.contract.models import RetrievalRequest
from aggregator.runtime.config import GatewayConfig

from .conftest import KEY, SCOPED_KEY

AUTH = {"Authorization": f"Bearer {KEY}"}


def body(query="rotate signing keys", kb="demo", top_k=5, threshold=0.0, **extra) -> dict:
    return {"knowledge_id": kb, "query": query, "retrieval_setting": {"top_k": top_k, "score_threshold": threshold}, **extra}


@pytest.fixture
def client(config: GatewayConfig):
    with TestClient(create_app(lambda: config)) as c:
        for connector in c.app.state.service.gateway.connectors.values():
            c.portal.call(connector.wait_ready, 10)
        yield c


def assert_error(response, status: int, code: int, mentions: str = "") -> None:
    assert response.status_code == status, response.text
    data = response.json()
    assert set(data) == {"error_code", "error_msg"}
    assert data["error_code"] == code and data["error_msg"]
    assert mentions in data["error_msg"]


def test_valid_request_returns_sorted_records_with_metadata(client):
    response = client.post("/retrieval", json=body(), headers=AUTH)
    assert response.status_code == 200
    records = response.json()["records"]
    assert records and records[0]["title"] == "Key rotation"
    scores = [r["score"] for r in records]
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
    meta = records[0]["metadata"]
    assert meta["source"] == "docs" and meta["source_type"] == "files"
    assert meta["document_id"] == "docs:keys.md" and meta["path"] == "keys.md"
    assert meta["chunk_index"] == 0 and meta["updated_at"].endswith("Z")
    assert set(meta["score_detail"]) == {"bm25", "proximity", "relevance", "source_score", "source_rank", "calibrated", "calibration"}
    assert response.headers["X-Sources"] == "docs=ok"


def test_chinese_query_finds_the_chinese_document(client):
    records = client.post("/retrieval", json=body("签名密钥多久轮换"), headers=AUTH).json()["records"]
    assert records[0]["metadata"]["document_id"] == "docs:zh/密钥.md"


def test_top_k_and_threshold(client):
    everything = client.post("/retrieval", json=body("keys rotate VPN expenses", top_k=10), headers=AUTH).json()["records"]
    assert len(everything) >= 3
    assert len(client.post("/retrieval", json=body("keys rotate VPN expenses", top_k=2), headers=AUTH).json()["records"]) == 2
    cut = everything[1]["score"]
    kept = client.post("/retrieval", json=body("keys rotate VPN expenses", top_k=10, threshold=cut), headers=AUTH).json()["records"]
    assert kept and all(r["score"] >= cut for r in kept) and len(kept) < len(everything)


def test_trailing_slash_endpoint_path_is_served(client):
    doubled = client.post("http://testserver//retrieval", json=body(), headers=AUTH)
    assert doubled.status_code == 200
    assert doubled.json() == client.post("/retrieval", json=body(), headers=AUTH).json()


@pytest.mark.parametrize("header", [None, "Basic abc", "Bearer", "Bearer   ", "token x"])
def test_missing_or_malformed_authorization_is_1001(client, header):
    headers = {} if header is None else {"Authorization": header}
    assert_error(client.post("/retrieval", json=body(), headers=headers), 403, 1001)


def test_unknown_key_is_1002(client):
    assert_error(client.post("/retrieval", json=body(), headers={"Authorization": "Bearer nope"}), 403, 1002)


def test_auth_is_checked_before_the_body_is_read(client):
    response = client.post("/retrieval", content=b"{not json", headers={"Authorization": "Bearer nope"})
    assert_error(response, 403, 1002)


def test_key_scoped_to_other_knowledge_bases_is_1002(client):
    scoped = {"Authorization": f"Bearer {SCOPED_KEY}"}
    assert_error(client.post("/retrieval", json=body(kb="demo"), headers=scoped), 403, 1002, "demo")
    assert client.post("/retrieval", json=body(kb="other"), headers=scoped).status_code == 200
    # a scoped key learns nothing about knowledge bases it may not read, not even whether they exist
    assert_error(client.post("/retrieval", json=body(kb="secret-kb"), headers=scoped), 403, 1002)


def test_unknown_knowledge_base_is_2001(client):
    assert_error(client.post("/retrieval", json=body(kb="nope"), headers=AUTH), 404, 2001, "nope")


def test_registration_probe_without_body_is_400(client):
    assert_error(client.post("/retrieval", headers=AUTH), 400, 3001, "body")


@pytest.mark.parametrize(
    "payload,field",
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        (b'"text"', "body"),
        (json.dumps({"knowledge_id": "demo"}).encode(), "query"),
        (json.dumps({"query": "x"}).encode(), "knowledge_id"),
        (json.dumps(body(query="")).encode(), "query"),
        (json.dumps(body(top_k="many")).encode(), "retrieval_setting.top_k"),
        (json.dumps(body(top_k=-1)).encode(), "retrieval_setting.top_k"),
        (json.dumps(body(top_k=True)).encode(), "retrieval_setting.top_k"),
        (json.dumps(body(threshold=7)).encode(), "retrieval_setting.score_threshold"),
        (json.dumps(body(threshold=-0.1)).encode(), "retrieval_setting.score_threshold"),
        (json.dumps(body(metadata_condition={"conditions": [{"name": ["x"], "comparison_operator": "like", "value": "y"}]})).encode(),
         "metadata_condition.conditions[0].comparison_operator"),
        (json.dumps(body(metadata_condition={"logical_operator": "xor", "conditions": []})).encode(), "metadata_condition.logical_operator"),
        (json.dumps(body(metadata_condition={"conditions": [{"name": [], "comparison_operator": "is", "value": "y"}]})).encode(),
         "metadata_condition.conditions[0].name"),
    ],
)  # fmt: skip
def test_bad_bodies_are_3001_naming_the_field(client, payload, field):
    assert_error(client.post("/retrieval", content=payload, headers=AUTH), 400, 3001, field)


def test_oversized_body_is_rejected_without_reading_it(client):
    response = client.post("/retrieval", content=b"x" * (1024 * 1024 + 1), headers=AUTH)
    assert_error(response, 413, 3002)


def test_dify_serialization_with_nulls_is_accepted(client):
    payload = body(metadata_condition={
        "logical_operator": None,
        "conditions": [{"name": ["source"], "comparison_operator": "not empty", "value": None}],
    })  # fmt: skip
    payload["retrieval_setting"]["score_threshold"] = None
    response = client.post("/retrieval", json=payload, headers=AUTH)
    assert response.status_code == 200 and response.json()["records"]


def test_metadata_condition_filters_records(client):
    only_zh = body("签名密钥 signing keys", metadata_condition={"conditions": [{"name": ["document_id"], "comparison_operator": "start with", "value": "docs:zh/"}]})
    records = client.post("/retrieval", json=only_zh, headers=AUTH).json()["records"]
    assert records and all(r["metadata"]["document_id"].startswith("docs:zh/") for r in records)
    none = body(metadata_condition={"conditions": [{"name": ["updated_at"], "comparison_operator": "before", "value": "1970-01-02"}]})
    assert client.post("/retrieval", json=none, headers=AUTH).json()["records"] == []


def test_a_nonsense_query_returns_an_empty_list(client):
    response = client.post("/retrieval", json=body("zzqx vvkw plorpt"), headers=AUTH)
    assert response.status_code == 200 and response.json() == {"records": []}


def test_health_and_readiness(client):
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_a_bug_is_500_5001_without_a_traceback(client, monkeypatch):
    import aggregator.web.route

    async def broken(*_args, **_kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(aggregator.web.route, "retrieve", broken)
    with TestClient(client.app, raise_server_exceptions=False) as c:
        response = c.post("/retrieval", json=body(), headers=AUTH)
    assert_error(response, 500, 5001)
    assert "secret internals" not in response.text and "Traceback" not in response.text


async def test_a_client_trickling_its_body_is_cut_off(config: GatewayConfig, monkeypatch):
    import asyncio

    import httpx

    import aggregator.web.route

    monkeypatch.setattr(aggregator.web.route, "BODY_TIMEOUT_S", 0.3)
    app = create_app(lambda: config)

    async def trickle():
        yield b'{"knowledge_id": "demo", '
        await asyncio.sleep(5)
        yield b'"query": "x"}'

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await asyncio.wait_for(client.post("/retrieval", content=trickle(), headers=AUTH), 3)
    assert_error(response, 408, 3003)


_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
_conditions = st.lists(st.fixed_dictionaries(
    {"name": st.sampled_from(["a", ["a", "b"]]) | _json, "comparison_operator": st.sampled_from(["is", "=", ">", "in", "empty"]) | _json},
    optional={"value": _scalars | st.lists(_scalars, max_size=3) | _json},
), max_size=3)
_bodies = st.fixed_dictionaries(
    {"knowledge_id": st.just("kb") | _json, "query": st.text(min_size=1, max_size=8) | _json},
    optional={
        "retrieval_setting": st.fixed_dictionaries({}, optional={
            "top_k": st.integers(-2, 200) | st.none() | _json, "score_threshold": st.floats(-1, 2) | st.integers(-1, 2) | _json,
        }) | _json,
        "metadata_condition": st.fixed_dictionaries({}, optional={"logical_operator": st.sampled_from(["and", "or"]) | _json,
                                                                  "conditions": _conditions | _json}) | _json,
    },
) | _json  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(_bodies, st.sampled_from(["", " ", "\n", " x", ",", "\ufeff"]))
def test_a_body_is_read_in_one_pass_exactly_as_parsing_then_validating_reads_it(body, around):
    """The body goes through pydantic's JSON mode first: it accepts what json.loads + the model accept, no more."""
    raw = (json.dumps(body) + around).encode() if around != "\ufeff" else ("\ufeff" + json.dumps(body)).encode()
    parsed = parse_request(raw)
    try:
        expected = RetrievalRequest.model_validate(json.loads(raw))
    except (ValueError, ValidationError):
        assert isinstance(parsed, StarletteJSONResponse) and parsed.status_code == 400
    else:
        assert parsed == expected
