"""The response cache in one process (no Redis): Dify's retries and identical requests answered once, exactly."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from aggregator.api import create_app

from .conftest import KEY, make_config, write_docs
from .fakes.dify import FakeUpstream
from .loopback import serve, wait_ready

PARTNER = """
partner:
  type: dify
  endpoint: {url}
  api_key: x
  knowledge_id: kb
  retries: 0
"""


def ask(url: str, query: str = "signing keys", kb: str = "demo", top_k: int = 3, **headers: str) -> httpx.Response:
    body = {"knowledge_id": kb, "query": query, "retrieval_setting": {"top_k": top_k, "score_threshold": 0}}
    return httpx.post(url + "/retrieval", json=body, headers={"Authorization": f"Bearer {KEY}", **headers}, timeout=10)


def test_a_retry_is_answered_from_the_cache_byte_for_byte(tmp_path: Path):
    config = make_config(write_docs(tmp_path / "docs"))  # the default: cache_ttl_s 5
    with serve(create_app(lambda: config)) as url:
        wait_ready(url)
        first = ask(url, **{"X-Request-Id": "attempt-1"})
        retry = ask(url, **{"X-Request-Id": "attempt-2"})
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
    text = f"server:\n  api_keys: [{{key: {KEY}}}]\nknowledge_bases:\n  demo: {{connectors: [docs]}}\nconnectors:\n  docs: {{type: files, path: {folder}}}\n"
    path.write_text(text)
    with serve(create_app(config_path=path)) as url:
        wait_ready(url)
        assert [ask(url).headers["X-Cache"] for _ in range(2)] == ["miss", "hit"]
        version = httpx.get(url + "/status").json()["config_version"]
        path.write_text(text + "# edited\n")
        deadline = time.monotonic() + 10
        while httpx.get(url + "/status").json()["config_version"] == version:
            assert time.monotonic() < deadline, "the edit was not reloaded"
            time.sleep(0.1)
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
