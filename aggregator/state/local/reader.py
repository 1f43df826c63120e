"""Every process's side of a local store: the committed state, loaded, scored and read.

A reader sees commits with `PRAGMA data_version` (no I/O when nothing changed), and a discarded database by
its file having no name any more. It maps the segments the commit names and keeps, per view, each passage's
length normalisation, the live passages of each segment, the document frequencies it has counted and the
decoded metadata. Scoring is BM25 exactly as `aggregator/ranking/bm25.py` defines it (same k1, b, idf and
ceiling), with the live collection's statistics, in float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from aggregator.ranking.bm25 import K1, B

from aggregator.state import segments as seg
from aggregator.state.base import IndexReader, StoredPassage, StoreInfo, SyncStatus, query_weights
from aggregator.state.local.files import DB_NAME, connect, folder_bytes, read_meta
from aggregator.state.reading import MetadataCache, Pages

log = logging.getLogger("aggregator.state")

#: Documents whose decoded metadata a reader keeps.
METADATA_CACHE = 100_000

_PASSAGES = (
    "SELECT p.id, p.chunk_index, p.content, d.id, d.doc_id, d.title, d.updated_at, d.metadata "
    "FROM passages p JOIN documents d ON d.id = p.document WHERE p.id IN ({marks})"
)


class _View:
    """What a reader has loaded of one committed state: the segments and their live passages."""

    def __init__(self) -> None:
        self.segments: list[seg.Segment] = []
        self.live: list[np.ndarray] = []
        self.dead_count: list[int] = []
        self.norms: list[np.ndarray] = []  # k1 * (1 - b + b * |d| / avgdl) of each passage, per segment
        self.passages = 0
        self.total_length = 0
        self.documents = 0
        self.valid = False  # False: nothing stored yet, or stored under other settings
        self.synced_once = False
        self.status = SyncStatus()
        self.bytes_on_disk = 0


class LocalReader(IndexReader):
    """One process's view of a local store; every worker has its own, over the same files."""

    def __init__(self, folder: Path, fingerprint: str, source: str) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.source = source
        self._reader: sqlite3.Connection | None = None
        # Searches run on worker threads (`asearch`) while the event loop asks for statistics and status: the
        # reader connection and the view it loads change under this lock, each use of it holds the lock briefly.
        self._reading = threading.RLock()
        self._pin: int | None = None  # a descriptor of the database file the reader uses, to see it deleted
        self._data_version: int | None = None
        self._view = _View()
        self._opened: dict[str, seg.Segment] = {}  # file name -> mapped segment, reused across reloads
        self._term_ids: dict[str, int] = {}
        self._absent: set[str] = set()  # terms not in the dictionary as of the current view
        self._df: dict[int, int] = {}
        self._metadata = MetadataCache(METADATA_CACHE)  # row ids are reused after removals: emptied per view
        self._warned = False

    def close(self) -> None:
        with self._reading:
            self._close_reader()

    # -- following the commits ---------------------------------------------------------------------

    def _close_reader(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(sqlite3.Error):
                self._reader.close()
        self._reader = None
        self._data_version = None
        self._opened = {}  # a new store may reuse file names
        if self._pin is not None:
            os.close(self._pin)
            self._pin = None

    def _open_reader(self) -> sqlite3.Connection | None:
        path = self.folder / DB_NAME
        try:
            pin = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            reader = connect(path, readonly=True)
        except sqlite3.Error:
            os.close(pin)
            return None
        self._reader, self._pin = reader, pin
        return reader

    def refresh(self) -> None:
        with self._reading:
            self._refresh()

    def _refresh(self) -> None:
        if self._pin is not None and os.fstat(self._pin).st_nlink == 0:
            self._close_reader()  # the syncer discarded the store (its file is gone) and began a new one
        reader = self._reader or self._open_reader()
        if reader is None:
            self._set_view(_View())
            return
        try:
            version = reader.execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                return
            self._load(reader)
            self._data_version = version
        except (sqlite3.Error, seg.SegmentCorrupt, OSError) as exc:
            if not self._warned:
                log.warning("source %s: cannot read the stored index yet (%s); serving nothing from it", self.source, exc)
                self._warned = True
            self._close_reader()
            self._set_view(_View())

    def _set_view(self, view: _View) -> None:
        self._view = view
        self._df = {}
        self._absent = set()
        self._metadata.clear()

    def _load(self, reader: sqlite3.Connection) -> None:
        """Load the committed state as one consistent snapshot (a read transaction)."""
        view = _View()
        reader.execute("BEGIN")
        try:
            tables = {row[0] for row in reader.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            meta = read_meta(reader) if "meta" in tables else {}
            if meta.get("fingerprint") != self.fingerprint:
                self._set_view(view)  # nothing stored, or another settings' index: never served
                return
            view.valid = True
            view.passages = int(meta.get("passages", 0))
            view.total_length = int(meta.get("total_length", 0))
            view.documents = int(meta.get("documents", 0))
            view.synced_once = meta.get("synced_once") == "1"
            view.status = SyncStatus.from_json(meta.get("status"))
            files = reader.execute("SELECT file, bytes FROM segments ORDER BY id").fetchall()
            dead = np.fromiter((row[0] for row in reader.execute("SELECT pid FROM dead")), dtype=np.int64)
        finally:
            reader.execute("COMMIT")
        first_load = not self._opened
        opened: dict[str, seg.Segment] = {}
        for name, size in files:
            segment = self._opened.get(name)
            if segment is None:
                segment = seg.Segment(self.folder / name, verify=first_load)
                if segment.size != size:
                    raise seg.SegmentCorrupt(f"{name}: {segment.size} bytes, the store says {size}")
            opened[name] = segment
            live = np.ones(len(segment), dtype=bool)
            if len(dead):
                at = np.searchsorted(segment.pids, dead)
                inside = at < len(segment)
                hit = at[inside][segment.pids[at[inside]] == dead[inside]]
                live[hit] = False
            view.segments.append(segment)
            view.live.append(live)
            view.dead_count.append(int(len(segment) - live.sum()))
        self._opened = opened
        avgdl = view.total_length / view.passages if view.passages else 1.0
        view.norms = [(K1 * (1 - B) + (K1 * B / (avgdl or 1.0)) * s.lengths).astype(np.float32) for s in view.segments]
        view.bytes_on_disk = folder_bytes(self.folder)
        self._set_view(view)
        self._warned = False

    # -- statistics ------------------------------------------------------------------------------------

    def _lookup_terms(self, terms: Sequence[str]) -> dict[str, int]:
        """Term ids of `terms` that are in the dictionary (ids never change, so they are cached)."""
        wanted = [t for t in dict.fromkeys(terms) if t not in self._term_ids and t not in self._absent]
        if wanted and self._reader is not None:
            marks = ",".join("?" * len(wanted))
            try:
                with self._reading:
                    found = self._reader.execute(f"SELECT term, id FROM terms WHERE term IN ({marks})", wanted).fetchall()
                for term, term_id in found:
                    self._term_ids[term] = term_id
            except sqlite3.Error as exc:  # a store being replaced under us: nothing found now, asked again next time
                log.debug("source %s: term lookup failed (%s)", self.source, exc)
                return {t: self._term_ids[t] for t in terms if t in self._term_ids}
            self._absent.update(t for t in wanted if t not in self._term_ids)
        return {t: self._term_ids[t] for t in terms if t in self._term_ids}

    def _frequency(self, term_id: int) -> int:
        """Live passages holding a term: posting lengths, minus removed passages where a segment has some."""
        found = self._df.get(term_id)
        if found is None:
            found = 0
            view = self._view
            for segment, live, dead in zip(view.segments, view.live, view.dead_count):
                postings = segment.postings(term_id)
                if postings is not None:
                    found += int(np.count_nonzero(live[postings[0]])) if dead else len(postings[0])
            self._df[term_id] = found
        return found

    def term_statistics(self, terms: Sequence[str]) -> tuple[int, int, dict[str, int]]:
        self.refresh()
        view = self._view
        if not view.valid or not view.passages:  # nothing committed yet (a first sync has not written its tables)
            return 0, 0, dict.fromkeys(terms, 0)
        ids = self._lookup_terms(terms)
        return view.passages, view.total_length, {t: self._frequency(ids[t]) if t in ids else 0 for t in dict.fromkeys(terms)}

    def info(self) -> StoreInfo:
        self.refresh()
        view = self._view
        return StoreInfo(view.documents, view.passages, view.bytes_on_disk, view.synced_once, view.status)

    @property
    def valid(self) -> bool:
        """The view holds an index of these settings (not nothing, nor another settings' index)."""
        return self._view.valid

    # -- searching -------------------------------------------------------------------------------------

    def search(
        self, terms: Sequence[str], limit: int, accept: Callable[[StoredPassage], bool] | None = None
    ) -> list[StoredPassage]:
        self.refresh()
        view = self._view
        n = view.passages
        if not terms or limit <= 0 or n == 0 or not view.segments:
            return []
        ids = self._lookup_terms(terms)

        def known(term: str) -> tuple[int, int]:
            return (ids[term], self._frequency(ids[term])) if term in ids else (0, 0)

        term_ids, term_weights, ceiling = query_weights(terms, n, known)
        if not term_ids or ceiling <= 0:
            return []
        weights = list(zip(term_ids, term_weights))
        found_scores, found_ties, found_pids = [], [], []
        for segment, live, dead, norm in zip(view.segments, view.live, view.dead_count, view.norms):
            scores = None
            for term_id, weight in weights:
                postings = segment.postings(term_id)
                if postings is None:
                    continue
                local, tfs = postings  # uint16 frequencies mix into float32 without a copy
                # weight * tf / (tf + k1 * (1 - b + b * |d| / avgdl)), the second term precomputed; the factor
                # (k1 + 1) of every term and of the ceiling cancels out of the normalised score, so it is left out
                part = norm[local]
                part += tfs
                np.divide(tfs, part, out=part)
                part *= np.float32(weight)
                if scores is None:  # float32 throughout: relative error ~1e-7, half the memory traffic
                    scores = np.zeros(len(segment), dtype=np.float32)
                    scores[local] = part
                else:
                    scores[local] += part
            if scores is None:
                continue
            if dead:
                scores[~live] = 0.0
            if accept is None and len(scores) > limit:
                kth = max(float(np.partition(scores, len(scores) - limit)[len(scores) - limit]), float(np.finfo(np.float32).tiny))
                hits = np.flatnonzero(scores >= kth)  # every passage tied with the last one stays: the tie-break decides
            else:
                hits = np.flatnonzero(scores > 0)
            found_scores.append(scores[hits])
            found_ties.append(segment.ties[hits])
            found_pids.append(segment.pids[hits])
        if not found_scores:
            return []
        scores = np.concatenate(found_scores)
        ties = np.concatenate(found_ties)
        pids = np.concatenate(found_pids)
        if accept is None and len(scores) > limit:
            kth = np.partition(scores, len(scores) - limit)[len(scores) - limit]
            keep = scores >= kth
            scores, ties, pids = scores[keep], ties[keep], pids[keep]
        order = np.lexsort((ties, -scores))
        return self._materialise(pids[order], scores[order].astype(np.float64) * (K1 + 1) / ceiling, limit, accept)

    def _materialise(
        self, pids: np.ndarray, scores: np.ndarray, limit: int, accept: Callable[[StoredPassage], bool] | None
    ) -> list[StoredPassage]:
        """Read the passages of ranked ids, in order, until `limit` are accepted.

        A filter that rejects much reads many candidates. A filter reads metadata only, so each candidate costs
        its (id, document, chunk) row and each document its row once; passage text is read for the `limit`
        accepted ones alone. `accept` sees each candidate with empty `content`.
        """
        reader = self._reader
        if reader is None:
            return []
        documents: dict[int, tuple[str, str, str | None, dict]] = {}  # a filter's candidates' documents, read once
        pages: Pages[int] = Pages(limit, accept)
        for offset, count in pages:
            chunk = [int(p) for p in pids[offset : offset + count]]
            if accept is None:
                rows = self._rows(reader, _PASSAGES, chunk)
                page = self._passages(chunk, rows, scores, offset)
            else:
                page = self._candidates(reader, chunk, scores, offset, documents)
            pages.take(page, last=offset + count >= len(pids) or self._reader is not reader)
        if accept is None:
            return pages.passages()
        contents = self._rows(reader, "SELECT id, content FROM passages WHERE id IN ({marks})", [pid for pid, _ in pages.kept])
        return [dataclasses.replace(passage, content=contents[pid][0]) for pid, passage in pages.kept if pid in contents]

    def _passages(
        self, chunk: list[int], rows: dict[int, tuple], scores: np.ndarray, offset: int
    ) -> Iterator[tuple[int, StoredPassage]]:
        for at, pid in enumerate(chunk, offset):
            row = rows.get(pid)
            if row is not None:  # else removed by a commit newer than this reader's view
                yield pid, self._metadata.passage(row, float(scores[at]))

    def _candidates(
        self, reader: sqlite3.Connection, chunk: list[int], scores: np.ndarray, offset: int,
        documents: dict[int, tuple[str, str, str | None, dict]],
    ) -> Iterator[tuple[int, StoredPassage]]:  # fmt: skip
        """A page of candidates for a filter: each with its document's fields and without its text."""
        rows = self._rows(reader, "SELECT id, document, chunk_index FROM passages WHERE id IN ({marks})", chunk)
        unseen = list({row[0] for row in rows.values()} - documents.keys())
        if unseen:
            for document, fields in self._rows(reader, "SELECT id, doc_id, title, updated_at, metadata FROM documents WHERE id IN ({marks})", unseen).items():
                doc_id, title, updated_at, metadata_json = fields
                documents[document] = (doc_id, title, updated_at, self._metadata.decoded(document, metadata_json))
        return self._described(chunk, rows, documents, scores, offset)

    @staticmethod
    def _described(
        chunk: list[int], rows: dict[int, tuple], documents: dict[int, tuple[str, str, str | None, dict]], scores: np.ndarray, offset: int
    ) -> Iterator[tuple[int, StoredPassage]]:
        for at, pid in enumerate(chunk, offset):
            row = rows.get(pid)
            fields = documents.get(row[0]) if row is not None else None
            if row is None or fields is None:
                continue  # removed by a commit newer than this reader's view
            doc_id, title, updated_at, metadata = fields
            yield pid, StoredPassage(doc_id, row[1], title, "", metadata, updated_at, float(scores[at]))

    def _rows(self, reader: sqlite3.Connection, sql: str, ids: list[int]) -> dict[int, tuple]:
        """Rows by their first column for `ids`, or none if the store was replaced or closed meanwhile."""
        if not ids:
            return {}
        with self._reading:
            if self._reader is not reader:
                return {}
            try:
                fetched = reader.execute(sql.format(marks=",".join("?" * len(ids))), ids).fetchall()
            except sqlite3.Error as exc:
                log.debug("source %s: reading passages failed (%s)", self.source, exc)
                return {}
        return {row[0]: row[1:] for row in fetched}
