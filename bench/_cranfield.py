"""The Cranfield collection and the measures the quality benchmark reports."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "cranfield"


@dataclass(frozen=True)
class Doc:
    id: str
    title: str
    body: str


def load() -> tuple[list[Doc], list[tuple[str, str]], dict[str, dict[str, int]]]:
    """Documents, (query id, text) pairs, and graded judgements: query id -> doc id -> gain (4 best .. 1)."""
    docs = [Doc(str(d["id"]), (d.get("title") or "").strip(), (d.get("body") or "").strip()) for d in json.loads((DATA / "cran_docs.json").read_text())]
    queries = [(str(q["query number"]), q["query"]) for q in json.loads((DATA / "cran_queries.json").read_text())]
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    for j in json.loads((DATA / "cran_qrels.json").read_text()):
        position = int(j["position"])
        if 1 <= position <= 4:
            qrels[str(j["query_num"])][str(j["id"])] = 5 - position
    return docs, [(qid, text) for qid, text in queries if qrels.get(qid)], dict(qrels)


def ndcg_at(ranked: list[str], gains: dict[str, int], k: int = 10) -> float:
    dcg = sum((2 ** gains.get(doc, 0) - 1) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted(gains.values(), reverse=True)[:k]
    idcg = sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at(ranked: list[str], gains: dict[str, int], k: int = 10) -> float:
    return len(set(ranked[:k]) & set(gains)) / len(gains) if gains else 0.0


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
