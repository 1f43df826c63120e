"""A federated knowledge gateway for Dify: one External Knowledge API over many sources.

What a user imports: `load_config` / `parse_config` to read connectors.yaml,
`create_app` for the ASGI app, `Gateway` and `retrieve` to run a retrieval
in-process. The web app is imported lazily so that connectors and tools can
use the text helpers without pulling in FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ConfigError", "Gateway", "GatewayConfig", "create_app", "load_config", "parse_config", "retrieve"]

if TYPE_CHECKING:
    from aggregator.web.api import create_app
    from aggregator.runtime.config import ConfigError, GatewayConfig, load_config, parse_config
    from aggregator.retrieval.pipeline import retrieve
    from aggregator.runtime.gateway import Gateway


def __getattr__(name: str) -> Any:
    modules = {
        "create_app": ".web.api", "ConfigError": ".runtime.config", "GatewayConfig": ".runtime.config",
        "load_config": ".runtime.config", "parse_config": ".runtime.config", "retrieve": ".retrieval.pipeline",
        "Gateway": ".runtime.gateway",
    }  # fmt: skip
    if name not in modules:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(modules[name], __name__), name)
