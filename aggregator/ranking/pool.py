"""Scoring the merged pool of one query: BM25 and the proximity of query terms.

Each distinct passage text is tokenized once and its term ids kept in a
bounded cache (`TermCache`), so a passage seen again (a popular page, an
upstream's stable answer) costs a lookup. Scoring a pool then is one pass
over its term ids that counts the query's terms and pairs in each passage
(`_kernel.c`'s loop, or numpy where the build had no C compiler: the same
counts), and the formula, written once (`_scores`), over those counts.

Proximity: for each pair of adjacent query terms (after stop words are
dropped, so "speed of the aircraft" pairs "speed" with "aircraft"), count how
often the pair is adjacent in the passage, and score those counts with the
same BM25 saturation and normalisation as single terms. Exact phrases and
longer CJK matches (overlapping bigrams that follow each other) rank higher.
"""

from __future__ import annotations

import hashlib
import operator
import unicodedata
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from connectors.base import Passage

from aggregator.text.tokenize import tokenize
from aggregator.ranking.bm25 import BM25Params, idf
from aggregator.ranking.statistics import PassageSample, QueryStatistics

try:  # the compiled counting loop (setup.py); optional, numpy counts the same without it
    from aggregator.ranking import _kernel
except ImportError:  # pragma: no cover - only where the build had no C compiler
    _kernel = None  # type: ignore[assignment]

CACHE_PASSAGES = 50_000
VOCABULARY_LIMIT = 2_000_000


def content_key(text: str) -> str:
    """Identity of a passage's text after Unicode, case and whitespace folding (for dedupe and caching).

    For ASCII text NFKC changes nothing and case folding is lower-casing, so that shorter path gives the same key.
    """
    folded = " ".join((text.lower() if text.isascii() else unicodedata.normalize("NFKC", text).casefold()).split())
    return hashlib.blake2b(folded.encode(), digest_size=16).hexdigest()


class Seen:
    """A passage text met before, with what ranking it again needs: its identity and its term ids (title first)."""

    __slots__ = ("key", "mark", "ids", "counted", "recent")

    def __init__(self, key: str, ids: bytes) -> None:
        self.key = key  # content_key: copies of one text share it
        self.mark = int(key[:16], 16)  # the same identity as a number, for the samples' sets
        self.ids = ids  # int32 term ids, packed: bytes keep them in the object itself, one memory access less per passage
        self.counted = 0  # one bit per source whose sample has counted this text (TermCache.count)
        self.recent = False  # met again since it entered the cache or since its last second chance


class TermCache:
    """Recently seen passages (`Seen`), the least recently used leaving first (a second-chance queue).

    Most passages come back (a popular page, an upstream's stable answer), so
    folding, hashing and tokenizing one happens once and a retrieval pays one
    lookup per passage. The lookup key is the text's hash and length with the
    title: comparing the whole text again would read a kilobyte of memory the
    request has not touched for each passage, the largest cost of a lookup.
    Two texts would be confused only if they had the same 64-bit hash, length
    and title (about one chance in 10^10 for a full cache).

    It also keeps each source's sample of passages seen
    (statistics.PassageSample), whose counts are by the same term ids and so
    are cleared with them.
    """

    def __init__(self, capacity: int = CACHE_PASSAGES) -> None:
        self.capacity = capacity
        self.vocabulary: dict[str, int] = {}
        self.samples: dict[str, PassageSample] = {}
        self._seen: dict[tuple[int, int, str], Seen] = {}  # oldest first (insertion order), see _evict
        self._bits: dict[str, tuple[PassageSample, int, int]] = {}  # source -> (its sample, its bit in Seen.counted, the sample's generation)
        self._columns = np.zeros(0, dtype=np.int32)  # by term id: 1 + the term's column in the query scored now, else 0

    def seen(self, title: str, content: str) -> Seen:
        """The entry of one passage text: looked up, or tokenized and added (the oldest may leave)."""
        cache_key = (hash(content), len(content), title)
        found = self._seen.get(cache_key)
        if found is not None:
            found.recent = True
            return found
        if len(self.vocabulary) > VOCABULARY_LIMIT:  # a long-lived process meets new words forever
            self.vocabulary.clear()
            self._seen.clear()
            self.samples.clear()
            self._bits.clear()
        vocabulary = self.vocabulary
        terms = tokenize(title) + tokenize(content)
        ids = array("i", [vocabulary.setdefault(t, len(vocabulary)) for t in terms]).tobytes()
        found = self._seen[cache_key] = Seen(content_key(content), ids)
        if len(self._seen) > self.capacity:
            self._evict()
        return found

    def recall(self, passages: Sequence[Passage]) -> list[Seen]:
        """`seen` of each of an answer's passages: one lookup apiece for the texts met before, the usual case."""
        found = list(map(self._seen.get, [(hash(p.content), len(p.content), p.title) for p in passages]))
        if None in found:  # some met for the first time (or again after leaving the cache): the general path
            return [self.seen(p.title, p.content) for p in passages]
        for entry in found:
            entry.recent = True  # type: ignore[union-attr]
        return found  # type: ignore[return-value]

    def _evict(self) -> None:
        """The oldest entry out, unless it was met again since it came in or since its last chance (then it
        goes to the back of the line, once): least recently used in effect, at no cost on a lookup."""
        table = self._seen
        while len(table) > self.capacity:
            key = next(iter(table))
            entry = table.pop(key)
            if entry.recent:
                entry.recent = False
                table[key] = entry

    def count(self, source: str, entries: list[Seen]) -> None:
        """Count each passage into `source`'s sample, once however often it comes back.

        A bit on the entry answers "counted already?" without touching the
        sample's set; the set stays the truth for entries evicted and met again.
        """
        sample = self.sample(source)
        bit = self._bit(source, sample)
        for entry in [e for e in entries if not e.counted & bit]:
            sample.observe(entry.mark, entry.ids)
            entry.counted |= bit

    def _bit(self, source: str, sample: PassageSample) -> int:
        known = self._bits.get(source)
        if known is not None and known[0] is sample and known[2] == sample.generation:
            return known[1]
        if known is None:
            bit = 1 << len(self._bits)
        else:  # the sample was replaced or halved (it forgot which texts it counted): so do the entries
            bit = known[1]
            for entry in self._seen.values():
                entry.counted &= ~bit
        self._bits[source] = (sample, bit, sample.generation)
        return bit

    def columns(self, term_ids: Sequence[int]) -> np.ndarray:
        """A table from term id to 1 + its position in `term_ids` (0 for every other id); reset with `release`.

        One gather through it labels every token of a pool at once, instead of one pass per query term.
        """
        if len(self._columns) < len(self.vocabulary):
            self._columns = np.zeros(max(len(self.vocabulary), 2 * len(self._columns)), dtype=np.int32)
        for column, term_id in enumerate(term_ids):
            if term_id >= 0:
                self._columns[term_id] = column + 1
        return self._columns

    def release(self, term_ids: Sequence[int]) -> None:
        for term_id in term_ids:
            if term_id >= 0:
                self._columns[term_id] = 0

    def sample(self, source: str) -> PassageSample:
        """The sample of passages seen from `source` (created empty on first use)."""
        found = self.samples.get(source)
        if found is None:
            found = self.samples[source] = PassageSample()
        return found


@dataclass(frozen=True, slots=True)
class PoolScores:
    bm25: np.ndarray  # per passage, in [0, 1)
    proximity: np.ndarray  # per passage, in [0, 1); all zero when the query has no pair of terms
    has_pairs: bool


@dataclass(frozen=True, slots=True)
class PoolCounts:
    """What scoring reads from a pool's text: each passage's length, and how often each of the query's k
    distinct terms, then each of its pairs of adjacent terms, occurs in it. One matrix for terms and pairs
    (float64, a row each, a column per passage), so one set of array operations scores both."""

    lengths: np.ndarray  # [n]
    rows: np.ndarray  # [k + pairs, n]
    k: int


class QueryPlan:
    """The query side of pool scoring: distinct terms, their ids, counts and pairs.

    Plain `array`s, not numpy: a query has a handful of terms, where numpy's per-call cost would dominate.
    """

    __slots__ = ("terms", "ids", "qtf", "pair_index", "pair_qtf")

    def __init__(self, query_terms: Sequence[str], vocabulary: dict[str, int]) -> None:
        counts = _counts(query_terms)
        self.terms = list(counts)  # distinct, in order of first appearance
        self.ids = [vocabulary.get(term, -1) for term in self.terms]  # -1: a word no passage seen has
        self.qtf = array("d", counts.values())  # float64, per term
        k = len(self.terms)
        pair_counts = _counts([(a, b) for a, b in zip(query_terms, query_terms[1:]) if a != b])
        self.pair_index = array("q", [-1]) * (k * k)  # (first term's column, second's) -> pair number, or -1
        if pair_counts:
            position_of = {term: i for i, term in enumerate(self.terms)}
            for p, (a, b) in enumerate(pair_counts):
                self.pair_index[position_of[a] * k + position_of[b]] = p
        self.pair_qtf = array("d", pair_counts.values())  # per distinct pair of adjacent query terms (stop words dropped)


def score_pool(
    plan: QueryPlan, documents: Sequence[bytes], cache: TermCache, params: BM25Params = BM25Params(),
    statistics: QueryStatistics | None = None, compiled: bool = True,
) -> PoolScores:  # fmt: skip
    """BM25 and proximity of each document (packed int32 term ids: `Seen.ids`), normalised by the query's ceiling.

    With `statistics` (aligned with the plan's distinct terms), single terms
    take their IDF and the average length from it instead of from the pool;
    term pairs always use the pool. `compiled`: count by the C loop of
    `_kernel.c` when the build made it (`_count_numpy` counts the same, and
    is the fallback); the arithmetic is `_scores`, either way.
    """
    n = len(documents)
    if n == 0 or not plan.terms:
        zeros = np.zeros(n)
        return PoolScores(zeros, zeros, False)
    table = cache.columns(plan.ids)
    try:
        counter = _count_compiled if compiled and _kernel is not None else _count_numpy
        counts = counter(plan, documents, table)
    finally:
        cache.release(plan.ids)
    bm25, proximity = _scores(plan, counts, params, statistics)
    return PoolScores(bm25, proximity, len(plan.pair_qtf) > 0)


def _scores(plan: QueryPlan, counts: PoolCounts, params: BM25Params, statistics: QueryStatistics | None) -> tuple[np.ndarray, np.ndarray]:
    """The module docstring's formula from the pool's counts: BM25 of the single terms, and of the pairs of
    adjacent terms, each over its ceiling. Its only implementation, compiled kernel or not.

    A pool is a few dozen passages, where each numpy call costs about a microsecond whatever its size: the
    few weights of a query (one per term or pair, over its ceiling) in plain Python, and a handful of array
    operations over the whole count matrix, terms and pairs at once (each row with its own average length).
    """
    lengths, rows, k = counts.lengths, counts.rows, counts.k
    n, pairs = len(lengths), len(plan.pair_qtf)
    avgdl = float(lengths.sum()) / n or 1.0
    present = (np.minimum(rows, 1.0) @ np.ones(n)).tolist()  # passages of the pool holding each term, each pair
    if statistics is not None:
        passages, frequencies = max(statistics.passages, 1.0), statistics.frequencies
        term_avgdl = statistics.average_length if statistics.average_length > 0 else avgdl
    else:
        passages, frequencies, term_avgdl = n, present[:k], avgdl
    weights = list(map(operator.mul, plan.qtf, map(idf, repeat(passages, k), frequencies)))
    ceiling = sum(weights)
    # an unknown word counts in the ceiling, and nowhere else
    weights = _over_ceiling([w if i >= 0 else 0.0 for w, i in zip(weights, plan.ids)], ceiling)
    # pairs are scored like terms, with the pool's frequencies and average length
    pair_weights = list(map(operator.mul, plan.pair_qtf, map(idf, repeat(n, pairs), present[k:])))
    pair_weights = _over_ceiling(pair_weights, sum(pair_weights))
    both = np.array([weights + [0.0] * pairs, [0.0] * k + pair_weights])
    norms = _length_norm(lengths, np.array([term_avgdl] * k + [avgdl] * pairs)[:, None], params)  # a row per term, per pair
    bm25, proximity = both @ (rows / (rows + norms))
    return bm25, proximity


def _over_ceiling(weights: list[float], ceiling: float) -> list[float]:
    return [w / ceiling for w in weights] if ceiling > 0 else [0.0] * len(weights)


def _length_norm(lengths: np.ndarray, avgdl: float, p: BM25Params) -> np.ndarray:
    """BM25's k1·(1 − b + b·|p|/avgdl), per passage: the saturation's denominator is tf plus this.

    The saturation tf·(k1 + 1) / (tf + norm) is taken over its ceiling k1 + 1, the same factor for every term
    and pair, so it cancels: what remains is tf / (tf + norm), weighted by idf over the query's ceiling.
    """
    return lengths * (p.k1 * p.b / avgdl) + p.k1 * (1 - p.b)


def _count_compiled(plan: QueryPlan, documents: Sequence[bytes], table: np.ndarray) -> PoolCounts:
    n, k, pairs = len(documents), len(plan.terms), len(plan.pair_qtf)
    counts = PoolCounts(np.empty(n), np.empty((k + pairs, n)), k)
    _kernel.count(list(documents), table, k, plan.pair_index, pairs, counts.rows, counts.lengths)
    return counts


def _count_numpy(plan: QueryPlan, documents: Sequence[bytes], table: np.ndarray) -> PoolCounts:
    """The pool's counts with numpy: the fallback without a C compiler, and the reference `_kernel.count` is tested against."""
    n, k, pairs = len(documents), len(plan.terms), len(plan.pair_qtf)
    sizes = [len(d) // 4 for d in documents]
    columns = np.take(table, np.frombuffer(b"".join(documents), dtype=np.int32))  # per token of the pool: 1 + its query term's position, or 0
    # From here on only the query terms' occurrences (hits) are looked at: a few hundred, not the pool's thousands of tokens.
    hit = (columns != 0).nonzero()[0]  # on booleans: four times faster than on the integers
    column = columns[hit]
    owner = np.searchsorted(np.cumsum(sizes), hit, side="right")  # the passage each hit is in
    cells = (column - 1) * n + owner  # row (the term's) and column (the passage) of each hit, flattened
    if pairs and len(hit) > 1:
        # Two hits make a query pair when they are adjacent tokens of one passage, in a pair's order.
        follows = np.flatnonzero((np.diff(hit) == 1) & (owner[1:] == owner[:-1]))
        which = np.asarray(plan.pair_index)[(column[follows] - 1) * k + (column[follows + 1] - 1)]
        found = which >= 0
        cells = np.concatenate((cells, (k + which[found]) * n + owner[follows[found]]))
    rows = np.bincount(cells, minlength=(k + pairs) * n).reshape(k + pairs, n).astype(np.float64)
    return PoolCounts(np.array(sizes, dtype=np.float64), rows, k)


def _counts(items: Sequence[object]) -> dict:
    counts: dict = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts
