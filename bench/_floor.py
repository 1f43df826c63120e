"""The gateway with its rerank replaced by a sort on the sources' own scores: the floor of everything else.

Run as `python -m bench._floor serve --config ... --port ...` (one process: `--workers` would start
workers without the replacement). `bench.perf --only cpu --floor` and `bench.load --compare --floor`
measure it beside this tree's gateway, so the gap between the two is what the ranking (term cache,
BM25, calibration, fusion) costs and the gap to the bare fan-out is what the rest of the gateway
costs: request checks, fan-out with deadlines and breakers, decoding, records, metrics, logs.

Its records are not the gateway's ranking: for measuring cost only.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any

from aggregator.retrieval import pipeline
from aggregator.ranking.rerank import Answer, Candidate, Ranked


def sort_by_source_score(query: str, answers: Sequence[Answer], *args: Any, **kwargs: Any) -> Iterator[Ranked]:
    """Every passage, best source score first: no term cache, no BM25, no calibration, no fusion."""
    flat = [(passage, answer) for answer in answers for passage in answer.passages]
    flat.sort(key=lambda pair: -(pair[0].source_score or 0.0))
    for passage, answer in flat:
        candidate = Candidate(passage, answer.source, answer.source_type, answer.weight, None, passage.source_score)
        yield Ranked(candidate, passage.source_score or 0.0, 0.0, 0.0, 0.0, "trusted", [candidate])


if __name__ == "__main__":
    if "--workers" in sys.argv:
        sys.exit("bench._floor runs one process: worker processes would import the gateway without the replacement")
    pipeline.rerank = sort_by_source_score  # type: ignore[assignment]  # the name the pipeline calls
    from aggregator.cli import main

    sys.exit(main())
