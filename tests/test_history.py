"""A source's last hour: minute buckets in /status, charts and recent errors on the status page.

The clock is injected (`service.health.clock`), so calls land in chosen minutes without waiting.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from aggregator.web.api import create_app
from aggregator.runtime.config import parse_config
from aggregator.contract.outcomes import OUTCOMES, SourceResult
from aggregator.ops.health import HealthRecorder, percentile
from aggregator.ops.history import ERRORS_KEPT, MINUTES, History

from .conftest import KEY, make_config, write_docs
from testkit.fakes.dify import FakeUpstream
from testkit.loopback import serve

#: 2026-11-24 19:00:00 UTC, a whole minute.
T0 = 1795546800.0


class Clock:
    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def test_calls_land_in_their_minute_and_memory_stays_bounded():
    history = History()
    for second in range(0, 3 * 3600, 3):  # three hours, a call every 3 s
        history.add(T0 + second, "ok", 5.0 + second % 50)
        if second % 300 == 0:
            history.add_error(T0 + second, "timeout", f"no answer within {second} s")
    now = T0 + 3 * 3600 - 1
    minutes = history.minutes(now)
    assert len(history._buckets) == MINUTES and len(history.errors) == ERRORS_KEPT, "bounded, not every call"
    assert len(minutes) == MINUTES and all(sum(m.calls.values()) == 20 for m in minutes)
    assert minutes[-1].minute == int(now // 60) and minutes[0].minute == int(now // 60) - MINUTES + 1
    snapshot = history.snapshot(now)
    assert snapshot["errors"][0]["message"] == f"no answer within {3 * 3600 - 300} s", "newest first"
    assert history.minutes(now + 30 * 60)[0].minute == int(now // 60) - MINUTES + 31, "older minutes leave the window"


def test_minute_percentiles_are_close_to_the_exact_ones():
    history = History()
    latencies = [1.3, 2.0, 4.5, 9.9, 12.0, 15.5, 33.0, 80.0, 120.0, 400.0, 950.0, 2999.0] * 7
    for i, ms in enumerate(latencies):
        history.add(T0 + i % 60, "ok", ms)
    [minute] = history.minutes(T0 + 59)
    for q in (0.5, 0.95):
        exact = percentile(latencies, q)
        assert exact is not None and abs(minute.percentile(q) - exact) <= 0.05 * exact
    history.add(T0 + 60, "timeout", 2000.0)
    assert history.minutes(T0 + 60)[-1].percentile(0.95) == 2000.0, "a single call is exact"


def test_skipped_calls_count_without_a_latency():
    health = HealthRecorder(clock=Clock(T0 + 10))
    health.record([SourceResult("a", "skipped", error="circuit open")], {"a": "dify"})
    [minute] = health.sources["a"].history.snapshot(T0 + 20)["minutes"]
    assert minute == {"at": "2026-11-24T19:00:00Z", "calls": {"skipped": 1}, "latency_ms": {"p50": None, "p95": None}}


def test_charts_put_each_minute_in_its_column_stacked_in_outcome_order():
    from aggregator.ops.charts import outcomes_chart, step_outline

    assert step_outline([0, 0, 3, 3, 0, 5]) == "M0 0h2V3h2V0h1V5h1V0z"
    assert step_outline([0, 0]) == ""
    history = History()
    history.add(T0 + 1, "timeout", 3000.0)  # the oldest minute of the window: the first column
    for _ in range(3):
        history.add(T0 + 59 * 60 + 1, "ok", 10.0)  # the newest minute: the last column
    history.add(T0 + 59 * 60 + 2, "error", 10.0)
    chart = outcomes_chart(history.snapshot(T0 + 59 * 60 + 30))
    paths = dict(re.findall(r'<path fill="(#\w+)" d="([^"]+)"', chart))
    top = 4  # the scale's top: 4 calls/min
    assert f"top {top}/min" in chart
    assert paths["#2da44e"] == "M0 0h59V33h1V0z", "ok: three calls of four in the last column"
    assert paths["#cf222e"] == "M0 0V11h1V0h58V44h1V0z", "error: stacked on top of ok (each area reaches its cumulative height)"
    assert paths["#fb8f44"] == "M0 0V11h1V0h58V33h1V0z", "timeout: the first column (and the stack under error)"
    assert list(paths) == ["#cf222e", "#fb8f44", "#2da44e"], "painted from the top of the stack down"


# -- a real run with a failing source ----------------------------------------------------------------


@pytest.fixture
def flaky():
    upstream = FakeUpstream(slow_s=0.6)
    with serve(upstream.app()) as url:
        yield url, upstream


def test_status_history_places_errors_and_timeouts_in_their_minutes(tmp_path: Path, flaky):
    url, upstream = flaky
    extra = f'partner: {{type: dify, endpoint: "{url}", api_key: upstream-secret, knowledge_id: kb, retries: 0, timeout_s: 0.3}}'
    config = make_config(write_docs(tmp_path / "docs"), extra, kb_connectors="[docs, partner]", deadline_s=2.0, cache_ttl_s=0)
    clock = Clock(T0)
    body = {"knowledge_id": "demo", "query": "rotate keys", "retrieval_setting": {"top_k": 3, "score_threshold": 0}}
    with TestClient(create_app(lambda: config)) as client:
        client.app.state.service.health.clock = clock
        client.portal.call(client.app.state.service.gateway.slots["docs"].connector.wait_ready, 10)

        def ask(at: float, behaviour: str) -> str:
            clock.at, upstream.mode = at, behaviour
            response = client.post("/retrieval", json=body, headers={"Authorization": f"Bearer {KEY}"})
            assert response.status_code == 200
            return response.headers["X-Sources"]

        assert ask(T0 + 5, "ok") == "docs=ok;partner=ok"
        assert ask(T0 + 70, "error") == ask(T0 + 100, "error") == "docs=ok;partner=error"
        assert ask(T0 + 190, "slow") == "docs=ok;partner=timeout"
        clock.at = T0 + 230
        status = client.get("/status").json()
        page = client.get("/").text
        clock.at = T0 + (3 + MINUTES - 1) * 60 + 30
        later = client.get("/status").json()

    sources = {s["name"]: s for s in status["sources"]}
    partner = sources["partner"]["history"]
    assert partner["now"] == "2026-11-24T19:03:50Z" and partner["window_minutes"] == 60
    assert [(m["at"][11:16], m["calls"]) for m in partner["minutes"]] == [
        ("19:00", {"ok": 1}), ("19:01", {"error": 2}), ("19:03", {"timeout": 1}),
    ]  # fmt: skip
    slow = partner["minutes"][-1]["latency_ms"]
    assert 250 <= slow["p50"] == slow["p95"] < 1000, "the timeout's own time, cut at timeout_s"
    assert [(e["at"], e["outcome"]) for e in partner["errors"]] == [
        ("2026-11-24T19:03:10Z", "timeout"), ("2026-11-24T19:01:40Z", "error"), ("2026-11-24T19:01:10Z", "error"),
    ]  # fmt: skip
    assert "HTTP 500" in partner["errors"][1]["message"] and "upstream-secret" not in str(status)
    assert [m["calls"] for m in sources["docs"]["history"]["minutes"]] == [{"ok": 1}, {"ok": 2}, {"ok": 1}]
    assert sources["docs"]["history"]["errors"] == []

    [row] = re.findall(r'<tr data-source="partner">(.*?)</tr>', page, re.S)
    [charts] = re.findall(r'<tr class="hist" data-history="partner">(.*?)</tr>', page, re.S)
    assert charts.count("<svg") == 2 and "<script" not in page
    assert "19:03:10</time> <b>timeout</b>" in row
    assert "19:01:40</time> <b>error</b> ×2 since 19:01:10" in row, "a run of one error is one line"

    assert later["sources"][1]["history"]["minutes"] == [{"at": "2026-11-24T19:03:00Z", "calls": {"timeout": 1},
                                                          "latency_ms": slow}], "an hour later only the last minute is left"  # fmt: skip
    assert len(later["sources"][1]["history"]["errors"]) == 3, "the last errors stay, whatever their age"


# -- the page stays light --------------------------------------------------------------------------------

SOURCES = 20
Mix = Callable[[int, int, random.Random], dict[str, int]]  # (source index, minute, rng) -> calls by outcome


def realistic_hour(source: int, minute: int, rng: random.Random) -> dict[str, int]:
    """A bad hour: every source busy every minute; 14 healthy with a rare failure, 4 flaky (timeouts,
    errors and rate limits every minute), 2 that go down at half past and are then skipped by their breaker."""
    calls = {"ok": rng.randint(20, 60), "empty": rng.randint(0, 10)}
    if source < 14:
        if rng.random() < 0.05:
            calls[rng.choice(["timeout", "error"])] = 1
    elif source < 18:
        calls |= {"timeout": rng.randint(1, 3), "error": rng.randint(0, 2), "rate_limited": rng.randint(0, 1)}
    elif minute >= 30:
        calls = {"timeout": 1, "skipped": rng.randint(20, 60)}
    return calls


def worst_hour(source: int, minute: int, rng: random.Random) -> dict[str, int]:
    """Every outcome in every minute of every source, in varying numbers: the most a chart can hold."""
    return {"ok": rng.randint(20, 60), "empty": rng.randint(1, 10), "timeout": rng.randint(1, 3), "error": rng.randint(1, 3),
            "rate_limited": rng.randint(1, 2), "auth_failed": 1, "skipped": rng.randint(1, 4)}  # fmt: skip


def page_after(mix: Mix) -> tuple[dict, bytes]:
    """/status and the page of a gateway with SOURCES sources after an hour of calls drawn from `mix`.
    Every error message differs from the others, so nothing on the page can be merged."""
    names = [f"kb-{i:02d}" for i in range(SOURCES)]
    connectors = "\n".join(f"  {n}: {{type: dify, endpoint: 'https://{n}.example.com/api', api_key: key-{n}, knowledge_id: kb}}" for n in names)
    config = parse_config(f"server:\n  api_keys: [{{key: {KEY}}}]\nknowledge_bases:\n  all: {{connectors: [{', '.join(names)}]}}\nconnectors:\n{connectors}\n", {})
    clock, rng = Clock(T0), random.Random(13)
    with TestClient(create_app(lambda: config)) as client:
        service = client.app.state.service
        service.health.clock = clock
        for minute in range(MINUTES):
            planned = {name: mix(i, minute, rng) for i, name in enumerate(names)}
            for second in range(60):
                clock.at = T0 + minute * 60 + second
                results = [
                    SourceResult(name, outcome, elapsed_ms=rng.lognormvariate(4, 1),
                                 error=f"POST https://{name}.example.com/api/retrieval: {outcome} ({uuid.uuid4()})")
                    for name, calls in planned.items() for outcome, n in calls.items() if n > second
                ]  # fmt: skip
                service.health.record(results, {name: "dify" for name in names})
        page = client.get("/", headers={"Accept-Encoding": "identity"})
        compressed = client.get("/", headers={"Accept-Encoding": "gzip"})
        digits = re.compile(rb"\d+")  # the page's clock ("up 3 s", ages) may tick between the two requests
        assert compressed.headers["content-encoding"] == "gzip"
        assert digits.sub(b"0", compressed.content) == digits.sub(b"0", page.content)
        sent = int(compressed.headers["content-length"])
        assert sent < 100_000 and sent < len(page.content) / 3, "what travels is compressed"
        return client.get("/status").json(), page.content


def test_page_with_twenty_busy_sources_over_a_full_hour_is_under_100_kb():
    status, page = page_after(realistic_hour)
    assert all(len(s["history"]["minutes"]) == MINUTES for s in status["sources"]), "a full hour everywhere"
    assert page.count(b"<svg") == 2 * SOURCES and page.count(b"<li>") >= 6 * ERRORS_KEPT
    assert all(f'fill="{c}"'.encode() in page for c in ("#2da44e", "#a6e3b4", "#cf222e", "#fb8f44", "#d4a72c", "#afb8c1"))
    print(f"status page, {SOURCES} sources with a full hour: {len(page)} bytes")
    assert len(page) < 100_000


def test_page_size_is_bounded_even_when_every_minute_has_every_outcome():
    status, page = page_after(worst_hour)
    assert all(set(m["calls"]) == set(OUTCOMES) for s in status["sources"] for m in s["history"]["minutes"])
    assert page.count(b"<li>") == SOURCES * ERRORS_KEPT
    print(f"status page, {SOURCES} sources, every outcome every minute: {len(page)} bytes")
    assert len(page) < 7_000 * SOURCES


def test_every_outcome_has_a_colour_and_a_place_in_the_stack():
    from aggregator.ops.charts import OUTCOME_COLOURS

    assert tuple(OUTCOME_COLOURS) == OUTCOMES
