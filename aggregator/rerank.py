"""Merge the passages of every source into one ranking with scores in [0, 1].

For each candidate passage p from a source with weight w::

    bm25(p)   = BM25 of p over the merged pool, divided by the query's ceiling  (see bm25.py)
    fused(p)  = λ * bm25(p) + (1 - λ) * source_score(p)     when the source gave a score
              = bm25(p)                                      otherwise
    score(p)  = 1 - (1 - fused(p)) ** w

The pool BM25 puts every source on one scale; the source's own score carries
what the pool cannot see (its collection-wide statistics, or an upstream's
semantic ranking). The weight bends the curve instead of multiplying, so the
score stays in [0, 1], 0 stays 0 and the order within a source is unchanged.
Identical passages (same text after Unicode and whitespace folding) are
merged first; the copy with the best source score is kept and the other
sources are listed in its `metadata.also_in`.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from connectors.base import Passage

from .bm25 import BM25Params, normalised_scores
from .tokenize import tokenize

#: Share of the pool's BM25 in the fused score; the rest is the source's own score.
DEFAULT_LAMBDA = 0.5
_SPACE = re.compile(r"\s+")


@dataclass(slots=True)
class Candidate:
    passage: Passage
    source: str
    source_type: str
    weight: float = 1.0
    metadata: dict[str, Any] | None = None  # record metadata, filled by the pipeline


@dataclass(slots=True)
class Ranked:
    candidate: Candidate
    score: float
    bm25: float


def content_key(text: str) -> str:
    folded = _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    return hashlib.blake2b(folded.encode(), digest_size=16).hexdigest()


def dedupe(candidates: list[Candidate]) -> list[Candidate]:
    """Keep one candidate per distinct text: the one its source scored highest (first on a tie)."""
    kept: dict[str, Candidate] = {}
    others: dict[str, list[str]] = {}
    for candidate in candidates:
        key = content_key(candidate.passage.content)
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


def fuse(bm25: float, source_score: float | None, weight: float, lam: float = DEFAULT_LAMBDA) -> float:
    fused = bm25 if source_score is None else lam * bm25 + (1.0 - lam) * source_score
    fused = min(1.0, max(0.0, fused))
    return 1.0 - (1.0 - fused) ** weight


def rerank(query: str, candidates: list[Candidate], params: BM25Params = BM25Params(), lam: float = DEFAULT_LAMBDA) -> list[Ranked]:
    """Score and sort deduplicated candidates, best first; ties keep the sources' order."""
    if not candidates:
        return []
    documents = [tokenize(c.passage.title) + tokenize(c.passage.content) for c in candidates]
    bm25 = normalised_scores(tokenize(query), documents, params)
    ranked = [
        Ranked(candidate, fuse(b, candidate.passage.source_score, candidate.weight, lam), b)
        for candidate, b in zip(candidates, bm25)
    ]
    ranked.sort(key=lambda r: (r.score, r.bm25), reverse=True)
    return ranked
