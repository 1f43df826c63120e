"""Paraphrase and cross-language cases of `bench.quality`: where a semantic source's best answer lands.

A `dify` source answers like an embedding search (its best passage first, similarity 0.86, sharing no word
with the query; tests/test_semantic.py's cases, one of them a Chinese question answered by an English
runbook, plus one more), beside a `files` folder of look-alikes that share the query's words. For each
case: the answer's place among the records at thresholds 0 and 0.5, in the source alone and in the mix,
with no judge and with the local judge (WordLlama), and whether the model itself prefers the answer to
its look-alike.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from aggregator.runtime.config import parse_config
from aggregator.contract.models import RetrievalRequest
from aggregator.retrieval.pipeline import retrieve
from aggregator.runtime.gateway import Gateway
from testkit.loopback import serve
from tests.test_semantic import ANSWERS, CASES, LOOKALIKES, semantic_upstream

from ._semantic import embed

#: The look-alike of each case, by the case's order.
PAIRED = list(LOOKALIKES.values())


def config(endpoint: str, folder: Path, judge: bool) -> str:
    block = "  embeddings: {provider: local}\n" if judge else ""
    return (f"server:\n  api_keys: [{{key: bench}}]\n  cache_ttl_s: 0\n{block}"
            f"knowledge_bases:\n  alone: {{connectors: [wiki]}}\n  mixed: {{connectors: [wiki, folder]}}\n"
            f"connectors:\n  wiki: {{type: dify, endpoint: {endpoint}, api_key: k, knowledge_id: x, semantic: true}}\n"
            f"  folder: {{type: files, path: {folder}, watch: false}}\n")  # fmt: skip


async def place(gateway: Gateway, kb: str, query: str, threshold: float) -> str:
    body = {"knowledge_id": kb, "query": query, "retrieval_setting": {"top_k": 5, "score_threshold": threshold}}
    records = (await retrieve(gateway, RetrievalRequest.model_validate(body))).records
    contents = [r["content"] for r in records]
    if ANSWERS[query] in contents:
        return f"{contents.index(ANSWERS[query]) + 1} of {len(contents)}"
    return f"— of {len(contents)}"


async def run() -> None:
    print("\nParaphrase and cross-language cases: the semantic source's answer, its place among the records"
          " (— : not among them).\n")  # fmt: skip
    print("| query | model prefers the answer | judge | alone, ≥ 0 | alone, ≥ 0.5 | mixed, ≥ 0 | mixed, ≥ 0.5 |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    with serve(semantic_upstream()) as endpoint, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "folder"
        folder.mkdir()
        for name, text in LOOKALIKES.items():
            (folder / name).write_text(text, encoding="utf-8")
        for judge in (False, True):
            gateway = Gateway(parse_config(config(endpoint, folder, judge), {}))
            await gateway.start()
            try:
                await gateway.slots["folder"].connector.wait_ready(60)  # type: ignore[attr-defined]
                for (query, (answer, *_)), lookalike in zip(CASES.items(), PAIRED):
                    q, a, look = embed([query, answer, lookalike])
                    prefers = "yes" if q @ a > q @ look else "no"
                    cells = [await place(gateway, kb, query, t) for kb in ("alone", "mixed") for t in (0.0, 0.5)]
                    print(f"| {query} | {prefers} ({q @ a:.2f} vs {q @ look:.2f}) | {'local' if judge else 'none'} | " + " | ".join(cells) + " |")
            finally:
                await gateway.aclose()
