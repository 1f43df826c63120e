"""The response cache: Dify's retries and identical requests answered once, exactly; in one process through the
API, and (at the end) as two replicas sharing one real Redis see it, through two `ResponseCache`s."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from aggregator.web.api import create_app
from aggregator.retrieval.cache import POLL_S, Answer, ResponseCache
from aggregator.shared.redis import SharedState

from testkit.fakes.dify import FakeUpstream
from testkit.gateway import ask, config_text
from testkit.loopback import eventually, serve, wait_ready

from .conftest import make_config, write_docs

PARTNER = """
partner:
  type: dify
  endpoint: {url}
  api_key: x
  knowledge_id: kb
  retries: 0
"""


def test_a_retry_is_answered_from_the_cache_byte_for_byte(tmp_path: Path):
    config = make_config(write_docs(tmp_path / "docs"))  # the default: cache_ttl_s 5
    with serve(create_app(lambda: config)) as url:
        wait_ready(url)
        first = ask(url, headers={"X-Request-Id": "attempt-1"})
        retry = ask(url, headers={"X-Request-Id": "attempt-2"})
        other = ask(url, top_k=2)
        unknown = [ask(url, kb="nope").headers.get("X-Cache") for _ in range(2)]
        metrics = httpx.get(url + "/metrics").text
        status = httpx.get(url + "/status").json()
    assert (first.headers["X-Cache"], retry.headers["X-Cache"], other.headers["X-Cache"]) == ("miss", "hit", "miss")
    assert retry.content == first.content and retry.headers["X-Sources"] == first.headers["X-Sources"] == "docs=ok"
    assert retry.headers["X-Request-Id"] == "attempt-2" and retry.headers["content-type"] == "application/json"
    assert unknown == ["miss", "miss"], "an error is never kept"
    assert 'gateway_response_cache_total{outcome="hit"} 1.0' in metrics
    assert 'gateway_response_cache_total{outcome="miss"} 4.0' in metrics
    assert re.search(r"^gateway_response_cache_hit_ratio 0\.2$", metrics, re.M)
    assert status["cache"] == {"ttl_s": 5.0, "hit": 1, "coalesced": 0, "miss": 4}


def test_entries_expire_and_zero_turns_the_cache_off(tmp_path: Path):
    folder = write_docs(tmp_path / "docs")
    short = make_config(folder, cache_ttl_s=0.3)
    with serve(create_app(lambda: short)) as url:
        wait_ready(url)
        assert [ask(url).headers["X-Cache"] for _ in range(2)] == ["miss", "hit"]
        time.sleep(0.4)
        assert ask(url).headers["X-Cache"] == "miss"
    off = make_config(folder, cache_ttl_s=0)
    with serve(create_app(lambda: off)) as url:
        wait_ready(url)
        assert all("X-Cache" not in ask(url).headers for _ in range(2))


def test_duplicates_in_flight_wait_for_the_first_and_failures_are_not_kept(tmp_path: Path):
    upstream = FakeUpstream(mode="slow", slow_s=0.5)
    with serve(upstream.app()) as upstream_url:
        config = make_config(write_docs(tmp_path / "docs"), PARTNER.format(url=upstream_url), kb_connectors="[docs, partner]")
        with serve(create_app(lambda: config)) as url:
            wait_ready(url)
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda _: ask(url), range(4)))
            assert sorted(a.headers["X-Cache"] for a in answers) == ["coalesced"] * 3 + ["miss"]
            assert len({a.content for a in answers}) == 1 and len(upstream.headers) == 1
            upstream.mode = "error"
            failed = [ask(url, "partner console") for _ in range(2)]
    assert [a.headers["X-Sources"] for a in failed] == ["docs=empty;partner=error"] * 2
    assert [a.headers["X-Cache"] for a in failed] == ["miss", "miss"], "an answer missing a failed source is asked again"
    assert len(upstream.headers) == 3


def test_a_config_reload_invalidates_the_cache(tmp_path: Path):
    folder = write_docs(tmp_path / "docs")
    path = tmp_path / "connectors.yaml"
    text = config_text({"docs": {"type": "files", "path": str(folder)}})
    path.write_text(text)
    with serve(create_app(config_path=path)) as url:
        wait_ready(url)
        assert [ask(url).headers["X-Cache"] for _ in range(2)] == ["miss", "hit"]
        version = httpx.get(url + "/status").json()["config_version"]
        path.write_text(text + "# edited\n")
        eventually(lambda: httpx.get(url + "/status").json()["config_version"] != version, what="the edit reloaded")
        assert ask(url).headers["X-Cache"] == "miss", "nothing answered under the old version is served again"


def test_the_shared_stores_urls_are_shown_without_their_passwords(tmp_path: Path):
    from aggregator.shared.redis import SharedState
    from aggregator.state.postgres import PostgresBackend

    config = make_config(write_docs(tmp_path / "docs"))
    config.server.state_url = "postgresql://gateway:pg-s3cret@db:5432/gateway"
    config.server.redis_url = "redis://:redis-s3cret@cache:6379/3"
    assert {"pg-s3cret", "redis-s3cret"} <= set(config.secrets()), "scrubbed from every message like any secret"
    described = PostgresBackend(config.server.state_url).describe()["url"] + SharedState(config.server.redis_url).describe()["url"]
    assert "s3cret" not in described and "db:5432/gateway" in described and "cache:6379/3" in described


# -- two replicas sharing one Redis: two ResponseCaches, each with its own connection ----------------------


@contextlib.asynccontextmanager
async def replica_caches(redis_url: str, count: int = 2, ttl_s: float = 5.0) -> AsyncIterator[list[ResponseCache]]:
    states = [SharedState(redis_url, f"replica-{i}") for i in range(count)]
    try:
        for state in states:
            await state.start()
        yield [ResponseCache(ttl_s, state) for state in states]
    finally:
        for state in states:
            await state.aclose()


class Source:
    """A retrieval's computation that takes `seconds` and counts how often it ran."""

    def __init__(self, answer: Answer, seconds: float = 0.3) -> None:
        self.answer, self.seconds, self.runs = answer, seconds, 0

    async def __call__(self) -> tuple[str, Answer]:
        self.runs += 1
        await asyncio.sleep(self.seconds)
        return "response", self.answer


async def later(seconds: float, call: Awaitable[tuple]) -> tuple:
    await asyncio.sleep(seconds)
    return await call


async def test_a_partial_answer_from_another_replica_is_given_to_its_waiting_duplicate_and_kept_by_neither(redis_url: str):
    partial = Answer(b'{"records": []}', "docs=ok;partner=error", complete=False)
    source = Source(partial)
    async with replica_caches(redis_url) as (a, b):
        first, waiting = await asyncio.gather(a.answer("k", source, 2.0), later(0.1, b.answer("k", source, 2.0)))
        assert (first[2], waiting[2]) == ("miss", "coalesced") and source.runs == 1
        assert waiting[1] == partial, "the waiting replica got the answer as it was, incomplete"
        outcomes = []
        for cache in (b, a):
            await asyncio.sleep(POLL_S * 4 + 0.1)  # Dify's retry, after the partial answer left Redis
            outcomes.append((await cache.answer("k", source, 2.0))[2])
    assert outcomes == ["miss", "miss"], "a later retry asks the sources again, on either replica"
    assert source.runs == 3


async def commands(cache: ResponseCache) -> Counter[str]:
    """How many times each command was run on the cache's Redis so far."""
    assert cache.shared is not None and cache.shared.client is not None
    stats = await cache.shared.client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): counts["calls"] for name, counts in stats.items()})


async def test_identical_requests_together_in_one_process_wait_for_the_local_answer_not_on_redis(redis_url: str):
    source = Source(Answer(b'{"records": []}', "docs=ok"))
    async with replica_caches(redis_url, count=1) as (cache,):
        before = await commands(cache)
        answers = await asyncio.gather(cache.answer("k", source, 2.0), cache.answer("k", source, 2.0))
        ran = await commands(cache) - before
    assert [outcome for _, _, outcome in answers] == ["miss", "coalesced"] and source.runs == 1
    assert answers[0][1] == answers[1][1]
    assert ran["eval"] == 1, "one claim in Redis"
    assert ran["get"] <= ran["eval"], "no polling for an answer computed in this process (a script's own GET may count)"


async def test_a_duplicate_waiting_on_a_request_that_gave_up_looks_for_the_answer_itself(redis_url: str):
    source = Source(Answer(b'{"records": []}', "docs=ok"), seconds=0.5)
    async with replica_caches(redis_url) as (a, b):
        computing = asyncio.ensure_future(b.answer("k", source, 2.0))
        await asyncio.sleep(0.05)
        gives_up = asyncio.ensure_future(a.answer("k", source, 2.0))  # polls Redis for b's answer
        await asyncio.sleep(0.05)
        duplicate = asyncio.ensure_future(a.answer("k", source, 2.0))  # waits for the one above, in process
        await asyncio.sleep(0.05)
        gives_up.cancel()  # its client went away
        async with asyncio.timeout(2):
            (_, answer, outcome), computed = await duplicate, await computing
    assert gives_up.cancelled() and outcome == "coalesced" and answer == computed[1] and source.runs == 1


async def test_a_request_arriving_just_after_another_replicas_partial_answer_asks_the_sources_again(redis_url: str):
    source = Source(Answer(b'{"records": []}', "docs=ok;partner=error", complete=False), seconds=0.05)
    async with replica_caches(redis_url) as (a, b):
        assert (await a.answer("k", source, 2.0))[2] == "miss"
        assert a.shared is not None
        while await a.shared.client.get(a._redis_key("k")) == b"pending":  # until the answer is published
            await asyncio.sleep(0.005)
        outcome = (await b.answer("k", source, 2.0))[2]  # within the moment it stays for the replicas waiting
    assert outcome == "miss" and source.runs == 2, "it was not waiting for that answer: it is a later one"
