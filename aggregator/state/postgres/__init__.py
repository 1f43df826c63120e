"""The shared store: the indexes of every replica in one PostgreSQL database (`server.state_url`).

database.py holds the schema (the gateway creates and migrates its tables itself), the connections and the
removal of a store; store.py the backend (one pool and one poller per process) and the store with its sync
lock; reader.py what every replica reads; writer.py what the one syncer of a store writes.

Why postings in a B-tree rather than a GIN index over each passage's terms: GIN finds the passages that hold a
term, but not how often, nor how long they are; scoring would then read every candidate row and search its
arrays. A posting row carries all of it, so PostgreSQL scores a query with one aggregate over the query terms'
ranges, and keeps the document frequencies exact through removals (MVCC, no tombstones).

psycopg is an optional extra (`pip install "dify-knowledge-gateway[replicas]"`), imported only here.
"""

try:
    import psycopg  # noqa: F401
    import psycopg_pool  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        'server.state_url needs the PostgreSQL driver: pip install "dify-knowledge-gateway[replicas]" (psycopg 3)'
    ) from exc

from aggregator.state.postgres.database import SCHEMA_VERSION, display_url, remove_stores, unused_stores
from aggregator.state.postgres.reader import PostgresReader
from aggregator.state.postgres.store import PostgresBackend, PostgresStore
from aggregator.state.postgres.writer import PostgresWriter

__all__ = [
    "SCHEMA_VERSION", "PostgresBackend", "PostgresReader", "PostgresStore", "PostgresWriter", "display_url",
    "remove_stores", "unused_stores",
]  # fmt: skip
