"""Ranking quality on Cranfield: the federated gateway against one central BM25 index.

    python -m bench.quality            # the report (about a minute)
    python -m bench.quality --sweep    # also the tuning grid over the pooled candidates

The collection is split round-robin into 4 shards, each served over loopback
HTTP by its own Dify-compatible upstream that ranks its shard with BM25 and
returns its top 20 with scores in [0, 1]. The gateway spans the 4 upstreams
through its real `dify` connectors and pipeline. Baseline: one BM25 index
over the whole collection, same tokenizer. Also shown: the naive merges
(by upstream score; reciprocal rank fusion) of the same upstream answers.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from contextlib import ExitStack

from fastapi import FastAPI

from aggregator.ranking.bm25 import BM25Index, BM25Params
from aggregator.config import parse_config
from aggregator.models import RetrievalRequest
from aggregator.pipeline import retrieve
from aggregator.ranking.rerank import Candidate, dedupe, rerank
from aggregator.runtime import Gateway
from aggregator.text.tokenize import tokenize
from tests.loopback import serve

from ._cranfield import Doc, load, mean, ndcg_at, recall_at

SHARDS = 4
UPSTREAM_TOP = 20
K = 10
THRESHOLDS = (0.2, 0.4, 0.6, 0.8)


def doc_terms(doc: Doc) -> list[str]:
    return tokenize(doc.title) + tokenize(doc.body)


def build_index(docs: list[Doc], params: BM25Params = BM25Params()) -> BM25Index:
    index = BM25Index(params)
    for doc in docs:
        index.add(doc.id, doc_terms(doc))
    return index


def shard_app(docs: list[Doc]) -> FastAPI:
    """A Dify-compatible upstream over one shard: BM25, its top 20, scores normalised to [0, 1]."""
    index = build_index(docs)
    by_id = {doc.id: doc for doc in docs}
    app = FastAPI()

    @app.post("/retrieval")
    async def retrieval(body: dict) -> dict:
        hits = index.search(tokenize(body["query"]), min(UPSTREAM_TOP, int(body["retrieval_setting"]["top_k"])))
        return {"records": [
            {"content": by_id[key].body, "title": by_id[key].title, "score": score, "metadata": {"document_id": key}}
            for key, score in hits
        ]}  # fmt: skip

    return app


def tokenizer_variants(docs: list[Doc]) -> list[tuple[str, object, BM25Index]]:
    """The shipped tokenizer against the same without stemming, and without the stop list."""
    import unicodedata

    from aggregator import tokenize as t

    def variant(stem: bool, stop: bool):  # type: ignore[no-untyped-def]
        def run(text: str) -> list[str]:
            out: list[str] = []
            for cjk, word in t._TOKEN.findall(unicodedata.normalize("NFKC", text).casefold()):
                if cjk:
                    out.extend(t._cjk_bigrams(cjk))
                elif not (stop and word in t.STOP_WORDS):
                    out.append(t._stem(word) if stem else word)
            return out

        return run

    variants = [("stemming + stop words (shipped)", tokenize), ("no stemming", variant(False, True)), ("no stop words", variant(True, False))]
    built = []
    for name, tok in variants:
        index = BM25Index()
        for doc in docs:
            index.add(doc.id, tok(doc.title) + tok(doc.body))  # type: ignore[operator]
        built.append((name, tok, index))
    return built


def gateway_config(urls: list[str]):
    connectors = "".join(
        f"""
  shard{i}:
    type: dify
    endpoint: {url}
    api_key: bench
    knowledge_id: cranfield
    candidates: {UPSTREAM_TOP}
    timeout_s: 30
"""
        for i, url in enumerate(urls)
    )
    names = ", ".join(f"shard{i}" for i in range(len(urls)))
    text = f"server:\n  api_keys: [{{key: bench}}]\n  deadline_s: 30\n  watch_config: false\nknowledge_bases:\n  cranfield:\n    connectors: [{names}]\nconnectors:{connectors}"
    return parse_config(text, {})


def by_score(pool: list[Candidate]) -> list[str]:
    ordered = sorted(pool, key=lambda c: c.passage.source_score or 0.0, reverse=True)
    return [c.passage.document_id for c in ordered]


def rrf(pool: list[Candidate], k: int = 60) -> list[str]:
    scores: dict[str, float] = {}
    for c in pool:
        scores[c.passage.document_id] = scores.get(c.passage.document_id, 0.0) + 1.0 / (k + (c.passage.source_rank or 1000))
    return sorted(scores, key=scores.__getitem__, reverse=True)


def reranked(query: str, pool: list[Candidate], **kwargs: object) -> list[str]:
    return [r.candidate.passage.document_id for r in rerank(query, dedupe(list(pool)), **kwargs)]  # type: ignore[arg-type]


def table(rows: list[tuple[str, float, float]], central_ndcg: float) -> str:
    lines = ["| ranking | nDCG@10 | recall@10 | nDCG ratio to central |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {n:.4f} | {r:.4f} | {n / central_ndcg:.3f} |" for name, n, r in rows]
    return "\n".join(lines)


async def evaluate(sweep: bool) -> None:
    docs, queries, qrels = load()
    shards = [docs[i::SHARDS] for i in range(SHARDS)]
    central = build_index(docs)
    started = time.perf_counter()
    with ExitStack() as stack:
        urls = [stack.enter_context(serve(shard_app(shard))) for shard in shards]
        gateway = Gateway(gateway_config(urls))
        await gateway.start()
        runs: dict[str, list[list[str]]] = {"central BM25 (baseline)": [], "gateway (default settings)": [], "merge by upstream score": [], "reciprocal rank fusion": []}
        pools: list[list[Candidate]] = []
        returned: list[list[tuple[str, float]]] = []
        for _, text in queries:
            runs["central BM25 (baseline)"].append([key for key, _ in central.search(tokenize(text), K)])
            request = RetrievalRequest.model_validate({"knowledge_id": "cranfield", "query": text, "retrieval_setting": {"top_k": K, "score_threshold": 0}})
            result = await retrieve(gateway, request)
            assert all(s.outcome == "ok" for s in result.sources), result.sources_header()
            runs["gateway (default settings)"].append([r["metadata"]["document_id"] for r in result.records])
            returned.append([(r["metadata"]["document_id"], r["score"]) for r in result.records])
            pool = [Candidate(p, s.name, "dify") for s in result.sources for p in s.passages]
            pools.append(pool)
            runs["merge by upstream score"].append(by_score(pool))
            runs["reciprocal rank fusion"].append(rrf(pool))
        await gateway.aclose()
    elapsed = time.perf_counter() - started

    def score(ranked_lists: list[list[str]]) -> tuple[float, float]:
        return (
            mean([ndcg_at(r, qrels[qid], K) for r, (qid, _) in zip(ranked_lists, queries)]),
            mean([recall_at(r, qrels[qid], K) for r, (qid, _) in zip(ranked_lists, queries)]),
        )

    rows = [(name, *score(lists)) for name, lists in runs.items()]
    central_ndcg = rows[0][1]
    print(f"Cranfield: {len(docs)} documents in {SHARDS} shards, {len(queries)} judged queries; upstreams return their top {UPSTREAM_TOP}. ({elapsed:.1f} s)\n")
    print(table(rows, central_ndcg))

    print("\nThreshold calibration (gateway, top_k=10): precision and recall of the records returned at or above each threshold.\n")
    print("| score_threshold | records per query | precision | recall |\n| ---: | ---: | ---: | ---: |")
    total_relevant = sum(len(qrels[qid]) for qid, _ in queries)
    for threshold in (0.0, *THRESHOLDS):
        kept = [[doc for doc, s in answer if s >= threshold] for answer in returned]
        hits = sum(len(set(k) & set(qrels[qid])) for k, (qid, _) in zip(kept, queries))
        count = sum(len(k) for k in kept)
        precision = hits / count if count else 0.0
        print(f"| {threshold:.1f} | {count / len(queries):.2f} | {precision:.3f} | {hits / total_relevant:.3f} |")

    if sweep:
        print("\nTuning grid over the same pooled candidates (fusion weight λ of the pool BM25; the rest is the upstream score):\n")
        grid: list[tuple[str, float, float]] = []
        for lam in (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 1.0):
            grid.append((f"λ={lam}", *score([reranked(text, pool, lam=lam) for (_, text), pool in zip(queries, pools)])))
        for k1, b in ((0.9, 0.4), (1.2, 0.75), (1.5, 0.75), (2.0, 0.75), (1.2, 0.5), (1.2, 0.9)):
            grid.append((f"λ=0.5 k1={k1} b={b}", *score([reranked(text, pool, params=BM25Params(k1, b)) for (_, text), pool in zip(queries, pools)])))
        print(table(grid, central_ndcg))
        print("\nTokenizer variants, measured on the central BM25 index (the upstreams use the same tokenizer):\n")
        print(table([(name, *score([[k for k, _ in index.search(tok(text), K)] for _, text in queries]))
                     for name, tok, index in tokenizer_variants(docs)], central_ndcg))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also print the tuning grid")
    args = parser.parse_args(argv)
    asyncio.run(evaluate(args.sweep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
