"""The embedded store: one folder per source under `server.state_dir` (store.py: the backend, the store and
its lock; reader.py and writer.py its two sides; files.py the folder's files)."""

from aggregator.state.local.files import DB_NAME, LOCK_NAME, folder_bytes
from aggregator.state.local.reader import LocalReader
from aggregator.state.local.store import LocalBackend, LocalStore, remove_store, unused_stores
from aggregator.state.local.writer import LocalWriter

__all__ = [
    "DB_NAME", "LOCK_NAME", "LocalBackend", "LocalReader", "LocalStore", "LocalWriter", "folder_bytes", "remove_store",
    "unused_stores",
]  # fmt: skip
