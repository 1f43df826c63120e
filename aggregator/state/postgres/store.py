"""The shared store's backend and its stores: one pool and one poller per process, one lock per store.

One syncer per store across every replica: it holds `pg_try_advisory_lock(LOCK_SPACE, store id)` on a
connection of its own and writes through that connection only (writer.py). When the syncer dies its connection
closes, the lock goes with it (TCP keepalives catch a machine that vanished), and the next replica to ask takes
over; a syncer whose connection broke can no longer write, so there are never two writers.

Every POLL_S a background task reads the rows of the stores this process has open, in one transaction, hands
each to its reader (reader.py), and sees from `pg_locks` whether each syncer still holds its lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from aggregator.shared.redis import replica_name  # the name alone: redis-py is not imported
from aggregator.tasks import cancel_and_wait

from aggregator.state.base import IndexStore, StateBackend, StoreUnavailable
from aggregator.state.postgres.database import (
    DOWN, LOCK_SPACE, STATEMENT_TIMEOUT_MS, SchemaTooNew, connect_options, display_url, migrate,
)  # fmt: skip
from aggregator.state.postgres.reader import PostgresReader
from aggregator.state.postgres.writer import PostgresWriter

log = logging.getLogger("aggregator.state")

#: How often readers look for commits (and the syncer's lock is checked).
POLL_S = 0.5

_STORE_COLUMNS = "id, source, fingerprint, generation, documents, passages, total_length, postings, text_bytes, synced_once, status, syncer"


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
        options = connect_options() | {"options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"}
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

    def reading_pool(self) -> AsyncConnectionPool:
        """The readers' pool, or StoreUnavailable while the database does not answer."""
        if self._pool is None or not self.reachable:
            raise StoreUnavailable(f"the index database is unreachable ({self.error or 'not connected'})")
        return self._pool

    def connect(self) -> "psycopg.Connection[Any]":
        """A connection of its own (a syncer's, which holds its lock): blocking, from a thread."""
        return psycopg.connect(self.url, **connect_options())

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
                        await store.reader.load(connection, row)
                    store.check_lock(held, asked_at)


class PostgresStore(IndexStore):
    """One source's store in the database: its reader, the advisory lock that makes this replica its syncer (on
    a connection of its own), and the writer that writes through that connection."""

    def __init__(self, backend: PostgresBackend, source: str, fingerprint: str) -> None:
        self.backend = backend
        self.source = source
        self.fingerprint = fingerprint
        self.closed = False
        self.reader = PostgresReader(backend)
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
            except DOWN as exc:
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
            except DOWN:
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

    @property
    def syncer(self) -> str | None:
        """The replica that last took the sync lock."""
        return self.reader.syncer
