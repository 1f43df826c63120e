"""The embedding judge against a fake OpenAI-compatible /v1/embeddings on loopback, and the local model.

Whatever becomes of the model (slow, down, refusing, rate limited, answering nonsense) the retrieval is
answered, ranked by words exactly as without a judge, and the judge's outcome is shown like a source's.
"""

from __future__ import annotations

import asyncio
import time
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from aggregator.web.api import create_app
from aggregator.runtime.config import ConfigError, parse_config
from aggregator.retrieval.pipeline import RetrievalResult
from aggregator.retrieval.embeddings import EmbeddingSettings, Judge, LocalProvider, VectorCache
from aggregator.runtime.gateway import Gateway

from testkit.fakes.embeddings import API_KEY, FakeEmbeddings, hashed_vectors
from testkit.gateway import KEY, ask, ask_gateway, config_text, write_docs
from testkit.loopback import free_port, serve, wait_ready

DOCS = {
    "vpn.md": "# VPN setup\n\nInstall WireGuard and import the VPN profile from the IT portal.",
    "keys.md": "# Key rotation\n\nWe rotate the release signing keys every twelve months.",
    "expenses.md": "# Expense reports\n\nSubmit receipts within thirty days; meals are reimbursed up to the daily allowance.",
    "leave.md": "# Parental leave\n\nEmployees receive sixteen weeks of paid leave after a birth or an adoption.",
}
QUERY = "rotate the VPN signing keys"


def judged_config(folder: Path, embeddings: dict[str, object] | None = None, deadline_s: float = 4.0, **knowledge_bases: object) -> str:
    """`demo` over a folder, judged by the server's `embeddings` (None: by words alone); `knowledge_bases` adds others."""
    server = {"cache_ttl_s": 0, "deadline_s": deadline_s} | ({"embeddings": embeddings} if embeddings else {})
    return config_text({"docs": {"type": "files", "path": str(folder), "watch": False}}, {"demo": ["docs"], **knowledge_bases}, **server)


def openai_block(url: str, **fields: object) -> dict[str, object]:
    return {"provider": "openai", "url": f"{url}/v1", "model": "test-model", "api_key": API_KEY, **fields}


async def started(text: str) -> Gateway:
    gateway = Gateway(parse_config(text, {}))
    await gateway.start()
    await gateway.slots["docs"].connector.wait_ready(20)  # type: ignore[attr-defined]
    return gateway


def ranking(result: RetrievalResult) -> list[tuple[str, float]]:
    return [(r["title"], r["score"]) for r in result.records]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_docs(tmp_path / "docs", DOCS)


def test_the_judge_speaks_openai_and_its_similarity_joins_the_relevance(folder: Path):
    fake = FakeEmbeddings(real=False)

    async def main() -> tuple[RetrievalResult, RetrievalResult]:
        with serve(fake.app()) as url:
            gateway = await started(judged_config(folder, openai_block(url, batch_size=1, dimensions=64)))
            plain = await started(judged_config(folder))
            try:
                return await ask_gateway(gateway, QUERY, top_k=4), await ask_gateway(plain, QUERY, top_k=4)
            finally:
                await gateway.aclose()
                await plain.aclose()

    judged, plain = asyncio.run(main())
    assert judged.sources_header() == "docs=ok;embeddings=ok"
    assert plain.sources_header() == "docs=ok"
    # one call for the query, then the passages in batches of 1 (sent at once), as the API documents them
    assert len(judged.records) == 2 and [len(c["input"]) for c in fake.calls] == [1, 1, 1]
    assert all(c["model"] == "test-model" and c["dimensions"] == 64 and c["encoding_format"] == "float" for c in fake.calls)
    assert set(fake.authorization) == {f"Bearer {API_KEY}"}
    # the fake answers in reverse order: the judge reads `index`, so each passage gets its own vector back
    texts = {r["title"]: r["content"] for r in judged.records}
    vectors = hashed_vectors([QUERY] + list(texts.values()))
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for (title, _), cosine in zip(texts.items(), unit[1:] @ unit[0]):
        detail = next(r for r in judged.records if r["title"] == title)["metadata"]["score_detail"]
        assert detail["meaning"] == pytest.approx(min(1.0, max(0.0, (cosine - 0.4) / 0.5)), abs=1e-5)  # default [0.4, 0.9]
        assert detail["relevance"] >= 0.5 * detail["meaning"] - 1e-6
    assert "meaning" not in plain.records[0]["metadata"]["score_detail"]


def test_passages_seen_before_cost_nothing_and_survive_a_restart(folder: Path, tmp_path: Path):
    fake = FakeEmbeddings(real=False)

    async def main() -> None:
        with serve(fake.app()) as url:
            gateway = await started(judged_config(folder, openai_block(url)))
            await ask_gateway(gateway, QUERY, top_k=4)
            calls = len(fake.calls)
            await ask_gateway(gateway, QUERY, top_k=4)  # the same query and passages: nothing to embed
            assert len(fake.calls) == calls
            await ask_gateway(gateway, "signing keys", top_k=4)  # a new query: one call, its passages all cached
            assert [len(c["input"]) for c in fake.calls[calls:]] == [1]
            judge = next(iter(gateway.judges.values()))
            judge.save(tmp_path / "state")
            await gateway.aclose()

            successor = await started(judged_config(folder, openai_block(url)))
            next(iter(successor.judges.values())).load(tmp_path / "state")
            before = len(fake.calls)
            result = await ask_gateway(successor, "import the profile", top_k=4)
            assert result.sources_header() == "docs=ok;embeddings=ok"
            assert [len(c["input"]) for c in fake.calls[before:]] == [1], "passages came from the saved cache"
            await successor.aclose()

    asyncio.run(main())


@pytest.mark.parametrize(
    "mode, outcome",
    [("auth", "auth_failed"), ("rate_limited", "rate_limited"), ("error", "error"), ("garbage", "error"), ("slow", "timeout")],
)
def test_when_the_model_fails_the_answer_is_the_lexical_one_and_says_so(folder: Path, mode: str, outcome: str):
    fake = FakeEmbeddings(real=False, mode=mode, delay_s=5.0)

    async def main() -> tuple[RetrievalResult, RetrievalResult, float]:
        with serve(fake.app()) as url:
            gateway = await started(judged_config(folder, openai_block(url, timeout_s=0.5, retries=1)))
            plain = await started(judged_config(folder))
            try:
                loop = asyncio.get_running_loop()
                begun = loop.time()
                judged = await ask_gateway(gateway, QUERY, top_k=4)
                return judged, await ask_gateway(plain, QUERY, top_k=4), loop.time() - begun
            finally:
                await gateway.aclose()
                await plain.aclose()

    judged, plain, seconds = asyncio.run(main())
    assert judged.sources_header() == f"docs=ok;embeddings={outcome}"
    assert ranking(judged) == ranking(plain)
    assert judged.sources[-1].name == "embeddings" and judged.sources[-1].error
    assert seconds < 2.0, "the judge's timeout_s bounds what a failing model costs"


def test_a_model_that_is_down_is_skipped_by_its_breaker(folder: Path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens

    async def main() -> list[str]:
        gateway = await started(judged_config(folder, openai_block(url, circuit={"failures": 2, "cooldown_s": 60})))
        try:
            return [(await ask_gateway(gateway, q, top_k=4)).sources_header() for q in ("VPN profile", "signing keys", "meals")]
        finally:
            await gateway.aclose()

    assert asyncio.run(main()) == ["docs=ok;embeddings=error", "docs=ok;embeddings=error", "docs=ok;embeddings=skipped"]


def test_the_judge_shows_in_status_metrics_the_log_and_explain(folder: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO", logger="aggregator.access")
    fake = FakeEmbeddings(real=False)
    with serve(fake.app()) as model:
        config = parse_config(judged_config(folder, openai_block(model)), {})
        with serve(create_app(lambda: config)) as url:
            wait_ready(url)  # the folder indexes in the background
            response = ask(url, QUERY, top_k=3)
            headers = {"Authorization": f"Bearer {KEY}"}
            assert response.headers["X-Sources"] == "docs=ok;embeddings=ok"
            line = [r for r in caplog.records if r.name == "aggregator.access"][-1]
            assert " embeddings=ok:" in line.getMessage() and line.fields["sources"]["embeddings"]["outcome"] == "ok"  # type: ignore[attr-defined]
            status = httpx.get(url + "/status").json()
            judge = next(s for s in status["sources"] if s["name"] == "embeddings")
            assert judge["calls"]["ok"] >= 1 and judge["embeddings"][0]["model"] == "test-model"
            assert judge["embeddings"][0]["cached_passages"] >= 1
            assert 'gateway_source_calls_total{outcome="ok",source="embeddings"}' in httpx.get(url + "/metrics").text
            page = httpx.get(url + "/")
            assert page.status_code == 200 and "embeddings" in page.text
            explained = httpx.get(url + "/explain", params={"kb": "demo", "q": QUERY, "format": "json"}, headers=headers).json()
            assert any(s["name"] == "embeddings" and s["outcome"] == "ok" for s in explained["sources"])
            assert explained["passages"][0]["meaning"] is not None


def test_settings_are_checked_where_they_are_written(folder: Path):
    with pytest.raises(ConfigError, match="server.embeddings: .*needs url"):
        parse_config(judged_config(folder, {"provider": "openai", "model": "m"}), {})
    with pytest.raises(ConfigError, match="similarity"):
        parse_config(judged_config(folder, {"provider": "openai", "url": "http://m/v1", "similarity": [0.8, 0.2]}), {})
    config = parse_config(judged_config(folder, {"provider": "openai", "url": "http://m/v1", "api_key": "sk-secret-value"}), {})
    assert "sk-secret-value" in config.secrets()


def test_a_knowledge_base_may_bring_its_own_model(folder: Path):
    text = judged_config(folder, openai_block("http://server-model"), own={"connectors": ["docs"], "embeddings": {"provider": "local"}})
    gateway = Gateway(parse_config(text, {}))
    assert gateway.judge("demo").settings.provider == "openai"  # type: ignore[union-attr]
    assert gateway.judge("own").settings.provider == "local"  # type: ignore[union-attr]
    successor = Gateway(parse_config(text, {}), previous=gateway)
    assert successor.judge("demo") is gateway.judge("demo"), "an unchanged judge keeps its cache across a reload"


def test_the_local_model_needs_its_extra_and_says_which(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "wordllama", None)
    monkeypatch.setattr(LocalProvider, "_models", {})
    with pytest.raises(RuntimeError, match=r"dify-knowledge-gateway\[local-embeddings\]"):
        Judge(EmbeddingSettings(provider="local"))


def test_the_local_model_judges_in_process(folder: Path):
    async def main() -> RetrievalResult:
        gateway = await started(judged_config(folder, {"provider": "local"}))
        try:
            return await ask_gateway(gateway, "paid time off for new parents", top_k=4)
        finally:
            await gateway.aclose()

    result = asyncio.run(main())
    assert result.sources_header() == "docs=ok;embeddings=ok"
    assert result.records[0]["title"] == "Parental leave"


def test_the_vector_cache_is_bounded_and_round_trips():
    cache = VectorCache(2)
    for i in range(3):
        cache.put(VectorCache.key(f"text {i}"), np.full(4, i, np.float32))
    assert len(cache) == 2 and cache.get(VectorCache.key("text 0")) is None
    copy = VectorCache(10)
    assert copy.load(cache.dump()) == 2
    assert np.array_equal(copy.get(VectorCache.key("text 2")), np.full(4, 2, np.float32))  # type: ignore[arg-type]


def test_the_vector_cache_keeps_what_was_used_lately_when_full():
    """The clock rule: a vector read since the hand last passed stays; one not read since goes first."""
    cache = VectorCache(3)
    key = VectorCache.key
    for name in ("a", "b", "c", "d"):  # d, into a full cache: the first pass spends every chance and a goes
        cache.put(key(name), np.full(4, ord(name), np.float32))
    assert cache.get(key("a")) is None
    assert cache.get(key("b")) is not None  # b read again
    cache.put(key("e"), np.full(4, 1, np.float32))
    assert cache.get(key("c")) is None, "c, not read since the hand passed, made room"
    assert cache.get(key("b")) is not None and cache.get(key("d")) is not None and len(cache) == 3


#: A paraphrase that shares no word with its query, a look-alike that shares several; WordLlama prefers the
#: paraphrase (cosines 0.54 and 0.48).
CAR = "my car will not start"
CAR_ANSWER = "Vehicle ignition failure: if the engine refuses to turn over, check the battery and the starter motor."
CAR_LOOKALIKE = "Start here: my first week, where to park the car and who will show you around."


def answering(*records: tuple[str, str, float]) -> Any:
    """A Dify-compatible upstream that answers every query with `records` (content, title, score), in order."""
    from fastapi import FastAPI

    upstream = FastAPI()

    @upstream.post("/retrieval")
    async def retrieval(body: dict) -> dict:
        return {"records": [{"content": text, "title": title, "score": score, "metadata": {"document_id": title}} for text, title, score in records]}

    return upstream


def test_with_a_real_model_a_match_by_meaning_alone_can_pass_a_threshold_of_half(tmp_path: Path):
    """A source (read by words: not declared semantic) returns both; only the judge can tell the paraphrase."""
    upstream = answering((CAR_LOOKALIKE, "lookalike", 0.9), (CAR_ANSWER, "answer", 0.8))
    fake = FakeEmbeddings(real=True)

    async def main(embeddings: dict[str, object] | None) -> dict[str, dict]:
        wiki = {"type": "dify", "endpoint": up, "api_key": "k", "knowledge_id": "x", "semantic": False}
        text = config_text({"wiki": wiki}, cache_ttl_s=0, **({"embeddings": embeddings} if embeddings else {}))
        gateway = Gateway(parse_config(text, {}))
        await gateway.start()
        try:
            result = await ask_gateway(gateway, CAR, top_k=4, threshold=0.5)
            return {r["title"]: r for r in result.records}
        finally:
            await gateway.aclose()

    with serve(upstream) as up, serve(fake.app()) as model:
        by_words = asyncio.run(main(None))
        judged = asyncio.run(main(openai_block(model, similarity=[0.4, 0.6])))
        trusted = asyncio.run(main(openai_block(model, similarity=[0.4, 0.6], combine="mix", weight=0.9)))
    assert "answer" not in by_words, "by words alone the paraphrase scores under 0.5"
    assert judged["answer"]["score"] > 0.5
    detail = judged["answer"]["metadata"]["score_detail"]
    assert detail["bm25"] == 0 and detail["meaning"] > judged["lookalike"]["metadata"]["score_detail"]["meaning"]
    # The model prefers the paraphrase (0.54 against 0.48): the gateway puts it first, though the look-alike
    # shares three of the query's words. A model trusted over words (`combine: mix`, a high weight) widens the gap.
    assert list(judged) == ["answer", "lookalike"]
    assert list(trusted) == ["answer", "lookalike"]
    gap = judged["answer"]["score"] - judged["lookalike"]["score"]
    assert trusted["answer"]["score"] - trusted["lookalike"]["score"] > gap


def test_a_semantic_sources_first_answer_that_the_judge_also_prefers_keeps_the_sources_confidence():
    """Two retrievers by meaning agree (the source ranks the paraphrase first at 0.86, the judge prefers it to
    the look-alike, if only a little): a threshold of 0.5 that the source's confidence passes keeps it, first,
    though the judge alone would score it low (cosine 0.54, barely over `similarity`'s low end 0.5)."""
    upstream = answering((CAR_ANSWER, "answer", 0.86), (CAR_LOOKALIKE, "lookalike", 0.62))
    fake = FakeEmbeddings(real=True)

    async def main(embeddings: dict[str, object]) -> list[dict]:
        wiki = {"type": "dify", "endpoint": up, "api_key": "k", "knowledge_id": "x", "semantic": True}
        gateway = Gateway(parse_config(config_text({"wiki": wiki}, cache_ttl_s=0, embeddings=embeddings), {}))
        await gateway.start()
        try:
            return (await ask_gateway(gateway, CAR, top_k=4, threshold=0.5)).records
        finally:
            await gateway.aclose()

    with serve(upstream) as up, serve(fake.app()) as model:
        records = asyncio.run(main(openai_block(model, similarity=[0.5, 0.9])))
    assert [r["title"] for r in records] == ["answer"]
    detail = records[0]["metadata"]["score_detail"]
    assert 0 < detail["meaning"] < 0.2 and detail["confidence"] == pytest.approx(0.86, abs=0.01)


def test_the_readme_example_is_a_valid_judge():
    import re

    import yaml

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "provider: openai" in b)
    example = yaml.safe_load(block.replace("${EMBEDDINGS_KEY}", "sk-x"))
    settings = EmbeddingSettings.model_validate(example["server"]["embeddings"])
    assert settings.url == "http://xinference:9997/v1" and settings.similarity == (0.3, 0.8)
    assert EmbeddingSettings.model_validate(example["knowledge_bases"]["manuals"]["embeddings"]).similarity == (0.7, 1.0)


def test_with_fast_sources_the_query_rides_with_the_passages_one_embedding_call_not_two(folder: Path):
    """The sources answered before the query's own call did: the judge sends the query with the new passages,
    so a retrieval with nothing cached waits for one embedding call (issue 22: at most one call more)."""
    fake = FakeEmbeddings(real=False, mode="slow", delay_s=0.6)

    async def main() -> tuple[RetrievalResult, float]:
        with serve(fake.app()) as url:
            gateway = await started(judged_config(folder, openai_block(url, timeout_s=3.0)))
            try:
                begun = time.perf_counter()
                result = await ask_gateway(gateway, QUERY, top_k=4)
                return result, time.perf_counter() - begun
            finally:
                await gateway.aclose()

    result, elapsed = asyncio.run(main())
    assert result.sources_header() == "docs=ok;embeddings=ok" and result.records
    assert elapsed < 1.1, f"{elapsed:.2f} s: two calls of 0.6 s in a row, not one"
    batch = fake.calls[-1]["input"]
    assert batch[0] == QUERY and len(batch) > 1, "the query went with the passages"
