"""One retrieval, from a validated request to ranked records. Plain async Python, no HTTP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from connectors.base import SourceQuery, record_metadata

from aggregator.contract.outcomes import SourceResult
from aggregator.retrieval.fanout import ask_sources
from aggregator.contract.conditions import compile_filter
from aggregator.contract.models import RetrievalRequest
from aggregator.retrieval.embeddings import NAME as JUDGE, Judge, drop
from aggregator.ranking.rerank import DEFAULT_FUSION, Answer, Candidate, Ranked, rerank
from aggregator.retrieval.rerank_model import stage_detail
from aggregator.ranking.statistics import merge_term_statistics
from aggregator.text.tokenize import tokenize

if TYPE_CHECKING:  # the gateway runs retrievals; a retrieval only reads the gateway it is given
    from aggregator.runtime.gateway import Gateway

log = logging.getLogger(__name__)

#: Candidates asked of each source: enough for the rerank to reorder, never fewer than this.
MIN_CANDIDATES = 20
CANDIDATES_PER_RESULT = 4
SCORE_DIGITS = 6


class UnknownKnowledgeBase(LookupError):
    pass


@dataclass(slots=True)
class Verdict:
    """What became of one distinct passage after ranking: a record, or why not."""

    ranked: Ranked
    score: float  # as the answer would carry it (rounded)
    outcome: str  # record, below threshold, score 0, beyond top_k
    position: int | None = None  # 1-based place among the records


@dataclass(slots=True)
class RetrievalTrace:
    """Everything a retrieval decided, for `explain`: kept only when asked for."""

    removed: list[Candidate]  # passages that metadata_condition filtered out
    verdicts: list[Verdict]  # every distinct passage, best first


@dataclass(slots=True)
class RetrievalResult:
    records: list[dict]
    sources: list[SourceResult]
    trace: RetrievalTrace | None = None

    def sources_header(self) -> str:
        """`X-Sources`: `name=outcome;name=outcome`, in the knowledge base's order, then the stages (`rerank=ok`)."""
        return ";".join(f"{s.name}={s.outcome}" for s in self.sources)


async def retrieve(gateway: Gateway, request: RetrievalRequest, explain: bool = False) -> RetrievalResult:
    """Fan out, filter, merge, rerank, cut. Raises UnknownKnowledgeBase.

    With `explain`, the result also carries what became of every passage (the same path, nothing recomputed).
    """
    knowledge_base = gateway.config.knowledge_bases.get(request.knowledge_id)
    if knowledge_base is None:
        raise UnknownKnowledgeBase(request.knowledge_id)
    accepts = compile_filter(request.metadata_condition)
    setting = request.retrieval_setting
    if setting.top_k == 0:  # asks for nothing: answered without bothering a source
        return RetrievalResult([], [], RetrievalTrace([], []) if explain else None)
    query = SourceQuery(
        text=request.query,
        limit=max(MIN_CANDIDATES, setting.top_k * CANDIDATES_PER_RESULT),
        metadata_condition=request.metadata_condition.model_dump() if request.metadata_condition else None,
        accepts=accepts,
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + gateway.config.server.deadline_s
    slots = [gateway.slots[name] for name in dict.fromkeys(knowledge_base.connectors)]
    model = gateway.rerank_models.get(request.knowledge_id)  # a second stage, its time kept out of the sources' share
    judge = gateway.judge(request.knowledge_id)
    # The rerank model's budget is kept out of what the sources and the judge may use, so it always has it.
    until = deadline - (model.reserve_s if model is not None else 0.0)
    started = judge.start(request.query, until) if judge is not None else None  # the query's vector, beside the sources
    results = await ask_sources(slots, query, until)

    # Indexed sources know their whole collection: the rerank's IDF uses it (whether they answered or not).
    terms = tokenize(request.query)
    reported = {slot.connector.name: slot.connector.term_statistics(terms) for slot in slots}
    local = merge_term_statistics(reported.values())

    answers: list[Answer] = []
    removed: list[Candidate] = []
    for result in results:
        connector = gateway.slots[result.name].connector
        settings = connector.settings
        passages = result.passages
        metadata = None
        # Built now only when a filter or `explain` reads it; otherwise for the records alone, at the end.
        if accepts is not None or explain:
            metadata = [record_metadata(p, connector.name, connector.type) for p in passages]
            if accepts is not None:
                keep = [accepts(m) for m in metadata]
                if explain:
                    removed += [Candidate(p, connector.name, connector.type, settings.weight, m)
                                for p, m, k in zip(passages, metadata, keep) if not k]  # fmt: skip
                passages = [p for p, k in zip(passages, keep) if k]
                metadata = [m for m, k in zip(metadata, keep) if k]
        indexed = reported.get(connector.name) is not None
        answers.append(Answer(connector.name, connector.type, passages, settings.weight, settings.scores, indexed, metadata,
                              connector.semantic))  # fmt: skip

    meaning = None
    if judge is not None:  # its outcome reported as a source's (`embeddings=ok`), after the sources
        meaning = await judge_meaning(judge, started, answers, until, results, request.query)

    records: list[dict] = []
    verdicts: list[Verdict] | None = [] if explain else None
    sampled = [name for name, stats in reported.items() if stats is None]
    fusion = judge.fusion if meaning is not None else DEFAULT_FUSION  # type: ignore[union-attr]
    ranking: Iterable[Ranked] = rerank(request.query, answers, gateway.term_cache, local, fusion, sampled, query_terms=terms, meaning=meaning)
    if model is not None:  # the model's order and scores, or the fusion's when it fails; its outcome reported as a source's
        ranking, stage = await model.reorder(request.query, ranking, deadline)
        results.append(stage)
    for ranked in ranking:
        score = round(ranked.score, SCORE_DIGITS)
        if score <= 0.0:
            outcome = "score 0"
        elif score < setting.score_threshold:
            outcome = "below threshold"
        elif len(records) >= setting.top_k:
            outcome = "beyond top_k"
        else:
            outcome = "record"
            candidate = ranked.candidate
            passage = candidate.passage
            metadata = candidate.metadata if candidate.metadata is not None else record_metadata(passage, candidate.source, candidate.source_type)
            if also_in := ranked.also_in:
                metadata["also_in"] = also_in
            metadata["score_detail"] = score_detail(ranked)
            records.append({"content": passage.content, "score": score, "title": passage.title, "metadata": metadata})
        if verdicts is None:
            if len(records) >= setting.top_k:
                break
            continue
        verdicts.append(Verdict(ranked, score, outcome, len(records) if outcome == "record" else None))
    return RetrievalResult(records, results, None if verdicts is None else RetrievalTrace(removed, verdicts))


async def judge_meaning(judge: Judge, started: Any, answers: list[Answer], deadline: float, results: list[SourceResult],
                        query: str | None = None) -> dict[str, float] | None:  # fmt: skip
    """The embedding judge's meaning of every passage (None when it failed: the ranking is then by words, as
    without a judge); its outcome is appended to `results` as a pseudo-source's (`embeddings=...`)."""
    texts = [p.content for a in answers for p in a.passages]
    if not texts:
        drop(started)
        return None
    judgement = await judge.judge(started, texts, deadline, query)
    results.append(SourceResult(JUDGE, judgement.outcome, [], judgement.elapsed_ms, judgement.error, 1))
    return judgement.meaning


def score_detail(ranked: Ranked) -> dict[str, float | int | str | None]:
    """How a record's score came to be: the gateway's own judgement, and the source's, before and after calibration."""
    passage = ranked.candidate.passage
    calibrated = ranked.calibrated
    detail: dict[str, float | int | str | None] = {
        "bm25": round(ranked.bm25, SCORE_DIGITS),
        "proximity": round(ranked.proximity, SCORE_DIGITS),
        "relevance": round(ranked.relevance, SCORE_DIGITS),
        "source_score": passage.source_score,
        "source_rank": passage.source_rank,
        "calibrated": None if calibrated is None else round(calibrated, SCORE_DIGITS),
        "calibration": ranked.calibration,
        **stage_detail(ranked),
    }
    if ranked.meaning is not None:  # the embedding judge's similarity, on [0, 1]
        detail["meaning"] = round(ranked.meaning, SCORE_DIGITS)
    if ranked.confidence is not None:  # a semantic source's own confidence, which set the score (no judge)
        detail["confidence"] = round(ranked.confidence, SCORE_DIGITS)
    return detail
