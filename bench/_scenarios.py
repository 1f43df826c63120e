"""What bench/quality.py and the fusion sweep both read: a scenario's run and the Cranfield ids of passages."""

from __future__ import annotations

from dataclasses import dataclass, field

from connectors.base import Passage, TermStatistics


def doc_id(passage: Passage) -> str:
    return passage.document_id.removesuffix(".md")


def unique(ids: list[str]) -> list[str]:
    return list(dict.fromkeys(ids))


@dataclass
class ScenarioRun:
    name: str
    rankings: dict[str, list[list[str]]] = field(default_factory=dict)
    answers: list[list[tuple[str, float]]] = field(default_factory=list)  # the gateway's (doc, score), for thresholds
    pools: list[list[list[Passage]]] = field(default_factory=list)  # per query, per source, what it returned
    kinds: list[str] = field(default_factory=list)
    local: list[TermStatistics | None] = field(default_factory=list)  # per query, what the indexed sources reported
    shares: dict[str, float] = field(default_factory=dict)  # share of the gateway's top-10 slots per source
    seconds: float = 0.0
