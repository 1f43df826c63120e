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
import operator
from array import array
from bisect import bisect_right
from dataclasses import dataclass, field, replace
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, overload

import numpy as np

from connectors.base import Passage, TermStatistics

from aggregator.text.tokenize import tokenize
from aggregator.ranking.bm25 import BM25Params
from aggregator.ranking.pool import QueryPlan, Seen, TermCache, score_pool
from aggregator.ranking.statistics import QueryStatistics

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
    meaning: float = 0.5  # weight of the embedding judge's similarity in the relevance, when there is a judge
    combine: str = "or"  # or: 1 − (1 − words)(1 − w·meaning), relevant by words or meaning; mix: (1 − w)·words + w·meaning
    rank_confidence: float = 0.5  # a semantic source's confidence in its best passage when it gives no score in [0, 1]
    confidence_discount: bool = True  # a semantic source's confidence counts less down its list: × 1/log2(1 + place)
    confidence_top: int = 0  # only its first so many passages get a floor (0: all)
    judged_confidence_top: int = 1  # with a judge, a semantic source's first so many passages still get it where the
    # judge saw neither words nor meaning in them (0: none)
    judged_agreement: bool = True  # ... and, where it saw some, as far as the judge agrees: the confidence × the
    # passage's meaning over the best meaning in the pool (the judge's favourite keeps all of it)


DEFAULT_FUSION = FusionSettings()


@dataclass(slots=True)
class Answer:
    """One source's passages as the rerank takes them: in the source's own order, with how to read its scores."""

    source: str
    source_type: str
    passages: list[Passage]
    weight: float = 1.0
    scores: ScoreUse = "auto"
    indexed: bool = False  # from a source whose collection statistics are already counted (no sampling)
    metadata: list[dict[str, Any]] | None = None  # record metadata per passage, when the pipeline built it (filters, explain)
    semantic: bool = False  # retrieved by meaning: without a judge, its own confidence is a floor under its passages' scores


@dataclass(slots=True)
class Candidate:
    """One passage of one source after the rerank, as records and explain read it."""

    passage: Passage
    source: str
    source_type: str
    weight: float = 1.0
    metadata: dict[str, Any] | None = None  # record metadata, when the pipeline built it
    calibrated: float | None = None  # this source's opinion on the gateway's scale (None: it gave none)


@dataclass(slots=True)
class Ranked:
    candidate: Candidate
    score: float
    bm25: float
    proximity: float
    relevance: float = 0.0
    calibration: str = "none"  # how the source's score was mapped: scores, ranks, trusted, ignored, none
    members: list[Candidate] = field(default_factory=list)  # every source's copy of this text, the winner among them
    meaning: float | None = None  # the embedding judge's similarity on [0, 1], when a judge scored the pool
    confidence: float | None = None  # a semantic source's own confidence, when it lifted the score (no judge)

    @property
    def calibrated(self) -> float | None:
        """The winning copy's calibrated source score: what the fusion used."""
        return self.candidate.calibrated

    @property
    def also_in(self) -> list[str]:
        """The other sources that returned the same text (for the record's `metadata.also_in`)."""
        if len(self.members) == 1:
            return []
        return [s for s in dict.fromkeys(m.source for m in self.members) if s != self.candidate.source]


def _positions(use: ScoreUse, scores: list[float | None], ranks: list[int]) -> tuple[list[float], str]:
    """Each passage's position in [0, 1] in its source's answer (1 = the best), and whether scores or ranks gave it.

    Scores that grow down the source's ranked list are distances (lower is better) and are read that way
    round. Plain Python: a source's answer is a few dozen passages, where numpy's per-call cost dominates.
    Most answers arrive in their ranks' order, so the sort by rank is skipped for them.
    """
    n = len(scores)
    in_rank_order = ranks == sorted(ranks)
    order = range(n) if in_rank_order else sorted(range(n), key=ranks.__getitem__)  # stable: arrival order among equal ranks
    if use != "rank" and n > 1 and None not in scores:
        low, high = min(scores), max(scores)  # type: ignore[type-var]
        if high > low:
            span = high - low
            if _NO_RANK not in ranks and _rising(scores if in_rank_order else [scores[i] for i in order]):  # type: ignore[arg-type]
                return [(high - x) / span for x in scores], "scores"  # type: ignore[operator]
            return [(x - low) / span for x in scores], "scores"  # type: ignore[operator]
    if n == 1:
        return [1.0], "ranks"
    floor = 1.0 / math.log2(n + 1)  # the discount of DCG: relevance falls fast at the top of a list, then slowly
    by_place = [(1.0 / math.log2(place + 2) - floor) / (1.0 - floor) for place in range(n)]
    if in_rank_order:
        return by_place, "ranks"
    position = [0.0] * n
    for place, i in enumerate(order):
        position[i] = by_place[place]
    return position, "ranks"


def _rising(in_order: list[float]) -> bool:
    """Whether scores grow down a ranked list more often than they fall (distances); most lists fall all the way."""
    if in_order == sorted(in_order, reverse=True):
        return False
    after = in_order[1:]
    return sum(map(operator.gt, after, in_order)) > sum(map(operator.lt, after, in_order))


_NO_RANK = 2**31


def _calibrate(use: ScoreUse, scores: list[float | None], ranks: list[int], relevance: list[float], kappa: float) -> tuple[list[float], str]:
    """One source's scores on the gateway's scale (-1 where it has none), and how they were obtained.

    Fits relevance ≈ a + β·position by least squares over the source's
    passages, with β ≥ 0 shrunk by n / (n + κ): with few passages, or an
    order that disagrees with the text, the line flattens toward the mean
    relevance of what the source returned.
    """
    if use == "ignore":
        return [-1.0] * len(scores), "ignored"
    if use == "trust":
        return [-1.0 if x is None else min(1.0, max(0.0, x)) for x in scores], "trusted"
    x, how = _positions(use, scores, ranks)
    n = len(x)
    # fsum: exactly rounded, so the fit does not depend on the order the passages arrived in
    mean_x, mean_y = math.fsum(x) / n, math.fsum(relevance) / n
    dx = [a - mean_x for a in x]
    spread = math.fsum(map(operator.mul, dx, dx))
    covariance = math.fsum(map(operator.mul, dx, [b - mean_y for b in relevance]))
    slope = max(0.0, covariance / spread) * n / (n + kappa) if spread > 0 else 0.0
    intercept = mean_y - slope * mean_x
    line = [intercept + slope * a for a in x]
    if 0.0 < min(line) and max(line) <= 1.0:  # the usual case: nothing to clamp
        return line, how
    return [min(1.0, max(0.0, y)) for y in line], how


def query_statistics(
    plan: QueryPlan, cache: TermCache, local: TermStatistics | None, sampled: Iterable[str], settings: FusionSettings
) -> QueryStatistics | None:
    """Collection statistics for the query's distinct terms: the local indexes' counts plus the samples of `sampled` sources."""
    passages = total = 0.0
    frequencies = [0.0] * len(plan.terms)
    if settings.local and local is not None and local.passages:
        passages += local.passages
        total += local.total_length
        frequencies = [f + local.frequencies.get(t, 0) for f, t in zip(frequencies, plan.terms)]
    if settings.sample:
        for source in sampled:
            sample = cache.samples.get(source)
            if sample is not None and sample.passages:
                passages += sample.passages
                total += sample.total_length
                frequencies = list(map(operator.add, frequencies, sample.frequencies(plan.ids)))
    if passages <= 0:
        return None
    return QueryStatistics(passages, total / passages, array("d", frequencies))


def fuse(relevance: Any, calibrated: Any, weight: Any, settings: FusionSettings = DEFAULT_FUSION) -> np.ndarray:
    """The final score from the gateway's relevance and the source's calibrated score, on numbers or arrays.

    A calibrated value below 0 (or None) means the source gave none: the relevance alone counts.
    """
    source = np.asarray(-1.0 if calibrated is None else calibrated, dtype=np.float64)
    fused = (1.0 - settings.alpha) * np.asarray(relevance, dtype=np.float64) + settings.alpha * source
    if source.min() < 0.0:  # some have none (the test costs less than the selection it saves, where all have one)
        fused = np.where(source >= 0.0, fused, relevance)
    spread = 1.0 - fused.clip(0.0, 1.0) ** settings.gamma
    if not (isinstance(weight, float) and weight == 1.0):  # x ** 1.0 is x
        spread = spread ** np.asarray(weight, dtype=np.float64)
    return 1.0 - spread


def rerank(
    query: str, answers: Sequence[Answer], cache: TermCache | None = None, local: TermStatistics | None = None,
    settings: FusionSettings = DEFAULT_FUSION, sampled: Iterable[str] | None = None, compiled: bool = True,
    query_terms: list[str] | None = None, meaning: Mapping[str, float] | None = None,
) -> Sequence[Ranked]:  # fmt: skip
    """Merge identical texts, score each distinct passage, calibrate each source, fuse and sort (best first).

    `local` holds the collection statistics of the query's terms reported by
    the knowledge base's indexed sources (their answers are marked
    `indexed`). Every other answer's passages are counted into its source's
    sample, and the samples of the `sampled` sources (by default, the
    answers' sources that are not indexed) join the statistics.
    `query_terms`: the query already tokenized, when the caller has it.
    `meaning`: the embedding judge's similarity on [0, 1] of each passage's text (by content), when a judge
    scored the pool: relevance becomes 1 − (1 − lexical)·(1 − w·meaning) before calibration. Without it, the
    passages of `semantic` answers keep at least the score their source's own confidence supports.

    A retrieval ranks a few dozen passages, where per-passage interpreter
    overhead is the cost: the work is done a source's answer at a time, in
    list comprehensions. `compiled=False` counts the pool's terms with numpy
    instead of the compiled `_kernel` (pool.score_pool): the same ranking.
    """
    answers = _one_per_source(answers)
    if not answers:
        return []
    cache = cache or TermCache(capacity=sum(len(a.passages) for a in answers))
    seen = []
    for answer in answers:
        found = cache.recall(answer.passages)
        if not answer.indexed:
            cache.count(answer.source, found)
        seen += found
    if sampled is None:
        sampled = [a.source for a in answers if not a.indexed]

    group_of, first, copies = _groups(seen)

    plan = QueryPlan(tokenize(query) if query_terms is None else query_terms, cache.vocabulary)
    statistics = query_statistics(plan, cache, local, sampled, settings)
    pool = score_pool(plan, [seen[i].ids for i in first], cache, settings.bm25, statistics, compiled)
    relevance = (pool.bm25 + settings.mu * pool.proximity) / (1.0 + settings.mu) if pool.has_pairs else pool.bm25
    similarity: list[float] | None = None
    if meaning is not None:
        flat = [p.content for a in answers for p in a.passages]
        similarity = [meaning.get(flat[i], 0.0) for i in first]
        if settings.combine == "or":
            relevance = 1.0 - (1.0 - relevance) * (1.0 - settings.meaning * np.asarray(similarity))
        else:
            relevance = (1.0 - settings.meaning) * relevance + settings.meaning * np.asarray(similarity)
    rel = relevance.tolist()

    fusion = _fuse(answers, relevance, group_of, first, copies, settings)
    confidence = None
    if any(a.semantic for a in answers):
        if meaning is None:
            confidence = _semantic_floor(answers, fusion, group_of, relevance, settings)
        elif settings.judged_confidence_top:  # a judge that cannot read the source's language must not empty it
            top = replace(settings, confidence_top=settings.judged_confidence_top)
            confidence = _semantic_floor(answers, fusion, group_of, relevance, top, blind=True, similarity=similarity)
    return RankedList(_Pool(answers, fusion.calibrated), fusion, copies, pool.bm25.tolist(), pool.proximity.tolist(), rel,
                      similarity, confidence)  # fmt: skip


def _confidence(passages: list[Passage], settings: FusionSettings) -> list[float]:
    """A semantic source's confidence in each of its passages, on [0, 1]: its scores when they are similarities
    (all in [0, 1], best first), else its order, from `rank_confidence` for its best passage down to 0; discounted
    down its list like DCG (its first passage keeps all of it), and none past `confidence_top`."""
    scores = [p.source_score for p in passages]
    ranks = [p.source_rank or _NO_RANK for p in passages]
    order = sorted(range(len(scores)), key=ranks.__getitem__)
    values: list[float] | None = None
    if None not in scores and all(0.0 <= x <= 1.0 for x in scores):  # type: ignore[operator]
        ordered = [scores[i] for i in order]
        if all(a >= b for a, b in zip(ordered, ordered[1:])) or _NO_RANK in ranks:
            values = scores  # type: ignore[assignment]
    if values is None:
        position, _ = _positions("rank", scores, ranks)
        values = [settings.rank_confidence * x for x in position]
    out = [0.0] * len(values)
    for place, i in enumerate(order):
        if settings.confidence_top and place >= settings.confidence_top:
            break
        out[i] = values[i] / math.log2(place + 2) if settings.confidence_discount else values[i]
    return out


def _semantic_floor(answers: list[Answer], fusion: "_Fusion", group_of: list[int], relevance: np.ndarray,
                    settings: FusionSettings, blind: bool = False, similarity: list[float] | None = None) -> list[float | None]:  # fmt: skip
    """Without a judge the gateway cannot read meaning: a semantic source's passage scores at least what the
    source's own confidence supports (bent by its weight like any score), so a paraphrase it ranks first is
    not scored 0 for lacking the query's words. With `blind` (a judge): texts the gateway found no relevance
    in at all (a judge that cannot read their language) keep it whole; the others, with `judged_agreement`,
    as far as the judge agrees (its meaning of the text over the best meaning it saw in the pool), so two
    retrievers by meaning that agree on a passage keep it above a threshold the source's confidence passes.
    Changes `fusion` in place; returns each text's floor where it lifted it."""
    floors: list[float | None] = [None] * len(fusion.scores)
    best = max(similarity) if similarity and settings.judged_agreement else 0.0
    at = 0
    for answer in answers:
        n = len(answer.passages)
        if answer.semantic:
            for g, value in zip(group_of[at : at + n], _confidence(answer.passages, settings)):
                if blind and relevance[g] > 0.0:
                    if best <= 0.0:
                        continue
                    value *= similarity[g] / best  # type: ignore[index]
                lifted = 1.0 - (1.0 - value) ** answer.weight
                if lifted > fusion.scores[g] and lifted > (floors[g] or 0.0):
                    floors[g] = lifted
        at += n
    if not any(f is not None for f in floors):
        return floors
    fusion.scores = [s if f is None else f for s, f in zip(fusion.scores, floors)]
    fusion.order, fusion.tied = _order(np.asarray(fusion.scores), relevance)
    return floors


@dataclass(slots=True)
class _Fusion:
    """What calibration and fusion decided (flat passage numbers: the answers one after the other)."""

    calibrated: list[float]  # per passage: its source's opinion on the gateway's scale, -1 where none
    how: dict[str, str]  # per source: how its scores were mapped
    winner: list[int]  # per text: the passage that speaks for it
    scores: list[float]  # per text: the fused score
    order: list[int]  # texts, best first by score, then relevance, then number
    tied: list[int]  # the places i in `order` whose text has the same score and relevance as the one at i + 1

    @property
    def ties(self) -> bool:
        """Whether some neighbours in `order` have equal score and relevance."""
        return bool(self.tied)


def _fuse(
    answers: list[Answer], relevance: np.ndarray, group_of: list[int], first: list[int], copies: dict[int, list[int]], settings: FusionSettings
) -> _Fusion:  # fmt: skip
    """Each source's calibration, the fused score of each text and their order."""
    rel = relevance.tolist()
    calibrated: list[float] = []
    how: dict[str, str] = {}
    kappa = settings.kappa
    for answer in answers:  # each source's calibration, fitted over its own passages
        passages = answer.passages
        at = len(calibrated)
        own_relevance = rel[at : at + len(passages)] if not copies else [rel[g] for g in group_of[at : at + len(passages)]]
        ranks = [p.source_rank or _NO_RANK for p in passages]
        values, how[answer.source] = _calibrate(answer.scores, [p.source_score for p in passages], ranks, own_relevance, kappa)
        calibrated += values
    winner = first.copy()  # the copy that vouches most for a text speaks for it (the first on a tie)
    for g, members in copies.items():
        winner[g] = max(members, key=lambda i: (calibrated[i], -i))
    best = [calibrated[i] for i in winner]
    if all(a.weight == 1.0 for a in answers):
        weights: Any = 1.0
    else:
        pool = _Pool(answers, calibrated)
        weights = [pool.answer_of(i).weight for i in winner]
    scores = fuse(relevance, best, weights, settings)
    order, tied = _order(scores, relevance)
    return _Fusion(calibrated, how, winner, scores.tolist(), order, tied)


def _order(scores: np.ndarray, relevance: np.ndarray) -> tuple[list[int], list[int]]:
    """Texts best first by score, then relevance, then number; and the places in that order whose text ties
    (equal score and relevance) with the next one, for `_break_ties`."""
    order = np.lexsort((-relevance, -scores))
    ranked_scores, ranked_relevance = scores[order], relevance[order]
    tied = np.flatnonzero((ranked_scores[1:] == ranked_scores[:-1]) & (ranked_relevance[1:] == ranked_relevance[:-1]))
    return order.tolist(), tied.tolist()


def _groups(seen: list[Seen]) -> tuple[list[int], list[int], dict[int, list[int]]]:
    """Copies of one text (after folding) form a group, numbered in order of first appearance.

    Returns each passage's group, each group's first passage, and the passages of the groups with several copies.
    """
    firsts: dict[str, int] = {}
    first_of = list(map(firsts.setdefault, [entry.key for entry in seen], range(len(seen))))
    first = list(firsts.values())
    copies: dict[int, list[int]] = {}
    if len(first) == len(seen):  # the usual case: no text twice
        return first, first, copies
    number = dict(zip(first, range(len(first))))
    group_of = list(map(number.__getitem__, first_of))
    for i in [i for i, f in enumerate(first_of) if f != i]:
        copies.setdefault(group_of[i], [first_of[i]]).append(i)
    return group_of, first, copies


def _one_per_source(answers: Sequence[Answer]) -> list[Answer]:
    """Non-empty answers, one per source: two answers of one source are calibrated as one list."""
    merged: dict[str, Answer] = {}
    for answer in answers:
        if not answer.passages:
            continue
        earlier = merged.get(answer.source)
        if earlier is None:
            merged[answer.source] = answer
            continue
        metadata = None
        if earlier.metadata is not None or answer.metadata is not None:
            metadata = (earlier.metadata or [None] * len(earlier.passages)) + (answer.metadata or [None] * len(answer.passages))  # type: ignore[operator]
        merged[answer.source] = Answer(earlier.source, earlier.source_type, earlier.passages + answer.passages, earlier.weight,
                                       earlier.scores, earlier.indexed, metadata, earlier.semantic)  # fmt: skip
    return list(merged.values())


class _Pool:
    """The answers' passages by one flat number, made into Candidates only when looked at."""

    def __init__(self, answers: list[Answer], calibrated: list[float]) -> None:
        self.answers, self.calibrated = answers, calibrated
        self.starts = [0]
        for answer in answers[:-1]:
            self.starts.append(self.starts[-1] + len(answer.passages))

    def _locate(self, i: int) -> tuple[Answer, int]:
        """The answer passage `i` is in, and its place there."""
        k = bisect_right(self.starts, i) - 1
        return self.answers[k], i - self.starts[k]

    def answer_of(self, i: int) -> Answer:
        return self._locate(i)[0]

    def tie_keys(self, flat: list[int]) -> list[tuple[str, str, int]]:
        """(source, document, chunk) of each of the passages `flat`: the tie-break's key, in one call."""
        starts, answers = self.starts, self.answers
        keys = []
        for i in flat:
            k = bisect_right(starts, i) - 1
            answer = answers[k]
            passage = answer.passages[i - starts[k]]
            keys.append((answer.source, passage.document_id, passage.chunk_index))
        return keys

    def candidate(self, i: int) -> Candidate:
        answer, j = self._locate(i)
        value = self.calibrated[i]
        metadata = answer.metadata[j] if answer.metadata is not None else None
        return Candidate(answer.passages[j], answer.source, answer.source_type, answer.weight, metadata,
                         value if value >= 0.0 else None)  # fmt: skip


class RankedList(Sequence[Ranked]):
    """The ranking, best first, its entries made when first looked at.

    A retrieval reads only as far as its top_k records (explain reads all),
    so the passages below never cost an object.
    """

    def __init__(self, pool: _Pool, fusion: _Fusion, copies: dict[int, list[int]], bm25: list[float], proximity: list[float], relevance: list[float],
                 meaning: list[float] | None = None, confidence: list[float | None] | None = None) -> None:  # fmt: skip
        self._pool, self._winner, self._copies, self._how = pool, fusion.winner, copies, fusion.how
        self._meaning, self._confidence = meaning, confidence
        self._scores, self._bm25, self._proximity, self._relevance = fusion.scores, bm25, proximity, relevance
        self._order = _break_ties(pool, fusion) if fusion.tied else fusion.order
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
        w = self._winner[g]
        copies = self._copies.get(g)
        if copies is None:
            candidate = self._pool.candidate(w)
            members = [candidate]
        else:
            members = [self._pool.candidate(i) for i in copies]
            candidate = members[copies.index(w)]
        label = self._how[candidate.source]
        if candidate.calibrated is None and label != "ignored":
            label = "none"
        made = self._made[g] = Ranked(candidate, self._scores[g], self._bm25[g], self._proximity[g], self._relevance[g], label, members,
                                      None if self._meaning is None else self._meaning[g],
                                      None if self._confidence is None else self._confidence[g])  # fmt: skip
        return made


def _break_ties(pool: _Pool, fusion: _Fusion) -> list[int]:
    """Runs of equal (score, relevance), common among passages the text does not match, sorted by source, document
    and chunk: a key that does not depend on the order the passages arrived in."""
    ranked, tied, winner = fusion.order.copy(), fusion.tied, fusion.winner
    start = tied[0]
    for at, following in zip(tied, tied[1:] + [-1]):  # a run is places start .. at + 1, when the next tied place is not at + 1
        if following != at + 1:
            run = ranked[start : at + 2]
            keys = pool.tie_keys([winner[g] for g in run])
            ranked[start : at + 2] = [g for _, g in sorted(zip(keys, run), key=_first)]
            start = following
    return ranked


_first = operator.itemgetter(0)
