"""A running gateway: one loaded config and the live sources it defines.

A config reload builds a new `Gateway` that adopts, from the old one, every
source whose settings did not change (connector, index, circuit breaker and
all), so an edit to one source never resets the others. Requests hold a lease
on the gateway they started with; the old gateway closes the sources it did
not hand over only once its last request has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from connectors import build_source
from connectors.base import Connector

from aggregator.retrieval.breaker import CircuitBreaker
from aggregator.runtime.config import DEV_API_KEY, GatewayConfig
from aggregator.retrieval.fanout import SourcePolicy, SourceSlot
from aggregator.retrieval.embeddings import NAME as JUDGE, Judge
from aggregator.ranking.pool import TermCache
from aggregator.retrieval.rerank_model import RerankModels
from aggregator.state import LocalBackend, StateBackend
from aggregator.state.local import unused_stores
from aggregator.state.sync import as_connector

if TYPE_CHECKING:
    from aggregator.retrieval.shared_breaker import SharedBreakers

log = logging.getLogger(__name__)


def state_backend(config: GatewayConfig, previous: StateBackend | None) -> StateBackend | None:
    """The backend of `server.state_url` (PostgreSQL) or of `server.state_dir`.

    A database backend outlives reloads (its connections and readers serve every version); changing
    `state_url` takes effect at the next start, as the log says.
    """
    url = config.server.state_url
    if url is None:
        if previous is not None and not isinstance(previous, LocalBackend):
            log.warning("server.state_url was removed: the indexes stay in PostgreSQL until the service restarts")
            return previous
        return LocalBackend(config.server.state_dir) if config.server.state_dir is not None else None
    if previous is not None and not isinstance(previous, LocalBackend):
        if getattr(previous, "url", None) != url:
            log.warning("server.state_url changed: the new database is used from the next start of the service")
        return previous
    from aggregator.state.postgres import PostgresBackend  # psycopg is an optional extra

    return PostgresBackend(url)


class Gateway:
    """Owns the sources of one config version."""

    def __init__(self, config: GatewayConfig, previous: "Gateway | None" = None, breakers: "SharedBreakers | None" = None) -> None:
        """`breakers`: circuit breakers shared through Redis (the service's, when it has `redis_url`); a
        successor gateway keeps its predecessor's."""
        self.config = config
        self.breakers = breakers if breakers is not None else (previous.breakers if previous else None)
        #: Tokenized passages for the rerank; carried across reloads, like the sources.
        self.term_cache = previous.term_cache if previous else TermCache()
        self.slots: dict[str, SourceSlot] = {}
        self.adopted: set[str] = set()
        #: Where indexed sources persist their index (None: each keeps a temporary one, as in tests).
        self.state = state_backend(config, previous.state if previous else None)
        for name in config.connectors:
            settings = config.effective(name)
            old = previous.slots.get(name) if previous else None
            if old is not None and old.connector.settings == settings:
                self.slots[name] = old
                self.adopted.add(name)
                continue
            assert settings.circuit is not None  # filled from defaults by effective()
            connector = as_connector(build_source(name, settings))
            if self.state is not None:
                connector.bind_state(self.state)
            self.slots[name] = SourceSlot(
                connector=connector,
                policy=SourcePolicy(timeout_s=settings.timeout_s, retries=settings.retries),
                breaker=self.breakers.breaker(name, settings.circuit) if self.breakers else CircuitBreaker(settings.circuit),
            )
        #: Embedding judges, one per distinct `embeddings:` block; a successor keeps those whose settings stay (cache and all).
        self.judges: dict[str, Judge] = {}
        self._kb_judge: dict[str, Judge] = {}
        kept = previous.judges if previous else {}
        blocks = {kb_id: kb.embeddings or config.server.embeddings for kb_id, kb in config.knowledge_bases.items()}
        for kb_id, block in blocks.items():
            if block is None:
                continue
            key = block.model_dump_json()
            judge = self.judges.get(key) or kept.get(key) or Judge(block)
            self.judges[key] = self._kb_judge[kb_id] = judge
        #: Worked out once per config version, not per request: what messages are scrubbed of, and each source's type.
        self.secrets: list[str] = config.secrets()
        self.source_types: dict[str, str] = {name: slot.connector.type for name, slot in self.slots.items()}
        #: Second stages of the ranking (a rerank model), per knowledge base; each reports like a source (`stages`: name -> type).
        self.rerank_models = RerankModels({kb_id: config.rerank_for(kb_id) for kb_id in config.knowledge_bases})
        self.stages: dict[str, str] = dict(self.rerank_models.stages)
        if self.judges:  # the embedding judge reports like a source too
            self.stages[JUDGE] = JUDGE
        self.source_types.update(self.stages)
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._lease = _Lease(self)

    def judge(self, knowledge_id: str) -> Judge | None:
        """The embedding judge of a knowledge base (its own block, else the server's), or None: words alone."""
        return self._kb_judge.get(knowledge_id)

    @property
    def connectors(self) -> dict[str, Connector]:
        return {name: slot.connector for name, slot in self.slots.items()}

    @property
    def ready(self) -> bool:
        return all(slot.connector.ready for slot in self.slots.values())

    def uses_dev_key(self) -> bool:
        return any(k.key is not None and k.key.get_secret_value() == DEV_API_KEY for k in self.config.server.api_keys)

    def lease(self) -> "_Lease":
        """Hold this gateway for one request (`with gateway.lease():`); closing waits for every lease to end."""
        return self._lease

    async def start(self) -> None:
        """Start the sources this gateway did not adopt (adopted ones are running already)."""
        if self.state is not None:
            await self.state.start()  # a database backend connects (once: a successor shares it)
        if isinstance(self.state, LocalBackend) and not self.adopted:
            unused = [p.name for p in unused_stores(self.state.root, set(self.slots))]
            if unused:
                log.info("state of sources no longer configured in %s: %s; `aggregator gc` deletes it",
                         self.state.root, ", ".join(unused))  # fmt: skip
        await asyncio.gather(*(s.connector.start() for n, s in self.slots.items() if n not in self.adopted))

    async def drain_and_close(self, keep: set[str] = frozenset(), drain_timeout: float = 30.0, judges: "dict[str, Judge] | None" = None) -> None:
        """Wait for requests in flight, then close every source not in `keep` (those a successor adopted), and
        every embedding judge not among the successor's `judges`."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), drain_timeout)
        await self._close([name for name in self.slots if name not in keep])
        await self.rerank_models.aclose()
        if judges is not None:
            await self.close_judges(judges)

    async def close_judges(self, keep: "dict[str, Judge]") -> None:
        """Close the judges a successor did not keep (`keep`: the successor's)."""
        kept = {id(j) for j in keep.values()}
        for judge in self.judges.values():
            if id(judge) not in kept:
                await judge.aclose()

    async def aclose(self) -> None:
        """Close every source and the state backend: the service stops (a retired version uses drain_and_close)."""
        await self._close(list(self.slots))
        await self.rerank_models.aclose()
        await self.close_judges({})
        if self.state is not None:
            await self.state.aclose()

    async def _close(self, names: list[str]) -> None:
        results = await asyncio.gather(*(self.slots[n].connector.aclose() for n in names), return_exceptions=True)
        for name, result in zip(names, results):
            if isinstance(result, Exception):
                log.warning("source %s did not close cleanly: %s", name, result)


class _Lease:
    """A gateway's one lease object, entered by every request in turn: a class rather than a generator-based
    context manager, which cost four times as much per request."""

    __slots__ = ("_gateway",)

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def __enter__(self) -> Gateway:
        gateway = self._gateway
        gateway._inflight += 1
        gateway._idle.clear()
        return gateway

    def __exit__(self, *_: object) -> None:
        gateway = self._gateway
        gateway._inflight -= 1
        if gateway._inflight == 0:
            gateway._idle.set()
