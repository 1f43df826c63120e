"""schemathesis against the service's own OpenAPI schema: no 5xx, every error in the contract's format."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from aggregator.web.api import create_app
from aggregator.runtime.config import parse_config

KEY = "schema-key"
DOCS = Path(__file__).resolve().parent.parent / "samples"
CONFIG = parse_config(
    f"server:\n  api_keys: [{{key: {KEY}}}]\n  watch_config: false\nknowledge_bases:\n  demo: {{connectors: [samples]}}\n"
    f"connectors:\n  samples: {{type: files, path: '{DOCS}', watch: false}}\n",
    {},
)
APP = create_app(lambda: CONFIG)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def lifespan():
    from fastapi.testclient import TestClient

    with TestClient(APP):  # runs startup (the index) once for all examples
        yield


@schema.include(path="/retrieval", method="POST").parametrize()
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_retrieval_never_fails_with_a_5xx(case):
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {KEY}"}
    response = case.call()
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        body = response.json()
        assert set(body) == {"error_code", "error_msg"}, (response.status_code, body, case.method, case.path, case.query, case.headers.get("Content-Type"))
        assert set(body) == {"error_code", "error_msg"}
        assert isinstance(body["error_code"], int) and isinstance(body["error_msg"], str) and body["error_msg"]
    else:
        records = response.json()["records"]
        assert all(0.0 <= r["score"] <= 1.0 and isinstance(r["metadata"], dict) for r in records)
