"""A short-lived cache of retrieval answers, so that Dify's retries cost nothing.

Dify retries a retrieval that failed or timed out (3 times, 0.5, 1 and 2 s apart); a load balancer may send the
retry to another replica. Identical retrievals (same key scope, knowledge base, query, settings, condition and
config version: `retrieval_key`) are answered once:

- a duplicate that arrives while the first is being answered waits for it (`coalesced`), within this process
  or, with Redis, on any replica (the first marks the key as pending; the others poll for its answer);
- one that arrives within `server.cache_ttl_s` after it is answered from the cache (`hit`), kept in process
  and, with Redis, shared by every replica;
- a config reload changes the version, so nothing of the old version is served again (and the process's
  entries are dropped).

Only 200 answers are kept, byte for byte as they were sent (`X-Sources` with them), and only when every source
answered (or was skipped by its breaker): an answer missing a source that failed is given to the duplicates
waiting for it, never kept for later ones, which ask the sources again. The computation runs as its own task,
so a client that gave up (Dify's 5 s) does not cancel the answer its retry is waiting for.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aggregator.shared.redis import SharedState

#: Bounds of the in-process cache (entries are evicted oldest first).
MAX_ENTRIES = 4096
MAX_BYTES = 64 * 2**20
#: How often a replica waiting for another replica's answer looks for it in Redis.
POLL_S = 0.05
_PENDING = b"pending"
# Returns the stored answer, or 'won' when this caller set the pending mark, or 'pending' when another did.
_CLAIM = """
local value = redis.call('GET', KEYS[1])
if value then return value end
redis.call('SET', KEYS[1], 'pending', 'PX', ARGV[1])
return 'won'
"""


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A retrieval's 200 answer as it was sent."""

    body: bytes
    sources: str  # X-Sources
    complete: bool = True  # no source failed: kept for `ttl_s`; otherwise only shared with waiting duplicates

    def dump(self) -> bytes:
        return json.dumps({"sources": self.sources, "complete": self.complete}).encode() + b"\n" + self.body

    @classmethod
    def load(cls, data: bytes) -> "CachedAnswer":
        """An entry without `complete` was written by a replica of an older version, during a rolling upgrade:
        read as complete, as that version read it (its partial answers stay in Redis a fraction of a second)."""
        head, _, body = data.partition(b"\n")
        described = json.loads(head)
        return cls(body, described["sources"], bool(described.get("complete", True)))


def answered_by_all(sources: Sequence[Any]) -> bool:
    """No source failed (timeout, error, rate limited, refused): an answer worth keeping for later duplicates."""
    return all(source.outcome in ("ok", "empty", "skipped") for source in sources)


def retrieval_key(scope: list[str], knowledge_id: str, query: str, top_k: int, threshold: float,
                  condition: dict[str, Any] | None, config_version: str) -> str:  # fmt: skip
    """What makes two retrievals the same question (hashed: no query text in Redis keys)."""
    described = [sorted(scope), knowledge_id, query, top_k, threshold, condition, config_version]
    return hashlib.sha256(json.dumps(described, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


class ResponseCache:
    def __init__(self, ttl_s: float, shared: "SharedState | None" = None) -> None:
        self.ttl_s = ttl_s
        self.shared = shared
        self.counts: Counter[str] = Counter()  # hit, miss, coalesced
        self._entries: OrderedDict[str, tuple[float, CachedAnswer]] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[str, asyncio.Future[CachedAnswer | None]] = {}

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    def clear(self) -> None:
        """A reload: nothing answered under the old config is served again."""
        self._entries.clear()
        self._bytes = 0

    def hit_ratio(self) -> float | None:
        total = sum(self.counts.values())
        return None if not total else (self.counts["hit"] + self.counts["coalesced"]) / total

    # -- the one entry point ----------------------------------------------------------------------------

    async def answer(self, key: str, compute: Callable[[], Awaitable[tuple[Any, CachedAnswer | None]]], wait_s: float) -> tuple[Any, CachedAnswer | None, str]:
        """(response, answer, outcome): `compute` gives the response and, for a 200, its CachedAnswer to keep.

        On a hit or a coalesced wait the response is None and the caller builds one from the CachedAnswer.
        """
        found = self._get(key)
        if found is not None:
            return self._count(None, found, "hit")
        running = self._inflight.get(key)
        if running is not None:
            answer = await asyncio.shield(running)
            if answer is not None:
                return self._count(None, answer, "coalesced")
        # From here this request answers for the process: identical ones arriving meanwhile wait for `result`,
        # also while it looks in Redis for another replica's answer. Every way out below settles `result`.
        result: asyncio.Future[CachedAnswer | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = result
        if self.shared is not None:
            try:
                claimed = await self._claim(key, wait_s)
            except BaseException:
                self._settle(key, result, None)  # those waiting answer themselves
                raise
            if claimed is not None:
                self._settle(key, result, claimed[0])  # a partial one was for the duplicates waiting for it only
                return self._count(None, *claimed)
        return await self._compute(key, result, compute)

    async def _compute(self, key: str, result: asyncio.Future[CachedAnswer | None],
                       compute: Callable[[], Awaitable[tuple[Any, CachedAnswer | None]]]) -> tuple[Any, CachedAnswer | None, str]:  # fmt: skip
        task = asyncio.ensure_future(compute())  # its own task: the first client giving up does not cancel it
        try:
            response, answer = await asyncio.shield(task)
        except BaseException:
            if not task.done():
                task.add_done_callback(lambda done: self._finish(key, result, None if done.cancelled() or done.exception() else done.result()[1]))
            else:
                self._finish(key, result, None)
            raise
        self._finish(key, result, answer)
        return self._count(response, answer, "miss")

    def _finish(self, key: str, result: asyncio.Future[CachedAnswer | None], answer: CachedAnswer | None) -> None:
        """An answer computed here: to those waiting in this process, the process cache and the other replicas."""
        self._settle(key, result, answer)
        if self.shared is not None:
            self._publish(key, answer)

    def _settle(self, key: str, result: asyncio.Future[CachedAnswer | None], answer: CachedAnswer | None) -> None:
        """`answer` (None: there is none, ask again) to the duplicates waiting in this process; kept if complete."""
        if self._inflight.get(key) is result:
            del self._inflight[key]
        if not result.done():
            result.set_result(answer)
        if answer is not None and answer.complete:
            self._put(key, answer)

    def _count(self, response: Any, answer: CachedAnswer | None, outcome: str) -> tuple[Any, CachedAnswer | None, str]:
        self.counts[outcome] += 1
        return response, answer, outcome

    # -- in process ----------------------------------------------------------------------------------

    def _get(self, key: str) -> CachedAnswer | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires, answer = found
        if expires < time.monotonic():
            self._drop(key)
            return None
        return answer

    def _put(self, key: str, answer: CachedAnswer) -> None:
        self._drop(key)
        self._entries[key] = (time.monotonic() + self.ttl_s, answer)
        self._bytes += len(answer.body)
        while self._entries and (len(self._entries) > MAX_ENTRIES or self._bytes > MAX_BYTES):
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self._bytes -= len(found[1].body)

    # -- across replicas (Redis) ---------------------------------------------------------------------

    def _redis_key(self, key: str) -> str:
        return f"gw:cache:{key}"

    async def _claim(self, key: str, wait_s: float) -> tuple[CachedAnswer, str] | None:
        """The answer another replica stored (`hit`) or computes now (`coalesced`, after waiting for it);
        None: compute it here."""
        assert self.shared is not None
        redis_key = self._redis_key(key)
        pending_ms = int((wait_s + 1.0) * 1000)  # a replica that died mid-answer holds the key no longer than this
        value = await self.shared.run(lambda r: r.eval(_CLAIM, 1, redis_key, pending_ms))
        if value is None or value == b"won":
            return None
        if value != _PENDING:
            found = CachedAnswer.load(value)
            # A partial answer stays in Redis only for the replicas that were waiting for it: this one was not.
            return (found, "hit") if found.complete else None
        deadline = time.monotonic() + wait_s
        while value == _PENDING:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(POLL_S)
            value = await self.shared.run(lambda r: r.get(redis_key))
            if value is None:
                return None  # the other replica could not answer (or Redis went away): answer here
        return CachedAnswer.load(value), "coalesced"

    def _publish(self, key: str, answer: CachedAnswer | None) -> None:
        shared = self.shared
        assert shared is not None
        redis_key = self._redis_key(key)
        if answer is None:
            command = lambda r: r.delete(redis_key)  # noqa: E731 - let the waiting replicas answer themselves
        else:  # an incomplete answer stays only as long as replicas waiting for it take to look
            data, ttl_ms = answer.dump(), int(self.ttl_s * 1000) if answer.complete else int(POLL_S * 1000 * 4)
            command = lambda r: r.set(redis_key, data, px=ttl_ms)  # noqa: E731
        task = asyncio.ensure_future(shared.run(command))
        _background.add(task)
        task.add_done_callback(_background.discard)


_background: set[asyncio.Task[Any]] = set()
