"""The embedded store (one folder per source under `server.state_dir`); see `store`."""

from aggregator.state.local.store import *  # noqa: F401,F403
from aggregator.state.local.store import DB_NAME, LOCK_NAME, MAX_SEGMENTS, folder_bytes, remove_store, tie_key, unused_stores  # noqa: F401
