"""Circuit breakers shared by every replica: failures count in total, and a circuit open anywhere is open everywhere.

Each process keeps a full local breaker (the mirror): a call in the closed state costs no round trip. Every
failure, and the first success after failures, goes to Redis in one atomic script that counts, opens (with the
cool-down doubling after a failed trial, as `aggregator/retrieval/breaker.py` does) and publishes the new state; every
replica's mirror applies it. When the cool-down is over, exactly one replica wins the trial call (`SET NX`).
While Redis is unreachable the mirror works as the per-process breaker it is; when it is back, the shared state
is read again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable
from typing import Any

from connectors.base import CircuitSettings

from aggregator.retrieval.breaker import CircuitBreaker
from aggregator.shared.redis import PREFIX, SharedState

CHANNEL = "circuit"
#: A trial call claimed by a replica that died is given to another after this long.
TRIAL_TTL_MS = 30_000
#: A breaker's state is kept this long after its last change.
KEEP_S = 86_400

_FAILURE = """
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local cooldown = tonumber(redis.call('HGET', KEYS[1], 'cooldown') or ARGV[3])
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or 0)
if ARGV[5] == '1' then
  cooldown = math.min(cooldown * 2, tonumber(ARGV[4]))
  state = 'open'
  open_until = tonumber(ARGV[1]) + cooldown
  redis.call('DEL', KEYS[2])
elseif state == 'closed' and failures >= tonumber(ARGV[2]) then
  state = 'open'
  open_until = tonumber(ARGV[1]) + cooldown
end
redis.call('HSET', KEYS[1], 'state', state, 'cooldown', cooldown, 'open_until', open_until)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
local message = cjson.encode({source = ARGV[6], state = state, failures = failures, open_until = open_until, cooldown = cooldown})
redis.call('PUBLISH', KEYS[3], message)
return message
"""
_SUCCESS = """
redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'cooldown', ARGV[1], 'open_until', 0)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('DEL', KEYS[2])
local message = cjson.encode({source = ARGV[2], state = 'closed', failures = 0, open_until = 0, cooldown = tonumber(ARGV[1])})
redis.call('PUBLISH', KEYS[3], message)
return message
"""


class SharedBreakers:
    """This process's shared breakers by source name: one subscription, one resync when Redis comes back."""

    def __init__(self, shared: SharedState) -> None:
        self.shared = shared
        self.breakers: dict[str, SharedCircuitBreaker] = {}
        shared.subscribe(CHANNEL, self._on_message)
        shared.on_reconnect(self.resync)

    def breaker(self, source: str, settings: CircuitSettings) -> "SharedCircuitBreaker":
        breaker = SharedCircuitBreaker(source, settings, self.shared)
        self.breakers[source] = breaker  # a reload's new breaker of a source replaces the old one here
        return breaker

    def _on_message(self, data: dict[str, Any]) -> None:
        breaker = self.breakers.get(str(data.get("source")))
        if breaker is not None:
            breaker.apply(data)

    async def resync(self) -> None:
        """Redis is back (or was just reached): take in what the other replicas decided meanwhile."""
        for source, breaker in list(self.breakers.items()):
            stored = await self.shared.run(lambda r, s=source: r.hgetall(f"{PREFIX}circuit:{s}"))
            if stored:
                fields = {k.decode(): v.decode() for k, v in stored.items()}
                breaker.apply({"state": fields.get("state", "closed"), "failures": int(fields.get("failures", 0)),
                               "open_until": float(fields.get("open_until", 0)), "cooldown": float(fields.get("cooldown", breaker.settings.cooldown_s))})  # fmt: skip


class SharedCircuitBreaker(CircuitBreaker):
    """The local breaker's logic, with its state mirrored from (and written to) Redis."""

    def __init__(self, source: str, settings: CircuitSettings, shared: SharedState) -> None:
        super().__init__(settings, clock=time.time)  # wall-clock: replicas on other machines read the same times
        self.source = source
        self.shared = shared
        self._key = f"{PREFIX}circuit:{source}"
        self._trial_key = f"{PREFIX}circuit-trial:{source}"
        self._channel = f"{PREFIX}{CHANNEL}"

    def apply(self, data: dict[str, Any]) -> None:
        """Take a state decided in Redis (by any replica)."""
        self.consecutive_failures = int(data.get("failures", 0))
        self.cooldown_s = float(data.get("cooldown", self.settings.cooldown_s))
        if data.get("state") == "open":
            self.state, self.open_until = "open", float(data.get("open_until", 0))
        else:
            self.state, self.open_until = "closed", 0.0
        self._trial_in_flight = False

    async def admit(self) -> bool:
        if self.state == "closed":
            return True
        if self.state == "open" and self._clock() < self.open_until:
            return False
        if not self.shared.available:
            return self.allow()
        won = await self.shared.run(lambda r: r.set(self._trial_key, self.shared.replica, nx=True, px=TRIAL_TTL_MS))
        if won is None and not self.shared.available:
            return self.allow()  # Redis went away just now: decide here
        if not won:
            return False  # another replica makes the trial call
        self.state, self._trial_in_flight = "half_open", True
        return True

    def report(self, success: bool) -> Awaitable[None] | None:
        trial = self.state == "half_open"
        clean = self.state == "closed" and self.consecutive_failures == 0
        super().record_success() if success else super().record_failure()
        if success and clean:
            return None  # nothing to tell: the common case costs no round trip, and no task to await
        return self._tell(success, trial)

    async def _tell(self, success: bool, trial: bool) -> None:
        """The verdict to Redis, in one atomic script; the state decided there is applied here too."""
        settings = self.settings
        if success:
            result = await self.shared.run(lambda r: r.eval(
                _SUCCESS, 3, self._key, self._trial_key, self._channel, settings.cooldown_s, self.source, KEEP_S))  # fmt: skip
        else:
            result = await self.shared.run(lambda r: r.eval(
                _FAILURE, 3, self._key, self._trial_key, self._channel, self._clock(), settings.failures, settings.cooldown_s,
                settings.max_cooldown_s, "1" if trial else "0", self.source, KEEP_S))  # fmt: skip
        if result is not None:
            self.apply(json.loads(result))
