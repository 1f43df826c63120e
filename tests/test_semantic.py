"""Sources that retrieve by meaning, without an embedding judge: their best answers keep a place and a score.

The upstream answers like an embedding search: its best passage first with a cosine-like 0.86, sharing no
word with the query (a paraphrase, or a Chinese question answered by an English runbook). Beside it, a
`files` folder of passages that share the query's words but do not answer it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi import FastAPI

from aggregator.runtime.config import parse_config
from aggregator.contract.models import RetrievalRequest
from aggregator.retrieval.pipeline import retrieve
from aggregator.runtime.gateway import Gateway

from .conftest import KEY, write_docs
from testkit.loopback import serve

#: query -> (the answer by meaning, two weaker passages of the same collection)
CASES: dict[str, tuple[str, str, str]] = {
    "how do I get reimbursed for a business trip": (
        "Travel expense claims: file the expense report within ten working days of returning, with receipts for lodging and fares.",
        "Company cars are booked through the facilities desk.",
        "Conference attendance needs a manager's approval.",
    ),
    "我的电脑连不上公司网络怎么办": (
        "VPN troubleshooting: if the laptop cannot reach the corporate network, restart WireGuard and import a fresh profile.",
        "Printers on the third floor are managed by facilities.",
        "Password resets are done in the self-service portal.",
    ),
    "who do I call when production breaks at night": (
        "On-call escalation: outside office hours an outage pages the engineer on duty, who may wake the incident commander.",
        "Release notes are published every second Tuesday.",
        "The staging cluster is rebuilt every weekend.",
    ),
    "how long can I stay home after my child is born": (
        "Parental leave: employees receive sixteen weeks of paid leave following a birth or an adoption.",
        "Sick days need a doctor's note after three days.",
        "Public holidays follow the office's country calendar.",
    ),
}
#: Passages that share the queries' words and answer none of them.
LOOKALIKES = {
    "trip.md": "# Business trip visas\n\nHow do I get a visa for a business trip? Ask the travel desk for an invitation letter.",
    "network.md": "# 公司网络使用规定\n\n公司网络仅供工作使用，电脑须安装杀毒软件。",
    "night.md": "# Night builds\n\nProduction builds run at night; when one breaks, the build bot calls a retry.",
    "home.md": "# Working from home\n\nHow long can I work from home? Stay home up to two days a week after your manager agrees.",
}
ANSWERS = {query: texts[0] for query, texts in CASES.items()}


def semantic_upstream() -> FastAPI:
    app = FastAPI()

    @app.post("/retrieval")
    async def retrieval(body: dict) -> dict:
        texts = CASES[body["query"]]
        return {"records": [{"content": text, "title": f"Page {i}", "score": score, "metadata": {"document_id": f"p{i}"}}
                            for i, (text, score) in enumerate(zip(texts, (0.86, 0.62, 0.55)))]}  # fmt: skip

    return app


def config_text(endpoint: str, folder: Path, semantic: str = "") -> str:
    return f"""
server:
  api_keys: [{{key: {KEY}}}]
  cache_ttl_s: 0
knowledge_bases:
  alone: {{connectors: [wiki]}}
  mixed: {{connectors: [wiki, folder]}}
connectors:
  wiki: {{type: dify, endpoint: {endpoint}, api_key: k, knowledge_id: x{semantic}}}
  folder: {{type: files, path: {folder}, watch: false}}
"""


@pytest.fixture(scope="module")
def upstream():
    with serve(semantic_upstream()) as url:
        yield url


async def ask(gateway: Gateway, kb: str, query: str, threshold: float) -> list[dict]:
    request = RetrievalRequest.model_validate({"knowledge_id": kb, "query": query, "retrieval_setting": {"top_k": 5, "score_threshold": threshold}})
    result = await retrieve(gateway, request)
    assert result.sources_header().count("=ok") == len(result.sources), result.sources_header()
    return result.records


def run(upstream: str, tmp_path: Path, semantic: str, kb: str, threshold: float) -> dict[str, list[dict]]:
    async def main() -> dict[str, list[dict]]:
        gateway = Gateway(parse_config(config_text(upstream, write_docs(tmp_path / "folder", LOOKALIKES), semantic), {}))
        await gateway.start()
        try:
            await gateway.slots["folder"].connector.wait_ready(20)  # type: ignore[attr-defined]
            return {query: await ask(gateway, kb, query, threshold) for query in CASES}
        finally:
            await gateway.aclose()

    return asyncio.run(main())


def test_a_semantic_source_alone_keeps_its_best_answer_first_at_a_threshold_of_half(upstream: str, tmp_path: Path):
    answered = run(upstream, tmp_path, ", semantic: true", "alone", 0.5)
    for query, records in answered.items():
        assert records, f"{query!r}: nothing at threshold 0.5 although the source scored its answer 0.86"
        assert records[0]["content"] == ANSWERS[query]
        assert records[0]["score"] >= 0.86 - 1e-6
        assert records[0]["metadata"]["score_detail"]["confidence"] == pytest.approx(0.86)
        assert all(r["score"] >= 0.5 for r in records)


def test_beside_a_folder_of_lookalikes_the_semantic_answer_stays_in_the_top_three(upstream: str, tmp_path: Path):
    for threshold in (0.0, 0.5):
        answered = run(upstream, tmp_path, ", semantic: true", "mixed", threshold)
        for query, records in answered.items():
            top = [r["content"] for r in records[:3]]
            assert ANSWERS[query] in top, (threshold, query, top)


def test_the_same_source_judged_by_words_alone_loses_its_answers(upstream: str, tmp_path: Path):
    """What `semantic` changes: read as a lexical source, every paraphrase falls below a threshold of 0.5."""
    answered = run(upstream, tmp_path, ", semantic: false", "alone", 0.5)
    assert not any(ANSWERS[q] in [r["content"] for r in records] for q, records in answered.items())


def test_sources_that_say_how_they_search_are_semantic_unless_told_otherwise():
    base = f"server: {{api_keys: [{{key: {KEY}}}]}}\nknowledge_bases: {{kb: {{connectors: [a, b, c, d, e]}}}}\nconnectors:\n"
    text = base + (
        "  a: {type: dify_dataset, api_key: k, dataset_id: 3f1c8a52-6f0e-4c57-9b3e-0d6f2a9c1b11}\n"
        "  b: {type: dify_dataset, api_key: k, dataset_id: 3f1c8a52-6f0e-4c57-9b3e-0d6f2a9c1b11, search_method: full_text_search}\n"
        "  c: {type: ragflow, base_url: 'http://r', api_key: k, dataset_ids: [x]}\n"
        "  d: {type: ragflow, base_url: 'http://r', api_key: k, dataset_ids: [x], vector_similarity_weight: 0}\n"
        "  e: {type: dify_dataset, api_key: k, dataset_id: 3f1c8a52-6f0e-4c57-9b3e-0d6f2a9c1b11, search_method: full_text_search, semantic: true}\n"
    )
    gateway = Gateway(parse_config(text, {}))
    assert {name: slot.connector.semantic for name, slot in gateway.slots.items()} == {"a": True, "b": False, "c": True, "d": False, "e": True}
