"""BM25 with a score normalised to [0, 1] by the query's own ceiling: the formula and its constants.

For a query q and passage d::

    idf(t)  = ln(1 + (N - n_t + 0.5) / (n_t + 0.5))            (always > 0)
    sat(t)  = tf * (k1 + 1) / (tf + k1 * (1 - b + b * |d| / avgdl))
    bm25    = sum over query terms t of qtf(t) * idf(t) * sat(t)
    ceiling = sum over query terms t of qtf(t) * idf(t) * (k1 + 1)
    norm    = bm25 / ceiling                                    (in [0, 1))

`ceiling` is what a passage containing every query term infinitely often
would score; it depends on the query and the collection, never on how good
the best candidate happens to be. So a weak match stays low even when it is
the best of a weak pool, and a threshold means the same for every query.
Query terms absent from the collection still count in the ceiling.

The persistent index of `files`-like sources (aggregator/state) scores with this
formula and these constants, and the rerank of the merged pool (pool.py) computes
it over a small pool. `testkit/bm25_index.py` holds the in-memory index the
store replaced, the reference its tests and benchmarks compare with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

K1 = 1.2
B = 0.75


@dataclass(frozen=True, slots=True)
class BM25Params:
    k1: float = K1
    b: float = B


def idf(doc_count: int, doc_freq: int) -> float:
    return math.log(1.0 + (doc_count - doc_freq + 0.5) / (doc_freq + 0.5))
