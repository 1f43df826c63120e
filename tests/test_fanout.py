"""Fan-out: every source at once, each in its own budget, none able to fail or stall the request."""

from __future__ import annotations

import asyncio
import time
from typing import Literal

import pytest

from aggregator.retrieval.fanout import SourcePolicy, call_source, fan_out, pause_before_retry
from aggregator.tasks import Timeout
from connectors.base import AuthFailed, BadResponse, Connector, ConnectorSettings, Passage, RateLimited, SourceQuery, Unavailable


class ScriptSettings(ConnectorSettings):
    type: Literal["script"] = "script"


class Scripted(Connector):
    """A source that plays a script: each call takes the next step (an exception, a delay, or passages)."""

    settings_model = ScriptSettings

    def __init__(self, name: str, *steps: object) -> None:
        super().__init__(name, ScriptSettings())
        self.steps = list(steps)
        self.calls = 0
        self.cancelled = 0

    async def search(self, query: SourceQuery) -> list[Passage]:
        step = self.steps[min(self.calls, len(self.steps) - 1)]
        self.calls += 1
        try:
            if isinstance(step, (int, float)):
                await asyncio.sleep(step)
                return [Passage(f"{self.name} answer", "t", "d")]
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if isinstance(step, BaseException):
            raise step
        return list(step)  # type: ignore[arg-type]


QUERY = SourceQuery("q", 10)
OK = [Passage("fine", "t", "d")]


async def run(connector: Connector, timeout_s=1.0, retries=2, deadline_in=3.0):
    loop = asyncio.get_running_loop()
    policy = SourcePolicy(timeout_s=timeout_s, retries=retries, backoff_initial_s=0.01, backoff_max_s=0.02)
    return await call_source(connector, QUERY, policy, loop.time() + deadline_in)


async def test_ok_and_empty():
    assert (await run(Scripted("a", OK))).outcome == "ok"
    assert (await run(Scripted("a", []))).outcome == "empty"


async def test_transient_failures_are_retried_then_succeed():
    source = Scripted("a", Unavailable("503"), Unavailable("503"), OK)
    result = await run(source, retries=2)
    assert result.outcome == "ok" and source.calls == 3 and result.attempts == 3


async def test_retries_stop_at_the_configured_count():
    source = Scripted("a", Unavailable("down"))
    result = await run(source, retries=2)
    assert result.outcome == "error" and source.calls == 3 and "down" in result.error


@pytest.mark.parametrize("error,outcome", [(AuthFailed("HTTP 401"), "auth_failed"), (BadResponse("not JSON"), "error")])
async def test_permanent_failures_are_not_retried(error, outcome):
    source = Scripted("a", error, OK)
    result = await run(source, retries=3)
    assert result.outcome == outcome and source.calls == 1


async def test_retry_after_is_honoured_when_it_fits():
    source = Scripted("a", RateLimited("429", retry_after=0.2), OK)
    started = time.perf_counter()
    result = await run(source)
    assert result.outcome == "ok" and time.perf_counter() - started >= 0.2


async def test_retry_after_beyond_the_deadline_gives_up_at_once():
    source = Scripted("a", RateLimited("429", retry_after=30), OK)
    started = time.perf_counter()
    result = await run(source, deadline_in=2.0)
    assert result.outcome == "rate_limited" and source.calls == 1
    assert time.perf_counter() - started < 0.5


async def test_a_hanging_source_times_out_at_its_own_timeout():
    source = Scripted("a", 10)
    started = time.perf_counter()
    result = await run(source, timeout_s=0.2, retries=0)
    assert result.outcome == "timeout" and 0.15 < time.perf_counter() - started < 1.0
    assert source.cancelled == 1


async def test_no_retry_outlives_the_deadline():
    source = Scripted("a", 10)
    started = time.perf_counter()
    result = await run(source, timeout_s=0.3, retries=10, deadline_in=0.8)
    assert result.outcome == "timeout" and time.perf_counter() - started < 1.0


async def test_a_bug_in_a_connector_is_that_sources_error():
    result = await run(Scripted("a", ZeroDivisionError("oops")))
    assert result.outcome == "error" and "ZeroDivisionError" in result.error


async def test_fan_out_runs_sources_concurrently_and_cuts_at_the_deadline():
    loop = asyncio.get_running_loop()
    slow = [Scripted(f"s{i}", 0.3) for i in range(5)]
    hung = Scripted("hung", 60)
    policy = SourcePolicy(timeout_s=30, retries=0)
    deadline = loop.time() + 0.8
    started = time.perf_counter()
    results = await fan_out({c.name: call_source(c, QUERY, policy, deadline) for c in [*slow, hung]}, deadline)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.2, "five 0.3 s sources and a hung one finish by the 0.8 s deadline"
    outcomes = {r.name: r.outcome for r in results}
    assert outcomes == {"s0": "ok", "s1": "ok", "s2": "ok", "s3": "ok", "s4": "ok", "hung": "timeout"}
    assert hung.cancelled == 1
    assert [r.name for r in results] == ["s0", "s1", "s2", "s3", "s4", "hung"]
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not others, "no task is left running after the deadline"


def test_backoff_is_full_jitter_doubling_to_its_cap_and_retry_after_wins():
    policy = SourcePolicy(timeout_s=1, retries=5, backoff_initial_s=0.1, backoff_max_s=1.0)
    for attempt, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)):
        pauses = [pause_before_retry(Unavailable("x"), attempt, policy) for _ in range(200)]
        assert all(0.0 <= p <= ceiling for p in pauses) and max(pauses) > ceiling / 2, attempt
    assert pause_before_retry(RateLimited("x", retry_after=7.0), 1, policy) == 7.0
    assert pause_before_retry(RateLimited("x"), 1, policy) <= 0.1


async def test_a_source_calls_timeout_ends_only_what_it_bounds_and_yields_to_a_cancellation_from_outside():
    """`aggregator.tasks.Timeout`, the fan-out's cheaper asyncio.timeout: the same contract."""
    task = asyncio.current_task()
    assert task is not None
    with pytest.raises(TimeoutError):
        with Timeout(0.05):
            await asyncio.sleep(5)
    assert task.cancelling() == 0, "an expired timeout leaves no cancellation pending"
    with Timeout(0.05) as roomy:
        await asyncio.sleep(0.01)
    assert not roomy.expired
    passed = asyncio.Event()  # set by a timer due after the block's: timers fire in order, so the block's had its chance
    asyncio.get_running_loop().call_later(0.06, passed.set)
    await passed.wait()
    assert not roomy.expired and task.cancelling() == 0, "a timer cancelled with its block fires nothing later"

    async def cancelled_from_outside_as_time_runs_out() -> None:
        with Timeout(0.05):
            asyncio.get_running_loop().call_later(0.05, inner.cancel)
            await asyncio.sleep(5)

    inner = asyncio.ensure_future(cancelled_from_outside_as_time_runs_out())
    with pytest.raises(asyncio.CancelledError):
        await inner
