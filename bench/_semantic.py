"""Semantic scenarios of `bench.quality`: dense upstreams, dense + lexical mixes, with and without a judge.

A dense shard is a vector search behind a Dify-compatible API: WordLlama (`l2_supercat_256`, whose weights
ship in its wheel) embeds each document as title + body, and the shard returns its top 20 by cosine, with
the cosine as its score, declared `semantic: true`. The judge, where a scenario has one, is the same model
in the gateway's process (`server.embeddings: {provider: local}`): the case of a Dify deployment whose
embedding model the gateway also uses.

Baselines over the whole collection: central BM25 (the gateway's tokenizer), central dense (cosine over
every document), central hybrid (0.5 · min-max BM25 + 0.5 · cosine, per query over every document).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from typing import Any

import numpy as np

from aggregator.retrieval.embeddings import LocalProvider
from aggregator.ranking.pool import TermCache
from aggregator.ranking.rerank import DEFAULT_FUSION, Answer, FusionSettings, rerank
from aggregator.text.tokenize import tokenize
from testkit.bm25_index import BM25Index

from ._cranfield import Doc

K = 10
#: name -> (kinds of the 4 shards, the gateway's judge: None, "local" (WordLlama in process) or "api"
#: (all-MiniLM-L6-v2 behind an OpenAI-compatible endpoint, bench/_transformer.py))
SCENARIOS: dict[str, tuple[list[str], str | None]] = {
    "1 ceiling-normalised, judge": (["ceiling"] * 4, "local"),
    "6 mixed: best, raw, rank, files, judge": (["best", "raw", "rank", "files"], "local"),
    "7 dense": (["dense"] * 4, None),
    "7 dense, judge": (["dense"] * 4, "local"),
    "8 dense + BM25 (best hit)": (["dense", "best", "dense", "best"], None),
    "8 dense + BM25 (best hit), judge": (["dense", "best", "dense", "best"], "local"),
    "9 dense + files": (["dense", "files", "dense", "files"], None),
    "9 dense + files, judge": (["dense", "files", "dense", "files"], "local"),
    "1 ceiling-normalised, API judge": (["ceiling"] * 4, "api"),
    "6 mixed: best, raw, rank, files, API judge": (["best", "raw", "rank", "files"], "api"),
    "7 dense, API judge": (["dense"] * 4, "api"),
    "8 dense + BM25 (best hit), API judge": (["dense", "best", "dense", "best"], "api"),
    "9 dense + files, API judge": (["dense", "files", "dense", "files"], "api"),
}


@lru_cache(maxsize=1)
def model() -> Any:
    return LocalProvider.load("wordllama")


def unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def doc_text(doc: Doc) -> str:
    return f"{doc.title}\n{doc.body}" if doc.title else doc.body


def embed(texts: list[str]) -> np.ndarray:
    return unit(model().embed(texts, norm=False).astype(np.float64))


class Dense:
    """Cosine search over some documents."""

    def __init__(self, docs: list[Doc]) -> None:
        self.docs = docs
        self.vectors = embed([doc_text(d) for d in docs]) if docs else np.zeros((0, 256))

    def search(self, query: str, limit: int) -> list[tuple[Doc, float]]:
        cosines = self.vectors @ embed([query])[0]
        top = np.argsort(-cosines, kind="stable")[:limit]
        return [(self.docs[i], float(cosines[i])) for i in top]


def central_rankings(docs: list[Doc], queries: list[tuple[str, str]], central: BM25Index) -> dict[str, list[list[str]]]:
    """Central dense and central hybrid over the whole collection (central BM25 is quality.py's)."""
    dense = Dense(docs)
    ids = [d.id for d in docs]
    position = {d.id: i for i, d in enumerate(docs)}
    out: dict[str, list[list[str]]] = {"central dense": [], "central hybrid (0.5 BM25 + 0.5 cosine)": []}
    for _, text in queries:
        cosines = dense.vectors @ embed([text])[0]
        out["central dense"].append([ids[i] for i in np.argsort(-cosines, kind="stable")[:K]])
        raw, _ = central.score_all(tokenize(text))
        bm25 = np.zeros(len(docs))
        for key, value in raw.items():
            bm25[position[str(key)]] = value
        span = bm25.max() - bm25.min()
        mixed = 0.5 * ((bm25 - bm25.min()) / span if span > 0 else bm25) + 0.5 * cosines
        out["central hybrid (0.5 BM25 + 0.5 cosine)"].append([ids[i] for i in np.argsort(-mixed, kind="stable")[:K]])
    from . import _transformer

    if _transformer.missing() is None:  # the API judge's model over the whole collection, for its rows
        vectors = unit(_transformer.embed([doc_text(d) for d in docs]))
        label = f"central dense ({_transformer.MODEL_NAME})"
        out[label] = [[ids[i] for i in np.argsort(-(vectors @ unit(_transformer.embed([t]))[0]), kind="stable")[:K]] for _, t in queries]
    return out


class Meaning:
    """The judge's similarity of passages, as the gateway computes it, for replaying the fusion offline."""

    def __init__(self, embedder: Callable[[list[str]], np.ndarray] | None = None) -> None:
        self.vectors: dict[str, np.ndarray] = {}
        self.embed = embedder or embed

    def of(self, query: str, texts: list[str], low: float | str, high: float) -> dict[str, float]:
        missing = [t for t in dict.fromkeys(texts) if t not in self.vectors]
        if missing:
            self.vectors.update(zip(missing, self.embed(missing)))
        q = self.embed([query])[0]
        cosines = {t: float(self.vectors[t] @ q) for t in texts}
        if isinstance(low, str):  # "p50": the pool's own median (a quantile) as the level of no evidence
            low = float(np.quantile(list(cosines.values()), int(low[1:]) / 100))
        return {t: float(np.clip((c - low) / (high - low), 0.0, 1.0)) for t, c in cosines.items()}


def replay(run: Any, queries: list[tuple[str, str]], meaning: Meaning, weight: float, low: float | str = 0.0, high: float = 1.0,
           settings: FusionSettings = DEFAULT_FUSION, semantic: bool = True) -> tuple[list[list[str]], list[list[tuple[str, float]]]]:  # fmt: skip
    """The real rerank over a run's captured pools, with a judge of the given constants (weight 0: no judge)."""
    from .quality import doc_id, unique

    cache = TermCache()
    settings = replace(settings, meaning=weight)
    rankings, answers = [], []
    for (_, text), pool, local in zip(queries, run.pools, run.local):
        batch = [Answer(f"shard{i}", kind, list(answer), indexed=kind == "files", semantic=semantic and kind == "dense")
                 for i, (kind, answer) in enumerate(zip(run.kinds, pool))]  # fmt: skip
        texts = [p.content for a in batch for p in a.passages]
        judged = meaning.of(text, texts, low, high) if weight > 0 and texts else None
        ranked = list(rerank(text, batch, cache, local, settings, meaning=judged))
        rankings.append(unique([doc_id(r.candidate.passage) for r in ranked])[:K])
        answers.append([(doc_id(r.candidate.passage), r.score) for r in ranked[:K]])
    return rankings, answers


def tuning(runs: list[Any], queries: list[tuple[str, str]], qrels: dict[str, dict[str, int]], best: float,
           measure: Callable[..., Any], precision: Callable[..., float]) -> None:  # fmt: skip
    """The judge's weight and similarity range, replayed over the pools of the judged scenarios."""
    meaning = Meaning()
    plain = [r for r in runs if "dense" in r.name and not r.name.endswith("judge")]
    if plain:
        print("\nWithout a judge: a semantic source's confidence as a floor (replayed over the dense scenarios' pools):"
              " nDCG@10 ratio to the best central ranking, precision at 0.4.\n")  # fmt: skip
        names = [r.name.split(" ")[0] for r in plain]
        print("| floor | " + " | ".join(names) + " | " + " | ".join(f"precision {n}" for n in names) + " |\n| --- |" + " ---: |" * (2 * len(names)))
        d = DEFAULT_FUSION
        for label, settings, semantic in (
            ("none (read by words, as before)", d, False),
            ("every passage, its own score", replace(d, confidence_discount=False), True),
            ("discounted 1/log2(1 + place) (default)", d, True),
            ("first passage only", replace(d, confidence_top=1), True),
            ("first 3, discounted", replace(d, confidence_top=3), True),
        ):
            cells = [replay(run, queries, meaning, 0.0, settings=settings, semantic=semantic) for run in plain]
            ratios = [measure(r, queries, qrels)[0] / best for r, _ in cells]
            precisions = [precision(a, queries, qrels, 0.4) for _, a in cells]
            print(f"| {label} | " + " | ".join(f"{r:.3f}" for r in ratios) + " | " + " | ".join(f"{p:.3f}" for p in precisions) + " |", flush=True)
    judged = [r for r in runs if r.name.endswith(", judge")]
    if judged:
        print("\nTuning the judge (replayed over the judged scenarios' pools): nDCG@10 ratio to the best central"
              " ranking, and precision at a threshold of 0.4.\n")  # fmt: skip
        grid = [(c, w, r, 1) for c, w in (("mix", 0.1), ("mix", 0.2), ("or", 0.3), ("or", 0.5), ("or", 0.7)) for r in ((0.5, 1.0), (0.6, 1.0), (0.7, 1.0))]
        grid += [("or", 0.5, (0.7, 1.0), top) for top in (0, 3)]
        grid += [(c, w, (q, 1.0), 1) for c, w in (("or", 0.3), ("or", 0.5), ("or", 0.7), ("mix", 0.2)) for q in ("p50", "p75", "p90")]
        grid += [("or", 0.5, (0.7, 1.0), 1, False)]
        tuning_grid(judged, grid, Meaning(), queries, qrels, best, measure, precision)
    api = [r for r in runs if r.name.endswith("API judge")]
    if api:
        from . import _transformer

        print(f"\nTuning the API judge ({_transformer.MODEL_NAME} behind the `openai` provider), the same way.\n")
        ranges = ((0.1, 0.6), (0.2, 0.7), (0.3, 0.8), (0.4, 0.9), (0.5, 1.0))
        grid = [(c, w, r, 1) for c, w in (("or", 0.5), ("or", 0.7), ("mix", 0.3), ("mix", 0.5)) for r in ranges]
        grid += [("or", 0.5, r, 1, False) for r in ranges]
        tuning_grid(api, grid, Meaning(_transformer.embed), queries, qrels, best, measure, precision)


def tuning_grid(judged: list[Any], grid: list[tuple[Any, ...]], meaning: Meaning,
                queries: list[tuple[str, str]], qrels: dict[str, dict[str, int]], best: float,
                measure: Callable[..., Any], precision: Callable[..., float]) -> None:  # fmt: skip
    names = [r.name.split(" ")[0] for r in judged]
    print("| weight | similarity | " + " | ".join(names) + " | min | precision ≥ 0.4, min–max |\n| ---: | --- |" + " ---: |" * (len(names) + 2))
    for combine, weight, (low, high), top, *agreement in grid:  # agreement: [False] for the floor without it
        ratios, precisions = [], []
        for run in judged:
            settings = replace(DEFAULT_FUSION, combine=combine, judged_confidence_top=top, judged_agreement=agreement != [False])
            rankings, answers = replay(run, queries, meaning, weight, low, high, settings)
            ratios.append(measure(rankings, queries, qrels)[0] / best)
            precisions.append(precision(answers, queries, qrels, 0.4))
        floor = f"{top or 'none'}{', no agreement' if agreement == [False] else ''}"
        print(f"| {combine} {weight}, floor {floor} | [{low}, {high}] | " + " | ".join(f"{r:.3f}" for r in ratios)
              + f" | {min(ratios):.3f} | {min(precisions):.3f}–{max(precisions):.3f} |", flush=True)  # fmt: skip
