"""The shared store: the indexes of every replica in one PostgreSQL database (`server.state_url`).

    gateway_schema  the schema's version: the gateway creates and migrates its tables itself (MIGRATIONS)
    gw_stores       one row per source and settings fingerprint: counters, the syncer's status and name, and a
                    generation that every commit bumps
    gw_documents    id, version, title, metadata of every document
    gw_passages     every passage's text and length, and its distinct term ids (to take its postings back out)
    gw_terms        the term dictionary: each term's id, document frequency, and the generation that last changed it
    gw_postings     the inverted index, (store, term, passage) -> term frequency, passage length, tie key, under one
                    covering B-tree: a query's candidates and everything their scores need are one index range per term

Why postings in a B-tree rather than a GIN index over each passage's terms: GIN finds the passages that hold a
term, but not how often, nor how long they are; scoring would then read every candidate row and search its
arrays. A posting row carries all of it, so PostgreSQL scores a query with one aggregate over the query terms'
ranges, and keeps the document frequencies exact through removals (MVCC, no tombstones).

Scoring is BM25 exactly as `aggregator/ranking/bm25.py` defines it: idf from the live collection, the same k1
and b, normalised by the query's ceiling; PostgreSQL sums in float8.

One syncer per store across every replica: it holds `pg_try_advisory_lock(LOCK_SPACE, store id)` on a
connection of its own and writes through that connection only. When the syncer dies its connection closes, the
lock goes with it (TCP keepalives catch a machine that vanished), and the next replica to ask takes over; a
syncer whose connection broke can no longer write, so there are never two writers.

Readers keep, per store, the collection counters and the term dictionary with document frequencies in memory,
so `term_statistics` (called once per query on the event loop) is a dictionary lookup; a background task polls
the stores' generations every POLL_S and loads only the terms a commit changed. `asearch` is one statement.
psycopg is an optional extra (`pip install "dify-knowledge-gateway[replicas]"`), imported only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aggregator.ranking.bm25 import B, K1
from aggregator.shared.redis import replica_name  # the name alone: redis-py is not imported
from aggregator.tasks import cancel_and_wait

from aggregator.state.base import (
    IndexStore, IndexWriter, PreparedDocument, StateBackend, StoreInfo, StoredPassage, StoreUnavailable, SyncStatus,
    query_weights, tie_key,
)  # fmt: skip


try:
    import psycopg
    from psycopg_pool import AsyncConnectionPool
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        'server.state_url needs the PostgreSQL driver: pip install "dify-knowledge-gateway[replicas]" (psycopg 3)'
    ) from exc

log = logging.getLogger("aggregator.state")

#: How often readers look for commits (and the syncer's lock is checked).
POLL_S = 0.5
#: The first key of every advisory lock the gateway takes (the second is a store's id).
LOCK_SPACE = 0x6777
#: Seconds a read may take before it is abandoned (the request's own deadline is shorter anyway).
STATEMENT_TIMEOUT_MS = 5000
#: Rough bytes of one posting row and its index entry, for the size shown in /status.
POSTING_BYTES = 64

MIGRATIONS: list[tuple[int, str]] = [
    (1, """
CREATE TABLE gw_stores (
    id serial PRIMARY KEY, source text NOT NULL, fingerprint text NOT NULL,
    documents bigint NOT NULL DEFAULT 0, passages bigint NOT NULL DEFAULT 0, total_length bigint NOT NULL DEFAULT 0,
    postings bigint NOT NULL DEFAULT 0, text_bytes bigint NOT NULL DEFAULT 0,
    next_passage bigint NOT NULL DEFAULT 1, next_term integer NOT NULL DEFAULT 1,
    synced_once boolean NOT NULL DEFAULT false, status text NOT NULL DEFAULT '{}', syncer text,
    generation bigint NOT NULL DEFAULT 0, created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source, fingerprint));
CREATE TABLE gw_documents (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, store integer NOT NULL, doc_id text NOT NULL,
    version text NOT NULL, title text NOT NULL, updated_at text, metadata text NOT NULL,
    UNIQUE (store, doc_id));
CREATE TABLE gw_passages (
    store integer NOT NULL, id bigint NOT NULL, document bigint NOT NULL, chunk_index integer NOT NULL,
    content text NOT NULL, length integer NOT NULL, terms integer[] NOT NULL,
    PRIMARY KEY (store, id));
CREATE INDEX gw_passages_document ON gw_passages (store, document);
CREATE TABLE gw_terms (
    store integer NOT NULL, id integer NOT NULL, term text NOT NULL, df integer NOT NULL, generation bigint NOT NULL,
    PRIMARY KEY (store, id), UNIQUE (store, term));
CREATE INDEX gw_terms_generation ON gw_terms (store, generation);
CREATE TABLE gw_postings (
    store integer NOT NULL, term integer NOT NULL, passage bigint NOT NULL, tf smallint NOT NULL,
    length integer NOT NULL, tie bigint NOT NULL,
    PRIMARY KEY (store, term, passage) INCLUDE (tf, length, tie));
"""),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

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
_STORE_COLUMNS = "id, source, fingerprint, generation, documents, passages, total_length, postings, text_bytes, synced_once, status, syncer"

_DOWN = (psycopg.Error, OSError)


def signed(key: int) -> int:
    """A 64-bit unsigned tie key as a bigint that sorts the same way."""
    return key - (1 << 63)


def display_url(url: str) -> str:
    """The URL without its password, for /status and logs."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    host, port, database, user = info.get("host", ""), info.get("port", ""), info.get("dbname", ""), info.get("user", "")
    return f"postgresql://{user + '@' if user else ''}{host}{':' + str(port) if port else ''}/{database}"


def _connect_options() -> dict[str, Any]:
    """Keepalives so that a syncer whose machine vanished loses its lock within about half a minute."""
    return {"autocommit": True, "connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
            "keepalives_count": 3, "application_name": f"knowledge-gateway/{os.getpid()}"}  # fmt: skip


class SchemaTooNew(Exception):
    pass


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


class PostgresBackend(StateBackend):
    """Every source's store in one database; readers refreshed by one background task per process."""

    def __init__(self, url: str, replica: str = "") -> None:
        self.url = url
        self.replica = replica or replica_name()
        self.stores: dict[tuple[str, str], PostgresStore] = {}
        self.schema_version: int | None = None  # set once the schema is known to be current
        self.reachable = False
        self.error: str | None = None
        self.down_since: float | None = None
        self._pool: AsyncConnectionPool | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._fatal: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._pool is not None:
            return
        options = _connect_options() | {"options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"}
        self._pool = AsyncConnectionPool(self.url, min_size=1, max_size=8, kwargs=options, open=False, timeout=2.0, name="gateway-state")
        await self._pool.open(wait=False)
        await self._poll_once()  # the schema and what is stored, before the first request if the database answers
        self._task = asyncio.create_task(self._poll_forever(), name="state:postgres")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        for store in list(self.stores.values()):
            store.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def open(self, source: str, fingerprint: str) -> "PostgresStore":
        store = self.stores.get((source, fingerprint))
        if store is None or store.closed:
            store = self.stores[(source, fingerprint)] = PostgresStore(self, source, fingerprint)
        self._wake.set()
        return store

    def forget(self, store: "PostgresStore") -> None:
        if self.stores.get((store.source, store.fingerprint)) is store:
            del self.stores[(store.source, store.fingerprint)]

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "postgresql",
            "url": display_url(self.url),
            "reachable": self.reachable,
            "schema_version": self.schema_version,
            "error": self._fatal or self.error,
        }

    def connect(self) -> "psycopg.Connection[Any]":
        """A connection of its own (a syncer's, which holds its lock): blocking, from a thread."""
        return psycopg.connect(self.url, **_connect_options())

    # -- the readers' refresh --------------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._wake.wait()
            self._wake.clear()
            await self._poll_once()

    async def _poll_once(self) -> None:
        try:
            await self._refresh()
        except asyncio.CancelledError:
            raise
        except SchemaTooNew as exc:
            if self._fatal is None:
                log.error("PostgreSQL state at %s: %s; indexed sources serve nothing from it", display_url(self.url), exc)
            self._fatal = str(exc)
        except Exception as exc:  # unreachable, restarting, timing out: readers keep what they hold
            self._mark_down(exc)
        else:
            self._mark_up()

    def _mark_down(self, exc: BaseException) -> None:
        message = " ".join(str(exc).split()) or type(exc).__name__
        if self.reachable or self.down_since is None:
            log.warning("PostgreSQL state at %s unreachable (%s): indexed sources answer from it again when it is back",
                        display_url(self.url), message)  # fmt: skip
            self.down_since = time.time()
        self.reachable, self.error = False, message

    def _mark_up(self) -> None:
        if not self.reachable and self.down_since is not None and self.error is not None:
            log.info("PostgreSQL state at %s reachable again", display_url(self.url))
        self.reachable, self.error, self.down_since = True, None, None

    async def _refresh(self) -> None:
        assert self._pool is not None
        async with self._pool.connection() as connection:
            if self.schema_version is None:
                self.schema_version = await migrate(connection)
            stores = [s for s in self.stores.values() if not s.closed]
            if not stores:
                return
            asked_at = time.monotonic()
            async with connection.transaction():  # counters and terms as of one commit
                await connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                cursor = await connection.execute(
                    f"SELECT {_STORE_COLUMNS} FROM gw_stores WHERE source = ANY(%s)", (list({s.source for s in stores}),)
                )
                rows = {(r[1], r[2]): r for r in await cursor.fetchall()}
                cursor = await connection.execute(
                    "SELECT objid::integer, pid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objsubid = 2 AND granted",
                    (LOCK_SPACE,),
                )
                held = {store_id: pid for store_id, pid in await cursor.fetchall()}
                for store in stores:
                    row = rows.get((store.source, store.fingerprint))
                    if row is not None:
                        await store.load(connection, row)
                    store.check_lock(held, asked_at)


async def migrate(connection: "psycopg.AsyncConnection[Any]") -> int:
    """Create or upgrade the schema (one replica at a time); the version it is at. Refuses a newer schema."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_SPACE,))
        await connection.execute("CREATE TABLE IF NOT EXISTS gateway_schema (version integer NOT NULL)")
        row = await (await connection.execute("SELECT max(version) FROM gateway_schema")).fetchone()
        current = int(row[0]) if row and row[0] is not None else 0
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the database's gateway schema is version {current}, newer than this gateway's {SCHEMA_VERSION}: upgrade the gateway"
            )
        for version, statements in MIGRATIONS:
            if version > current:
                await connection.execute(statements)
                await connection.execute("DELETE FROM gateway_schema")
                await connection.execute("INSERT INTO gateway_schema (version) VALUES (%s)", (version,))
                log.info("PostgreSQL state: schema migrated to version %d", version)
                current = version
    return current


class PostgresStore(IndexStore):
    def __init__(self, backend: PostgresBackend, source: str, fingerprint: str) -> None:
        self.backend = backend
        self.source = source
        self.fingerprint = fingerprint
        self.closed = False
        self._snap = _Snapshot()
        self._metadata: dict[int, dict[str, Any]] = {}  # decoded metadata by document row
        self._connection: psycopg.Connection[Any] | None = None  # the syncer's: holds the lock, carries every write
        self._store_id: int | None = None
        self._leading = False
        self._lead_since = 0.0
        self._writer: PostgresWriter | None = None
        self._guard = threading.Lock()

    # -- leadership (from the source's sync thread) -------------------------------------------------

    @property
    def leading(self) -> bool:
        return self._leading

    def try_lead(self) -> bool:
        if self._leading:
            return True
        if self.backend.schema_version is None or self.closed:
            return False  # the schema is not known to be current yet
        with self._guard:
            try:
                if self._connection is None or self._connection.closed:
                    self._connection = self.backend.connect()
                connection = self._connection
                store_id = self._ensure_row(connection)
                won = connection.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_SPACE, store_id)).fetchone()
                if not (won and won[0]):
                    return False
                connection.execute("UPDATE gw_stores SET syncer = %s WHERE id = %s", (self.backend.replica, store_id))
            except _DOWN as exc:
                log.debug("source %s: cannot ask for the sync lock (%s)", self.source, exc)
                self._drop_connection()
                return False
            self._store_id = store_id
            self._writer = None
            self._lead_since = time.monotonic()
            self._leading = True
            return True

    def _ensure_row(self, connection: "psycopg.Connection[Any]") -> int:
        """The store's row id, creating the row if missing. Looked up first: an INSERT, even one that conflicts,
        takes a number from the id sequence, and every replica that does not sync comes here each second."""
        select = "SELECT id FROM gw_stores WHERE source = %s AND fingerprint = %s"
        row = connection.execute(select, (self.source, self.fingerprint)).fetchone()
        if row is None:
            connection.execute(
                "INSERT INTO gw_stores (source, fingerprint) VALUES (%s, %s) ON CONFLICT (source, fingerprint) DO NOTHING",
                (self.source, self.fingerprint),
            )
            row = connection.execute(select, (self.source, self.fingerprint)).fetchone()
        assert row is not None
        return int(row[0])

    def check_lock(self, held: dict[int, int], asked_at: float) -> None:
        """The poller saw which sessions hold locks: a syncer whose session no longer does has lost the lead."""
        if not self._leading or asked_at < self._lead_since or self._store_id is None:
            return
        connection = self._connection
        pid = None if connection is None or connection.closed else connection.info.backend_pid
        if held.get(self._store_id) != pid:
            log.warning("source %s: the sync lock in PostgreSQL was lost (its connection ended); another replica may take over", self.source)
            self.lost_lead()

    def lost_lead(self) -> None:
        self._leading = False
        self._writer = None

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def open_writer(self) -> "PostgresWriter":
        if not self._leading or self._connection is None or self._store_id is None:
            raise RuntimeError("only the syncer writes")
        if self._writer is None:
            try:
                self._writer = PostgresWriter(self, self._connection, self._store_id)
            except _DOWN:
                self.lost_lead()
                raise
        return self._writer

    def close(self) -> None:
        self.closed = True
        self._leading = False
        self._writer = None
        with self._guard:
            self._drop_connection()  # the lock goes with its session
        self.backend.forget(self)

    # -- reading ----------------------------------------------------------------------------------

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
            self._metadata = {}
        terms = snap.terms
        for term, term_id, df in changed:
            terms[term] = (term_id, df)
        snap.generation = generation
        snap.documents, snap.passages, snap.total_length = int(row[4]), int(row[5]), int(row[6])
        snap.bytes = int(row[8]) + int(row[7]) * POSTING_BYTES
        snap.synced_once, snap.status, snap.syncer = bool(row[9]), SyncStatus.from_json(row[10]), row[11]
        if len(self._metadata) > 10_000:
            self._metadata.clear()
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
        pool = self.backend._pool
        if pool is None or not self.backend.reachable:
            raise StoreUnavailable(f"the index database is unreachable ({self.backend.error or 'not connected'})")
        avgdl = snap.total_length / snap.passages or 1.0
        params: dict[str, Any] = {"terms": ids, "weights": weights, "c1": K1 * (1 - B), "c2": K1 * B / avgdl, "store": snap.store_id}
        scale = (K1 + 1) / ceiling
        found: list[StoredPassage] = []
        batch = limit if accept is None else max(64, 2 * limit)
        offset = 0
        while True:
            try:
                async with pool.connection() as connection:
                    cursor = await connection.execute(_SEARCH, params | {"limit": batch, "offset": offset})
                    rows = await cursor.fetchall()
            except _DOWN as exc:
                raise StoreUnavailable(f"the index database did not answer ({' '.join(str(exc).split())})") from None
            wanted = limit - len(found)
            if accept is None:
                found += self._passages(rows, scale, None, wanted)
            else:  # a filter's work on a page of up to 4,096 rows: on a worker thread, not on the event loop
                found += await asyncio.to_thread(self._passages, rows, scale, accept, wanted)
            if len(found) >= limit:
                return found
            if len(rows) < batch:
                return found
            offset += batch
            batch = min(batch * 2, 4096)  # a filter that rejects much: read ever larger pages


    def _passages(
        self, rows: Sequence[tuple], scale: float, accept: Callable[[StoredPassage], bool] | None, wanted: int
    ) -> list[StoredPassage]:
        """The page's passages that `accept` takes, in order, `wanted` at most."""
        found: list[StoredPassage] = []
        for score, chunk_index, content, document, doc_id, title, updated_at, metadata_json in rows:
            metadata = self._metadata.get(document)
            if metadata is None:
                metadata = self._metadata[document] = json.loads(metadata_json)
            passage = StoredPassage(doc_id, chunk_index, title, content, metadata, updated_at, float(score) * scale)
            if accept is not None and not accept(passage):
                continue
            found.append(passage)
            if len(found) >= wanted:
                break
        return found


class PostgresWriter(IndexWriter):
    """The syncer's side: every write goes through the connection that holds the store's lock."""

    def __init__(self, store: PostgresStore, connection: "psycopg.Connection[Any]", store_id: int) -> None:
        self.store = store
        self.connection = connection
        self.store_id = store_id
        self._versions = dict(connection.execute("SELECT doc_id, version FROM gw_documents WHERE store = %s", (store_id,)).fetchall())
        self._vocabulary: dict[str, int] = dict(connection.execute("SELECT term, id FROM gw_terms WHERE store = %s", (store_id,)).fetchall())
        row = connection.execute("SELECT next_passage, next_term FROM gw_stores WHERE id = %s", (store_id,)).fetchone()
        assert row is not None
        self._next_passage, self._next_term = int(row[0]), int(row[1])

    def versions(self) -> dict[str, str]:
        return dict(self._versions)

    def apply(self, documents: Sequence[PreparedDocument], removed: Sequence[str], status: SyncStatus) -> None:
        replaced = [d.document_id for d in documents] + list(removed)
        vocabulary = dict(self._vocabulary)  # committed only with the transaction
        next_term, next_passage = self._next_term, self._next_passage
        fresh: dict[int, str] = {}
        passages: list[tuple[int, str, int, str, int, list[int]]] = []
        postings: list[tuple[int, int, int, int, int, int]] = []
        delta: Counter[int] = Counter()
        for document in documents:
            for chunk_index, (content, terms) in enumerate(document.passages):
                counts = Counter(terms)
                ids = []
                for term in counts:
                    term_id = vocabulary.get(term)
                    if term_id is None:
                        term_id = vocabulary[term] = next_term
                        fresh[term_id] = term
                        next_term += 1
                    ids.append(term_id)
                pid, next_passage = next_passage, next_passage + 1
                tie = signed(tie_key(document.document_id, chunk_index))
                passages.append((pid, document.document_id, chunk_index, _text(content), len(terms), ids))
                postings.extend((self.store_id, term_id, pid, min(tf, 32767), len(terms), tie) for term_id, tf in zip(ids, counts.values()))
                delta.update(ids)
        try:
            self._write(documents, replaced, status, passages, postings, delta, fresh, next_passage, next_term)
        except _DOWN:
            self.store.lost_lead()  # the connection (and with it the lock) may be gone: ask again before writing
            raise
        self._vocabulary = vocabulary
        self._next_term, self._next_passage = next_term, next_passage
        for document_id in removed:
            self._versions.pop(document_id, None)
        for document in documents:
            self._versions[document.document_id] = document.version

    def _write(self, documents: Sequence[PreparedDocument], replaced: list[str], status: SyncStatus,
               passages: list[tuple[int, str, int, str, int, list[int]]], postings: list[tuple[int, int, int, int, int, int]],
               delta: Counter[int], fresh: dict[int, str], next_passage: int, next_term: int) -> None:  # fmt: skip
        store_id = self.store_id
        connection = self.connection
        with connection.transaction():
            row = connection.execute("UPDATE gw_stores SET generation = generation + 1 WHERE id = %s RETURNING generation", (store_id,)).fetchone()
            assert row is not None
            generation = int(row[0])
            gone = self._delete(replaced, delta)
            doc_rows: dict[str, int] = {}
            if documents:
                cursor = connection.execute(
                    "INSERT INTO gw_documents (store, doc_id, version, title, updated_at, metadata) "
                    "SELECT %s::integer, * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[]) RETURNING doc_id, id",
                    (store_id, [d.document_id for d in documents], [d.version for d in documents], [_text(d.title) for d in documents],
                     [d.updated_at for d in documents], [json.dumps(d.metadata, ensure_ascii=False, default=str) for d in documents]),
                )  # fmt: skip
                doc_rows = dict(cursor.fetchall())
            with connection.cursor() as cursor:
                with cursor.copy("COPY gw_passages (store, id, document, chunk_index, content, length, terms) FROM STDIN") as copy:
                    for pid, doc_id, chunk_index, content, length, ids in passages:
                        copy.write_row((store_id, pid, doc_rows[doc_id], chunk_index, content, length, ids))
                with cursor.copy("COPY gw_postings (store, term, passage, tf, length, tie) FROM STDIN") as copy:
                    for posting in postings:
                        copy.write_row(posting)
                with cursor.copy("COPY gw_terms (store, id, term, df, generation) FROM STDIN") as copy:
                    for term_id, term in fresh.items():
                        copy.write_row((store_id, term_id, term, delta.pop(term_id, 0), generation))
            changed = [(term_id, count) for term_id, count in delta.items() if count]
            if changed:
                connection.execute(
                    "UPDATE gw_terms t SET df = t.df + x.d, generation = %s FROM unnest(%s::integer[], %s::integer[]) AS x (id, d) "
                    "WHERE t.store = %s AND t.id = x.id",
                    (generation, [c[0] for c in changed], [c[1] for c in changed], store_id),
                )  # fmt: skip
            connection.execute(
                "UPDATE gw_stores SET documents = documents + %s, passages = passages + %s, total_length = total_length + %s, "
                "postings = postings + %s, text_bytes = text_bytes + %s, next_passage = %s, next_term = %s, status = %s WHERE id = %s",
                (len(documents) - gone[0], len(passages) - gone[1], sum(p[4] for p in passages) - gone[2],
                 len(postings) - gone[3], sum(len(p[3].encode()) for p in passages) - gone[4], next_passage, next_term,
                 status.to_json(), store_id),
            )  # fmt: skip

    def _delete(self, document_ids: Sequence[str], delta: Counter[int]) -> tuple[int, int, int, int, int]:
        """Remove documents, their passages and postings, counting the terms they held out of `delta`;
        (documents, passages, length, postings, text bytes) removed."""
        if not document_ids:
            return 0, 0, 0, 0, 0
        connection, store_id = self.connection, self.store_id
        rows = connection.execute("SELECT id FROM gw_documents WHERE store = %s AND doc_id = ANY(%s)", (store_id, list(document_ids))).fetchall()
        if not rows:
            return 0, 0, 0, 0, 0
        doc_rows = [r[0] for r in rows]
        for term_id, count in connection.execute(
            "SELECT t, count(*) FROM gw_passages p, unnest(p.terms) AS t WHERE p.store = %s AND p.document = ANY(%s) GROUP BY t",
            (store_id, doc_rows),
        ):  # fmt: skip
            delta[term_id] -= count
        connection.execute(
            "DELETE FROM gw_postings po USING (SELECT p.id, unnest(p.terms) AS t FROM gw_passages p WHERE p.store = %s AND p.document = ANY(%s)) x "
            "WHERE po.store = %s AND po.term = x.t AND po.passage = x.id",
            (store_id, doc_rows, store_id),
        )  # fmt: skip
        row = connection.execute(
            "WITH gone AS (DELETE FROM gw_passages WHERE store = %s AND document = ANY(%s) RETURNING length, octet_length(content) AS bytes, cardinality(terms) AS postings) "
            "SELECT count(*), coalesce(sum(length), 0), coalesce(sum(postings), 0), coalesce(sum(bytes), 0) FROM gone",
            (store_id, doc_rows),
        ).fetchone()  # fmt: skip
        assert row is not None
        connection.execute("DELETE FROM gw_documents WHERE id = ANY(%s)", (doc_rows,))
        return len(doc_rows), int(row[0]), int(row[1]), int(row[2]), int(row[3])

    def finish(self, status: SyncStatus) -> None:
        try:
            self.connection.execute(
                "UPDATE gw_stores SET status = %s, synced_once = true, generation = generation + 1 WHERE id = %s",
                (status.to_json(), self.store_id),
            )
            self._drop_other_settings()
        except _DOWN:
            self.store.lost_lead()
            raise

    def _drop_other_settings(self) -> None:
        """Stores of this source under settings no replica syncs any more (an edit that reshaped the index)."""
        connection = self.connection
        others = connection.execute(
            "SELECT id FROM gw_stores WHERE source = %s AND fingerprint <> %s", (self.store.source, self.store.fingerprint)
        ).fetchall()
        for (store_id,) in others:
            if drop_store(connection, store_id):
                log.info("source %s: deleted its index stored under earlier settings", self.store.source)

    def close(self) -> None:
        """The connection belongs to the store (it holds the lock)."""


def drop_store(connection: "psycopg.Connection[Any]", store_id: int) -> bool:
    """Delete one store unless a replica syncs it (holds its lock); True if deleted."""
    won = connection.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_SPACE, store_id)).fetchone()
    if not (won and won[0]):
        return False
    try:
        with connection.transaction():
            for table in ("gw_postings", "gw_passages", "gw_terms", "gw_documents"):
                connection.execute(f"DELETE FROM {table} WHERE store = %s", (store_id,))
            connection.execute("DELETE FROM gw_stores WHERE id = %s", (store_id,))
    finally:
        connection.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_SPACE, store_id))
    return True


def unused_stores(url: str, in_use: set[str]) -> list[tuple[int, str, int]]:
    """(id, source, estimated bytes) of stores whose source the config no longer names (what `aggregator gc` removes)."""
    with psycopg.connect(url, **_connect_options()) as connection:
        if connection.execute("SELECT to_regclass('gw_stores')").fetchone() == (None,):
            return []
        rows = connection.execute("SELECT id, source, text_bytes + postings * %s FROM gw_stores ORDER BY source", (POSTING_BYTES,)).fetchall()
    return [(int(r[0]), r[1], int(r[2])) for r in rows if r[1] not in in_use]


def remove_stores(url: str, store_ids: Sequence[int]) -> list[bool]:
    with psycopg.connect(url, **_connect_options()) as connection:
        return [drop_store(connection, store_id) for store_id in store_ids]


def _text(value: str) -> str:
    """PostgreSQL's text holds no NUL character."""
    return value.replace("\x00", "") if "\x00" in value else value
