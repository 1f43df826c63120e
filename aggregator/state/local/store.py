"""The embedded store: one folder per source under `server.state_dir`, SQLite beside numpy segments.

    <state_dir>/<source>/index.sqlite3   documents (id, version, title, metadata), passages (text),
                                         the term dictionary, the segment list, removed passages,
                                         the settings fingerprint and the syncer's status
    <state_dir>/<source>/seg-*.bin       postings, memory-mapped by every worker (segments.py)
    <state_dir>/<source>/sync.lock       held (flock) by the one process that syncs the source

SQLite in WAL mode gives one writer and any number of readers across processes,
atomic commits and recovery after a crash; a segment file is written and fsynced
before the commit that names it, so a commit never refers to half a file, and
files no commit names (a sync killed mid-way) are deleted when a writer opens.
Readers notice commits with `PRAGMA data_version` (no I/O when nothing
changed) and a discarded database by its file having no name any more. The lock is an `flock` on a file:
the kernel releases it when its holder dies, and the next worker to ask takes over.

Scoring is BM25 exactly as `aggregator/ranking/bm25.py` defines it (same k1, b,
idf and ceiling), with the live collection's statistics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from aggregator.ranking.bm25 import K1, B

from aggregator.state import segments as seg
from aggregator.state.base import IndexStore, IndexWriter, PreparedDocument, StateBackend, StoreInfo, StoredPassage, SyncStatus, query_weights

log = logging.getLogger("aggregator.state")

DB_NAME = "index.sqlite3"
LOCK_NAME = "sync.lock"
#: More segments than this, or more than this share of removed passages, and the writer merges them into one.
MAX_SEGMENTS = 8
MAX_DEAD_SHARE = 0.25
#: Documents whose decoded metadata a reader keeps.
METADATA_CACHE = 100_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY, doc_id TEXT UNIQUE NOT NULL, version TEXT NOT NULL, title TEXT NOT NULL,
    updated_at TEXT, metadata TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS passages (
    id INTEGER PRIMARY KEY, document INTEGER NOT NULL, chunk_index INTEGER NOT NULL, content TEXT NOT NULL,
    length INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS passages_document ON passages (document);
CREATE TABLE IF NOT EXISTS terms (id INTEGER PRIMARY KEY, term TEXT UNIQUE NOT NULL);
CREATE TABLE IF NOT EXISTS segments (id INTEGER PRIMARY KEY, file TEXT NOT NULL, passages INTEGER NOT NULL, bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dead (pid INTEGER PRIMARY KEY);
"""


def tie_key(document_id: str, chunk_index: int) -> int:
    """A stable order for passages that score the same: the same on every build, restart and worker."""
    return int.from_bytes(hashlib.blake2b(f"{document_id}\0{chunk_index}".encode(), digest_size=8).digest(), "little")


def make_private_dir(path: Path) -> None:
    """Create a folder only its owner can read (the index holds the documents' text)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if not readonly and not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    uri = f"file:{path}?mode=rw" if readonly else f"file:{path}"  # a reader never creates the file
    connection = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None, timeout=10)
    connection.execute("PRAGMA busy_timeout = 10000")
    if not readonly:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
    return connection


def _meta(connection: sqlite3.Connection) -> dict[str, str]:
    return dict(connection.execute("SELECT key, value FROM meta").fetchall())


def folder_bytes(folder: Path) -> int:
    """Bytes of the files in a store's folder (for /status and `aggregator gc`); 0 if it is gone."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file():
                    total += entry.stat().st_size
    return total


class LocalBackend(StateBackend):
    """Stores under one folder (`server.state_dir`), one subfolder per source."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self) -> dict[str, str]:
        return {"kind": "local", "path": str(self.root)}

    def open(self, source: str, fingerprint: str) -> "LocalStore":
        make_private_dir(self.root)
        folder = self.root / source
        make_private_dir(folder)
        return LocalStore(folder, fingerprint, source)


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


class LocalStore(IndexStore):
    def __init__(self, folder: Path, fingerprint: str, source: str = "") -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.source = source or folder.name
        self._lock_fd: int | None = None
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
        self._metadata: dict[int, dict] = {}  # decoded metadata by document row, for the current view
        self._writer: LocalWriter | None = None
        self._warned = False

    # -- leadership ---------------------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        return self._lock_fd is not None

    def try_lead(self) -> bool:
        if self._lock_fd is not None:
            return True
        fd = os.open(self.folder / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return True

    def _release(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def open_writer(self) -> "LocalWriter":
        if not self.leading:
            raise RuntimeError("only the syncer writes")
        if self._writer is None:
            self._writer = LocalWriter(self)
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        with self._reading:
            self._close_reader()
        self._release()

    # -- reading ---------------------------------------------------------------------------------------

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
            reader = _connect(path, readonly=True)
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
        self._metadata = {}

    def _load(self, reader: sqlite3.Connection) -> None:
        """Load the committed state as one consistent snapshot (a read transaction)."""
        view = _View()
        reader.execute("BEGIN")
        try:
            tables = {row[0] for row in reader.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            meta = _meta(reader) if "meta" in tables else {}
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
        """Read the passages of ranked ids, in order, until `limit` are accepted."""
        reader = self._reader
        if reader is None:
            return []
        if accept is not None:
            return self._filtered(reader, pids, scores, limit, accept)
        found: list[StoredPassage] = []
        start = 0
        while start < len(pids) and len(found) < limit and self._reader is reader:
            chunk = [int(p) for p in pids[start : start + limit - len(found)]]  # more only for passages since removed
            rows = self._rows(
                reader, "SELECT p.id, p.chunk_index, p.content, d.id, d.doc_id, d.title, d.updated_at, d.metadata "
                "FROM passages p JOIN documents d ON d.id = p.document WHERE p.id IN ({marks})", chunk,
            )  # fmt: skip
            for offset, pid in enumerate(chunk, start):
                row = rows.get(pid)
                if row is None:
                    continue  # removed by a commit newer than this reader's view
                chunk_index, content, document, doc_id, title, updated_at, metadata_json = row
                found.append(StoredPassage(doc_id, chunk_index, title, content, self._decoded(document, metadata_json), updated_at, float(scores[offset])))
            start += len(chunk)
        return found

    def _filtered(
        self, reader: sqlite3.Connection, pids: np.ndarray, scores: np.ndarray, limit: int, accept: Callable[[StoredPassage], bool]
    ) -> list[StoredPassage]:
        """Ranked passages that `accept` takes, until `limit`: tested on their document's fields, text read last.

        A filter that rejects much reads many candidates. A filter reads metadata only, so each candidate costs
        its (id, document, chunk) row and each document its row once; passage text is read for the `limit`
        accepted ones alone. `accept` sees each candidate with empty `content`.
        """
        documents: dict[int, tuple[str, str, str | None, dict]] = {}
        kept: list[tuple[int, StoredPassage]] = []
        batch = max(64, 2 * limit)
        start = 0
        while start < len(pids) and len(kept) < limit and self._reader is reader:
            chunk = [int(p) for p in pids[start : start + batch]]
            rows = self._rows(reader, "SELECT id, document, chunk_index FROM passages WHERE id IN ({marks})", chunk)
            unseen = list({row[0] for row in rows.values()} - documents.keys())
            if unseen:
                for document, fields in self._rows(reader, "SELECT id, doc_id, title, updated_at, metadata FROM documents WHERE id IN ({marks})", unseen).items():
                    doc_id, title, updated_at, metadata_json = fields
                    documents[document] = (doc_id, title, updated_at, self._decoded(document, metadata_json))
            for offset, pid in enumerate(chunk):
                row = rows.get(pid)
                fields = documents.get(row[0]) if row is not None else None
                if row is None or fields is None:
                    continue  # removed by a commit newer than this reader's view
                doc_id, title, updated_at, metadata = fields
                passage = StoredPassage(doc_id, row[1], title, "", metadata, updated_at, float(scores[start + offset]))
                if accept(passage):
                    kept.append((pid, passage))
                    if len(kept) >= limit:
                        break
            start += len(chunk)
            batch = min(batch * 2, 4096)  # a filter that rejects much: read ever larger pages
        contents = self._rows(reader, "SELECT id, content FROM passages WHERE id IN ({marks})", [pid for pid, _ in kept])
        return [dataclasses.replace(passage, content=contents[pid][0]) for pid, passage in kept if pid in contents]

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

    def _decoded(self, document: int, metadata_json: str) -> dict:
        """A document's metadata, decoded once per view (bounded: a cache, not a copy of the table)."""
        metadata = self._metadata.get(document)
        if metadata is None:
            if len(self._metadata) >= METADATA_CACHE:
                self._metadata.clear()
            metadata = self._metadata[document] = json.loads(metadata_json)
        return metadata

    def info(self) -> StoreInfo:
        self.refresh()
        view = self._view
        if self._writer is not None and view.valid:
            view.bytes_on_disk = self._writer.bytes_on_disk
        return StoreInfo(view.documents, view.passages, view.bytes_on_disk, view.synced_once, view.status)


class LocalWriter(IndexWriter):
    """The syncer's connection. Validates (or discards) the store when it opens."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        self.folder = store.folder
        self.bytes_on_disk = 0
        self._connection = self._open_checked()
        self._versions = dict(self._connection.execute("SELECT doc_id, version FROM documents").fetchall())
        self._vocabulary = dict(self._connection.execute("SELECT term, id FROM terms").fetchall())
        self.bytes_on_disk = folder_bytes(self.folder)

    # -- opening, checking, discarding -------------------------------------------------------------

    def _open_checked(self) -> sqlite3.Connection:
        path = self.folder / DB_NAME
        existed = path.exists() and path.stat().st_size > 0
        reason = None
        connection = None
        try:
            connection = _connect(path)
            if existed:
                reason = self._problem(connection)
        except (sqlite3.Error, OSError) as exc:
            reason = f"unreadable ({exc})"
        if reason is not None:
            log.warning("source %s: discarding the stored index (%s); rebuilding it", self.store.source, reason)
            if connection is not None:
                with contextlib.suppress(sqlite3.Error):
                    connection.close()
            self._discard()
            connection = _connect(path)
        connection.executescript(SCHEMA)
        meta = _meta(connection)
        if "fingerprint" not in meta:
            with connection:
                connection.execute("BEGIN IMMEDIATE")
                connection.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    [("fingerprint", self.store.fingerprint), ("passages", "0"), ("total_length", "0"),
                     ("documents", "0"), ("next_pid", "1"), ("next_segment", "1"), ("synced_once", "0")],
                )  # fmt: skip
        self._remove_orphans(connection)
        return connection

    def _problem(self, connection: sqlite3.Connection) -> str | None:
        """Why a stored index cannot be used, or None."""
        check = connection.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            return f"damaged: {check}"
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "meta" not in tables:
            return "not an index of this gateway"
        fingerprint = _meta(connection).get("fingerprint")
        if fingerprint != self.store.fingerprint:
            return "written under other settings, another tokenizer or another store format"
        for name, size in connection.execute("SELECT file, bytes FROM segments"):
            try:
                segment = seg.Segment(self.folder / name, verify=True)
            except seg.SegmentCorrupt as exc:
                return f"damaged: {exc}"
            if segment.size != size:
                return f"damaged: {name} has {segment.size} bytes, the store says {size}"
        return None

    def _discard(self) -> None:
        for entry in self.folder.iterdir():
            if entry.name != LOCK_NAME and entry.is_file():
                entry.unlink(missing_ok=True)

    def _remove_orphans(self, connection: sqlite3.Connection) -> None:
        """Segment files no commit names: left by a sync that was killed, or by a merge's predecessors."""
        named = {row[0] for row in connection.execute("SELECT file FROM segments")}
        for entry in self.folder.iterdir():
            if (entry.name.startswith("seg-") and entry.name not in named) or entry.suffix == ".tmp":
                entry.unlink(missing_ok=True)

    # -- writing -------------------------------------------------------------------------------------

    def versions(self) -> dict[str, str]:
        return dict(self._versions)

    def _counter(self, meta: dict[str, str], key: str, count: int) -> range:
        start = int(meta[key])
        meta[key] = str(start + count)
        return range(start, start + count)

    def apply(self, documents: Sequence[PreparedDocument], removed: Sequence[str], status: SyncStatus) -> None:
        connection = self._connection
        meta = _meta(connection)
        replaced = [d.document_id for d in documents] + list(removed)
        # New term ids and the segment file come first: a crash before the commit leaves an orphan file only.
        fresh_terms: list[tuple[int, str]] = []
        vocabulary = self._vocabulary
        next_term = int(meta.get("next_term", "1"))
        term_lists: list[list[int]] = []
        rows: list[tuple[int, str, int, str, int]] = []
        ties: list[int] = []
        pids = self._counter(meta, "next_pid", sum(len(d.passages) for d in documents))
        pid_iter = iter(pids)
        lookup = vocabulary.__getitem__
        for document in documents:
            for chunk_index, (content, terms) in enumerate(document.passages):
                try:
                    ids = list(map(lookup, terms))  # the common case: every term known already
                except KeyError:
                    ids = []
                    for term in terms:
                        term_id = vocabulary.get(term)
                        if term_id is None:
                            term_id = vocabulary[term] = next_term
                            fresh_terms.append((next_term, term))
                            next_term += 1
                        ids.append(term_id)
                term_lists.append(ids)
                pid = next(pid_iter)
                rows.append((pid, document.document_id, chunk_index, content, len(terms)))
                ties.append(tie_key(document.document_id, chunk_index))
        meta["next_term"] = str(next_term)
        segment_file = None
        segment_bytes = 0
        if rows:
            segment_file = f"seg-{self._counter(meta, 'next_segment', 1)[0]:08d}.bin"
            data = seg.build([r[0] for r in rows], ties, term_lists)
            segment_bytes = seg.write(self.folder / segment_file, data)
        try:
            with connection:
                connection.execute("BEGIN IMMEDIATE")
                gone_passages, gone_length, gone_documents = self._delete(connection, replaced)
                doc_rows: dict[str, int] = {}
                for document in documents:
                    cursor = connection.execute(
                        "INSERT INTO documents (doc_id, version, title, updated_at, metadata) VALUES (?, ?, ?, ?, ?)",
                        (document.document_id, document.version, document.title, document.updated_at,
                         json.dumps(document.metadata, ensure_ascii=False, default=str)),
                    )  # fmt: skip
                    doc_rows[document.document_id] = int(cursor.lastrowid or 0)
                connection.executemany(
                    "INSERT INTO passages (id, document, chunk_index, content, length) VALUES (?, ?, ?, ?, ?)",
                    [(pid, doc_rows[doc_id], chunk, content, length) for pid, doc_id, chunk, content, length in rows],
                )
                connection.executemany("INSERT INTO terms (id, term) VALUES (?, ?)", fresh_terms)
                if segment_file is not None:
                    connection.execute(
                        "INSERT INTO segments (file, passages, bytes) VALUES (?, ?, ?)", (segment_file, len(rows), segment_bytes)
                    )
                meta["passages"] = str(int(meta["passages"]) - gone_passages + len(rows))
                meta["total_length"] = str(int(meta["total_length"]) - gone_length + sum(r[4] for r in rows))
                meta["documents"] = str(int(meta["documents"]) - gone_documents + len(documents))
                meta["status"] = status.to_json()
                connection.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(meta.items()))
        except BaseException:
            for term_id, term in fresh_terms:  # not committed: forget them so ids stay in step with the table
                vocabulary.pop(term, None)
            if segment_file is not None:
                (self.folder / segment_file).unlink(missing_ok=True)
            raise
        for document_id in removed:
            self._versions.pop(document_id, None)
        for document in documents:
            self._versions[document.document_id] = document.version
        self.bytes_on_disk = folder_bytes(self.folder)

    def _delete(self, connection: sqlite3.Connection, document_ids: Sequence[str]) -> tuple[int, int, int]:
        """Remove documents and mark their passages dead in their segments; (passages, length, documents) removed."""
        passages = length = documents = 0
        for start in range(0, len(document_ids), 500):
            chunk = list(document_ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            doc_rows = [r[0] for r in connection.execute(f"SELECT id FROM documents WHERE doc_id IN ({marks})", chunk)]
            if not doc_rows:
                continue
            marks = ",".join("?" * len(doc_rows))
            gone = connection.execute(f"SELECT id, length FROM passages WHERE document IN ({marks})", doc_rows).fetchall()
            connection.executemany("INSERT OR IGNORE INTO dead (pid) VALUES (?)", [(pid,) for pid, _ in gone])
            connection.execute(f"DELETE FROM passages WHERE document IN ({marks})", doc_rows)
            connection.execute(f"DELETE FROM documents WHERE id IN ({marks})", doc_rows)
            passages += len(gone)
            length += sum(n for _, n in gone)
            documents += len(doc_rows)
        return passages, length, documents

    def finish(self, status: SyncStatus) -> None:
        connection = self._connection
        with connection:
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [("status", status.to_json()), ("synced_once", "1")]
            )
        self._merge_if_needed()
        self.bytes_on_disk = folder_bytes(self.folder)

    def _merge_if_needed(self) -> None:
        connection = self._connection
        files = connection.execute("SELECT id, file FROM segments ORDER BY id").fetchall()
        dead = np.fromiter((r[0] for r in connection.execute("SELECT pid FROM dead")), dtype=np.int64)
        passages = int(_meta(connection)["passages"])
        if len(files) <= MAX_SEGMENTS and len(dead) <= MAX_DEAD_SHARE * max(passages, 1):
            return
        if len(files) <= 1 and not len(dead):
            return
        started = time.perf_counter()
        opened = [seg.Segment(self.folder / name, verify=False) for _, name in files]
        live = []
        for segment in opened:
            mask = np.ones(len(segment), dtype=bool)
            if len(dead):
                mask &= ~np.isin(segment.pids, dead)
            live.append(mask)
        data = seg.merge(opened, live)
        meta = _meta(connection)
        name = f"seg-{self._counter(meta, 'next_segment', 1)[0]:08d}.bin"
        size = seg.write(self.folder / name, data)
        with connection:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("DELETE FROM segments")
            connection.execute("DELETE FROM dead")
            if len(data):
                connection.execute("INSERT INTO segments (file, passages, bytes) VALUES (?, ?, ?)", (name, len(data), size))
            connection.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('next_segment', ?)", (meta["next_segment"],))
        del opened
        self._remove_orphans(connection)
        if not len(data):
            (self.folder / name).unlink(missing_ok=True)
        log.info("source %s: merged %d index segments in %.2f s", self.store.source, len(files), time.perf_counter() - started)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._connection.close()


def unused_stores(root: Path, in_use: set[str]) -> list[Path]:
    """Stores under `root` of sources the config no longer names (what `aggregator gc` removes)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / DB_NAME).exists() and p.name not in in_use)


def remove_store(folder: Path) -> bool:
    """Delete one source's store unless a running gateway syncs it (its lock is held); True if removed."""
    fd = os.open(folder / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        for entry in folder.iterdir():
            if entry.is_file() or entry.is_symlink():
                entry.unlink(missing_ok=True)
        folder.rmdir()
        return True
    finally:
        os.close(fd)
