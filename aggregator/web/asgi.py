"""The app as an import string, for `uvicorn --workers N` (each worker builds its own from the environment)."""

from __future__ import annotations

import os

from fastapi import FastAPI

from aggregator.web.api import create_app
from aggregator.runtime.gc import settle_for_serving
from aggregator.runtime.config import resolve_config_path
from aggregator.ops.logs import configure_logging


def create_from_env() -> FastAPI:
    """Load `$AGGREGATOR_CONFIG` (else ./connectors.yaml) and watch it, as `aggregator serve` does."""
    configure_logging(os.environ.get("AGGREGATOR_LOG_LEVEL", "info"), os.environ.get("AGGREGATOR_LOG_FORMAT", "text"))
    app = create_app(config_path=resolve_config_path(None))
    settle_for_serving()
    return app
