"""The rerank's outputs on random pools, against values stored when the maths was last changed on purpose.

A speed-up of the rerank must not change what it decides: every case below
(random texts, queries with repeated, unknown and paired words, sources in
every score convention, weights, copies of one text in several sources,
collection statistics or none) is ranked and compared with
`data/ranking_golden.json`: the same order, and every number within 1e-12.
The stored values were made by the implementation before the speed-up
(main at 07a3a5c): `python -m tests.test_ranking_golden --write` writes them
again, for a change to the formula that is meant.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from aggregator.ranking.pool import TermCache
from aggregator.ranking.rerank import Answer, rerank
from connectors.base import Passage, TermStatistics

GOLDEN = Path(__file__).parent / "data" / "ranking_golden.json"
CASES = 60
WORDS = [f"w{i}" for i in range(40)] + ["the", "of", "speed", "aircraft", "wing", "flow"]


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 40)))


def _answer(rng: random.Random, source: str, texts: list[str]) -> Answer:
    """One source's answer in a convention drawn at random: scores up or down the list, none, ranks only, ties."""
    n = len(texts)
    convention = rng.choice(["descending", "raw", "distance", "none", "equal", "some-none", "no-rank"])
    if convention == "descending":
        scores: list[float | None] = sorted((rng.random() for _ in range(n)), reverse=True)
    elif convention == "raw":
        scores = [rng.random() * 40 - 5 for _ in range(n)]
    elif convention == "distance":
        scores = sorted(rng.random() * 2 for _ in range(n))
    elif convention == "equal":
        scores = [1.0] * n
    elif convention == "some-none":
        scores = [None if rng.random() < 0.3 else rng.random() for _ in range(n)]
    else:
        scores = [None] * n if convention == "none" else [rng.random() for _ in range(n)]
    ranks = [None] * n if convention == "no-rank" else rng.sample(range(1, n + 1), n) if rng.random() < 0.2 else list(range(1, n + 1))
    passages = [Passage(t, f"title {rng.randint(0, 3)}" if rng.random() < 0.3 else "", f"{source}-d{i % 5}", chunk_index=i, source_score=s,
                        source_rank=r) for i, (t, s, r) in enumerate(zip(texts, scores, ranks))]  # fmt: skip
    use = rng.choice(["auto"] * 6 + ["rank", "trust", "ignore"])
    weight = rng.choice([1.0, 1.0, 1.0, 0.5, 2.0])
    return Answer(source, "dify", passages, weight=weight, scores=use, indexed=rng.random() < 0.2)  # type: ignore[arg-type]


def _case(seed: int) -> tuple[str, list[Answer], TermStatistics | None, int]:
    rng = random.Random(seed)
    shared = [_text(rng) for _ in range(rng.randint(0, 6))]  # texts several sources return
    answers = []
    for s in range(rng.randint(1, 4)):
        texts = [rng.choice(shared) if shared and rng.random() < 0.25 else _text(rng) for _ in range(rng.randint(0, 25))]
        answers.append(_answer(rng, f"s{s}", texts))
    query = " ".join(rng.choice(WORDS + ["unknownword", "w1 w2", "speed of the aircraft"]) for _ in range(rng.randint(0, 12)))
    local = None
    if rng.random() < 0.4:
        local = TermStatistics(passages=rng.randint(1, 2000), total_length=rng.randint(1, 200_000),
                               frequencies={w: rng.randint(0, 50) for w in rng.sample(WORDS, 20)})  # fmt: skip
    return query, answers, local, rng.randint(1, 3)


def _outputs(seed: int) -> list[list[Any]]:
    """What the rerank decides for case `seed`, ranked a few times with one term cache (samples grow between)."""
    query, answers, local, repeats = _case(seed)
    cache = TermCache()
    out = []
    for _ in range(repeats):
        ranked = rerank(query, answers, cache, local=local)
    for r in ranked:
        out.append([r.candidate.source, r.candidate.passage.document_id, r.candidate.passage.chunk_index, r.score, r.bm25, r.proximity,
                    r.relevance, r.calibrated, r.calibration, r.also_in])  # fmt: skip
    return out


def _golden() -> dict[str, list[list[Any]]]:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("seed", range(CASES))
def test_the_rerank_decides_what_it_decided_before(seed: int) -> None:
    expected, found = _golden()[str(seed)], _outputs(seed)
    assert [row[:3] for row in found] == [row[:3] for row in expected]  # the same order
    for got, want in zip(found, expected):
        for a, b in zip(got[3:], want[3:]):
            if isinstance(b, float):
                assert a == pytest.approx(b, abs=1e-12, rel=0)
            else:
                assert a == b


def test_the_golden_cases_cover_every_convention() -> None:
    """The stored cases are not all trivial: every calibration is met, pairs score, sources share texts."""
    rows = [row for seed in range(CASES) for row in _golden()[str(seed)]]
    assert {row[8] for row in rows} == {"scores", "ranks", "trusted", "ignored", "none"}
    assert any(row[5] > 0 for row in rows) and any(row[9] for row in rows) and len(rows) > 500


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({str(seed): _outputs(seed) for seed in range(CASES)}, indent=None, separators=(",", ":")) + "\n")
