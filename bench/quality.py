"""Ranking quality when sources score in different ways: a scenario matrix on Cranfield.

    python -m bench.quality                  # the matrix and the threshold table (a minute or two)
    python -m bench.quality --sweep          # also the tuning grid, over the pools captured in the same run
    python -m bench.quality --collection cisi  # the held-out collection, with the settings tuned on Cranfield
    python -m bench.quality --lexical        # only the lexical scenarios 1 to 6, without a judge (as before)

Scenarios 7 to 9 and the judged rows are `bench/_semantic.py`'s (dense upstreams, the embedding judge);
the paraphrase and cross-language cases are `bench/_paraphrase.py`'s.

The collection is split round-robin into 4 shards. Each scenario is one
knowledge base of 4 sources over loopback HTTP; a remote shard is a
third-party engine (plain BM25: lower-cased words, no stemming, no stop
list, not the gateway's tokenizer) behind a Dify-compatible API, returning
its top 20 with scores in one convention:

- ceiling: BM25 divided by the query's ceiling (what the gateway does itself);
- best: BM25 divided by the shard's best hit, so every top record says 1.0;
- raw: BM25 as it is, unbounded (Elasticsearch's `_score`);
- rank: no score at all, only the order (Confluence search);
- cosine: 0.55 + 0.4 * x ** 0.3 with x the ceiling-normalised BM25 (bunched like embedding similarities);
- files: the gateway's own `files` source over the shard on local disk.

Baseline: one BM25 index over the whole collection with the gateway's
tokenizer (the stronger baseline). Also shown: the naive merges of the same
answers (by source score; reciprocal rank fusion).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from fastapi import FastAPI

from aggregator.runtime.config import parse_config
from aggregator.contract.models import RetrievalRequest
from aggregator.retrieval.pipeline import retrieve
from aggregator.ranking.bm25 import BM25Params
from aggregator.runtime.gateway import Gateway
from aggregator.text.tokenize import tokenize
from aggregator.ranking.statistics import merge_term_statistics
from connectors.base import Passage
from testkit.bm25_index import BM25Index
from testkit.loopback import serve

from ._cranfield import Doc, mean, ndcg_at, recall_at
from ._scenarios import ScenarioRun, doc_id, unique

SHARDS = 4
UPSTREAM_TOP = 20
K = 10
THRESHOLDS = (0.2, 0.4, 0.6)
SCENARIOS: dict[str, list[str]] = {
    "1 ceiling-normalised": ["ceiling"] * 4,
    "2 normalised by best hit": ["best"] * 4,
    "3 raw BM25": ["raw"] * 4,
    "4 ranks only": ["rank"] * 4,
    "5 cosine-like": ["cosine"] * 4,
    "6 mixed: best, raw, rank, files": ["best", "raw", "rank", "files"],
}
_WORD = re.compile(r"\w+")


def third_party_terms(text: str) -> list[str]:
    """A search engine that is not the gateway: lower-cased words, no stemming, no stop list."""
    return _WORD.findall(text.lower())


def build_index(docs: list[Doc], terms: Callable[[str], list[str]], params: BM25Params = BM25Params()) -> BM25Index:
    index = BM25Index(params)
    for doc in docs:
        index.add(doc.id, terms(doc.title) + terms(doc.body))
    return index


CONVENTIONS: dict[str, Callable[[float, float, float], float]] = {
    "ceiling": lambda raw, ceiling, best: raw / ceiling,
    "best": lambda raw, ceiling, best: raw / best,
    "raw": lambda raw, ceiling, best: raw,
    "cosine": lambda raw, ceiling, best: 0.55 + 0.4 * (raw / ceiling) ** 0.3,
}


def shard_app(docs: list[Doc]) -> FastAPI:
    """A third-party engine over one shard, answering in every convention at `/{convention}/retrieval`
    (`/dense/retrieval`: a vector search, by the cosine of WordLlama's embeddings)."""
    from ._semantic import Dense

    index = build_index(docs, third_party_terms)
    dense = Dense(docs)
    by_id = {doc.id: doc for doc in docs}
    app = FastAPI()

    @app.post("/{convention}/retrieval")
    async def retrieval(convention: str, body: dict) -> dict:
        if convention == "dense":
            found = dense.search(body["query"], min(UPSTREAM_TOP, int(body["retrieval_setting"]["top_k"])))
            return {"records": [{"content": d.body, "title": d.title, "metadata": {"document_id": d.id}, "score": cosine}
                                for d, cosine in found]}  # fmt: skip
        terms = third_party_terms(body["query"])
        _, ceiling = index.score_all(terms)
        hits = index.search(terms, min(UPSTREAM_TOP, int(body["retrieval_setting"]["top_k"])))
        if not hits:
            return {"records": []}
        best = hits[0][1] * ceiling
        records = []
        for key, normalised in hits:
            doc = by_id[str(key)]
            record: dict = {"content": doc.body, "title": doc.title, "metadata": {"document_id": doc.id}}
            if convention != "rank":
                record["score"] = CONVENTIONS[convention](normalised * ceiling, ceiling, best)
            records.append(record)
        return {"records": records}

    return app


def write_shard(folder: Path, docs: list[Doc]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for doc in docs:
        (folder / f"{doc.id}.md").write_text(f"# {doc.title}\n\n{doc.body}\n" if doc.title else doc.body, encoding="utf-8")
    return folder


def gateway_config(kinds: list[str], urls: list[str], folders: list[Path], judge: dict[str, object] | None = None) -> str:
    """`judge`: None, or the gateway's `embeddings` block (bench/_semantic.py's judges)."""
    connectors = []
    for i, kind in enumerate(kinds):
        if kind == "files":
            connectors.append(f"  shard{i}:\n    type: files\n    path: {folders[i]}\n    include: ['*.md']\n    watch: false\n    chunk_chars: 20000\n")
        else:
            connectors.append(
                f"  shard{i}:\n    type: dify\n    endpoint: {urls[i]}/{kind}\n    api_key: bench\n"
                f"    knowledge_id: cranfield\n    candidates: {UPSTREAM_TOP}\n    timeout_s: 30\n"
                + ("    semantic: true\n" if kind == "dense" else "")
            )
    names = ", ".join(f"shard{i}" for i in range(len(kinds)))
    return (
        "server:\n  api_keys: [{key: bench}]\n  deadline_s: 30\n  watch_config: false\n  cache_ttl_s: 0\n"
        + (f"  embeddings: {json.dumps(judge)}\n" if judge else "")  # JSON: YAML's flow style
        + f"knowledge_bases:\n  bench:\n    connectors: [{names}]\nconnectors:\n" + "".join(connectors)
    )


def judged_id(record: dict) -> str:
    """The Cranfield id of a record: its document_id is `<source>:<the source's own id>` (a file name, or a shard's id)."""
    return record["metadata"]["document_id"].split(":", 1)[1].removesuffix(".md")


def by_source_score(pool: list[list[Passage]]) -> list[str]:
    """Sort everything by the score each source gave (no score sorts last): what a naive merge does."""
    flat = [p for answer in pool for p in answer]
    flat.sort(key=lambda p: float("-inf") if p.source_score is None else p.source_score, reverse=True)
    return unique([doc_id(p) for p in flat])


def rrf(pool: list[list[Passage]], k: int = 60) -> list[str]:
    scores: dict[str, float] = {}
    for answer in pool:
        for rank, p in enumerate(answer, start=1):
            scores[doc_id(p)] = scores.get(doc_id(p), 0.0) + 1.0 / (k + rank)
    return sorted(scores, key=scores.__getitem__, reverse=True)


@contextmanager
def shard_servers(shards: list[list[Doc]]) -> Iterator[tuple[list[str], list[Path]]]:
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        urls = [stack.enter_context(serve(shard_app(shard))) for shard in shards]
        folders = [write_shard(Path(tmp) / f"shard{i}", shard) for i, shard in enumerate(shards)]
        yield urls, folders


async def run_scenario(name: str, kinds: list[str], urls: list[str], folders: list[Path], queries: list[tuple[str, str]],
                       judge: dict[str, object] | None = None) -> ScenarioRun:  # fmt: skip
    run = ScenarioRun(name, {"gateway": [], "merge by source score": [], "reciprocal rank fusion": []}, kinds=kinds)
    gateway = Gateway(parse_config(gateway_config(kinds, urls, folders, judge), {}))
    await gateway.start()
    for slot in gateway.slots.values():
        wait_ready = getattr(slot.connector, "wait_ready", None)
        if wait_ready is not None:
            await wait_ready(120)
    slots_won: dict[str, int] = {}
    started = time.perf_counter()
    try:
        for _, text in queries:
            request = RetrievalRequest.model_validate({"knowledge_id": "bench", "query": text, "retrieval_setting": {"top_k": K, "score_threshold": 0}})
            result = await retrieve(gateway, request)
            assert all(s.outcome in ("ok", "empty") for s in result.sources), result.sources_header()
            ranked = unique([judged_id(r) for r in result.records])
            run.rankings["gateway"].append(ranked)
            run.answers.append([(judged_id(r), r["score"]) for r in result.records])
            for r in result.records:
                slots_won[r["metadata"]["source"]] = slots_won.get(r["metadata"]["source"], 0) + 1
            pool = [s.passages for s in result.sources]
            run.pools.append(pool)
            run.local.append(merge_term_statistics(slot.connector.term_statistics(tokenize(text)) for slot in gateway.slots.values()))
            run.rankings["merge by source score"].append(by_source_score(pool))
            run.rankings["reciprocal rank fusion"].append(rrf(pool))
    finally:
        await gateway.aclose()
    run.seconds = time.perf_counter() - started
    total = sum(slots_won.values()) or 1
    run.shares = {f"shard{i}:{kind}": slots_won.get(f"shard{i}", 0) / total for i, kind in enumerate(kinds)}
    return run


def measure(rankings: list[list[str]], queries: list[tuple[str, str]], qrels: dict[str, dict[str, int]]) -> tuple[float, float]:
    return (
        mean([ndcg_at(r, qrels[qid], K) for r, (qid, _) in zip(rankings, queries)]),
        mean([recall_at(r, qrels[qid], K) for r, (qid, _) in zip(rankings, queries)]),
    )


def threshold_rows(run: ScenarioRun, queries: list[tuple[str, str]], qrels: dict[str, dict[str, int]]) -> list[tuple[float, float, float]]:
    """(threshold, records per query, precision) of the gateway's answers at each threshold."""
    rows = []
    for threshold in THRESHOLDS:
        kept = [[doc for doc, s in answer if s >= threshold] for answer in run.answers]
        hits = sum(len(set(k) & set(qrels[qid])) for k, (qid, _) in zip(kept, queries))
        count = sum(len(k) for k in kept)
        rows.append((threshold, count / len(queries), hits / count if count else 0.0))
    return rows


def load_collection(name: str) -> tuple[list[Doc], list[tuple[str, str]], dict[str, dict[str, int]]]:
    if name == "cisi":
        from . import _cisi

        if not _cisi.HOLDOUT.exists():
            raise SystemExit(f"the held-out collection is not at {_cisi.HOLDOUT}")
        return _cisi.load()
    from . import _cranfield

    return _cranfield.load()


async def evaluate(collection: str, sweep: bool, only: list[str] | None, lexical: bool = False) -> None:
    docs, queries, qrels = load_collection(collection)
    shards = [docs[i::SHARDS] for i in range(SHARDS)]
    central = build_index(docs, tokenize)
    central_run = [[str(key) for key, _ in central.search(tokenize(text), K)] for _, text in queries]
    central_ndcg, central_recall = measure(central_run, queries, qrels)
    print(f"{collection}: {len(docs)} documents in {SHARDS} shards, {len(queries)} judged queries; "
          f"remote shards return their top {UPSTREAM_TOP}; top_k = {K}.\n")  # fmt: skip
    from . import _semantic

    runs: list[ScenarioRun] = []
    matrix = {name: (kinds, None) for name, kinds in SCENARIOS.items()} | ({} if lexical else _semantic.SCENARIOS)
    from . import _transformer

    without_api = _transformer.missing()
    if without_api and any(judge == "api" for _, judge in matrix.values()):
        print(f"(the API judge's rows are left out: {without_api})\n")
    with shard_servers(shards) as (urls, folders), ExitStack() as stack:
        judges: dict[str, dict[str, object]] = {"local": {"provider": "local", "timeout_s": 30}}
        if not without_api:
            judges["api"] = _transformer.judge(stack.enter_context(serve(_transformer.TransformerEndpoint().app())))
        for name, (kinds, judge) in matrix.items():
            if (only and not any(name.startswith(o) for o in only)) or (judge is not None and judge not in judges):
                continue
            runs.append(await run_scenario(name, kinds, urls, folders, queries, judges[judge] if judge else None))

    plain = build_index(docs, third_party_terms)
    plain_ndcg, plain_recall = measure([[str(k) for k, _ in plain.search(third_party_terms(t), K)] for _, t in queries], queries, qrels)
    lines = ["| scenario | ranking | nDCG@10 | recall@10 | ratio to central |", "| --- | --- | ---: | ---: | ---: |"]
    lines.append(f"| all | central BM25, whole collection (baseline) | {central_ndcg:.4f} | {central_recall:.4f} | 1.000 |")
    lines.append(f"| all | central BM25 with the third-party tokenizer | {plain_ndcg:.4f} | {plain_recall:.4f} | {plain_ndcg / central_ndcg:.3f} |")
    best = central_ndcg
    if not lexical:
        for label, rankings in _semantic.central_rankings(docs, queries, central).items():
            n, r = measure(rankings, queries, qrels)
            best = max(best, n) if label.startswith("central dense") else best
            lines.append(f"| all | {label} | {n:.4f} | {r:.4f} | {n / central_ndcg:.3f} |")
    lines[0] += " ratio to the best of central BM25 and dense |"
    lines[1] += " ---: |"
    lines[2:] = [line + " |" for line in lines[2:]]
    for run in runs:
        for label, rankings in run.rankings.items():
            n, r = measure(rankings, queries, qrels)
            name = f"**{label}**" if label == "gateway" else label
            lines.append(f"| {run.name} | {name} | {n:.4f} | {r:.4f} | {n / central_ndcg:.3f} | {n / best:.3f} |")
    print("\n".join(lines))

    print("\nThresholds (the gateway, top_k = 10): records per query and their precision at each score_threshold.\n")
    header = "| scenario | " + " | ".join(f"records ≥ {t} | precision ≥ {t}" for t in THRESHOLDS) + " |"
    print(header + "\n| --- |" + " ---: | ---: |" * len(THRESHOLDS))
    for run in runs:
        cells = " | ".join(f"{count:.2f} | {precision:.3f}" for _, count, precision in threshold_rows(run, queries, qrels))
        print(f"| {run.name} | {cells} |")

    print("\nShare of the gateway's top-10 slots per source:\n")
    for run in runs:
        print(f"- {run.name}: " + ", ".join(f"{k} {v:.0%}" for k, v in run.shares.items()) + f"  ({run.seconds:.1f} s)")

    from ._fusion_sweep import sweep as replay

    if not lexical and not only:
        from . import _paraphrase

        await _paraphrase.run()
    lexical_runs = [run for run in runs if run.name in SCENARIOS]
    replay(lexical_runs, queries, qrels, central_ndcg, measure, grid=sweep)
    if sweep and not lexical:
        _semantic.tuning(runs, queries, qrels, best, measure, precision_at)


def precision_at(answers: list[list[tuple[str, float]]], queries: list[tuple[str, str]], qrels: dict[str, dict[str, int]], threshold: float) -> float:
    kept = [[doc for doc, s in answer if s >= threshold] for answer in answers]
    count = sum(len(k) for k in kept)
    return sum(len(set(k) & set(qrels[qid])) for k, (qid, _) in zip(kept, queries)) / count if count else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also print the tuning grid over the captured pools")
    parser.add_argument("--collection", choices=("cranfield", "cisi"), default="cranfield")
    parser.add_argument("--only", nargs="*", help="scenario numbers to run (e.g. 3 6)")
    parser.add_argument("--lexical", action="store_true", help="only the lexical scenarios 1 to 6, without a judge (as before)")
    args = parser.parse_args(argv)
    asyncio.run(evaluate(args.collection, args.sweep, args.only, args.lexical))
    return 0


if __name__ == "__main__":
    sys.exit(main())
