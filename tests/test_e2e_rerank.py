"""The rerank model through the running service: its order wins, its failures fall back to the fusion, the
deadline holds, and its outcome shows like a source's (X-Sources, /status, metrics, the log line, explain)."""

from __future__ import annotations

import logging
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from aggregator.web.api import create_app
from aggregator.runtime.config import parse_config

from testkit.fakes import rerank as fake_rerank
from testkit.gateway import ask
from testkit.loopback import serve, until, wait_ready

from .conftest import KEY, write_docs

MODEL_KEY = "cohere-secret-key-for-tests"
QUERY = "signing keys rotation 签名密钥"  # a bilingual user: the fusion puts the English page first


@pytest.fixture(scope="module")
def model() -> Iterator[tuple[str, fake_rerank.FakeRerank]]:
    state = fake_rerank.FakeRerank()
    with serve(fake_rerank.app(state)) as url:
        yield url, state


@pytest.fixture
def gateway(model, tmp_path: Path) -> Iterator[tuple[str, fake_rerank.FakeRerank]]:
    """`demo` with a Cohere-shaped model (a 1 s budget in a 2 s deadline); `plain`: the same source, no model."""
    url, state = model
    state.reset()
    state.api_key = MODEL_KEY
    text = f"""
    server:
      api_keys: [{{key: {KEY}}}]
      deadline_s: 2.0
      cache_ttl_s: 0
      rerank:
        provider: cohere
        url: {url}/cohere
        model: rerank-v3.5
        api_key: ${{COHERE_KEY}}
        timeout_s: 1.0
    knowledge_bases:
      demo: {{connectors: [docs]}}
      plain:
        connectors: [docs]
        rerank: {{enabled: false}}
    connectors:
      docs: {{type: files, path: {write_docs(tmp_path / "docs")}}}
    """
    config = parse_config(textwrap.dedent(text), {"COHERE_KEY": MODEL_KEY})
    with serve(create_app(lambda: config)) as base:
        wait_ready(base)
        yield base, state
    state.reset()


def titles(response: httpx.Response) -> list[str]:
    return [r["title"] for r in response.json()["records"]]


def stage_status(base: str) -> dict:
    return next(s for s in httpx.get(base + "/status").json()["sources"] if s["name"] == "rerank")


def test_the_models_order_and_scores_win_and_a_threshold_cuts_on_them(gateway, caplog):
    base, state = gateway
    # The model prefers the Chinese page the fusion puts second, and finds nothing else relevant.
    state.relevance = {"签名密钥": 0.93, "signing keys": 0.41}
    plain = ask(base, QUERY, "plain")
    assert titles(plain) == ["Key rotation", "签名密钥轮换"]
    with caplog.at_level(logging.INFO, logger="aggregator.access"):
        response = ask(base, QUERY, threshold=0.2)
    assert response.status_code == 200 and response.headers["X-Sources"] == "docs=ok;rerank=ok"
    records = response.json()["records"]
    assert [(r["title"], r["score"]) for r in records] == [("签名密钥轮换", 0.93), ("Key rotation", 0.41)]
    detail = records[1]["metadata"]["score_detail"]
    assert detail["rerank"] == 0.41 and detail["fused"] == plain.json()["records"][0]["score"] and detail["bm25"] > 0
    _, headers, body = state.requests[-1]
    assert body["query"] == QUERY and body["model"] == "rerank-v3.5" and len(body["documents"]) == len(plain.json()["records"])
    assert headers["authorization"] == f"Bearer {MODEL_KEY}"
    assert any("rerank=ok:" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert all(MODEL_KEY not in r.getMessage() for r in caplog.records)
    stage = stage_status(base)
    assert stage["type"] == "rerank-model" and stage["state"] == "ok" and stage["calls"]["ok"] == 1
    metrics = httpx.get(base + "/metrics").text
    assert 'gateway_source_calls_total{outcome="ok",source="rerank"} 1.0' in metrics
    page = httpx.get(base + "/")
    assert page.status_code == 200 and "rerank-model" in page.text
    assert titles(ask(base, QUERY, threshold=0.5)) == ["签名密钥轮换"], "the threshold cuts on the model's relevance"


@pytest.mark.parametrize(("fault", "outcome"), [("fail", "error"), ("malformed", "error"), ("rate_limit", "rate_limited"), ("key", "auth_failed")])
def test_a_failing_model_falls_back_to_the_fusion_with_the_outcome_shown(gateway, fault, outcome):
    base, state = gateway
    state.relevance = {"签名密钥": 0.93}
    if fault == "fail":
        state.fail_next = 1
    elif fault == "malformed":
        state.malformed = True
    elif fault == "rate_limit":
        state.rate_limit_next, state.retry_after = 1, "30"
    else:
        state.api_key = "rotated"
    response = ask(base, QUERY)
    assert response.status_code == 200 and response.headers["X-Sources"] == f"docs=ok;rerank={outcome}"
    assert response.json()["records"] == ask(base, QUERY, "plain").json()["records"], "the fusion's order and scores, untouched"
    stage = stage_status(base)
    assert stage["calls"][outcome] == 1 and stage["state"] in ("degraded", "auth_failed")
    assert stage["last_error"]["message"] and MODEL_KEY not in httpx.get(base + "/status").text
    assert f'gateway_source_calls_total{{outcome="{outcome}",source="rerank"}} 1.0' in httpx.get(base + "/metrics").text


def test_a_hung_model_costs_its_budget_and_the_deadline_holds(gateway):
    base, state = gateway
    state.delay_s = 5.0
    started = time.perf_counter()
    response = ask(base, QUERY)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200 and response.headers["X-Sources"] == "docs=ok;rerank=timeout"
    assert 0.9 < elapsed < 2.0, f"{elapsed:.2f} s: the model's 1 s budget, inside the 2 s deadline"
    assert titles(response) == titles(ask(base, QUERY, "plain"))


def test_explain_shows_the_stage_like_a_source(gateway):
    base, state = gateway
    state.relevance = {"签名密钥": 0.93}
    data = httpx.get(base + "/explain", params={"kb": "demo", "q": QUERY, "format": "json"}, headers={"Authorization": f"Bearer {KEY}"}).json()
    stage = next(s for s in data["sources"] if s["name"] == "rerank")
    assert stage["outcome"] == "ok" and stage["attempts"] == 1
    assert data["passages"][0]["title"] == "签名密钥轮换" and data["passages"][0]["score"] == 0.93
    assert data["records"][0]["metadata"]["score_detail"]["rerank"] == 0.93


async def test_a_reload_adds_changes_and_removes_the_model(model, tmp_path: Path):
    import asyncio

    from aggregator.contract.models import RetrievalRequest
    from aggregator.retrieval.pipeline import retrieve as run
    from aggregator.runtime.service import Service

    url, state = model
    state.reset()
    state.relevance = {"签名密钥": 0.93}
    path = tmp_path / "connectors.yaml"
    head = f"server:\n  api_keys: [{{key: {KEY}}}]\n  watch_config: false\n"
    tail = f"knowledge_bases:\n  demo: {{connectors: [docs]}}\nconnectors:\n  docs: {{type: files, path: {write_docs(tmp_path / 'docs')}}}\n"
    path.write_text(head + tail)
    service = Service.from_path(path)
    await service.start()
    request = RetrievalRequest.model_validate({"knowledge_id": "demo", "query": QUERY, "retrieval_setting": {"top_k": 3}})
    try:
        await until(lambda: service.gateway.ready, what="the gateway ready")
        assert (await run(service.gateway, request)).sources_header() == "docs=ok"
        assert [s["name"] for s in service.status()["sources"]] == ["docs"]
        for top_n, sent in ((1, 1), (5, 2)):
            path.write_text(head + f"  rerank: {{provider: tei, url: '{url}/tei', top_n: {top_n}}}\n" + tail)
            old = service.gateway
            assert await service.reload()
            result = await run(service.gateway, request)
            assert result.sources_header() == "docs=ok;rerank=ok" and len(state.requests[-1][2]["texts"]) == sent
            await asyncio.gather(*service._retiring)
            assert old.rerank_models.get("demo") is None or old.rerank_models.get("demo")._client is None, "the old client is closed"
        assert result.records[0]["title"] == "签名密钥轮换"
        assert [s["name"] for s in service.status()["sources"]] == ["docs", "rerank"]
        path.write_text(head + tail)
        assert await service.reload()
        assert (await run(service.gateway, request)).sources_header() == "docs=ok"
        assert [s["name"] for s in service.status()["sources"]] == ["docs"]
    finally:
        await service.aclose()
        state.reset()


def test_the_models_call_is_a_span_of_the_retrieval_and_carries_its_traceparent(model, tmp_path: Path):
    from aggregator.ops.tracing import Tracing
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    url, state = model
    state.reset()
    state.fail_next, state.fail_status = 1, 500
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    text = f"""
    server:
      api_keys: [{{key: {KEY}}}]
      cache_ttl_s: 0
      rerank: {{provider: tei, url: '{url}/tei', api_key: {MODEL_KEY}}}
    knowledge_bases:
      demo: {{connectors: [docs]}}
    connectors:
      docs: {{type: files, path: {write_docs(tmp_path / "docs")}}}
    """
    config = parse_config(textwrap.dedent(text), {})
    with serve(create_app(lambda: config, tracing=Tracing(provider))) as base:
        wait_ready(base)
        assert ask(base, QUERY).headers["X-Sources"] == "docs=ok;rerank=error"
    spans = {s.name: s for s in exporter.get_finished_spans()}
    stage = spans["search rerank"]
    assert stage.attributes["gateway.source.type"] == "rerank-model" and stage.attributes["gateway.source.outcome"] == "error"
    assert stage.parent is not None and stage.parent.span_id == spans[next(n for n in spans if "retrieval" in n.lower())].context.span_id
    traceparent = state.requests[-1][1]["traceparent"]
    assert traceparent.split("-")[2] == format(stage.context.span_id, "016x"), "the model's server sees the stage's span"
    assert all(MODEL_KEY not in str(s.status.description) for s in spans.values())
    state.reset()


def test_aggregator_check_tries_each_model_and_fails_when_one_does(model, tmp_path: Path):
    from .test_cli import run

    url, state = model
    state.reset()
    state.api_key = MODEL_KEY
    dead = "http://127.0.0.1:9"
    config = tmp_path / "c.yaml"
    config.write_text(textwrap.dedent(f"""
    server:
      api_keys: [{{key: k}}]
      rerank: {{provider: cohere, url: '{url}/cohere', model: rerank-v3.5, api_key: {MODEL_KEY}}}
    knowledge_bases:
      demo: {{connectors: [docs]}}
      other: {{connectors: [docs], rerank: {{provider: tei, url: '{dead}'}}}}
    connectors:
      docs: {{type: files, path: {write_docs(tmp_path / "docs")}}}
    """))
    result = run("check", "--config", str(config), "--query", "signing keys")
    lines = result.stdout.splitlines()
    assert result.returncode == 1 and lines[-1] == "2 ok, 1 failing", result.stdout + result.stderr
    cohere = next(line for line in lines if line.startswith("rerank (cohere: demo)"))
    tei = next(line for line in lines if line.startswith("rerank (tei: other)"))
    assert " ok " in cohere and " error " in tei and "cannot connect" in tei
    assert state.requests[-1][2]["query"] == "signing keys" and MODEL_KEY not in result.stdout + result.stderr
    state.reset()


def test_an_answer_whose_model_failed_is_not_kept_for_later_retries(model, tmp_path: Path):
    url, state = model
    state.reset()
    state.relevance, state.fail_next = {"签名密钥": 0.93}, 1
    text = f"""
    server:
      api_keys: [{{key: {KEY}}}]
      cache_ttl_s: 30
      rerank: {{provider: xinference, url: '{url}/xinference', model: bge-reranker-v2-m3}}
    knowledge_bases:
      demo: {{connectors: [docs]}}
    connectors:
      docs: {{type: files, path: {write_docs(tmp_path / "docs")}}}
    """
    config = parse_config(textwrap.dedent(text), {})
    with serve(create_app(lambda: config)) as base:
        wait_ready(base)
        failed = ask(base, QUERY)
        assert failed.headers["X-Sources"] == "docs=ok;rerank=error" and failed.headers["X-Cache"] == "miss"
        retried = ask(base, QUERY)  # Dify's retry asks the model again, and gets its order
        assert retried.headers["X-Sources"] == "docs=ok;rerank=ok" and retried.headers["X-Cache"] == "miss"
        assert titles(retried)[0] == "签名密钥轮换" and len(state.requests) == 2
        again = ask(base, QUERY)
        assert again.headers["X-Cache"] == "hit" and again.content == retried.content and len(state.requests) == 2
    state.reset()


def test_a_slow_embedding_judge_leaves_the_rerank_model_its_budget(model, tmp_path: Path):
    """Both stages configured: the judge ends where the sources end, so the model keeps the time it was promised."""
    from testkit.fakes.embeddings import API_KEY as EMBEDDING_KEY, FakeEmbeddings

    url, state = model
    state.reset()
    state.api_key = MODEL_KEY
    state.relevance = {"签名密钥": 0.93}
    judge = FakeEmbeddings(real=False, mode="slow", delay_s=10.0)
    with serve(judge.app()) as judge_url:
        text = f"""
        server:
          api_keys: [{{key: {KEY}}}]
          deadline_s: 2.0
          cache_ttl_s: 0
          embeddings: {{provider: openai, url: {judge_url}/v1, model: m, api_key: {EMBEDDING_KEY}, timeout_s: 5.0}}
          rerank: {{provider: cohere, url: {url}/cohere, model: rerank-v3.5, api_key: {MODEL_KEY}, timeout_s: 1.0}}
        knowledge_bases:
          demo: {{connectors: [docs]}}
        connectors:
          docs: {{type: files, path: {write_docs(tmp_path / "docs")}}}
        """
        config = parse_config(textwrap.dedent(text), {})
        with serve(create_app(lambda: config)) as base:
            wait_ready(base)
            started = time.perf_counter()
            response = ask(base, QUERY)
            elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    assert response.headers["X-Sources"] == "docs=ok;embeddings=timeout;rerank=ok", "the judge timed out, the model still answered"
    assert titles(response)[0] == "签名密钥轮换" and elapsed < 2.5
    state.reset()
