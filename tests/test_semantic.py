"""Sources that retrieve by meaning, without an embedding judge: their best answers keep a place and a score.

The upstream answers like an embedding search: its best passage first with a cosine-like 0.86, sharing no
word with the query (a paraphrase, or a Chinese question answered by an English runbook). Beside it, a
`files` folder of passages that share the query's words but do not answer it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aggregator.runtime.config import parse_config
from aggregator.runtime.gateway import Gateway
from testkit.fakes.semantic import ANSWERS, CASES, LOOKALIKES, semantic_config, semantic_upstream
from testkit.gateway import KEY, ask_gateway, write_docs
from testkit.loopback import serve


@pytest.fixture(scope="module")
def upstream():
    with serve(semantic_upstream()) as url:
        yield url


async def ask(gateway: Gateway, kb: str, query: str, threshold: float) -> list[dict]:
    result = await ask_gateway(gateway, query, kb, threshold=threshold)
    assert result.sources_header().count("=ok") == len(result.sources), result.sources_header()
    return result.records


def run(upstream: str, tmp_path: Path, semantic: bool, kb: str, threshold: float) -> dict[str, list[dict]]:
    async def main() -> dict[str, list[dict]]:
        gateway = Gateway(parse_config(semantic_config(upstream, write_docs(tmp_path / "folder", LOOKALIKES), semantic), {}))
        await gateway.start()
        try:
            await gateway.slots["folder"].connector.wait_ready(20)  # type: ignore[attr-defined]
            return {query: await ask(gateway, kb, query, threshold) for query in CASES}
        finally:
            await gateway.aclose()

    return asyncio.run(main())


def test_a_semantic_source_alone_keeps_its_best_answer_first_at_a_threshold_of_half(upstream: str, tmp_path: Path):
    answered = run(upstream, tmp_path, True, "alone", 0.5)
    for query, records in answered.items():
        assert records, f"{query!r}: nothing at threshold 0.5 although the source scored its answer 0.86"
        assert records[0]["content"] == ANSWERS[query]
        assert records[0]["score"] >= 0.86 - 1e-6
        assert records[0]["metadata"]["score_detail"]["confidence"] == pytest.approx(0.86)
        assert all(r["score"] >= 0.5 for r in records)


def test_beside_a_folder_of_lookalikes_the_semantic_answer_stays_in_the_top_three(upstream: str, tmp_path: Path):
    for threshold in (0.0, 0.5):
        answered = run(upstream, tmp_path, True, "mixed", threshold)
        for query, records in answered.items():
            top = [r["content"] for r in records[:3]]
            assert ANSWERS[query] in top, (threshold, query, top)


def test_the_same_source_judged_by_words_alone_loses_its_answers(upstream: str, tmp_path: Path):
    """What `semantic` changes: read as a lexical source, every paraphrase falls below a threshold of 0.5."""
    answered = run(upstream, tmp_path, False, "alone", 0.5)
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
