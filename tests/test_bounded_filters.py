"""One request must not stall the service: a filter's work is bounded, off the event loop and inside the deadline."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

import aggregator.state.sync as indexed
from aggregator.web.api import create_app
from aggregator.contract.conditions import compile_filter
from aggregator.contract.models import MAX_FILTER_FIELDS, MAX_FILTER_TESTS, MAX_VALUE_CHARS, MAX_VALUES_PER_CONDITION, MetadataCondition

from .conftest import KEY, make_config, write_docs
from testkit.loopback import eventually, serve, wait_ready

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def client(config):
    with TestClient(create_app(lambda: config)) as c:
        for connector in c.app.state.service.gateway.connectors.values():
            c.portal.call(connector.wait_ready, 10)
        yield c


def retrieval(conditions: list[dict], logical: str = "or", kb: str = "demo") -> dict:
    return {
        "knowledge_id": kb, "query": "alpha", "retrieval_setting": {"top_k": 3, "score_threshold": 0.0},
        "metadata_condition": {"logical_operator": logical, "conditions": conditions},
    }  # fmt: skip


def contains(names: list[str], values: list[str]) -> dict:
    return {"name": names, "comparison_operator": "contains", "value": values}


@pytest.mark.parametrize(
    "conditions,mentions",
    [
        # the review's request: 64 conditions x 32 names x 1,500 values (one test per value, name and condition)
        ([contains([f"f{i}" for i in range(32)], [f"v{j}" for j in range(1500)])] * 64, "values in one condition"),
        ([contains(["title"], ["x"] * (MAX_VALUES_PER_CONDITION + 1))], "values in one condition"),
        ([{"name": ["title"], "comparison_operator": "in", "value": ",".join(["x"] * (MAX_VALUES_PER_CONDITION + 1))}], "values in one condition"),
        ([contains([f"f{i}" for i in range(32)], ["x"])] * 3, "field names"),
        ([contains([f"f{i}" for i in range(8)], [f"v{j}" for j in range(MAX_FILTER_TESTS // 8 + 1)])], "field tests"),
        ([contains(["title"], ["x" * (MAX_VALUE_CHARS + 1)])], "characters"),
    ],
)
def test_a_filter_over_the_limits_is_refused_with_3001_saying_which_limit(client, conditions, mentions):
    response = client.post("/retrieval", json=retrieval(conditions), headers=AUTH)
    assert response.status_code == 400
    body = response.json()
    assert body["error_code"] == 3001
    assert "metadata_condition" in body["error_msg"] and mentions in body["error_msg"]


def test_the_largest_filters_the_limits_allow_are_served(client):
    def records(conditions: list[dict]) -> list[dict]:
        response = client.post("/retrieval", json=retrieval(conditions) | {"query": "rotate signing keys"}, headers=AUTH)
        assert response.status_code == 200, response.text
        return response.json()["records"]

    assert records([contains(["title"], [f"v{j}" for j in range(MAX_VALUES_PER_CONDITION)])]) == []
    assert records([contains(["title"], ["x"])] * MAX_FILTER_FIELDS) == []
    ids = [f"d{j}" for j in range(MAX_VALUES_PER_CONDITION - 1)] + ["docs:keys.md"]
    found = records([{"name": ["document_id"], "comparison_operator": "in", "value": ids}])
    assert [r["metadata"]["document_id"] for r in found] == ["docs:keys.md"]


def test_many_values_fold_into_one_test_with_the_same_meaning():
    """A list of values holds when any value does; numbers and dates compare with the loosest bound."""
    record = {"title": "Key rotation runbook", "size": 1200, "updated_at": "2025-03-10T12:00:00Z", "labels": ["ops", "security"]}

    def holds(op: str, value, name: str) -> bool:
        condition = MetadataCondition.model_validate({"conditions": [{"name": [name], "comparison_operator": op, "value": value}]})
        return compile_filter(condition)(record)  # type: ignore[misc]

    assert holds("contains", [f"nope{i}" for i in range(200)] + ["rotation"], "title")
    assert not holds("contains", [f"nope{i}" for i in range(200)], "title")
    assert holds("not contains", [f"nope{i}" for i in range(200)], "title")
    assert holds("start with", ["Lock", "Key"], "title") and holds("end with", ["book", "zzz"], "title")
    assert holds("in", ["dev", "security"], "labels") and not holds("not in", ["dev", "security"], "labels")
    assert holds(">", [5000, 1000], "size") and not holds(">", [5000, 2000], "size")
    assert holds("<", [5000, 1000], "size") and holds("=", [3, 1200], "size") and not holds("≠", [3, 1200], "size")
    assert holds("before", ["2024-01-01", "2026-01-01"], "updated_at") and not holds("after", ["2026-01-01", "2025-12-01"], "updated_at")
    assert holds(">", ["abc", 1000], "size")  # the value it cannot use matches nothing; the other one still counts


@pytest.fixture
def slow_filter(monkeypatch) -> threading.Event:
    """Every passage a filter looks at costs 2 ms: a filter that rejects everything on a large source. The event
    is set when a passage is looked at (clear it, then wait for it: the filter is under way)."""
    real = indexed.record_metadata
    looked_at = threading.Event()

    def slow(*args, **kwargs):
        looked_at.set()
        time.sleep(0.002)
        return real(*args, **kwargs)

    monkeypatch.setattr(indexed, "record_metadata", slow)
    return looked_at


def test_a_slow_filter_on_an_indexed_source_neither_stalls_the_service_nor_outlives_the_deadline(tmp_path: Path, slow_filter):
    docs = {f"doc{i:04d}.md": f"# Note {i}\n\nalpha beta gamma {i}" for i in range(1500)}  # ~3 s of filter work
    config = make_config(write_docs(tmp_path / "docs", docs), deadline_s=0.8)
    body = retrieval([{"name": ["title"], "comparison_operator": "is", "value": "no such title"}])
    answers: dict[str, object] = {}

    with serve(create_app(lambda: config)) as url:
        wait_ready(url, timeout=60)
        slow_filter.clear()

        def ask() -> None:
            started = time.monotonic()
            answers["response"] = httpx.post(url + "/retrieval", json=body, headers=AUTH, timeout=30)
            answers["elapsed"] = time.monotonic() - started

        asker = threading.Thread(target=ask)
        asker.start()
        eventually(slow_filter.is_set, what="the retrieval's filter reading passages")
        started = time.monotonic()
        health = httpx.get(url + "/healthz", timeout=30)
        health_s = time.monotonic() - started
        asker.join(30)

    assert health.status_code == 200 and health_s < 0.4, f"/healthz took {health_s:.2f} s during the filter"
    response = answers["response"]
    assert isinstance(response, httpx.Response) and response.status_code == 200
    assert response.json()["records"] == []
    assert response.headers["X-Sources"] == "docs=timeout"
    assert answers["elapsed"] < 0.8 + 0.5, f"the answer took {answers['elapsed']:.2f} s with a deadline of 0.8 s"
