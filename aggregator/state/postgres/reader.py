"""Every replica's side of a shared store: its counters and term dictionary in memory, search as one statement.

A reader keeps the collection counters and the term dictionary with document frequencies, so `term_statistics`
(called once per query on the event loop) is a dictionary lookup; the backend's poller (store.py) reads every
store's row each POLL_S and hands it to `load`, which reads only the terms a commit changed. `asearch` ranks
with one statement, read a page at a time (reading.Pages) while a filter rejects what it reads.

Scoring is BM25 exactly as `aggregator/ranking/bm25.py` defines it: idf from the live collection, the same k1
and b, normalised by the query's ceiling; PostgreSQL sums in float8.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aggregator.ranking.bm25 import B, K1

from aggregator.state.base import IndexReader, StoredPassage, StoreInfo, StoreUnavailable, SyncStatus, query_weights
from aggregator.state.postgres.database import DOWN, POSTING_BYTES
from aggregator.state.reading import MetadataCache, Pages

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import AsyncConnectionPool

    from aggregator.state.postgres.store import PostgresBackend

#: Documents whose decoded metadata a reader keeps (row ids are never reused: kept across commits).
METADATA_CACHE = 10_000

_SEARCH = """
WITH q (term, weight) AS (SELECT * FROM unnest(%(terms)s::integer[], %(weights)s::float8[])),
scored AS (
    SELECT po.passage, sum(q.weight * po.tf / (po.tf + %(c1)s + %(c2)s * po.length)) AS score, min(po.tie) AS tie
    FROM q JOIN gw_postings po ON po.store = %(store)s AND po.term = q.term
    GROUP BY po.passage ORDER BY score DESC, tie LIMIT %(limit)s OFFSET %(offset)s)
SELECT s.score, pa.chunk_index, pa.content, d.id, d.doc_id, d.title, d.updated_at, d.metadata
FROM scored s JOIN gw_passages pa ON pa.store = %(store)s AND pa.id = s.passage JOIN gw_documents d ON d.id = pa.document
ORDER BY s.score DESC, s.tie
"""


@dataclass(slots=True)
class _Snapshot:
    """What a reader holds of one store: its counters as of `generation`, and the term dictionary."""

    store_id: int | None = None
    generation: int = -1
    documents: int = 0
    passages: int = 0
    total_length: int = 0
    bytes: int = 0
    synced_once: bool = False
    status: SyncStatus = field(default_factory=SyncStatus)
    syncer: str | None = None
    terms: dict[str, tuple[int, int]] = field(default_factory=dict)  # term -> (id, document frequency)


class PostgresReader(IndexReader):
    """One replica's view of a shared store, as its backend's poller last loaded it."""

    def __init__(self, backend: "PostgresBackend") -> None:
        self.backend = backend
        self._snap = _Snapshot()
        self._metadata = MetadataCache(METADATA_CACHE)  # by document row

    async def load(self, connection: "psycopg.AsyncConnection[Any]", row: Sequence[Any]) -> None:
        """Take in a store's row (and the terms its commits changed) as the poller read them."""
        store_id, generation = int(row[0]), int(row[3])
        snap = self._snap
        if store_id == snap.store_id and generation == snap.generation:
            return
        since = snap.generation if store_id == snap.store_id else -1
        cursor = await connection.execute("SELECT term, id, df FROM gw_terms WHERE store = %s AND generation > %s", (store_id, since))
        changed = await cursor.fetchall()
        if store_id != snap.store_id:
            snap = _Snapshot(store_id=store_id)
            self._metadata.clear()
        terms = snap.terms
        for term, term_id, df in changed:
            terms[term] = (term_id, df)
        snap.generation = generation
        snap.documents, snap.passages, snap.total_length = int(row[4]), int(row[5]), int(row[6])
        snap.bytes = int(row[8]) + int(row[7]) * POSTING_BYTES
        snap.synced_once, snap.status, snap.syncer = bool(row[9]), SyncStatus.from_json(row[10]), row[11]
        self._snap = snap

    def refresh(self) -> None:
        """Nothing to do here: the backend's poller brings every commit in (within POLL_S)."""

    def term_statistics(self, terms: Sequence[str]) -> tuple[int, int, dict[str, int]]:
        snap = self._snap
        known = snap.terms
        return snap.passages, snap.total_length, {t: known[t][1] if t in known else 0 for t in dict.fromkeys(terms)}

    def info(self) -> StoreInfo:
        snap = self._snap
        return StoreInfo(snap.documents, snap.passages, snap.bytes, snap.synced_once, snap.status)

    @property
    def syncer(self) -> str | None:
        """The replica that last took the sync lock."""
        return self._snap.syncer


    def search(
        self, terms: Sequence[str], limit: int, accept: Callable[[StoredPassage], bool] | None = None
    ) -> list[StoredPassage]:
        raise NotImplementedError("a PostgreSQL store is read with asearch, on the event loop")

    async def asearch(
        self, terms: Sequence[str], limit: int, accept: Callable[[StoredPassage], bool] | None = None
    ) -> list[StoredPassage]:
        snap = self._snap
        if not terms or limit <= 0 or snap.passages == 0 or snap.store_id is None:
            return []
        known = snap.terms
        ids, weights, ceiling = query_weights(terms, snap.passages, lambda term: known.get(term, (0, 0)))
        if not ids or ceiling <= 0:
            return []
        pool = self.backend.reading_pool()
        avgdl = snap.total_length / snap.passages or 1.0
        params: dict[str, Any] = {"terms": ids, "weights": weights, "c1": K1 * (1 - B), "c2": K1 * B / avgdl, "store": snap.store_id}
        scale = (K1 + 1) / ceiling
        pages: Pages[None] = Pages(limit, accept)
        for offset, count in pages:
            rows = await self._ranked(pool, params | {"limit": count, "offset": offset})
            if accept is None:
                pages.take(self._passages(rows, scale), last=len(rows) < count)
            else:  # a filter's work on a page of up to 4,096 rows: on a worker thread, not on the event loop
                await asyncio.to_thread(pages.take, self._passages(rows, scale), len(rows) < count)
        return pages.passages()

    @staticmethod
    async def _ranked(pool: "AsyncConnectionPool", params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """One page of the ranking statement's rows."""
        try:
            async with pool.connection() as connection:
                cursor = await connection.execute(_SEARCH, params)
                return await cursor.fetchall()
        except DOWN as exc:
            raise StoreUnavailable(f"the index database did not answer ({' '.join(str(exc).split())})") from None

    def _passages(self, rows: Sequence[tuple[Any, ...]], scale: float) -> Iterator[tuple[None, StoredPassage]]:
        """The page's passages, built as they are tested (a filter that is satisfied early decodes no more)."""
        for score, *row in rows:
            yield None, self._metadata.passage(row, float(score) * scale)
