"""Merge the passages of every source into one ranking with scores in [0, 1].

For each candidate passage p, from a source with weight w (see pool.py for bm25 and proximity)::

    relevance(p) = (1 - λ) * source_score(p) + λ * bm25(p)    when the source gave a score
                 = bm25(p)                                    otherwise
    fused(p)     = (relevance(p) + μ * proximity(p)) / (1 + μ)  when the query has two terms or more
                 = relevance(p)                                otherwise
    score(p)     = 1 - (1 - fused(p) ** γ) ** w

with λ = 0.2, μ = 0.75 and γ = 0.5, tuned on Cranfield (bench/quality.py). The
source's own score carries what the pool cannot see: its collection-wide
statistics, or an upstream's semantic ranking. The pool's BM25 puts every
source on one scale. Proximity, which BM25 upstreams ignore, rewards passages
where the query's words stand together. Every part is normalised by a
ceiling that depends on the query, not on the best candidate, so a weak
match stays low even when it is the best of a weak pool. The weight bends
the curve instead of multiplying, so the score stays in [0, 1], 0 stays 0
and the order within a source is unchanged.

Identical passages (same text after Unicode and whitespace folding) are
merged first; the copy with the best source score is kept and the other
sources are listed in its `metadata.also_in`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from connectors.base import Passage

from .bm25 import BM25Params
from .pool import TermCache, content_key, score_pool

#: Share of the pool's BM25 in a passage's relevance; the rest is the source's own score.
LAMBDA = 0.2
#: Weight of term proximity against relevance.
MU = 0.75
#: Calibration exponent: fused scores are spread by a power below 1 so that Dify's usual
#: thresholds (0.3 to 0.7) separate good matches from weak ones (see the table in the README).
GAMMA = 0.5


@dataclass(slots=True)
class Candidate:
    passage: Passage
    source: str
    source_type: str
    weight: float = 1.0
    metadata: dict[str, Any] | None = None  # record metadata, filled by the pipeline
    key: str = ""  # content_key of the passage, filled by dedupe


@dataclass(slots=True)
class Ranked:
    candidate: Candidate
    score: float
    bm25: float
    proximity: float


def dedupe(candidates: list[Candidate]) -> list[Candidate]:
    """Keep one candidate per distinct text: the one its source scored highest (first on a tie)."""
    kept: dict[str, Candidate] = {}
    others: dict[str, list[str]] = {}
    for candidate in candidates:
        key = candidate.key = content_key(candidate.passage.content)
        best = kept.get(key)
        if best is None:
            kept[key] = candidate
            continue
        if (candidate.passage.source_score or 0.0) > (best.passage.source_score or 0.0):
            kept[key], candidate = candidate, best
        others.setdefault(key, []).append(candidate.source)
    for key, sources in others.items():
        winner = kept[key]
        if winner.metadata is not None:
            also = [s for s in dict.fromkeys(sources) if s != winner.source]
            if also:
                winner.metadata["also_in"] = also
    return list(kept.values())


def fuse(bm25: float, proximity: float, has_pairs: bool, source_score: float | None, weight: float,
         lam: float = LAMBDA, mu: float = MU) -> float:  # fmt: skip
    relevance = bm25 if source_score is None else (1.0 - lam) * source_score + lam * bm25
    fused = (relevance + mu * proximity) / (1.0 + mu) if has_pairs else relevance
    calibrated = min(1.0, max(0.0, fused)) ** GAMMA
    return 1.0 - (1.0 - calibrated) ** weight


def rerank(query: str, candidates: list[Candidate], cache: TermCache | None = None, params: BM25Params = BM25Params(),
           lam: float = LAMBDA, mu: float = MU) -> list[Ranked]:  # fmt: skip
    """Score and sort deduplicated candidates, best first; ties keep the sources' order."""
    if not candidates:
        return []
    cache = cache or TermCache(capacity=len(candidates))
    documents = [cache.ids(c.passage.title, c.passage.content, c.key or None) for c in candidates]
    pool = score_pool(query, documents, cache, params)
    ranked = [
        Ranked(candidate, fuse(float(b), float(x), pool.has_pairs, candidate.passage.source_score, candidate.weight, lam, mu), float(b), float(x))
        for candidate, b, x in zip(candidates, pool.bm25, pool.proximity)
    ]
    ranked.sort(key=lambda r: (r.score, r.bm25), reverse=True)
    return ranked
