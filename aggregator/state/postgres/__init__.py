"""The shared store of several replicas (`server.state_url`); see `store`."""

from aggregator.state.postgres.store import *  # noqa: F401,F403
from aggregator.state.postgres.store import SCHEMA_VERSION, display_url, remove_stores, unused_stores  # noqa: F401
