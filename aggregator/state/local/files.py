"""A local store's folder: the names of its files, and how its reader and its writer open the database."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

DB_NAME = "index.sqlite3"
LOCK_NAME = "sync.lock"


def make_private_dir(path: Path) -> None:
    """Create a folder only its owner can read (the index holds the documents' text)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if not readonly and not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    uri = f"file:{path}?mode=rw" if readonly else f"file:{path}"  # a reader never creates the file
    connection = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None, timeout=10)
    connection.execute("PRAGMA busy_timeout = 10000")
    if not readonly:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
    return connection


def read_meta(connection: sqlite3.Connection) -> dict[str, str]:
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
