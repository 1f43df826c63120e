"""Every replica's recent health, exchanged through Redis so that /status on any replica shows the whole picture.

Each second a replica writes its own summary (per source: state, calls by outcome, latency, last error, circuit,
whether it syncs the source) under a key that expires after `KEEP_S`, and reads the others'. A replica that
stopped drops out of the picture when its key expires.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from aggregator.shared.redis import PREFIX, SharedState

KEEP_S = 15


class Peers:
    def __init__(self, shared: SharedState, summary: Callable[[], dict[str, Any]]) -> None:
        self.shared = shared
        self.summary = summary
        self.seen: dict[str, dict[str, Any]] = {}  # replica -> what it published last
        shared.every_second(self.exchange)

    async def exchange(self) -> None:
        now = time.time()
        mine = {"replica": self.shared.replica, "at": now, **self.summary()}
        index = f"{PREFIX}replicas"

        async def swap(client: Any) -> tuple[list[str], list[bytes | None]]:
            pipe = client.pipeline(transaction=False)
            pipe.set(f"{PREFIX}replica:{self.shared.replica}", json.dumps(mine), ex=KEEP_S)
            pipe.zadd(index, {self.shared.replica: now})
            pipe.zremrangebyscore(index, 0, now - 3600)
            pipe.zrangebyscore(index, now - KEEP_S, "+inf")
            names = [n.decode() for n in (await pipe.execute())[3]]
            return names, (await client.mget([f"{PREFIX}replica:{n}" for n in names]) if names else [])

        result = await self.shared.run(swap)
        if result is not None:
            names, values = result
            self.seen = {name: json.loads(value) for name, value in zip(names, values) if value}

    def current(self) -> dict[str, dict[str, Any]]:
        """The replicas seen at the last exchange (none while Redis is unreachable: each replica shows itself)."""
        return self.seen if self.shared.available else {}
