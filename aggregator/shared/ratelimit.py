"""Request rates that belong to a credential, not to a process: Notion allows an integration about 3 a second.

`credential_limiter(credential, per_second)` is what the sync engine hands a source whose `rate_limit()` names
one. Sources with the same credential share one limiter in the process; when the service has Redis (`server.redis_url`), every process and replica
shares it: each request reserves the next free slot, `1 / per_second` (plus a 10 % margin for the network's
jitter) after the previous one, in one atomic script (GCRA, no burst), and waits for it. While Redis is unreachable, the per-process limiter of that credential
takes over (aiolimiter's leaky bucket, as before replicas existed).

The credential is kept only as a hash.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import TYPE_CHECKING, Any

from aiolimiter import AsyncLimiter

if TYPE_CHECKING:
    from aggregator.shared.redis import SharedState

#: Slots are this much further apart than 1 / per_second: requests leave at their slot and arrive with some
#: jitter, and the limit must hold in every second as the upstream counts it.
SPACING_MARGIN = 1.1
_RESERVE = """
local now_parts = redis.call('TIME')
local now = now_parts[1] * 1000 + now_parts[2] / 1000
local interval = tonumber(ARGV[1])
local next_free = tonumber(redis.call('GET', KEYS[1]) or '0')
local at = math.max(now, next_free)
redis.call('SET', KEYS[1], tostring(at + interval), 'PX', math.ceil(at + interval - now) + 1000)
return tostring(at - now)
"""


class RateLimits:
    """The process's limiters by credential; `shared` is set by the service when it has Redis."""

    def __init__(self) -> None:
        self.shared: SharedState | None = None
        self._local: dict[tuple[str, float], AsyncLimiter] = {}

    def limiter(self, credential: str, per_second: float) -> "CredentialLimiter":
        key = hashlib.sha256(credential.encode()).hexdigest()[:24]
        local = self._local.get((key, per_second))
        if local is None:
            local = self._local[(key, per_second)] = AsyncLimiter(per_second, 1.0)
        return CredentialLimiter(self, key, per_second, local)


class CredentialLimiter:
    """`async with limiter:` waits for the credential's next slot (shared through Redis when available)."""

    def __init__(self, limits: RateLimits, key: str, per_second: float, local: AsyncLimiter) -> None:
        self._limits = limits
        self._key = f"gw:rate:{key}"
        self._interval_ms = 1000.0 / per_second * SPACING_MARGIN
        self._local = local

    async def __aenter__(self) -> None:
        shared = self._limits.shared
        if shared is not None and shared.available:
            wait_ms = await shared.run(lambda r: r.eval(_RESERVE, 1, self._key, self._interval_ms))
            if wait_ms is not None:
                await asyncio.sleep(float(wait_ms) / 1000.0)
                return
        await self._local.acquire()

    async def __aexit__(self, *exc_info: Any) -> None:
        return None


#: Every connector of this process asks here.
PROCESS_LIMITS = RateLimits()


def credential_limiter(credential: str, per_second: float) -> CredentialLimiter:
    return PROCESS_LIMITS.limiter(credential, per_second)
