"""The rerank alone, in a loop: CPU µs per rerank of 60 passages seen before, from three sources.

    python -m bench.rerank_micro [--baseline COMMIT] [--rounds 200] [--profile]

Twenty Cranfield queries; each source answers 20 passages in its own score convention (raw BM25-like,
scores in [0, 1], ranks only), a few texts returned by two sources. Each query's pool is ranked once to
warm the term cache, then `--rounds` times under the process clock, in five batches; the figure is the
median over the queries of the CPU time per rerank in the fastest batch (the least disturbed by other work). `--baseline` runs the same loop over an earlier commit's tree (built in
place, bench/_cpu.checkout) in a process of its own, right after this tree's, so both meet the same load.
`--profile` prints cProfile's top functions for this tree instead.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

PASSAGES_PER_SOURCE = 20
QUERIES = 20
BATCHES = 5


def workload() -> list[tuple[str, list[Any]]]:
    """(query, answers) for each query: three sources over a pool of Cranfield passages drawn per query."""
    from aggregator.ranking.rerank import Answer
    from bench._cranfield import load
    from connectors.base import Passage

    docs, queries, _ = load()
    rng = random.Random(7)
    out = []
    for _, text in queries[:QUERIES]:
        pool = rng.sample(docs, 3 * PASSAGES_PER_SOURCE - 4)
        picks = [pool[0:20], pool[20:40], pool[40:56] + pool[0:2] + pool[20:22]]  # four texts in two sources
        raw = sorted((rng.random() * 30 for _ in range(20)), reverse=True)
        unit = sorted((rng.random() for _ in range(20)), reverse=True)
        answers = [
            Answer("raw", "dify", [Passage(d.body, d.title, d.id, source_score=raw[i], source_rank=i + 1) for i, d in enumerate(picks[0])]),
            Answer("unit", "dify", [Passage(d.body, d.title, d.id, source_score=unit[i], source_rank=i + 1) for i, d in enumerate(picks[1])]),
            Answer("ranks", "http", [Passage(d.body, d.title, d.id, source_rank=i + 1) for i, d in enumerate(picks[2])]),
        ]  # fmt: skip
        out.append((text, answers))
    return out


def measure(rounds: int) -> float:
    """Median over the queries of CPU µs per rerank (passages already in the term cache)."""
    from aggregator.ranking.pool import TermCache
    from aggregator.ranking.rerank import rerank

    per_query = []
    for text, answers in workload():
        cache = TermCache()
        list(rerank(text, answers, cache))  # first sight: tokenize, sample; not measured
        batches = []
        for _ in range(BATCHES):  # the fastest batch: the least disturbed by other work on the machine
            start = time.process_time_ns()
            for _ in range(rounds // BATCHES):
                rerank(text, answers, cache)
            batches.append((time.process_time_ns() - start) / (rounds // BATCHES) / 1000)
        per_query.append(min(batches))
    return statistics.median(per_query)


def profile(rounds: int) -> None:
    from aggregator.ranking.pool import TermCache
    from aggregator.ranking.rerank import rerank

    cases = [(text, answers, TermCache()) for text, answers in workload()]
    for text, answers, cache in cases:
        rerank(text, answers, cache)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(rounds):
        for text, answers, cache in cases:
            rerank(text, answers, cache)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="also measure this commit's tree, in a process of its own")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tree", help=argparse.SUPPRESS)  # internal: the tree whose aggregator to import
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, args.tree)
        print(f"{measure(args.rounds):.1f}")
        return 0
    sys.path.insert(0, str(ROOT))
    if args.profile:
        profile(args.rounds // 10 or 1)
        return 0
    print("| tree | µs per rerank (CPU, median of 20 queries) |")
    print("| --- | ---: |")
    print(f"| this tree | {measure(args.rounds):.1f} |")
    if args.baseline:
        from bench._cpu import checkout

        with tempfile.TemporaryDirectory() as folder:
            tree = checkout(args.baseline, Path(folder) / "baseline")
            command = [sys.executable, "-m", "bench.rerank_micro", "--tree", str(tree), "--rounds", str(args.rounds)]
            found = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
            print(f"| {args.baseline} | {found} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
