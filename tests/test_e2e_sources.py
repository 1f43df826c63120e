"""One knowledge base over files, Elasticsearch, a Dify dataset, RAGFlow and a JSON search API, through POST /retrieval.

Every upstream is a loopback fake answering with its documented shapes; the
gateway runs for real (uvicorn) and is asked over HTTP, as Dify asks it.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from aggregator.web.api import create_app
from aggregator.runtime.config import parse_config

from testkit.fakes import dify_dataset, elasticsearch, ragflow, search_api
from testkit.gateway import ask, config_text, write_docs
from testkit.loopback import serve, wait_ready

SECRETS = {
    "ES_API_KEY": "es-id:es-secret-key",
    "DIFY_DATASET_KEY": "dataset-dify-secret-key",
    "RAGFLOW_KEY": "ragflow-secret-key",
    "INTRANET_KEY": "intranet-secret-key",
}
SOURCES = ["docs", "es", "dify-kb", "ragflow", "intranet"]
REMOTE = SOURCES[1:]


@dataclass
class Fakes:
    es: elasticsearch.FakeCluster
    dify: dify_dataset.FakeDify
    ragflow: ragflow.FakeRagflow
    intranet: search_api.FakeSearchApi
    urls: dict[str, str]

    def each(self):
        return [self.es, self.dify, self.ragflow, self.intranet]


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Fakes]:
    """The four fake upstreams, started once for the module (their shutdown is what costs time)."""
    es = elasticsearch.FakeCluster(api_key=base64.b64encode(SECRETS["ES_API_KEY"].encode()).decode())
    es.add("es-1", title="Signing key rotation (Elasticsearch)", team="security",
           content="Filler about other things. Rotate the release signing keys every twelve months in the HSM. More filler.")  # fmt: skip
    es.add("es-2", title="Holiday calendar", team="hr", content="The office closes between the holidays.")
    dify = dify_dataset.FakeDify(SECRETS["DIFY_DATASET_KEY"])
    dify.segments = [dify_dataset.Segment("s1", "d1", "signing-keys.md", "Signing keys are rotated yearly by the security team.",
                                          doc_metadata={"team": "security"})]  # fmt: skip
    rf = ragflow.FakeRagflow(SECRETS["RAGFLOW_KEY"])
    rf.chunks = [ragflow.Chunk("c1", "doc-1", "key-policy.pdf", "Policy: rotate signing keys after any suspected compromise.", metadata={"team": "security"})]
    intranet = search_api.FakeSearchApi(SECRETS["INTRANET_KEY"])
    intranet.items = [{"id": "kb-17", "title": "Signing keys FAQ (intranet)", "snippet": "Who rotates the signing keys? The security team, yearly.",
                       "links": {"self": "https://intranet.example/kb/17"}, "owner": {"team": "security"}, "tags": [], "modified": "2025-05-01"}]  # fmt: skip
    with serve(elasticsearch.app(es)) as es_url, serve(dify_dataset.app(dify)) as dify_url, \
            serve(ragflow.app(rf)) as rf_url, serve(search_api.app(intranet)) as intranet_url:  # fmt: skip
        yield Fakes(es, dify, rf, intranet, {"es": es_url, "dify": dify_url, "ragflow": rf_url, "intranet": intranet_url})


@pytest.fixture
def fakes(upstreams: Fakes) -> Iterator[Fakes]:
    """The shared fakes, put back as they were after each test (keys, faults, recorded requests)."""
    keys = [fake.api_key for fake in upstreams.each()]
    yield upstreams
    for fake, key in zip(upstreams.each(), keys):
        fake.api_key, fake.malformed, fake.rate_limit_next = key, False, 0
        getattr(fake, "bodies", getattr(fake, "requests", [])).clear()


def sources_config(fakes: Fakes, docs: Path) -> str:
    """`eng` over a folder and every fake, their keys as ${VAR}s (SECRETS)."""
    u = fakes.urls
    intranet_record = {"content": "snippet", "title": "title", "url": "links.self", "score": "relevance", "id": "id", "metadata": "{team: owner.team}"}
    connectors = {
        "docs": {"type": "files", "path": str(docs)},
        "es": {"type": "elasticsearch", "url": u["es"], "index": "docs", "api_key": "${ES_API_KEY}",
               "metadata_fields": ["team"], "filter_fields": {"team": "team"}},
        "dify-kb": {"type": "dify_dataset", "api_base": f"{u['dify']}/v1", "api_key": "${DIFY_DATASET_KEY}", "dataset_id": fakes.dify.dataset_id},
        "ragflow": {"type": "ragflow", "base_url": u["ragflow"], "api_key": "${RAGFLOW_KEY}", "dataset_ids": ["kb-1"]},
        "intranet": {"type": "http", "url": f"{u['intranet']}/api/search?q={{query}}&size={{limit}}", "headers": {"X-Api-Key": "${INTRANET_KEY}"},
                     "results": "data.items", "record": intranet_record},
    }  # fmt: skip
    return config_text(connectors, {"eng": list(SOURCES)}, defaults={"timeout_s": 2.0, "retries": 1})


@pytest.fixture
def gateway(fakes: Fakes, tmp_path: Path) -> Iterator[tuple[str, Fakes]]:
    config = parse_config(sources_config(fakes, write_docs(tmp_path / "docs")), SECRETS)
    with serve(create_app(lambda: config)) as url:
        wait_ready(url)
        yield url, fakes


def assert_no_secret(text: str) -> None:
    for secret in SECRETS.values():
        assert secret not in text and secret.split(":")[-1] not in text


def test_records_from_every_source_merge_into_one_ranking(gateway):
    url, _ = gateway
    response = ask(url, kb="eng", top_k=10)
    assert response.status_code == 200
    assert response.headers["X-Sources"] == ";".join(f"{name}=ok" for name in SOURCES)
    records = response.json()["records"]
    assert {r["metadata"]["source"] for r in records} == set(SOURCES)
    assert {r["metadata"]["source_type"] for r in records} == {"files", "elasticsearch", "dify_dataset", "ragflow", "http"}
    scores = [r["score"] for r in records]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    es = next(r for r in records if r["metadata"]["source"] == "es")
    assert es["metadata"]["score_detail"]["source_score"] > 1, "Elasticsearch's raw _score reaches the rerank unscaled"
    status = httpx.get(url + "/status").json()
    by_name = {s["name"]: s for s in status["sources"]}
    assert all(by_name[name]["state"] == "ok" and by_name[name]["calls"]["ok"] == 1 for name in SOURCES)
    assert by_name["ragflow"]["type"] == "ragflow" and by_name["intranet"]["type"] == "http"
    metrics = httpx.get(url + "/metrics").text
    for name in REMOTE:
        assert f'gateway_source_calls_total{{outcome="ok",source="{name}"}} 1.0' in metrics
    assert_no_secret(httpx.get(url + "/status").text + metrics)


def test_a_metadata_filter_is_pushed_to_the_sources_that_can_and_applied_to_all(gateway):
    url, fakes = gateway
    condition = {"logical_operator": "and", "conditions": [{"name": "team", "comparison_operator": "is", "value": "security"}]}
    response = ask(url, kb="eng", top_k=10, metadata_condition=condition)
    assert response.status_code == 200
    records = response.json()["records"]
    assert {r["metadata"]["source"] for r in records} == set(REMOTE), "files carry no team: filtered out by the gateway"
    assert all(r["metadata"]["team"] == "security" for r in records)
    assert fakes.es.bodies[-1]["query"]["bool"]["filter"] == [{"term": {"team": "security"}}]
    assert fakes.dify.bodies[-1]["retrieval_model"]["metadata_filtering_conditions"]["conditions"] == [
        {"name": "team", "comparison_operator": "is", "value": "security"}
    ]
    assert fakes.ragflow.bodies[-1]["metadata_condition"] == {"logic": "and", "conditions": [{"name": "team", "comparison_operator": "=", "value": "security"}]}


def test_a_malformed_answer_fails_only_that_source(gateway):
    url, fakes = gateway
    for fake in fakes.each():
        fake.malformed = True
    response = ask(url, kb="eng", top_k=10)
    assert response.status_code == 200
    assert response.headers["X-Sources"] == "docs=ok;" + ";".join(f"{name}=error" for name in REMOTE)
    assert {r["metadata"]["source"] for r in response.json()["records"]} == {"docs"}
    errors = {s["name"]: s["last_error"]["message"] for s in httpx.get(url + "/status").json()["sources"] if s["last_error"]}
    assert "no hits.hits list" in errors["es"] and "no 'records' list" in errors["dify-kb"]
    assert "no data.chunks list" in errors["ragflow"] and "not a list" in errors["intranet"]


def test_rate_limits_and_refused_keys_are_reported_per_source(gateway):
    url, fakes = gateway
    for fake in fakes.each():
        fake.rate_limit_next, fake.retry_after = 1, "30"  # longer than the request's deadline: give up at once
    response = ask(url, kb="eng", top_k=10)
    assert response.headers["X-Sources"] == "docs=ok;" + ";".join(f"{name}=rate_limited" for name in REMOTE)
    fakes.es.api_key = fakes.dify.api_key = fakes.ragflow.api_key = fakes.intranet.api_key = "rotated"
    response = ask(url, kb="eng", top_k=10)
    assert response.status_code == 200
    assert response.headers["X-Sources"] == "docs=ok;" + ";".join(f"{name}=auth_failed" for name in REMOTE)
    status = httpx.get(url + "/status")
    assert all(s["state"] == "auth_failed" for s in status.json()["sources"] if s["name"] in REMOTE)
    assert_no_secret(status.text)


def test_aggregator_check_tries_every_type_and_shows_its_first_record(fakes: Fakes, tmp_path: Path):
    config = tmp_path / "connectors.yaml"
    config.write_text(sources_config(fakes, write_docs(tmp_path / "docs")))
    env = {"PATH": "/usr/bin:/bin", **SECRETS}
    result = subprocess.run([sys.executable, "-m", "aggregator", "check", "--config", str(config), "--query", "signing keys"],
                            capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line and not line.startswith(" ")}
    assert all(rows[name][1] == "ok" for name in SOURCES)
    assert "  intranet: 'Signing keys FAQ (intranet)'  source_score=" in result.stdout
    assert '"team": "security"' in result.stdout and "https://intranet.example/kb/17" in result.stdout
    assert result.stdout.splitlines()[-1] == "5 ok, 0 failing"
    assert_no_secret(result.stdout + result.stderr)
