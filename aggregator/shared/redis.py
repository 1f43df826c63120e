"""One process's connection to the shared Redis, watched: commands fail fast and fall back while it is down.

Every command goes through `run()`: while Redis is known to be unreachable nothing is sent (no request waits on
a dead server) and the caller's per-process fallback answers; a monitor pings every `MONITOR_S` and, once Redis
answers again, resumes shared state, re-reads what others changed meanwhile (`on_reconnect` hooks) and
subscribes the channels again. Each transition is logged once and shown in /status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aggregator.tasks import cancel_and_wait

log = logging.getLogger("aggregator.shared")
T = TypeVar("T")

#: How often the monitor pings (and how soon a Redis that came back is used again).
MONITOR_S = 1.0
#: A command that takes longer than this counts as Redis being down: requests must not wait on it.
COMMAND_TIMEOUT_S = 0.5
#: Every key and channel the gateway uses starts with this.
PREFIX = "gw:"


def replica_name() -> str:
    """This process as other replicas see it: `$AGGREGATOR_REPLICA` (else the host name) and the process id."""
    return f"{os.environ.get('AGGREGATOR_REPLICA') or os.uname().nodename}/{os.getpid()}"


def display_url(url: str) -> str:
    """The URL without its password, for /status and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = (f"{parts.username}:***@" if parts.username else ":***@") + (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class SharedState:
    """The Redis of `server.redis_url`, for one process: availability, commands, pub/sub and periodic work."""

    def __init__(self, url: str, replica: str | None = None) -> None:
        self.url = url
        self.replica = replica or replica_name()
        self.available = False
        self.since: float | None = None  # when it last became available or unavailable
        self.error: str | None = None
        self.client: Any = None
        self._subscriptions: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._on_reconnect: list[Callable[[], Awaitable[None]]] = []
        self._every_second: list[Callable[[], Awaitable[None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub_task: asyncio.Task[None] | None = None
        self._errors: tuple[type[BaseException], ...] = (OSError,)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.client is not None:
            return
        import redis.asyncio as aioredis  # the replicas extra (config validation says so when it is missing)
        from redis.exceptions import RedisError

        self._errors = (RedisError, OSError, asyncio.TimeoutError)
        self.client = aioredis.Redis.from_url(
            self.url, socket_timeout=COMMAND_TIMEOUT_S, socket_connect_timeout=COMMAND_TIMEOUT_S, retry_on_timeout=False,
            health_check_interval=0, client_name="knowledge-gateway:" + "".join(c if "!" <= c <= "~" else "-" for c in self.replica),
        )  # fmt: skip
        await self._check()
        self._tasks.append(asyncio.create_task(self._monitor(), name="shared:monitor"))

    async def aclose(self) -> None:
        for task in [*self._tasks, self._pubsub_task]:
            await cancel_and_wait(task)
        self._tasks, self._pubsub_task = [], None
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    def subscribe(self, channel: str, handler: Callable[[dict[str, Any]], None]) -> None:
        """Call `handler` with every JSON message published on `channel` (from the next (re)connection on)."""
        self._subscriptions[PREFIX + channel] = handler
        if self.available:
            self._restart_pubsub()

    def on_reconnect(self, hook: Callable[[], Awaitable[None]]) -> None:
        self._on_reconnect.append(hook)

    def every_second(self, job: Callable[[], Awaitable[None]]) -> None:
        """Periodic work while Redis is available (publishing this replica's health, reading the others')."""
        self._every_second.append(job)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "redis",
            "url": display_url(self.url),
            "state": "connected" if self.available else "unreachable",
            "since": None if self.since is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since)),
            "error": self.error,
            "replica": self.replica,
        }

    # -- commands ----------------------------------------------------------------------------------

    async def run(self, command: Callable[[Any], Awaitable[T]]) -> T | None:
        """`command(client)`, or None (and Redis marked down) if it is unreachable or too slow."""
        if not self.available or self.client is None:
            return None
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S * 2):
                return await command(self.client)
        except asyncio.CancelledError:
            raise
        except self._errors as exc:
            self._mark_down(exc)
            return None

    # -- health ------------------------------------------------------------------------------------

    async def _check(self) -> None:
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S * 2):
                await self.client.ping()
        except asyncio.CancelledError:
            raise
        except self._errors as exc:
            self._mark_down(exc)
            return
        if not self.available:
            self._mark_up()
            for hook in self._on_reconnect:
                with contextlib.suppress(*self._errors):
                    await hook()

    def _mark_down(self, exc: BaseException) -> None:
        message = " ".join(str(exc).split()) or type(exc).__name__
        if self.available or self.since is None:
            log.warning(
                "Redis at %s unreachable (%s): circuit breakers, health, rate limits and the response cache are per process until it is back",
                display_url(self.url), message,
            )  # fmt: skip
            self.since = time.time()
        self.available, self.error = False, message
        if self._pubsub_task is not None:
            self._pubsub_task.cancel()
            self._pubsub_task = None

    def _mark_up(self) -> None:
        if self.since is not None and self.error is not None:
            log.info("Redis at %s reachable again: shared state resumed", display_url(self.url))
        self.available, self.error, self.since = True, None, time.time()
        self._restart_pubsub()

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_S)
            await self._check()
            for job in self._every_second:
                if self.available:
                    try:
                        await job()
                    except asyncio.CancelledError:
                        raise
                    except self._errors as exc:
                        self._mark_down(exc)
                    except Exception:  # a bug in one job must not stop the monitor
                        log.exception("shared state: %s failed", getattr(job, "__qualname__", job))

    # -- pub/sub -------------------------------------------------------------------------------------

    def _restart_pubsub(self) -> None:
        if self._pubsub_task is not None:
            self._pubsub_task.cancel()
        self._pubsub_task = asyncio.create_task(self._listen(), name="shared:pubsub") if self._subscriptions else None

    async def _listen(self) -> None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(*self._subscriptions)
            while True:
                message = await pubsub.get_message(timeout=MONITOR_S)
                if message is None:
                    continue
                handler = self._subscriptions.get(message["channel"].decode())
                if handler is not None:
                    with contextlib.suppress(ValueError, TypeError, KeyError):
                        handler(json.loads(message["data"]))
        except asyncio.CancelledError:
            raise
        except self._errors as exc:
            self._mark_down(exc)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
