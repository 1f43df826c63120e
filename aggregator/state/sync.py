"""The sync engine: how the core indexes a source that has no search of its own (files, S3, Notion).

The source (`connectors.base.DocumentSource`) says how to list its documents
with a version token (mtime, ETag, last_edited_time) and how to fetch them;
`IndexedConnector` wraps it into the `Connector` the fan-out calls, keeping
its passages in a persistent index store (`aggregator.state`) shared by every
worker process:

- the store lives under `server.state_dir` and survives restarts: a source
  serves what is stored at once and syncs only documents whose version changed;
- one process per source syncs it (the store's lock); the others answer from
  the same store and pick up each commit at their next query; with a shared
  database the lead can be lost (the syncer's connection died), and the
  source then asks for it again like the others;
- a sync fetches in batches, splits and tokenizes off the event loop, and
  commits every few thousand passages, so requests are answered while it runs
  and a killed sync loses at most its last batch;
- later syncs run every `refresh_s`, or at once when `trigger_refresh()` is
  called (the source's `watch`, a file watcher, does);
- a source that can list what changed cheaply (`list_changed`: Notion's
  search sorted by edit time) has most of those syncs list only that, so an
  edit shows within `refresh_s` plus the time to fetch it, however many
  documents there are; a full listing, which also finds removed documents,
  runs at least every `FULL_LISTING_S` (and every sync when `refresh_s` is
  at least that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from aggregator.shared.ratelimit import credential_limiter
from aggregator.state import (
    IndexStore, LocalBackend, PreparedDocument, StateBackend, StoredPassage, StoreUnavailable, SyncStatus, settings_fingerprint,
)  # fmt: skip
from aggregator.tasks import cancel_and_wait
from aggregator.text.chunking import split_passages
from aggregator.text.tokenize import tokenize

from connectors.base import (
    Connector, Document, DocumentSource, IndexedSettings, Passage, RateLimited, SourceError, SourceQuery, SourceStats,
    TermStatistics, Unavailable, now_iso, record_metadata,
)  # fmt: skip

log = logging.getLogger(__name__)
T = TypeVar("T")
#: How long a first sync that ended waits for this process's view of the store to show it before it counts as ready.
VISIBLE_WAIT_S = 5.0

#: How often a process that is not the syncer asks for the lock (and so how soon it takes over).
LEAD_POLL_S = 1.0
#: A sync commits when this many passages are waiting, or when COMMIT_EVERY_S has passed since its last commit.
COMMIT_PASSAGES = 5_000
COMMIT_EVERY_S = 2.0
#: How long the syncer waits before opening a store that failed to open (busy, a full disk) again, at most
#: (refresh_s when shorter): long enough not to fill the log with the same error, short enough that it mends soon.
OPEN_RETRY_S = 60.0
#: Names of skipped documents kept for /status (the count is always whole).
SKIPPED_NAMES_SHOWN = 100
#: For a source with `list_changed`: a full listing at least this often (the default refresh_s, so that a removed
#: document never stays longer than it did before quick listings existed); the syncs in between list changes only.
FULL_LISTING_S = 300.0


class IndexedConnector(Connector):
    """A `DocumentSource` as the fan-out sees it: searched in the local index the engine keeps in sync."""

    settings: IndexedSettings

    def __init__(self, source: DocumentSource) -> None:
        super().__init__(source.name, source.settings)
        self.source = source
        limit = source.rate_limit()
        if limit is not None:  # connectors (and replicas) with the same credential share one limiter
            source.bind_limiter(credential_limiter(limit.credential, limit.per_second))
        self._backend: StateBackend | None = None
        self._ephemeral: str | None = None  # a temporary state folder when no backend was bound
        self._store: IndexStore | None = None
        self._status = SyncStatus()
        self._first_attempt = asyncio.Event()  # this process finished (or failed) a sync as the syncer
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None  # the source's `watch`, while this process syncs it
        self._executor: ThreadPoolExecutor | None = None
        self._last_full: float | None = None  # monotonic time of this process's last full listing

    # -- state ------------------------------------------------------------------------------------

    def bind_state(self, backend: StateBackend) -> None:
        """Keep the index in `backend` (the gateway passes the one of `server.state_dir`)."""
        self._backend = backend

    def fingerprint(self) -> str:
        """The settings that shape the index: a stored index of other settings is never served."""
        shaping = self.settings.model_dump(mode="json", exclude=set(self.source.runtime_fields))
        shaping["source_name"] = self.name
        return settings_fingerprint(shaping)

    def _open_store(self) -> IndexStore:
        if self._store is None:
            backend = self._backend
            if backend is not None:
                try:
                    self._store = backend.open(self.name, self.fingerprint())
                except OSError as exc:  # e.g. a read-only state_dir: serve anyway, and say so
                    problem = f"the state folder cannot be used ({exc.strerror or exc}); the index is kept in a temporary folder until restart"
                    log.error("source %s: %s", self.name, problem)
                    self._status.last_error, self._status.last_outcome = problem, "error"
            if self._store is None:  # used on its own (tests, tools), or no usable state folder: private, removed at close
                self._ephemeral = tempfile.mkdtemp(prefix=f"gateway-{self.name}-")
                self._store = LocalBackend(Path(self._ephemeral)).open(self.name, self.fingerprint())
        return self._store

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Ready once the store holds a finished sync of these settings (this process's or the syncer's)."""
        if self._first_attempt.is_set():
            return True
        store = self._store
        return store is not None and store.info().synced_once

    @property
    def syncing_here(self) -> bool:
        return self._store is not None and self._store.leading

    def term_statistics(self, terms: Sequence[str]) -> TermStatistics:
        if self._store is None:
            return TermStatistics(0, 0, {t: 0 for t in terms})
        passages, total_length, frequencies = self._store.term_statistics(terms)
        return TermStatistics(passages, total_length, frequencies)

    def stats(self) -> SourceStats:
        store = self._store
        info = store.info() if store is not None else None
        status = self._status if self.syncing_here or info is None else info.status
        return SourceStats(
            documents=info.documents if info else 0,
            passages=info.passages if info else 0,
            last_refresh=status.last_sync,
            syncs=status.syncs,
            last_refresh_error=status.last_error,
            last_refresh_outcome=status.last_outcome,
            skipped=status.skipped,
            skipped_paths=list(status.skipped_paths),
            store_bytes=info.bytes_on_disk if info else 0,
            syncing=status.syncing,
            sync_done=status.done,
            sync_total=status.total,
            passages_per_s=status.passages_per_s,
            syncer=self.syncing_here,
        )

    async def start(self) -> None:
        if self._task is None:
            self._open_store()
            self._task = asyncio.create_task(self._run(), name=f"sync:{self.name}")

    async def wait_ready(self, timeout: float | None = None) -> None:
        async def until_ready() -> None:
            while not self.ready:
                await asyncio.sleep(0.02)

        await asyncio.wait_for(until_ready(), timeout)

    def trigger_refresh(self) -> None:
        """Ask for a sync now (a file watcher calls this)."""
        self._wake.set()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        watcher, self._watcher = self._watcher, None
        await cancel_and_wait(watcher)
        executor, self._executor = self._executor, None
        if executor is not None:  # let a commit in progress finish before the store (and its lock) goes
            await asyncio.to_thread(executor.shutdown, True)
        store, self._store = self._store, None
        if store is not None:
            store.close()
        if self._ephemeral is not None:
            shutil.rmtree(self._ephemeral, ignore_errors=True)
            self._ephemeral = None
        await self.source.aclose()

    async def _blocking(self, function: Callable[..., T], *args: Any) -> T:
        """Run store I/O on this source's own thread: one at a time, in order, off the event loop."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"sync-{self.name}")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _run(self) -> None:
        store = self._open_store()
        while True:
            while not store.leading:
                if await self._blocking(store.try_lead):
                    break
                store.refresh()
                await asyncio.sleep(LEAD_POLL_S)
            log.info("source %s: this process syncs it", self.name)
            published = store.info()
            self._status = published.status if published.synced_once else SyncStatus()
            self._status.syncing = False
            writer = await self._open_writer(store)
            if writer is None:  # a shared store's connection died on the way: ask for the lead again
                await asyncio.sleep(LEAD_POLL_S)
                continue
            if self._watcher is None:  # only the process that syncs the source watches it
                self._watcher = asyncio.create_task(self.source.watch(self.trigger_refresh), name=f"watch:{self.name}")
            await self._sync_while_leading(store, writer)
            log.warning("source %s: no longer syncs it (the store's lock was lost); asking for it again", self.name)

    async def _open_writer(self, store: IndexStore) -> Any | None:
        """The store's writer, or None if the lead was lost on the way. While the lock stays here no other
        process takes over, so a store that fails to open (busy, a full disk) is tried again until it opens."""
        while True:
            try:
                return await self._blocking(store.open_writer)
            except Exception:
                log.exception("source %s: cannot open its index store", self.name)
                self._status.last_error, self._status.last_outcome = "the index store cannot be opened (see the log)", "error"
                self._first_attempt.set()
                if not store.leading:
                    return None
                self._wake.clear()  # a watcher's trigger must not turn this wait into a busy retry
                await self._pause(min(self.settings.refresh_s, OPEN_RETRY_S))

    async def _sync_while_leading(self, store: IndexStore, writer: Any) -> None:
        while store.leading:
            wait = self.settings.refresh_s
            status = self._status
            # Cleared before the listing, not when the pause starts: a change the watcher reports while this
            # sync runs (after the listing saw the old version) leaves it set, and the next sync runs at once.
            self._wake.clear()
            full = self._last_full is None or time.monotonic() - self._last_full >= max(FULL_LISTING_S, self.settings.refresh_s) - 0.5
            synced = False
            try:
                await self.sync(full=full)
                status.last_error = status.last_outcome = None
                synced = True
            except asyncio.CancelledError:
                raise
            except RateLimited as exc:
                # A pause the source asked for: what is indexed stays, the sync resumes when it said.
                status.last_error, status.last_outcome = str(exc), exc.outcome
                wait = min(wait, exc.retry_after if exc.retry_after is not None else 30.0)
                log.info("source %s: rate limited during sync; resuming in %.0f s", self.name, wait)
            except SourceError as exc:
                status.last_error, status.last_outcome = str(exc), exc.outcome
                log.warning("source %s: sync failed: %s", self.name, exc)
                self._first_attempt.set()  # a source that cannot sync must not keep the whole service unready
            except Exception as exc:  # a bug in a connector, or the store's database gone: the loop goes on
                status.last_error, status.last_outcome = f"{type(exc).__name__}: {exc}", "error"
                if store.leading:
                    log.exception("source %s: sync failed", self.name)
                self._first_attempt.set()
            status.syncing = False
            status.last_sync = now_iso()
            status.syncs += 1
            if status.last_outcome != RateLimited.outcome and store.leading:
                with contextlib.suppress(Exception):
                    await self._blocking(writer.finish, status)
            if synced and not self._first_attempt.is_set():
                await self._until_visible(store)
                self._first_attempt.set()
            if not store.leading:
                return
            await self._pause(wait)

    async def _until_visible(self, store: IndexStore) -> None:
        """Ready means answers come from the index: wait until this process's own view of the store holds the
        finished sync (a shared store's readers see a commit when they next poll it), for VISIBLE_WAIT_S at most."""
        loop = asyncio.get_running_loop()
        until = loop.time() + VISIBLE_WAIT_S
        while not store.info().synced_once and loop.time() < until:
            await asyncio.sleep(0.02)

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or less if `trigger_refresh()` asks (or asked since the last sync began) for a sync now."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    # -- syncing ---------------------------------------------------------------------------------

    async def sync(self, full: bool = True) -> None:
        """Bring the store in line with the source: fetch new and changed documents, drop removed ones.
        `full=False`: only what `list_changed` reports, when the source has it (nothing is removed then)."""
        store = self._open_store()
        if not store.leading and not await self._blocking(store.try_lead):
            return  # another process syncs this source
        writer = await self._blocking(store.open_writer)
        stored = writer.versions()
        changed = None if full or not stored else await self.source.list_changed(stored)
        if changed is None:
            started_listing = time.monotonic()
            versions = await self.source.list_versions()
            self._last_full = started_listing
        else:
            versions = {**stored, **changed}
        status = self._status
        removed = sorted(d for d in stored if d not in versions)
        stale = sorted(d for d, v in versions.items() if stored.get(d) != v)
        status.syncing, status.done, status.total = True, 0, len(stale)
        skipped, skipped_names = self.source.skipped
        status.skipped, status.skipped_paths = skipped, skipped_names[:SKIPPED_NAMES_SHOWN]
        chunk_chars = self.settings.chunk_chars
        pending: list[PreparedDocument] = []
        gone: list[str] = list(removed)
        waiting = 0
        last_commit = time.monotonic()
        started = time.monotonic()
        indexed = 0
        failures: list[BaseException] = []

        async def commit() -> None:
            nonlocal pending, gone, waiting, last_commit, indexed
            if pending or gone:
                await self._blocking(writer.apply, pending, gone, status)
                indexed += waiting
            pending, gone, waiting, last_commit = [], [], 0, time.monotonic()

        batch_size = self.source.batch_size
        for start in range(0, len(stale), batch_size):
            batch = stale[start : start + batch_size]
            results = await self.source.fetch_many(batch)
            documents = []
            for document_id, result in zip(batch, results):
                if isinstance(result, BaseException):
                    if isinstance(result, asyncio.CancelledError):
                        raise result
                    failures.append(result)
                elif result is None:
                    if document_id in stored:
                        gone.append(document_id)
                else:
                    documents.append(result)
            prepared = await asyncio.to_thread(prepare_documents, documents, chunk_chars)
            pending.extend(prepared)
            waiting += sum(len(p.passages) for p in prepared)
            status.done += len(batch)
            elapsed = time.monotonic() - started
            status.passages_per_s = round((indexed + waiting) / elapsed, 1) if elapsed > 0 else None
            if waiting >= COMMIT_PASSAGES or time.monotonic() - last_commit >= COMMIT_EVERY_S:
                await commit()
            if any(isinstance(f, RateLimited) for f in failures):
                break  # the source asked for a pause: keep what was fetched, resume later
        await commit()
        if indexed and time.monotonic() > started:
            status.passages_per_s = round(indexed / (time.monotonic() - started), 1)
        limited = [f for f in failures if isinstance(f, RateLimited)]
        if limited:
            raise limited[0]
        if failures:
            first = failures[0]
            raise first if isinstance(first, SourceError) else SourceError(
                f"{len(failures)} of {len(stale)} documents could not be read: {first}"
            )

    # -- searching -------------------------------------------------------------------------------

    async def search(self, query: SourceQuery) -> list[Passage]:
        store = self._store
        if store is None:
            return []
        predicate = query.accepts
        accept: Callable[[StoredPassage], bool] | None = None
        abandoned = threading.Event()
        if predicate is not None:
            name, source_type = self.name, self.type
            # Every field but `chunk_index` is the same for all passages of a document: unless the filter reads
            # it, each document is tested once (documents are usually split into several passages).
            verdicts: dict[str, bool] | None = None if "chunk_index" in getattr(predicate, "fields", ("chunk_index",)) else {}

            def accept(stored: StoredPassage) -> bool:
                # The search runs on a worker thread, which no timeout can interrupt: a filter that rejects
                # much reads many passages, so it stops here once the call is given up (deadline, timeout).
                if abandoned.is_set():
                    raise _Abandoned
                if verdicts is None:
                    return predicate(record_metadata(_passage(stored), name, source_type))
                verdict = verdicts.get(stored.document_id)
                if verdict is None:
                    verdict = verdicts[stored.document_id] = predicate(record_metadata(_passage(stored), name, source_type))
                return verdict

        try:
            hits = await store.asearch(tokenize(query.text), query.limit, accept)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from None
        finally:
            abandoned.set()
        return [_passage(hit, rank) for rank, hit in enumerate(hits, start=1)]


class _Abandoned(Exception):
    """Raised on a search's worker thread once the call that started it was given up."""


def prepare_documents(documents: Sequence[Document], chunk_chars: int) -> list[PreparedDocument]:
    """Split and tokenize (off the event loop); the title is indexed with every passage."""
    prepared = []
    for document in documents:
        title_terms = tokenize(document.title)
        passages = [(p, title_terms + tokenize(p)) for p in split_passages(document.text, chunk_chars)]
        prepared.append(PreparedDocument(document.document_id, document.version, document.title, document.updated_at, document.metadata, passages))
    return prepared


def _passage(stored: StoredPassage, rank: int | None = None) -> Passage:
    return Passage(
        content=stored.content,
        title=stored.title,
        document_id=stored.document_id,
        chunk_index=stored.chunk_index,
        metadata=stored.metadata,
        updated_at=stored.updated_at,
        source_score=stored.score if rank is not None else None,
        source_rank=rank,
    )


def as_connector(source: Connector | DocumentSource) -> Connector:
    """What the fan-out calls: a source searched at query time as it is, one that cannot search in the sync engine."""
    return IndexedConnector(source) if isinstance(source, DocumentSource) else source
