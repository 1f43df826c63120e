"""The long-lived service around a gateway: hot reload, health, metrics, and the per-request log line.

Reload: the config file is watched; a valid new version is swapped in as one
assignment (requests in flight keep the gateway they leased), sources whose
settings did not change are carried over with their indexes and breakers, and
the old gateway closes the rest once its last request has finished. An
invalid version is rejected: the last good one keeps serving and the error is
kept for /status, the status page and the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from connectors.base import iso_utc, now_iso

from aggregator.retrieval.cache import ResponseCache
from aggregator.runtime.config import DEV_API_KEY, ConfigError, GatewayConfig, load_config
from aggregator.ops.health import HealthRecorder, ReloadRecord, redact, summary_of
from aggregator.ops.metrics import Metrics, SharedView
from aggregator.ops.tracing import Tracing, annotate, current_trace_id
from aggregator.retrieval.pipeline import RetrievalResult
from aggregator.ranking import pool
from aggregator.ranking.statistics import dump_samples, load_samples
from aggregator.retrieval.embeddings import NAME as EMBEDDINGS
from aggregator.runtime.gateway import Gateway
from aggregator.retrieval.shared_breaker import SharedBreakers
from aggregator.shared.peers import Peers
from aggregator.shared.ratelimit import PROCESS_LIMITS
from aggregator.shared.redis import SharedState, replica_name
from aggregator.tasks import cancel_and_wait
from aggregator.text.tokenize import TOKENIZER_VERSION

log = logging.getLogger("aggregator")

#: In the state folder: the rerank's samples of passages seen from remote sources (ranking/statistics.py).
SAMPLES_FILE = "rerank-samples.json.gz"
SAMPLES_SAVE_S = 300.0
access_log = logging.getLogger("aggregator.access")


class Service:
    def __init__(self, load: Callable[[], GatewayConfig], config_path: Path | None = None, tracing: Tracing | None = None) -> None:
        """`load` gives the first config; with `config_path`, the file is also watched and reloaded.
        `tracing` defaults to what the OTEL_* environment variables ask for (off when they ask for nothing)."""
        self._load = load
        self.config_path = config_path
        self.gateway: Gateway | None = None
        self.health = HealthRecorder()
        self.metrics = Metrics(lambda: self.gateway, self._shared_view)
        self.tracing = Tracing.from_env() if tracing is None else tracing
        self._watcher: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()
        self._saver: asyncio.Task[None] | None = None
        #: Redis (`server.redis_url`): breakers, peers' health, rate limits and the cache shared across replicas.
        self.shared: SharedState | None = None
        self.peers: Peers | None = None
        self.cache = ResponseCache(0.0)

    def _shared_view(self) -> SharedView:
        up: dict[str, bool] = {}
        state = self.gateway.state if self.gateway is not None else None
        if state is not None and "reachable" in (described := state.describe()):
            up["index"] = bool(described["reachable"])
        if self.shared is not None:
            up["redis"] = self.shared.available
        return SharedView(up, self.cache.hit_ratio())

    @classmethod
    def from_path(cls, path: Path, tracing: Tracing | None = None) -> "Service":
        return cls(lambda: load_config(path), path, tracing)

    async def start(self) -> None:
        config = self._load()
        breakers = None
        if config.server.redis_url:
            self.shared = SharedState(config.server.redis_url)
            await self.shared.start()
            breakers = SharedBreakers(self.shared)
            self.peers = Peers(self.shared, self.summary)
            PROCESS_LIMITS.shared = self.shared
        self.cache = ResponseCache(config.server.cache_ttl_s, self.shared)
        self.gateway = Gateway(config, breakers=breakers)
        if self.gateway.uses_dev_key():
            log.warning("an API key is the development default %r: set AGGREGATOR_API_KEY before exposing this service", DEV_API_KEY)
        if pool._kernel is None:
            log.warning("the rerank's compiled kernel was not built (no C compiler at install): numpy counts the pool's terms "
                        "instead, the same ranking for about 0.1 ms more CPU per retrieval; install a C compiler and reinstall to build it")  # fmt: skip
        await asyncio.to_thread(self._load_samples)
        await asyncio.to_thread(self._load_vectors, self.gateway)
        await self.gateway.start()
        self._saver = asyncio.create_task(self._save_samples_every(SAMPLES_SAVE_S), name="save:samples")
        if self.config_path is not None and self.gateway.config.server.watch_config:
            self._watcher = asyncio.create_task(self._watch(self.config_path), name="watch:config")

    async def aclose(self) -> None:
        await cancel_and_wait(self._watcher)
        for task in list(self._retiring):
            with contextlib.suppress(Exception):
                await task
        await cancel_and_wait(self._saver)
        if self.gateway is not None:
            await asyncio.to_thread(self._save_samples)
            await self.gateway.aclose()
        if self.shared is not None:
            if PROCESS_LIMITS.shared is self.shared:
                PROCESS_LIMITS.shared = None
            await self.shared.aclose()
        await asyncio.to_thread(self.tracing.shutdown)  # exports what is still buffered

    # -- the rerank's samples of remote sources, kept across restarts ----------------------------------

    def _samples_path(self) -> Path | None:
        state_dir = self.gateway.config.server.state_dir if self.gateway is not None else None
        return None if state_dir is None else Path(state_dir) / SAMPLES_FILE

    def _load_samples(self) -> None:
        path = self._samples_path()
        if path is None or not path.exists() or self.gateway is None:
            return
        cache = self.gateway.term_cache
        try:
            cache.samples.update(load_samples(path.read_bytes(), cache.vocabulary, TOKENIZER_VERSION))
        except (OSError, ValueError) as exc:
            log.warning("%s: rerank statistics not loaded (%s); they are gathered again from the next queries", path, exc)

    def _load_vectors(self, gateway: Gateway, previous: Gateway | None = None) -> None:
        """The embedding judges' passage vectors, for judges the previous version did not already run."""
        running = {id(j) for j in previous.judges.values()} if previous else set()
        for judge in gateway.judges.values():
            if id(judge) not in running:
                judge.load(gateway.config.server.state_dir)

    def _save_samples(self) -> None:
        if self.gateway is not None:
            for judge in self.gateway.judges.values():
                judge.save(self.gateway.config.server.state_dir)
        path = self._samples_path()
        if path is None or self.gateway is None or not self.gateway.term_cache.samples:
            return
        cache = self.gateway.term_cache
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            partial = path.with_name(f".{path.name}.{os.getpid()}")
            partial.write_bytes(dump_samples(cache.samples, cache.vocabulary, TOKENIZER_VERSION))
            os.replace(partial, path)  # workers each write a whole file; the last one wins
        except OSError as exc:
            log.warning("%s: rerank statistics not saved (%s)", path, exc)

    async def _save_samples_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await asyncio.to_thread(self._save_samples)
            except Exception:  # a bug must not end the saving for the rest of the process's life, unlogged
                log.exception("rerank statistics not saved")

    # -- reload ------------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Load the config file again and swap it in if valid. True when the new version serves."""
        if self.config_path is None or self.gateway is None:
            return False
        async with self._reload_lock:
            old = self.gateway
            try:
                config = await asyncio.to_thread(load_config, self.config_path)
            except ConfigError as exc:
                message = "; ".join(redact(e, old.config.secrets()) or "" for e in exc.errors)
                self.health.last_reload = ReloadRecord(now_iso(), "error", message)
                self.metrics.reloads.labels("error").inc()
                log.error("config reload rejected, still serving version %s: %s", old.config.version, message)
                return False
            if config.version == old.config.version and config.secrets() == old.config.secrets():
                return True
            if config.server.redis_url != old.config.server.redis_url:
                log.warning("server.redis_url changed: the new Redis is used from the next start of the service")
            new = Gateway(config, previous=old)
            await asyncio.to_thread(self._load_vectors, new, old)
            await new.start()
            self.gateway = new
            self.cache.ttl_s = config.server.cache_ttl_s
            self.cache.clear()  # keys carry the config version too: nothing of the old one is served again
            retire = asyncio.create_task(old.drain_and_close(keep=new.adopted, judges=new.judges), name=f"retire:{old.config.version}")
            self._retiring.add(retire)
            retire.add_done_callback(self._retiring.discard)
            self.health.last_reload = ReloadRecord(now_iso(), "ok")
            self.metrics.reloads.labels("ok").inc()
            changed = sorted(set(new.slots) - new.adopted)
            removed = sorted(set(old.slots) - set(new.slots))
            log.info("config version %s now serving (new or changed sources: %s; removed: %s)",
                     config.version, ", ".join(changed) or "none", ", ".join(removed) or "none")  # fmt: skip
            return True

    async def _watch(self, path: Path) -> None:
        import watchfiles

        target = path.resolve()

        def is_config(_change: Any, changed: str) -> bool:
            return Path(changed).resolve() == target

        while True:
            try:
                async for _ in watchfiles.awatch(target.parent, watch_filter=is_config, debounce=300, step=50):
                    await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watching %s failed (%s); retrying in 5 s", path, exc)
                await asyncio.sleep(5)

    # -- what happened ------------------------------------------------------------------------------

    def record(self, gateway: Gateway, knowledge_id: str, query: str, result: RetrievalResult, elapsed_s: float, request_id: str,
               via: str | None = None) -> None:
        """Health, metrics and the one log line of a retrieval (`via=mcp`: asked through MCP, not /retrieval)."""
        self.health.record(result.sources, gateway.source_types, gateway.secrets)
        self.metrics.observe_sources(result.sources)
        annotate({"gateway.knowledge_id": knowledge_id, "gateway.records": len(result.records)})
        if not access_log.isEnabledFor(logging.INFO):  # its fields are built only for a line that is written
            return
        trace_id = current_trace_id()
        fields: dict[str, Any] = {
            "event": "retrieval",
            "request_id": request_id,
            "trace_id": trace_id,
            **({"via": via} if via else {}),
            "knowledge_id": knowledge_id,
            "records": len(result.records),
            "ms": round(elapsed_s * 1000, 1),
            "sources": {s.name: {"outcome": s.outcome, "ms": round(s.elapsed_ms, 1)} for s in result.sources},
        }
        if gateway.config.server.log_queries:
            fields["query"] = query
        summary = " ".join(f"{s.name}={s.outcome}:{s.elapsed_ms:.0f}ms" for s in result.sources)
        access_log.info(
            "retrieval id=%s%s%s kb=%s records=%d ms=%.1f %s%s", request_id, f" trace={trace_id}" if trace_id else "",
            f" via={via}" if via else "", knowledge_id,
            len(result.records), elapsed_s * 1000, summary, f" query={query!r}" if gateway.config.server.log_queries else "",
            extra={"fields": fields},
        )  # fmt: skip

    def record_cached(self, knowledge_id: str, request_id: str, outcome: str, elapsed_s: float, via: str | None = None) -> None:
        """Count a retrieval's cache outcome; one answered from the cache (no source called) gets its log line here."""
        self.metrics.observe_cache(outcome)
        if outcome == "miss" or not access_log.isEnabledFor(logging.INFO):
            return  # a miss: record() wrote its line; otherwise the fields are built only for a line that is written
        trace_id = current_trace_id()
        fields = {"event": "retrieval", "request_id": request_id, "trace_id": trace_id, **({"via": via} if via else {}),
                  "knowledge_id": knowledge_id, "cache": outcome, "ms": round(elapsed_s * 1000, 1)}  # fmt: skip
        access_log.info("retrieval id=%s%s%s kb=%s cache=%s ms=%.1f", request_id, f" trace={trace_id}" if trace_id else "",
                        f" via={via}" if via else "", knowledge_id, outcome, elapsed_s * 1000, extra={"fields": fields})  # fmt: skip

    def _sources(self, gateway: Gateway) -> list[dict[str, Any]]:
        used = _used(gateway)
        now = self.health.clock()
        sources = [
            self.health.source(name, slot.connector.type).snapshot(slot, name in used, gateway.secrets, now)
            for name, slot in gateway.slots.items()
        ] + [self.health.source(name, kind).snapshot(None, True, gateway.secrets, now) for name, kind in gateway.stages.items()]
        for entry in sources:
            if entry["name"] == EMBEDDINGS:  # the judges' models and cached vectors
                entry["embeddings"] = [j.describe() for j in dict.fromkeys(gateway.judges.values())]
        return sources

    def summary(self) -> dict[str, Any]:
        """This replica's recent health per source, as the other replicas show it (no history: it is large).
        `Peers` asks for it every second: only what it keeps is computed."""
        gateway = self.gateway
        if gateway is None:
            return {"sources": {}}
        used = _used(gateway)
        return {"config_version": gateway.config.version, "sources": {
            name: self.health.source(name, slot.connector.type).summary(slot, name in used) for name, slot in gateway.slots.items()
        } | {name: self.health.source(name, kind).summary(None, True) for name, kind in gateway.stages.items()}}  # fmt: skip

    def status(self) -> dict[str, Any]:
        gateway = self.gateway
        if gateway is None:
            return {"ready": False, "sources": []}
        config = gateway.config
        sources = self._sources(gateway)
        replica = self.shared.replica if self.shared is not None else replica_name()
        peers = self.peers.current() if self.peers is not None else {}
        # summary(), from the snapshots just taken
        mine = {"replica": replica, "at": time.time(), "config_version": config.version,
                "sources": {s["name"]: summary_of(s) for s in sources}} if peers else None  # fmt: skip
        everyone = {**peers, replica: mine} if mine else {}
        for source in sources:  # each replica's view of each source, this one's fresh
            source["replicas"] = [
                {"replica": name, "updated": iso_utc(seen["at"]), **seen["sources"][source["name"]]}
                for name, seen in sorted(everyone.items()) if source["name"] in seen.get("sources", {})
            ]  # fmt: skip
        reload = self.health.last_reload
        return {
            "ready": gateway.ready,
            "config_version": config.version,
            "config_path": str(self.config_path) if self.config_path else None,
            "last_reload": None if reload is None else {"at": reload.at, "result": reload.result, "error": reload.error},
            "uptime_s": round(time.time() - self.health.started, 1),
            "pid": os.getpid(),  # with --workers N, which worker answered (one of them syncs each indexed source)
            "state_dir": str(config.server.state_dir) if config.server.state_dir else None,
            "replica": replica,
            "replicas": sorted(everyone) or [replica],
            "shared_state": {
                "index": gateway.state.describe() if gateway.state is not None else {},
                "redis": self.shared.describe() if self.shared is not None else None,
            },
            "cache": {"ttl_s": self.cache.ttl_s, **{k: self.cache.counts.get(k, 0) for k in ("hit", "coalesced", "miss")}},
            "tasks": len(asyncio.all_tasks()),
            "knowledge_bases": {kb_id: kb.connectors for kb_id, kb in config.knowledge_bases.items()},
            "sources": sources,
        }


def _used(gateway: Gateway) -> set[str]:
    """The sources some knowledge base asks (the others are `disabled`)."""
    return {name for kb in gateway.config.knowledge_bases.values() for name in kb.connectors}
