"""Where indexed sources keep their index between restarts, shared by every worker process.

`base` is the interface (a backend opens one `IndexStore` per source; a store holds its `IndexReader` and,
in the process that syncs it, opens its `IndexWriter`); `reading` and `vocabulary` what both backends'
readers and writers share; `local` the embedded default under `server.state_dir`, with `segments` the
memory-mapped postings it is made of; `postgres` the shared store of several replicas (`server.state_url`,
imported only when configured: psycopg is an extra); `sync` the engine that keeps a source's index in line
with it (imported from there, not re-exported here).
"""

from aggregator.state.base import (
    IndexReader, IndexStore, IndexWriter, PreparedDocument, StateBackend, StoredPassage, StoreInfo, StoreUnavailable,
    SyncStatus, settings_fingerprint,
)  # fmt: skip
from aggregator.state.local import LocalBackend, LocalStore

__all__ = [
    "IndexReader", "IndexStore", "IndexWriter", "LocalBackend", "LocalStore", "PreparedDocument", "StateBackend",
    "StoreInfo", "StoredPassage", "StoreUnavailable", "SyncStatus", "settings_fingerprint",
]  # fmt: skip
