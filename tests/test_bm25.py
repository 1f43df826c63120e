"""The local BM25 index agrees with the formula, through additions, removals and compaction."""

from __future__ import annotations

import math
import random
from collections import Counter

from aggregator.ranking.bm25 import idf
from testkit.bm25_index import BM25Index

WORDS = [f"w{i}" for i in range(40)]


def reference(docs: dict[str, list[str]], query: list[str], k1: float = 1.2, b: float = 0.75) -> dict[str, float]:
    n = len(docs)
    avgdl = sum(map(len, docs.values())) / n
    ceiling = 0.0
    scores = {key: 0.0 for key in docs}
    for term, qtf in Counter(query).items():
        df = sum(1 for terms in docs.values() if term in terms)
        weight = qtf * idf(n, df)
        ceiling += weight * (k1 + 1)
        for key, terms in docs.items():
            tf = terms.count(term)
            if tf:
                scores[key] += weight * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(terms) / avgdl))
    return {key: s / ceiling for key, s in scores.items() if s > 0}


def test_matches_the_formula_through_churn():
    rng = random.Random(3)
    index, docs = BM25Index(), {}
    for step in range(6000):
        key = f"d{rng.randrange(1500)}"
        if key in docs and rng.random() < 0.5:
            index.remove(key)
            del docs[key]
        else:
            terms = [rng.choice(WORDS[: rng.randrange(5, 40)]) for _ in range(rng.randrange(1, 30))]
            index.add(key, terms)
            docs[key] = terms
        if step % 1500 == 0 or step == 5999:
            query = [rng.choice(WORDS) for _ in range(4)] + ["unknown-word"]
            got = dict(index.search(query, len(docs)))
            want = reference(docs, query)
            assert set(got) == set(want)
            assert all(math.isclose(got[k], want[k], rel_tol=1e-5) for k in want)
    assert len(index) == len(docs)


def test_search_order_limit_and_filter():
    index = BM25Index()
    for i in range(10):
        index.add(i, ["alpha"] * (i + 1) + ["pad"] * 5)
    top = index.search(["alpha"], 3)
    assert [k for k, _ in top] == [9, 8, 7] and all(0 < s < 1 for _, s in top)
    assert [k for k, _ in index.search(["alpha"], 3, accept=lambda k: k % 2 == 0)] == [8, 6, 4]
    assert index.search(["nothing"], 3) == [] and index.search([], 3) == []


def test_ties_keep_insertion_order():
    index = BM25Index()
    for key in ("b", "a", "c"):
        index.add(key, ["same", "words"])
    assert [k for k, _ in index.search(["same"], 3)] == ["b", "a", "c"]


def test_document_frequencies_count_live_passages_only():
    index = BM25Index()
    index.add("a", ["rotat", "key"])
    index.add("b", ["rotat"])
    index.add("c", ["vpn", "vpn"])
    index.remove("b")
    assert index.document_frequencies(["rotat", "key", "vpn", "absent"]) == {"rotat": 1, "key": 1, "vpn": 1, "absent": 0}
    assert len(index) == 2 and index.total_length == 4
