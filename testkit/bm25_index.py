"""`BM25Index`: the in-memory BM25 index the persistent store (aggregator/state) replaced, kept as the reference
that store's tests and the benchmarks compare with. It scores with aggregator/ranking/bm25.py's formula and
constants; the service does not use it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from aggregator.ranking.bm25 import BM25Params, idf


@dataclass(slots=True)
class _Posting:
    """One term's passages as numpy arrays, plus a short tail of recent additions not yet packed."""

    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    tfs: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    tail_ids: list[int] = field(default_factory=list)
    tail_tfs: list[int] = field(default_factory=list)

    def pack(self) -> None:
        if self.tail_ids:
            self.ids = np.concatenate((self.ids, np.asarray(self.tail_ids, dtype=np.int32)))
            self.tfs = np.concatenate((self.tfs, np.asarray(self.tail_tfs, dtype=np.float32)))
            self.tail_ids, self.tail_tfs = [], []

    def append(self, slot: int, tf: int) -> None:
        self.tail_ids.append(slot)
        self.tail_tfs.append(tf)
        if len(self.tail_ids) >= max(64, len(self.ids)):  # amortised doubling keeps packing linear
            self.pack()


class BM25Index:
    """An incremental inverted index: add and remove passages, then search.

    Postings are numpy arrays (4 bytes of id and 4 of term frequency per
    term and passage), so a query costs a few vectorised operations per term
    and 100,000 passages fit in a fraction of what dicts would take. A
    removed passage is masked at once and its postings are dropped in bulk
    when a quarter of the slots are dead.
    """

    def __init__(self, params: BM25Params = BM25Params()) -> None:
        self.params = params
        self._postings: dict[str, _Posting] = {}
        self._slot_of: dict[Hashable, int] = {}
        self._key_of: list[Hashable | None] = []
        self._lengths = np.zeros(1024, dtype=np.float32)
        self._alive = np.zeros(1024, dtype=bool)
        self._free: list[int] = []
        self._dead = 0
        self._total_length = 0

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slot_of

    def _new_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot = len(self._key_of)
        self._key_of.append(None)
        if slot >= len(self._lengths):
            grow = len(self._lengths)
            self._lengths = np.concatenate((self._lengths, np.zeros(grow, dtype=np.float32)))
            self._alive = np.concatenate((self._alive, np.zeros(grow, dtype=bool)))
        return slot

    def add(self, key: Hashable, terms: Sequence[str]) -> None:
        if key in self._slot_of:
            self.remove(key)
        slot = self._new_slot()
        self._slot_of[key] = slot
        self._key_of[slot] = key
        for term, tf in Counter(terms).items():
            posting = self._postings.get(term)
            if posting is None:
                posting = self._postings[term] = _Posting()
            posting.append(slot, tf)
        self._lengths[slot] = len(terms)
        self._alive[slot] = True
        self._total_length += len(terms)

    def remove(self, key: Hashable) -> None:
        """Forget a passage; unknown keys are ignored."""
        slot = self._slot_of.pop(key, None)
        if slot is None:
            return
        self._total_length -= int(self._lengths[slot])
        self._alive[slot] = False
        self._lengths[slot] = 0
        self._key_of[slot] = None
        self._dead += 1
        if self._dead > max(1024, len(self._key_of) // 4):
            self._compact()

    def _compact(self) -> None:
        """Drop dead passages from every posting, then let their slots be reused."""
        alive = self._alive
        empty = []
        for term, posting in self._postings.items():
            posting.pack()
            keep = alive[posting.ids]
            posting.ids, posting.tfs = posting.ids[keep], posting.tfs[keep]
            if not len(posting.ids):
                empty.append(term)
        for term in empty:
            del self._postings[term]
        self._free.extend(slot for slot, key in enumerate(self._key_of) if key is None)
        self._dead = 0

    @property
    def total_length(self) -> int:
        """Terms in all live passages."""
        return self._total_length

    def document_frequencies(self, terms: Sequence[str]) -> dict[str, int]:
        """How many live passages hold each of `terms`."""
        frequencies: dict[str, int] = {}
        for term in dict.fromkeys(terms):
            posting = self._postings.get(term)
            if posting is None:
                frequencies[term] = 0
                continue
            posting.pack()
            frequencies[term] = int(np.count_nonzero(self._alive[posting.ids])) if self._dead else len(posting.ids)
        return frequencies

    def _scores(self, query_terms: Sequence[str]) -> tuple[np.ndarray, float]:
        """Raw BM25 per slot (dead slots score 0) and the query's ceiling."""
        n = len(self._slot_of)
        size = len(self._key_of)
        scores = np.zeros(size, dtype=np.float64)
        if n == 0 or not query_terms:
            return scores, 0.0
        k1, b = self.params.k1, self.params.b
        avgdl = self._total_length / n or 1.0
        lengths = self._lengths
        alive = self._alive
        ceiling = 0.0
        for term, qtf in Counter(query_terms).items():
            posting = self._postings.get(term)
            ids = tfs = None
            if posting is not None:
                posting.pack()
                ids, tfs = posting.ids, posting.tfs
                if self._dead:
                    keep = alive[ids]
                    ids, tfs = ids[keep], tfs[keep]
            df = 0 if ids is None else len(ids)
            weight = qtf * idf(n, df)
            ceiling += weight * (k1 + 1)
            if df:
                scores[ids] += weight * tfs * (k1 + 1) / (tfs + k1 * (1 - b) + (k1 * b / avgdl) * lengths[ids])
        return scores, ceiling

    def score_all(self, query_terms: Sequence[str]) -> tuple[dict[Hashable, float], float]:
        """Raw BM25 of every passage sharing a term with the query, and the query's ceiling."""
        scores, ceiling = self._scores(query_terms)
        return {self._key_of[int(s)]: float(scores[s]) for s in np.flatnonzero(scores)}, ceiling  # type: ignore[misc]

    def search(
        self, query_terms: Sequence[str], limit: int, accept: Callable[[Hashable], bool] | None = None
    ) -> list[tuple[Hashable, float]]:
        """The `limit` best passages as (key, normalised score), best first; ties in insertion order.

        With `accept`, passages it rejects are skipped before the limit is applied.
        """
        scores, ceiling = self._scores(query_terms)
        hits = np.flatnonzero(scores)
        if not len(hits) or ceiling <= 0 or limit <= 0:
            return []
        if accept is None and len(hits) > limit:
            hits = hits[np.argpartition(-scores[hits], limit - 1)[:limit]]
        hits = hits[np.lexsort((hits, -scores[hits]))]
        found: list[tuple[Hashable, float]] = []
        for slot in hits:
            key = self._key_of[int(slot)]
            if accept is not None and not accept(key):
                continue
            found.append((key, float(scores[slot]) / ceiling))
            if len(found) >= limit:
                break
        return found
