"""The embedded store: one folder per source under `server.state_dir`, SQLite beside numpy segments.

    <state_dir>/<source>/index.sqlite3   documents (id, version, title, metadata), passages (text),
                                         the term dictionary, the segment list, removed passages,
                                         the settings fingerprint and the syncer's status
    <state_dir>/<source>/seg-*.bin       postings, memory-mapped by every worker (segments.py)
    <state_dir>/<source>/sync.lock       held (flock) by the one process that syncs the source

SQLite in WAL mode gives one writer and any number of readers across processes,
atomic commits and recovery after a crash. Each `LocalStore` holds a `LocalReader`
(reader.py: follows the commits, scores, reads passages) and, in the one process
that holds the lock, a `LocalWriter` (writer.py). The lock is an `flock` on a file:
the kernel releases it when its holder dies, and the next worker to ask takes over.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from aggregator.state.base import IndexStore, StateBackend, StoreInfo
from aggregator.state.local.files import DB_NAME, LOCK_NAME, make_private_dir
from aggregator.state.local.reader import LocalReader
from aggregator.state.local.writer import LocalWriter


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


class LocalStore(IndexStore):
    """One source's folder: its reader, the lock that makes this process its syncer, and the writer it opens."""

    def __init__(self, folder: Path, fingerprint: str, source: str = "") -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.source = source or folder.name
        self.reader = LocalReader(folder, fingerprint, self.source)
        self._lock_fd: int | None = None
        self._writer: LocalWriter | None = None

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

    def open_writer(self) -> LocalWriter:
        if not self.leading:
            raise RuntimeError("only the syncer writes")
        if self._writer is None:
            self._writer = LocalWriter(self.folder, self.fingerprint, self.source)
        return self._writer

    def info(self) -> StoreInfo:
        """The reader's account, with the folder's size as the writer last measured it (fresher, while syncing)."""
        info = self.reader.info()
        if self._writer is not None and self.reader.valid:
            info.bytes_on_disk = self._writer.bytes_on_disk
        return info

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.reader.close()
        self._release()


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
