"""BM25 with a score normalised to [0, 1] by the query's own ceiling.

The local indexes of `files`-like sources use this index; the rerank of the
merged pool (pool.py) computes the same formula vectorised over a small pool,
so a score means the same thing everywhere.

For a query q and passage d::

    idf(t)  = ln(1 + (N - n_t + 0.5) / (n_t + 0.5))            (always > 0)
    sat(t)  = tf * (k1 + 1) / (tf + k1 * (1 - b + b * |d| / avgdl))
    bm25    = sum over query terms t of qtf(t) * idf(t) * sat(t)
    ceiling = sum over query terms t of qtf(t) * idf(t) * (k1 + 1)
    norm    = bm25 / ceiling                                    (in [0, 1))

`ceiling` is what a passage containing every query term infinitely often
would score; it depends on the query and the collection, never on how good
the best candidate happens to be. So a weak match stays low even when it is
the best of a weak pool, and a threshold means the same for every query.
Query terms absent from the collection still count in the ceiling: a query
half made of unknown words can reach at most about half.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

K1 = 1.2
B = 0.75


@dataclass(frozen=True, slots=True)
class BM25Params:
    k1: float = K1
    b: float = B


def idf(doc_count: int, doc_freq: int) -> float:
    return math.log(1.0 + (doc_count - doc_freq + 0.5) / (doc_freq + 0.5))


class BM25Index:
    """An incremental inverted index: add and remove passages, then search.

    Keys are any hashable id chosen by the caller. Memory is one dict entry
    per (term, passage) pair; search touches only the postings of query terms.
    """

    def __init__(self, params: BM25Params = BM25Params()) -> None:
        self.params = params
        self._postings: dict[str, dict[Hashable, int]] = {}
        self._lengths: dict[Hashable, int] = {}
        self._terms: dict[Hashable, tuple[str, ...]] = {}  # what to unlink on removal
        self._total_length = 0

    def __len__(self) -> int:
        return len(self._lengths)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._lengths

    def add(self, key: Hashable, terms: Sequence[str]) -> None:
        if key in self._lengths:
            self.remove(key)
        counts = Counter(terms)
        for term, tf in counts.items():
            self._postings.setdefault(term, {})[key] = tf
        self._terms[key] = tuple(counts)
        self._lengths[key] = len(terms)
        self._total_length += len(terms)

    def remove(self, key: Hashable) -> None:
        """Forget a passage; unknown keys are ignored."""
        terms = self._terms.pop(key, None)
        if terms is None:
            return
        self._total_length -= self._lengths.pop(key)
        for term in terms:
            posting = self._postings[term]
            del posting[key]
            if not posting:
                del self._postings[term]

    def score_all(self, query_terms: Sequence[str]) -> tuple[dict[Hashable, float], float]:
        """Raw BM25 of every passage sharing a term with the query, and the query's ceiling."""
        n = len(self._lengths)
        if n == 0 or not query_terms:
            return {}, 0.0
        k1, b = self.params.k1, self.params.b
        avgdl = self._total_length / n or 1.0
        lengths = self._lengths
        scores: dict[Hashable, float] = {}
        ceiling = 0.0
        norm_k, per_len = k1 * (1 - b), k1 * b / avgdl
        for term, qtf in Counter(query_terms).items():
            posting = self._postings.get(term)
            weight = qtf * idf(n, len(posting) if posting else 0)
            ceiling += weight * (k1 + 1)
            if not posting:
                continue
            for key, tf in posting.items():
                scores[key] = scores.get(key, 0.0) + weight * tf * (k1 + 1) / (tf + norm_k + per_len * lengths[key])
        return scores, ceiling

    def search(self, query_terms: Sequence[str], limit: int) -> list[tuple[Hashable, float]]:
        """The `limit` best passages as (key, normalised score), best first; ties by key order of insertion."""
        scores, ceiling = self.score_all(query_terms)
        if not scores:
            return []
        best = heapq.nlargest(limit, scores.items(), key=lambda kv: kv[1])
        return [(key, raw / ceiling) for key, raw in best]
