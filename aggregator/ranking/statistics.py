"""Collection statistics for the rerank: how rare each query term is beyond the pool of candidates.

The pool alone is a poor judge of rarity: its candidates were picked because
they contain the query's words, so every query term looks common in it (on
Cranfield, BM25 over the pool alone loses 10 % nDCG against a central
index). Two better sources of document frequencies are combined:

- sources with an index of their own (`files`, `s3`, `notion`) report exact
  counts over their whole collection (`Connector.term_statistics`);
- every distinct passage the gateway has seen from each of the other
  sources is counted once into that source's bounded sample (query-based
  sampling): over many queries it approaches the remote collection's own
  statistics.

A knowledge base's statistics are the sum over its own sources only, so one
knowledge base's traffic never skews another's ranking. The service keeps
the samples in its state folder across restarts (`dump_samples`). Counts are over
passages, with the terms of the one tokenizer. Samples are keyed by the
TermCache's term ids, so they live and are cleared with its vocabulary.
"""

from __future__ import annotations

import gzip
from array import array
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from connectors.base import TermStatistics

#: Distinct passages a source's sample remembers; beyond this its counts are halved and it starts remembering anew.
SAMPLE_PASSAGES = 50_000


class PassageSample:
    """One source's document frequencies over the distinct passages seen from it, by term id; memory bounded."""

    def __init__(self, capacity: int = SAMPLE_PASSAGES) -> None:
        self.capacity = capacity
        self.passages = 0.0
        self.total_length = 0.0
        self._df: Counter[int] = Counter()
        self._seen: set[int] = set()
        self.generation = 0  # +1 each time it forgets which passages it counted

    def observe(self, mark: int, term_ids: bytes) -> None:
        """Count a passage once, however often it comes back (`mark`: its identity, pool.Seen.mark)."""
        if mark in self._seen:
            return
        if len(self._seen) >= self.capacity:
            self._decay()
        self._seen.add(mark)
        tokens = np.frombuffer(term_ids, dtype=np.int32)
        self._df.update(np.unique(tokens).tolist())
        self.passages += 1.0
        self.total_length += float(len(tokens))

    def frequencies(self, term_ids: Sequence[int]) -> list[float]:
        """Document frequency of each id (0 for ids never seen from this source, and for -1: unknown words)."""
        df = self._df
        return [df.get(i, 0.0) for i in term_ids]

    def _decay(self) -> None:
        """Halve what was counted and forget which passages were seen: old evidence weighs less, memory stays flat."""
        self._df = Counter({term: count / 2 for term, count in self._df.items() if count >= 1.0})
        self.passages /= 2
        self.total_length /= 2
        self._seen.clear()
        self.generation += 1


@dataclass(frozen=True, slots=True)
class QueryStatistics:
    """What the pool's BM25 uses instead of the pool's own counts, for one query's terms."""

    passages: float
    average_length: float
    frequencies: array  # float64, aligned with the query's distinct terms


def merge_term_statistics(found: Iterable[TermStatistics | None]) -> TermStatistics | None:
    """The sum of several sources' statistics (their collections are disjoint), or None if none reported."""
    passages = total = 0
    frequencies: dict[str, int] = {}
    reported = False
    for stats in found:
        if stats is None:
            continue
        reported = True
        passages += stats.passages
        total += stats.total_length
        for term, count in stats.frequencies.items():
            frequencies[term] = frequencies.get(term, 0) + count
    return TermStatistics(passages, total, frequencies) if reported else None


# -- keeping the samples across restarts --------------------------------------------------------------

SAMPLES_FORMAT = 1


def dump_samples(samples: dict[str, PassageSample], vocabulary: dict[str, int], tokenizer: str) -> bytes:
    """The samples as compressed JSON, by term text (term ids belong to one process's vocabulary).

    The service calls this on a thread while the event loop goes on adding words and passages: every
    dict and set is first copied whole (one C call each, which no other thread interrupts), and only
    the copies are iterated.
    """
    terms = {term_id: term for term, term_id in vocabulary.copy().items()}
    copies = [(source, sample.passages, sample.total_length, dict(sample._df), sorted(sample._seen)) for source, sample in samples.copy().items()]
    data = {
        "format": SAMPLES_FORMAT,
        "tokenizer": tokenizer,
        "sources": {
            source: {
                "passages": passages,
                "total_length": total_length,
                "df": {terms[i]: count for i, count in df.items() if i in terms},
                "seen": seen,
            }
            for source, passages, total_length, df, seen in copies
            if passages
        },
    }
    return gzip.compress(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode(), 6)


def load_samples(raw: bytes, vocabulary: dict[str, int], tokenizer: str) -> dict[str, PassageSample]:
    """Samples written by `dump_samples`, their terms added to `vocabulary`; ValueError when unreadable or of another tokenizer."""
    try:
        data = json.loads(gzip.decompress(raw))
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(f"unreadable: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != SAMPLES_FORMAT or data.get("tokenizer") != tokenizer:
        raise ValueError("written by another version or tokenizer")
    samples: dict[str, PassageSample] = {}
    for source, stored in data["sources"].items():
        sample = PassageSample()
        sample.passages = float(stored["passages"])
        sample.total_length = float(stored["total_length"])
        sample._df = Counter({vocabulary.setdefault(term, len(vocabulary)): float(count) for term, count in stored["df"].items()})
        sample._seen = set(stored["seen"][-sample.capacity :])
        samples[source] = sample
    return samples
