"""A running gateway: one loaded config and the live connectors it defines."""

from __future__ import annotations

import asyncio
import logging

from connectors import build_connector
from connectors.base import Connector

from .config import DEV_API_KEY, GatewayConfig
from .fanout import SourcePolicy

log = logging.getLogger(__name__)


class Gateway:
    """Owns the connectors of one config version. Start it once, close it once."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.connectors: dict[str, Connector] = {
            name: build_connector(name, config.effective(name)) for name in config.connectors
        }
        self.policies: dict[str, SourcePolicy] = {}
        for name, connector in self.connectors.items():
            settings = connector.settings
            self.policies[name] = SourcePolicy(timeout_s=settings.timeout_s or 3.0, retries=settings.retries or 0)

    @property
    def ready(self) -> bool:
        return all(connector.ready for connector in self.connectors.values())

    def uses_dev_key(self) -> bool:
        return any(k.key.get_secret_value() == DEV_API_KEY for k in self.config.server.api_keys)

    async def start(self) -> None:
        await asyncio.gather(*(connector.start() for connector in self.connectors.values()))

    async def aclose(self) -> None:
        results = await asyncio.gather(*(c.aclose() for c in self.connectors.values()), return_exceptions=True)
        for name, result in zip(self.connectors, results):
            if isinstance(result, Exception):
                log.warning("source %s did not close cleanly: %s", name, result)
