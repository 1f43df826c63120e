"""What every store's reader does alike: read ranked candidates a page at a time until enough pass a request's
filter, and decode each document's metadata once.

A filter that rejects much makes a search read many candidates. `Pages` says which candidates to read next
(without a filter just the passages still wanted; with one, a first page that holds enough if half pass, then
pages twice as large, up to MAX_PAGE) and tests each candidate as it is read, so a call given up (its filter
raises) stops at its next candidate. The stores differ only in how they read a page: rows of ranked ids from
SQLite (`local.reader`), or an OFFSET of one ranking statement in PostgreSQL (`postgres.reader`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from aggregator.state.base import StoredPassage

#: The most candidates read in one page.
MAX_PAGE = 4096
#: The fewest candidates in the first page read for a filter.
MIN_FILTERED_PAGE = 64

Key = TypeVar("Key")


class Pages(Generic[Key]):
    """Ranked candidates, read in pages until `limit` of them pass `accept` or none are left.

        pages = Pages(limit, accept)
        for offset, count in pages:                  # the candidates at ranks offset .. offset + count - 1
            pages.take(read(offset, count), last)    # (key, passage) of those still stored, in rank order
        return pages.kept

    `accept` sees each candidate once, in rank order, and may raise to stop the search (a deadline)."""

    def __init__(self, limit: int, accept: Callable[[StoredPassage], bool] | None) -> None:
        self.limit = limit
        self.accept = accept
        self.kept: list[tuple[Key, StoredPassage]] = []
        self.offset = 0
        self._page = max(MIN_FILTERED_PAGE, 2 * limit)
        self._asked = 0
        self._last = False

    def __iter__(self) -> Iterator[tuple[int, int]]:
        while not self._last and len(self.kept) < self.limit:
            # no filter: only the passages still wanted (more than one page only for passages since removed)
            self._asked = self._page if self.accept is not None else self.limit - len(self.kept)
            yield self.offset, self._asked

    def take(self, candidates: Iterable[tuple[Key, StoredPassage]], last: bool) -> None:
        """The page just read: what `accept` takes of it, up to `limit` in all; `last`: no candidates after it."""
        accept, kept = self.accept, self.kept
        for key, passage in candidates:
            if accept is None or accept(passage):
                kept.append((key, passage))
                if len(kept) >= self.limit:
                    break
        self.offset += self._asked
        self._page = min(self._page * 2, MAX_PAGE)  # a filter that rejects much: read ever larger pages
        self._last = last

    def passages(self) -> list[StoredPassage]:
        return [passage for _, passage in self.kept]


class MetadataCache:
    """Documents' decoded metadata by document row, so that a document's passages decode it once. Bounded: a
    cache, not a copy of the table (emptied when full). A reader empties it when a row id may name another
    document (a store that reuses row ids, after a commit)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._decoded: dict[int, dict[str, Any]] = {}

    def decoded(self, document: int, metadata_json: str) -> dict[str, Any]:
        metadata = self._decoded.get(document)
        if metadata is None:
            if len(self._decoded) >= self.size:
                self._decoded.clear()
            metadata = self._decoded[document] = json.loads(metadata_json)
        return metadata

    def passage(self, row: Sequence[Any], score: float) -> StoredPassage:
        """A passage from the row both stores read: chunk index, content, document row, document id, title,
        updated_at, metadata JSON."""
        chunk_index, content, document, doc_id, title, updated_at, metadata_json = row
        return StoredPassage(doc_id, chunk_index, title, content, self.decoded(document, metadata_json), updated_at, score)

    def clear(self) -> None:
        self._decoded.clear()
