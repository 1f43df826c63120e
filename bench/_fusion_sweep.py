"""The tuning grid of `bench.quality --sweep`: the real rerank replayed over the pools captured in the same run.

Each variant starts with an empty sample of passages seen and replays the
queries in the same order as the gateway did, so the collection statistics
grow the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from aggregator.ranking.bm25 import BM25Params
from aggregator.ranking.pool import TermCache
from aggregator.ranking.rerank import DEFAULT_FUSION, Answer, FusionSettings, rerank

from ._scenarios import ScenarioRun, doc_id, unique


def replay(run: ScenarioRun, queries: list[tuple[str, str]], settings: FusionSettings) -> list[list[str]]:
    cache = TermCache()
    rankings = []
    for (_, text), pool, local in zip(queries, run.pools, run.local):
        answers = [Answer(f"shard{i}", kind, list(answer), indexed=kind == "files") for i, (kind, answer) in enumerate(zip(run.kinds, pool))]
        ranked = rerank(text, answers, cache, local, settings)
        rankings.append(unique([doc_id(r.candidate.passage) for r in ranked])[:10])
    return rankings


def parts() -> list[tuple[str, FusionSettings]]:
    """What each part of the fusion adds: the defaults with one part taken away at a time."""
    d = DEFAULT_FUSION
    return [
        ("gateway (defaults)", d),
        ("IDF from the pool only (no collection statistics)", replace(d, sample=False, local=False)),
        ("IDF from the pool + local indexes", replace(d, sample=False)),
        ("IDF from the pool + sample of passages seen", replace(d, local=False)),
        ("no calibrated source score (α = 0)", replace(d, alpha=0.0)),
        ("no proximity (μ = 0)", replace(d, mu=0.0)),
        ("calibrated source score alone (α = 1)", replace(d, alpha=1.0)),
    ]


def variants() -> list[tuple[str, FusionSettings]]:
    d = DEFAULT_FUSION
    found: list[tuple[str, FusionSettings]] = [("defaults", d)]
    found += [(f"α={a}", replace(d, alpha=a)) for a in (0.0, 0.1, 0.2, 0.4, 0.5, 0.7, 1.0) if a != d.alpha]
    found += [(f"κ={k}", replace(d, kappa=k)) for k in (0.0, 1.0, 10.0, 30.0) if k != d.kappa]
    found += [(f"μ={m}", replace(d, mu=m)) for m in (0.0, 0.5, 1.0, 1.5) if m != d.mu]
    found += [(f"k1={k1} b={b}", replace(d, bm25=BM25Params(k1, b))) for k1, b in ((0.9, 0.4), (1.5, 0.75), (2.0, 0.75), (1.2, 0.5), (1.2, 0.9))]
    return found


def table(title: str, rows: list[tuple[str, FusionSettings]], runs: list[ScenarioRun], queries: list[tuple[str, str]],
          qrels: dict[str, dict[str, int]], central_ndcg: float, measure: Callable[..., Any]) -> None:  # fmt: skip
    print(f"\n{title}: nDCG@10 ratio to central per scenario, over the pools captured above (the real rerank, replayed).\n")
    names = [r.name.split(" ")[0] for r in runs]
    print("| variant | " + " | ".join(names) + " | min | spread |\n| --- |" + " ---: |" * (len(names) + 2))
    for label, settings in rows:
        ratios = [measure(replay(run, queries, settings), queries, qrels)[0] / central_ndcg for run in runs]
        print(f"| {label} | " + " | ".join(f"{r:.3f}" for r in ratios) + f" | {min(ratios):.3f} | {max(ratios) - min(ratios):.3f} |", flush=True)


def sweep(runs: list[ScenarioRun], queries: list[tuple[str, str]], qrels: dict[str, dict[str, int]], central_ndcg: float,
          measure: Callable[..., Any], grid: bool) -> None:  # fmt: skip
    table("What each part adds", parts(), runs, queries, qrels, central_ndcg, measure)
    if grid:
        table("Tuning grid", variants(), runs, queries, qrels, central_ndcg, measure)
