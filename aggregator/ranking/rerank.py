"""Merge the passages of every source into one ranking with scores in [0, 1], whatever scale each source uses.

No source's scale is trusted. Sources report relevance their own way: BM25
divided by their best hit (every top record says 1.0), raw unbounded scores,
cosine similarities bunched between 0.5 and 0.9, ranks only. So the gateway
scores every distinct passage itself and, per query and per source, learns
how the source's scores map onto that common scale::

    relevance(p)  = (bm25(p) + μ·proximity(p)) / (1 + μ)     the gateway's own judgement (pool.py),
                                                           relevance = bm25 for one-term queries
    position(p,s) = (x − min_s x) / (max_s x − min_s x)    where x is the score source s gave p (read the other
                                                           way round when it grows down the list: a distance);
                  = 1 / log2(1 + rank), scaled to [0, 1]   from its ranks when it gave no usable scores
    fit over s:     relevance ≈ a_s + β_s · position        least squares, β_s ≥ 0, shrunk by n_s / (n_s + κ)
    calibrated(p) = a_s + β_s · position(p, s)             the source's opinion on the gateway's scale
    fused(p)      = (1 − α) · relevance(p) + α · calibrated(p)
    score(p)      = 1 − (1 − fused(p)^γ)^w                 w: the source's weight

A source's calibrated scores keep its own order (β ≥ 0), do not change when
it multiplies or shifts its scores, and are worth as much as its order agrees
with the passages' text: a source whose order says nothing gets a flat line
at the mean relevance of what it returned. The gateway's relevance uses
collection statistics the pool cannot see (statistics.py). Every part is
normalised by a ceiling that depends on the query, never on the best
candidate, so a weak match stays low even when it is the best of a weak
pool, and a threshold means the same whatever the mix of sources.

A connector's `scores` setting overrides the automatic choice: `rank` uses
the order only, `trust` takes the source's scores as already on this scale
(clamped to [0, 1]), `ignore` leaves the source out of the fusion.

Identical passages (same text after Unicode and whitespace folding) are
merged: the copy whose source vouches for it most (highest calibrated score)
is kept and the other sources are listed in its `metadata.also_in`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, overload

import numpy as np

from connectors.base import Passage, TermStatistics

from ..text.tokenize import tokenize
from .bm25 import BM25Params
from .pool import TermCache, content_key, score_pool
from .statistics import QueryStatistics

ScoreUse = Literal["auto", "rank", "trust", "ignore"]


@dataclass(frozen=True, slots=True)
class FusionSettings:
    """The constants of the formula above; the defaults were tuned on Cranfield (bench/quality.py --sweep)."""

    bm25: BM25Params = BM25Params()
    mu: float = 0.75  # weight of term proximity against BM25
    alpha: float = 0.3  # share of the calibrated source score in the fused score
    kappa: float = 3.0  # pseudo-observations that shrink a source's fitted slope toward flat
    gamma: float = 0.5  # spread of fused scores so that thresholds 0.3 to 0.6 separate good from weak
    sample: bool = True  # IDF from passages seen before, not only the pool
    local: bool = True  # IDF from the local indexes' whole collections


DEFAULT_FUSION = FusionSettings()


@dataclass(slots=True)
class Candidate:
    passage: Passage
    source: str
    source_type: str
    weight: float = 1.0
    metadata: dict[str, Any] | None = None  # record metadata, filled by the pipeline
    scores: ScoreUse = "auto"
    indexed: bool = False  # from a source whose collection statistics are already counted (no sampling)
    calibrated: float | None = None  # this source's opinion on the gateway's scale, set by `rank`


@dataclass(slots=True)
class Ranked:
    candidate: Candidate
    score: float
    bm25: float
    proximity: float
    relevance: float = 0.0
    calibration: str = "none"  # how the source's score was mapped: scores, ranks, trusted, ignored, none
    members: list[Candidate] = field(default_factory=list)  # every source's copy of this text, the winner among them

    @property
    def calibrated(self) -> float | None:
        """The winning copy's calibrated source score: what the fusion used."""
        return self.candidate.calibrated

    @property
    def also_in(self) -> list[str]:
        """The other sources that returned the same text (for the record's `metadata.also_in`)."""
        return [s for s in dict.fromkeys(m.source for m in self.members) if s != self.candidate.source]


@dataclass(slots=True)
class Group:
    """One distinct passage text and every source that returned it."""

    key: str  # content_key of the text
    members: list[Candidate]


def group(candidates: list[Candidate]) -> list[Group]:
    """Candidates grouped by their text after Unicode, case and whitespace folding, in order of first appearance."""
    groups: dict[str, Group] = {}
    for candidate in candidates:
        key = content_key(candidate.passage.content)
        found = groups.get(key)
        if found is None:
            groups[key] = Group(key, [candidate])
        else:
            found.members.append(candidate)
    return list(groups.values())


def _positions(candidates: list[Candidate]) -> tuple[list[float], str]:
    """Each passage's position in [0, 1] in its source's answer (1 = the best), and whether scores or ranks gave it.

    Scores that grow down the source's ranked list are distances (lower is better) and are read that way
    round. Plain Python: a source's answer is a few dozen passages, where numpy's per-call cost dominates.
    """
    n = len(candidates)
    order = sorted(range(n), key=lambda i: (candidates[i].passage.source_rank or _NO_RANK, i))
    scores = [c.passage.source_score for c in candidates]
    if candidates[0].scores != "rank" and n > 1 and None not in scores:
        low, high = min(scores), max(scores)  # type: ignore[type-var]
        if high > low:
            span = high - low
            in_order = [scores[i] for i in order]
            rising = sum((b > a) - (b < a) for a, b in zip(in_order, in_order[1:]))  # type: ignore[operator]
            if rising > 0 and all(c.passage.source_rank is not None for c in candidates):
                return [(high - x) / span for x in scores], "scores"  # type: ignore[operator]
            return [(x - low) / span for x in scores], "scores"  # type: ignore[operator]
    if n == 1:
        return [1.0], "ranks"
    floor = 1.0 / math.log2(n + 1)  # the discount of DCG: relevance falls fast at the top of a list, then slowly
    position = [0.0] * n
    for place, i in enumerate(order):
        position[i] = (1.0 / math.log2(place + 2) - floor) / (1.0 - floor)
    return position, "ranks"


_NO_RANK = 2**31


def _calibrate(candidates: list[Candidate], relevance: list[float], kappa: float) -> tuple[list[float], str]:
    """One source's scores on the gateway's scale (-1 where it has none), and how they were obtained.

    Fits relevance ≈ a + β·position by least squares over the source's
    passages, with β ≥ 0 shrunk by n / (n + κ): with few passages, or an
    order that disagrees with the text, the line flattens toward the mean
    relevance of what the source returned.
    """
    use = candidates[0].scores
    if use == "ignore":
        return [-1.0] * len(candidates), "ignored"
    if use == "trust":
        scores = [c.passage.source_score for c in candidates]
        return [-1.0 if x is None else min(1.0, max(0.0, x)) for x in scores], "trusted"
    x, how = _positions(candidates)
    n = len(x)
    # fsum: exactly rounded, so the fit does not depend on the order the passages arrived in
    mean_x, mean_y = math.fsum(x) / n, math.fsum(relevance) / n
    spread = math.fsum((a - mean_x) ** 2 for a in x)
    covariance = math.fsum((a - mean_x) * (b - mean_y) for a, b in zip(x, relevance))
    slope = max(0.0, covariance / spread) * n / (n + kappa) if spread > 0 else 0.0
    intercept = mean_y - slope * mean_x
    return [min(1.0, max(0.0, intercept + slope * a)) for a in x], how


def query_statistics(
    query_terms: list[str], cache: TermCache, local: TermStatistics | None, sampled: Iterable[str], settings: FusionSettings
) -> QueryStatistics | None:
    """Collection statistics for the query's distinct terms: the local indexes' counts plus the samples of `sampled` sources."""
    distinct = list(dict.fromkeys(query_terms))
    passages = total = 0.0
    frequencies = np.zeros(len(distinct))
    if settings.local and local is not None and local.passages:
        passages += local.passages
        total += local.total_length
        frequencies += np.fromiter((local.frequencies.get(t, 0) for t in distinct), dtype=np.float64, count=len(distinct))
    if settings.sample:
        ids = [cache.vocabulary.get(t, -1) for t in distinct]
        for source in sampled:
            sample = cache.samples.get(source)
            if sample is not None and sample.passages:
                passages += sample.passages
                total += sample.total_length
                frequencies += sample.frequencies(ids)
    if passages <= 0:
        return None
    return QueryStatistics(passages, total / passages, frequencies)


def fuse(relevance: Any, calibrated: Any, weight: Any, settings: FusionSettings = DEFAULT_FUSION) -> np.ndarray:
    """The final score from the gateway's relevance and the source's calibrated score, on numbers or arrays.

    A calibrated value below 0 (or None) means the source gave none: the relevance alone counts.
    """
    source = np.asarray(-1.0 if calibrated is None else calibrated, dtype=np.float64)
    mixed = (1.0 - settings.alpha) * np.asarray(relevance, dtype=np.float64) + settings.alpha * source
    fused = np.where(source >= 0.0, mixed, relevance)
    return 1.0 - (1.0 - np.clip(fused, 0.0, 1.0) ** settings.gamma) ** np.asarray(weight, dtype=np.float64)


def rerank(
    query: str, candidates: list[Candidate], cache: TermCache | None = None, local: TermStatistics | None = None,
    settings: FusionSettings = DEFAULT_FUSION, sampled: Iterable[str] | None = None,
) -> Sequence[Ranked]:  # fmt: skip
    """Merge duplicates, then rank them (`rank`): best first, ties broken by a stable key."""
    return rank(query, group(candidates), cache, local, settings, sampled)


def rank(
    query: str, groups: list[Group], cache: TermCache | None = None, local: TermStatistics | None = None,
    settings: FusionSettings = DEFAULT_FUSION, sampled: Iterable[str] | None = None,
) -> Sequence[Ranked]:  # fmt: skip
    """Score each distinct passage, calibrate each source, fuse and sort.

    `local` holds the collection statistics of the query's terms reported by
    the knowledge base's indexed sources (their candidates are marked
    `indexed`). Every other candidate is counted into its source's sample,
    and the samples of the `sampled` sources (by default, the candidates'
    sources that are not indexed) join the statistics.
    """
    if not groups:
        return []
    cache = cache or TermCache(capacity=len(groups))
    documents = []
    for found in groups:
        first = found.members[0].passage
        ids = cache.ids(first.title, first.content, found.key)
        documents.append(ids)
        for member in found.members:
            if not member.indexed:
                cache.sample(member.source).observe(found.key, ids)
    if sampled is None:
        sampled = dict.fromkeys(m.source for found in groups for m in found.members if not m.indexed)
    query_terms = tokenize(query)
    statistics = query_statistics(query_terms, cache, local, sampled, settings)
    pool = score_pool(query_terms, documents, cache, settings.bm25, statistics)
    if pool.has_pairs:
        relevance = (pool.bm25 + settings.mu * pool.proximity) / (1.0 + settings.mu)
    else:
        relevance = pool.bm25

    # Every (group, source) sighting in one flat list; each source's calibration is fitted over its own sightings.
    sizes = [len(found.members) for found in groups]
    sighted = [member for found in groups for member in found.members]
    group_of = [g for g, size in enumerate(sizes) for _ in range(size)]
    by_source: dict[str, list[int]] = {}
    for i, member in enumerate(sighted):
        by_source.setdefault(member.source, []).append(i)
    rel = relevance.tolist()
    calibrated = [0.0] * len(sighted)
    how: dict[str, str] = {}
    for source, indexes in by_source.items():
        members = [sighted[i] for i in indexes]
        values, how[source] = _calibrate(members, [rel[group_of[i]] for i in indexes], settings.kappa)
        for i, member, value in zip(indexes, members, values):
            calibrated[i] = value
            member.calibrated = value if value >= 0.0 else None

    # The sighting that vouches most for each passage speaks for it (the first on a tie).
    winner, start = [], 0
    for size in sizes:
        winner.append(start if size == 1 else max(range(start, start + size), key=lambda i: (calibrated[i], -i)))
        start += size
    best = np.fromiter((calibrated[i] for i in winner), dtype=np.float64, count=len(winner))
    weights = np.fromiter((sighted[i].weight for i in winner), dtype=np.float64, count=len(winner))
    scores = fuse(relevance, best, weights, settings)
    return RankedList(groups, sighted, winner, how, scores, pool.bm25, pool.proximity, relevance)


class RankedList(Sequence[Ranked]):
    """The ranking, best first, its entries made when first looked at.

    A retrieval reads only as far as its top_k records (explain reads all),
    so the passages below never cost an object.
    """

    def __init__(
        self, groups: list[Group], sighted: list[Candidate], winner: list[int], how: dict[str, str],
        scores: np.ndarray, bm25: np.ndarray, proximity: np.ndarray, relevance: np.ndarray,
    ) -> None:  # fmt: skip
        self._groups, self._sighted, self._winner, self._how = groups, sighted, winner, how
        self._scores, self._bm25, self._proximity, self._relevance = scores.tolist(), bm25.tolist(), proximity.tolist(), relevance.tolist()
        self._order = _order(sighted, self._winner, scores, relevance)
        self._made: dict[int, Ranked] = {}

    def __len__(self) -> int:
        return len(self._order)

    @overload
    def __getitem__(self, index: int) -> Ranked: ...
    @overload
    def __getitem__(self, index: slice) -> list[Ranked]: ...
    def __getitem__(self, index: int | slice) -> Ranked | list[Ranked]:
        if isinstance(index, slice):
            return [self._make(g) for g in self._order[index]]
        return self._make(self._order[index])

    def __iter__(self) -> Iterator[Ranked]:
        return (self._make(g) for g in self._order)

    def _make(self, g: int) -> Ranked:
        made = self._made.get(g)
        if made is not None:
            return made
        candidate = self._sighted[self._winner[g]]
        label = self._how[candidate.source]
        if candidate.calibrated is None and label != "ignored":
            label = "none"
        made = self._made[g] = Ranked(
            candidate, self._scores[g], self._bm25[g], self._proximity[g], self._relevance[g], label, self._groups[g].members
        )
        return made


def _order(sighted: list[Candidate], winner: list[int], scores: np.ndarray, relevance: np.ndarray) -> list[int]:
    """Best score first; then the gateway's own relevance; then a key that does not depend on arrival order."""
    order = np.lexsort((-relevance, -scores))
    tied = np.flatnonzero((np.diff(scores[order]) == 0) & (np.diff(relevance[order]) == 0))
    ranked = order.tolist()
    if not len(tied):
        return ranked

    def key(g: int) -> tuple[str, str, int]:
        candidate = sighted[winner[g]]
        return candidate.source, candidate.passage.document_id, candidate.passage.chunk_index

    # Runs of equal (score, relevance), common among passages the text does not match: sorted by source, document, chunk.
    run_start = previous = int(tied[0])
    for at in [*tied[1:].tolist(), -2]:
        if at != previous + 1:
            ranked[run_start : previous + 2] = sorted(ranked[run_start : previous + 2], key=key)
            run_start = at
        previous = at
    return ranked
