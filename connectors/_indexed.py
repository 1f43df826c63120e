"""Shared machinery for sources that have no search API of their own (files, S3, Notion).

A subclass says how to list its documents with a version token (mtime, ETag,
last_edited_time) and how to fetch one; this class keeps a BM25 index of
their passages fresh: the first sync runs in the background at start, later
ones every `refresh_s` or when `trigger_refresh()` is called, and each sync
fetches only what is new or changed and drops what disappeared.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import count
from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import Field

from aggregator.ranking.bm25 import BM25Index
from aggregator.text.chunking import split_passages
from aggregator.text.tokenize import tokenize

from .base import (
    Connector, ConnectorSettings, Passage, RateLimited, SourceError, SourceQuery, SourceStats, TermStatistics, record_metadata,
)  # fmt: skip

log = logging.getLogger(__name__)


class IndexedSettings(ConnectorSettings):
    refresh_s: float = Field(300.0, ge=1, le=86400, description="Seconds between two syncs of the index.")


@dataclass(slots=True)
class Document:
    """A whole document as a source hands it over, before it is split into passages."""

    document_id: str
    title: str
    text: str
    version: str
    updated_at: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Indexed:
    version: str
    keys: list[int]


def iso_utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class IndexedConnector(Connector):
    settings: IndexedSettings
    #: How many documents are fetched at once during a sync.
    fetch_concurrency: ClassVar[int] = 8

    def __init__(self, name: str, settings: IndexedSettings) -> None:
        super().__init__(name, settings)
        self._index = BM25Index()
        self._passages: dict[int, Passage] = {}
        self._documents: dict[str, _Indexed] = {}
        self._ids = count()
        self._stats = SourceStats()
        self._first_sync = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- what a subclass provides -------------------------------------------------------------

    @abc.abstractmethod
    async def list_versions(self) -> dict[str, str]:
        """Every document id the source holds now, with a token that changes when the document does."""

    @abc.abstractmethod
    async def fetch(self, document_id: str) -> Document | None:
        """One document, or None if it vanished or must be skipped since listing."""

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._first_sync.is_set()

    def term_statistics(self, terms: Sequence[str]) -> TermStatistics:
        index = self._index
        return TermStatistics(len(index), index.total_length, index.document_frequencies(terms))

    def stats(self) -> SourceStats:
        self._stats.documents = len(self._documents)
        self._stats.passages = len(self._passages)
        return self._stats

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"sync:{self.name}")

    async def wait_ready(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._first_sync.wait(), timeout)

    def trigger_refresh(self) -> None:
        """Ask for a sync now (a file watcher calls this)."""
        self._wake.set()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            wait = self.settings.refresh_s
            try:
                await self.sync()
                self._stats.last_refresh_error = self._stats.last_refresh_outcome = None
                self._first_sync.set()
            except asyncio.CancelledError:
                raise
            except RateLimited as exc:
                # A pause the source asked for: what is indexed stays, the sync resumes when it said.
                self._stats.last_refresh_error, self._stats.last_refresh_outcome = str(exc), exc.outcome
                wait = min(wait, exc.retry_after if exc.retry_after is not None else 30.0)
                log.info("source %s: rate limited during sync; resuming in %.0f s", self.name, wait)
            except SourceError as exc:
                self._stats.last_refresh_error, self._stats.last_refresh_outcome = str(exc), exc.outcome
                log.warning("source %s: sync failed: %s", self.name, exc)
                self._first_sync.set()  # a source that cannot sync must not keep the whole service unready
            except Exception as exc:  # a bug in a connector must not stop the refresh loop
                self._stats.last_refresh_error = f"{type(exc).__name__}: {exc}"
                self._stats.last_refresh_outcome = "error"
                log.exception("source %s: sync failed", self.name)
                self._first_sync.set()
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    # -- syncing ---------------------------------------------------------------------------------

    async def sync(self) -> None:
        """Bring the index in line with the source: fetch new and changed documents, drop removed ones."""
        versions = await self.list_versions()
        for document_id in [d for d in self._documents if d not in versions]:
            self._drop(document_id)
        stale = [d for d, v in versions.items() if d not in self._documents or self._documents[d].version != v]
        gate = asyncio.Semaphore(self.fetch_concurrency)
        chunk_chars = self.settings.chunk_chars or 1500

        async def load(document_id: str) -> None:
            async with gate:
                document = await self.fetch(document_id)
            if document is None:
                self._drop(document_id)
                return
            prepared = await asyncio.to_thread(_prepare, document, chunk_chars)
            self._replace(document, prepared)

        results = await asyncio.gather(*(load(d) for d in stale), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        self._stats.last_refresh = iso_utc(datetime.now(timezone.utc).timestamp())
        for failure in failures:
            if isinstance(failure, asyncio.CancelledError):
                raise failure
        limited = [f for f in failures if isinstance(f, RateLimited)]
        if limited:
            raise limited[0]
        if failures:
            raise failures[0] if isinstance(failures[0], SourceError) else SourceError(
                f"{len(failures)} of {len(stale)} documents could not be read: {failures[0]}"
            )

    def _drop(self, document_id: str) -> None:
        indexed = self._documents.pop(document_id, None)
        if indexed is None:
            return
        for key in indexed.keys:
            self._index.remove(key)
            self._passages.pop(key, None)

    def _replace(self, document: Document, prepared: list[tuple[str, list[str]]]) -> None:
        self._drop(document.document_id)
        keys: list[int] = []
        for chunk_index, (content, terms) in enumerate(prepared):
            key = next(self._ids)
            self._passages[key] = Passage(
                content=content,
                title=document.title,
                document_id=document.document_id,
                chunk_index=chunk_index,
                metadata=document.metadata,
                updated_at=document.updated_at,
            )
            self._index.add(key, terms)
            keys.append(key)
        self._documents[document.document_id] = _Indexed(document.version, keys)

    # -- searching -------------------------------------------------------------------------------

    async def search(self, query: SourceQuery) -> list[Passage]:
        accept = None
        if query.accepts is not None:
            predicate, passages = query.accepts, self._passages

            def accept(key: object) -> bool:
                return predicate(record_metadata(passages[key], self.name, self.type))  # type: ignore[index]

        hits = self._index.search(tokenize(query.text), query.limit, accept)
        return [_scored(self._passages[key], score, rank) for rank, (key, score) in enumerate(hits, start=1)]  # type: ignore[index]


def _prepare(document: Document, chunk_chars: int) -> list[tuple[str, list[str]]]:
    """Split and tokenize off the event loop; the title is indexed with every passage."""
    title_terms = tokenize(document.title)
    return [(p, title_terms + tokenize(p)) for p in split_passages(document.text, chunk_chars)]


def _scored(passage: Passage, score: float, rank: int) -> Passage:
    return Passage(
        content=passage.content,
        title=passage.title,
        document_id=passage.document_id,
        chunk_index=passage.chunk_index,
        metadata=passage.metadata,
        updated_at=passage.updated_at,
        source_score=score,
        source_rank=rank,
    )
