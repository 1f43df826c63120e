"""The syncer's side of a local store: it validates (or discards) the store when it opens, then commits batches.

A batch's postings go to a new segment file, written and fsynced before the SQLite transaction that names it,
so a commit never refers to half a file; files no commit names (a sync killed mid-way) are deleted when a
writer opens. Removed passages are listed as dead until a merge rewrites the segments without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aggregator.state import segments as seg
from aggregator.state.base import IndexWriter, PreparedDocument, SyncStatus, tie_key
from aggregator.state.local.files import DB_NAME, LOCK_NAME, connect, folder_bytes, read_meta
from aggregator.state.vocabulary import Vocabulary

log = logging.getLogger("aggregator.state")

#: More segments than this, or more than this share of removed passages, and the writer merges them into one.
MAX_SEGMENTS = 8
MAX_DEAD_SHARE = 0.25

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


class LocalWriter(IndexWriter):
    """The syncer's connection. Validates (or discards) the store when it opens."""

    def __init__(self, folder: Path, fingerprint: str, source: str) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.source = source
        self.bytes_on_disk = 0
        self._connection = self._open_checked()
        self._versions = dict(self._connection.execute("SELECT doc_id, version FROM documents").fetchall())
        known = dict(self._connection.execute("SELECT term, id FROM terms").fetchall())
        self._vocabulary = Vocabulary(known, int(read_meta(self._connection).get("next_term", "1")))
        self.bytes_on_disk = folder_bytes(self.folder)

    # -- opening, checking, discarding -------------------------------------------------------------

    def _open_checked(self) -> sqlite3.Connection:
        path = self.folder / DB_NAME
        existed = path.exists() and path.stat().st_size > 0
        reason = None
        connection = None
        try:
            connection = connect(path)
            if existed:
                reason = self._problem(connection)
        except (sqlite3.Error, OSError) as exc:
            reason = f"unreadable ({exc})"
        if reason is not None:
            log.warning("source %s: discarding the stored index (%s); rebuilding it", self.source, reason)
            if connection is not None:
                with contextlib.suppress(sqlite3.Error):
                    connection.close()
            self._discard()
            connection = connect(path)
        connection.executescript(SCHEMA)
        meta = read_meta(connection)
        if "fingerprint" not in meta:
            with connection:
                connection.execute("BEGIN IMMEDIATE")
                connection.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    [("fingerprint", self.fingerprint), ("passages", "0"), ("total_length", "0"),
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
        fingerprint = read_meta(connection).get("fingerprint")
        if fingerprint != self.fingerprint:
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
        meta = read_meta(connection)
        replaced = [d.document_id for d in documents] + list(removed)
        # New term ids and the segment file come first: a crash before the commit leaves an orphan file only.
        vocabulary = self._vocabulary
        term_lists: list[list[int]] = []
        rows: list[tuple[int, str, int, str, int]] = []
        ties: list[int] = []
        pids = self._counter(meta, "next_pid", sum(len(d.passages) for d in documents))
        pid_iter = iter(pids)
        for document in documents:
            for chunk_index, (content, terms) in enumerate(document.passages):
                term_lists.append(vocabulary.ids(terms))
                pid = next(pid_iter)
                rows.append((pid, document.document_id, chunk_index, content, len(terms)))
                ties.append(tie_key(document.document_id, chunk_index))
        meta["next_term"] = str(vocabulary.next_id)
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
                connection.executemany("INSERT INTO terms (id, term) VALUES (?, ?)", list(vocabulary.fresh.items()))
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
            vocabulary.rolled_back()
            if segment_file is not None:
                (self.folder / segment_file).unlink(missing_ok=True)
            raise
        vocabulary.committed()
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
        passages = int(read_meta(connection)["passages"])
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
        meta = read_meta(connection)
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
        log.info("source %s: merged %d index segments in %.2f s", self.source, len(files), time.perf_counter() - started)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._connection.close()
