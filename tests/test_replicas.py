"""Several replicas, as a user runs them: two `aggregator serve` processes with separate state folders sharing one
PostgreSQL (the index, sync leadership) and one Redis (breakers, health, rate limits, the response cache), both
real servers started by the suite on loopback, and a fake Notion that counts what it is asked."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from testkit.fakes.dify import FakeUpstream
from testkit.fakes.notion import FakeNotion, app as notion_app, block
from testkit.gateway import ask, config_text
from testkit.loopback import eventually, free_port, serve, wait_ready

TOKEN = "secret_notion_token_for_replicas"


def replica_config(notion_url: str, upstream_url: str, *, pg: str | None, redis: str, rps: float = 50, failures: int = 4) -> str:
    """`demo` over a fake Notion, `remote` over it and a Dify upstream; the index in `pg` (else each replica's own)."""
    wiki = {"type": "notion", "token": TOKEN, "base_url": notion_url, "requests_per_second": rps, "refresh_s": 1}
    circuit = {"failures": failures, "cooldown_s": 60}
    partner = {"type": "dify", "endpoint": upstream_url, "api_key": "x", "knowledge_id": "kb", "retries": 0, "circuit": circuit}
    state: dict[str, object] = {"state_dir": "./state"} | ({"state_url": pg} if pg else {})
    return config_text(
        {"wiki": wiki, "partner": partner}, {"demo": ["wiki"], "remote": ["wiki", "partner"]},
        **state, redis_url=redis, watch_config=False,
    )  # fmt: skip


@contextlib.contextmanager
def replicas(tmp_path: Path, count: int = 2, **options: object) -> Iterator[list[tuple[str, subprocess.Popen]]]:
    """`count` gateway processes, each with its own state folder beside its own copy of the same config file."""
    started: list[tuple[str, subprocess.Popen]] = []
    env = {**os.environ, "AGGREGATOR_LOG_LEVEL": "info"}
    try:
        for i in range(count):
            folder = tmp_path / f"replica-{i}"
            folder.mkdir(exist_ok=True)
            config = folder / "connectors.yaml"
            # The same file on every replica (the state folder is relative to it): one config version, one cache.
            config.write_text(replica_config(**options))  # type: ignore[arg-type]
            port = free_port()
            process = subprocess.Popen(
                [sys.executable, "-m", "aggregator", "serve", "--config", str(config), "--port", str(port)],
                env={**env, "AGGREGATOR_REPLICA": f"replica-{i}"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            started.append((f"http://127.0.0.1:{port}", process))
        for url, process in started:
            wait_ready(url, timeout=40, process=process)
        yield started
    finally:
        for _, process in started:
            if process.poll() is None:
                process.terminate()
        for i, (_, process) in enumerate(started):
            try:
                output = process.communicate(timeout=15)[0]
            except subprocess.TimeoutExpired:
                process.kill()
                output = process.communicate()[0]
            print(f"--- replica-{i} ---\n{output[-6000:] if output else ''}")  # shown when a test fails


def documents(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [r["metadata"]["document_id"].removeprefix("wiki:") for r in response.json()["records"]]


def status(url: str) -> dict:
    return httpx.get(url + "/status", timeout=10).json()


def source(url: str, name: str) -> dict:
    return {s["name"]: s for s in status(url)["sources"]}[name]



def block_reads(fake: FakeNotion) -> Counter[str]:
    return Counter(path.split("/")[3] for _, path in fake.requests if path.startswith("/v1/blocks/"))


@pytest.fixture
def notion() -> Iterator[tuple[FakeNotion, str]]:
    fake = FakeNotion(token=TOKEN, page_size=100)
    for i in range(12):
        fake.add_page(f"p-{i:02}", f"Page {i}", [block(f"b{i}", "paragraph", f"Paragraph about topic{i} and the shared handbook.")])
    fake.add_page("p-keys", "Key rotation", [block("k1", "paragraph", "Rotate the signing keys in the HSM.")])
    with serve(notion_app(fake)) as url:
        yield fake, url


@pytest.fixture
def upstream() -> Iterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream()
    with serve(fake.app()) as url:
        yield fake, url


def test_two_replicas_share_one_index_fetch_each_page_once_and_hand_the_sync_over(
    tmp_path: Path, pg_url: str, redis_url: str, notion, upstream
):  # type: ignore[no-untyped-def]
    fake, notion_url = notion
    with replicas(tmp_path, pg=pg_url, redis=redis_url, notion_url=notion_url, upstream_url=upstream[1]) as both:
        (a, process_a), (b, process_b) = both
        for url in (a, b):
            assert documents(ask(url, "signing keys HSM"))[0] == "p-keys"
            assert documents(ask(url, "topic7"))[0] == "p-07"
        synced = source(a, "wiki")["index"]["syncs"]
        eventually(lambda: source(a, "wiki")["index"]["syncs"] > synced, what="another sync (refresh_s: 1) ran and found nothing new")
        assert block_reads(fake) == Counter({f"p-{i:02}": 1 for i in range(12)} | {"p-keys": 1}), "each page fetched once in all"
        syncers = {url: source(url, "wiki")["index"]["syncer"] for url in (a, b)}
        assert sorted(syncers.values()) == [False, True], "one replica syncs, the other only reads"
        eventually(lambda: len(status(a)["replicas"]) == 2, what="each replica sees both")
        views = {v["replica"].split("/")[0]: v for v in source(a, "wiki")["replicas"]}
        assert set(views) == {"replica-0", "replica-1"} and sum(v["syncer"] for v in views.values()) == 1
        page = httpx.get(a + "/").text
        assert "of 2 · index in PostgreSQL (reachable) · Redis connected" in page and page.count("(syncs)") == 1
        assert status(b)["shared_state"]["index"]["kind"] == "postgresql" and status(b)["shared_state"]["redis"]["state"] == "connected"

        syncer, survivor = (process_a, b) if syncers[a] else (process_b, a)
        os.kill(syncer.pid, signal.SIGKILL)  # the syncing replica dies; its lock goes with its connection
        syncer.wait(10)
        eventually(lambda: source(survivor, "wiki")["index"]["syncer"], timeout=8, what="the other replica takes the sync over")
        fake.add_page("p-03", "Page 3", [block("b3", "paragraph", "Visitors use the Lobby network.")], edited="2026-06-01T00:00:00.000Z")
        eventually(lambda: documents(ask(survivor, "lobby network")) == ["p-03"], what="the new syncer indexes the edit")
        assert block_reads(fake)["p-03"] == 2 and sum(block_reads(fake).values()) == 14, "only the edited page was fetched again"


def test_breakers_and_the_response_cache_are_shared(tmp_path: Path, pg_url: str, redis_url: str, notion, upstream):  # type: ignore[no-untyped-def]
    dead, upstream_url = upstream
    dead.mode = "error"
    with replicas(tmp_path, pg=pg_url, redis=redis_url, notion_url=notion[1], upstream_url=upstream_url, failures=4) as both:
        (a, _), (b, _) = both
        outcomes = []
        for i in range(8):  # alternating replicas, as a load balancer would; each query new, so no cache answers it
            response = ask((a, b)[i % 2], f"signing keys {i}", kb="remote")
            assert response.status_code == 200
            outcomes.append(response.headers["X-Sources"])
            time.sleep(0.05)
        assert len(dead.headers) == 4, "the upstream was called circuit.failures times in total, then skipped by both"
        assert all("partner=error" in o for o in outcomes[:4]) and all("partner=skipped" in o for o in outcomes[4:])
        for url in (a, b):
            assert source(url, "partner")["circuit"]["state"] == "open"

        first = ask(a, "rotate the signing keys", headers={"X-Request-Id": "try-1"})
        retried = ask(b, "rotate the signing keys", headers={"X-Request-Id": "try-2"})  # Dify's retry, sent to the other replica
        again = ask(a, "rotate the signing keys")
        assert (first.headers["X-Cache"], retried.headers["X-Cache"], again.headers["X-Cache"]) == ("miss", "hit", "hit")
        assert retried.content == first.content and retried.headers["X-Sources"] == first.headers["X-Sources"]
        assert retried.headers["X-Request-Id"] == "try-2"
        assert ask(b, "rotate the signing keys", top_k=2).headers["X-Cache"] == "miss", "other settings: another answer"
        metrics = httpx.get(b + "/metrics").text
        assert 'gateway_response_cache_total{outcome="hit"} 1.0' in metrics and "gateway_response_cache_hit_ratio" in metrics


def test_identical_requests_in_flight_on_two_replicas_are_answered_once(tmp_path: Path, pg_url: str, redis_url: str, notion, upstream):  # type: ignore[no-untyped-def]
    slow, upstream_url = upstream
    slow.mode, slow.slow_s = "slow", 1.0
    with replicas(tmp_path, pg=pg_url, redis=redis_url, notion_url=notion[1], upstream_url=upstream_url) as both:
        (a, _), (b, _) = both
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda url: ask(url, "partner console", kb="remote"), (a, b, a)))
        assert sorted(r.headers["X-Cache"] for r in answers) == ["coalesced", "coalesced", "miss"], [(r.url, r.headers["X-Cache"], r.headers["X-Sources"]) for r in answers]
        assert len({r.content for r in answers}) == 1
        assert len(slow.headers) == 1, "the slow upstream was asked once for three identical requests"


def test_redis_stopped_mid_run_leaves_both_answering_and_shared_state_comes_back(tmp_path: Path, pg_url: str, own_redis, notion, upstream):  # type: ignore[no-untyped-def]
    redis = own_redis
    with replicas(tmp_path, pg=pg_url, redis=redis.url, notion_url=notion[1], upstream_url=upstream[1]) as both:
        (a, process_a), (b, _) = both
        assert documents(ask(a, "signing keys"))[0] == "p-keys"
        redis.stop()
        for i in range(6):
            started = time.monotonic()
            response = ask((a, b)[i % 2], f"signing keys {i}", kb="remote")
            assert response.status_code == 200 and documents(response)[0] == "p-keys"
            assert time.monotonic() - started < 2.0, "no request waits on the dead Redis"
        eventually(lambda: all(status(u)["shared_state"]["redis"]["state"] == "unreachable" for u in (a, b)), timeout=5)
        assert status(a)["shared_state"]["redis"]["error"]
        page = httpx.get(a + "/").text
        assert 'class="banner">Redis (redis://127.0.0.1:' in page and "are per process until it is back" in page
        redis.start()  # the same port: Redis is back
        eventually(lambda: all(status(u)["shared_state"]["redis"]["state"] == "connected" for u in (a, b)), timeout=8)
        first = ask(a, "key rotation HSM")
        assert ask(b, "key rotation HSM").headers["X-Cache"] == "hit", "shared again: the cache spans both replicas"
        assert first.headers["X-Cache"] == "miss"
        process_a.terminate()
        output = process_a.communicate(timeout=15)[0]
    assert "unreachable" in output and "reachable again: shared state resumed" in output


def test_notion_requests_from_two_replicas_together_stay_under_three_a_second(tmp_path: Path, redis_url: str, upstream):  # type: ignore[no-untyped-def]
    fake = FakeNotion(token=TOKEN, page_size=100)
    for i in range(4):
        fake.add_page(f"p-{i}", f"Page {i}", [block(f"b{i}", "paragraph", f"Paragraph {i} about rate limits.")])
    with serve(notion_app(fake)) as notion_url:
        # No state_url: each replica keeps its own index and syncs Notion itself; only Redis is shared.
        with replicas(tmp_path, pg=None, redis=redis_url, notion_url=notion_url, upstream_url=upstream[1], rps=3) as both:
            for url, _ in both:
                eventually(lambda u=url: len(documents(ask(u, "rate limits"))) == 4, timeout=20)
    times = sorted(t for t, _ in fake.requests)
    assert block_reads(fake) == Counter({f"p-{i}": 2 for i in range(4)}), "both replicas synced every page"
    assert (len(times) - 1) / (times[-1] - times[0]) <= 3.0, "3 a second on average, together"
    # Every second holds at most 3. Slots are reserved in Redis 1/3 s apart (and a little more); the first request
    # on a new connection also connects, so it may arrive ~0.1 s after its slot: those are left out of the count.
    opened: set[str] = set()
    steady = []
    for (at, _), client in zip(fake.requests, fake.clients):
        if client in opened:
            steady.append(at)
        opened.add(client)
    busiest = max(sum(1 for u in steady if t <= u < t + 1.0) for t in steady)
    assert busiest <= 3, f"{busiest} requests within one second: {[round(t - times[0], 3) for t in times]}"
