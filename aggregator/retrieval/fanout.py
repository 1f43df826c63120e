"""Ask every source of a knowledge base at once, within the request's deadline.

One policy for every source type, in one place:
- each call runs under the source's `timeout_s`, and never past the request deadline;
- transient failures (`Unavailable`, `SourceTimeout`, `RateLimited`) are retried up to
  `retries` times with exponential backoff and jitter; a `Retry-After` is honoured when
  it fits in the time left, otherwise the source gives up at once as `rate_limited`;
- no retry sleeps past the deadline; other errors are not retried;
- when the deadline comes, calls still running are cancelled and awaited, so nothing is
  left behind, and their sources are reported as `timeout`;
- a circuit breaker per source skips, at no cost, a source that keeps failing (`skipped`)
  and lets one trial call through after a cool-down.
A source's failure is data (its outcome), never an exception out of here.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from connectors.base import BOUNDED_CALL, Connector, RateLimited, SourceError, SourceQuery, SourceTimeout

from aggregator.retrieval.breaker import CircuitBreaker
from aggregator.contract.outcomes import SUCCESSES, SourceResult, traced, traced_skip
from aggregator.tasks import Timeout

log = logging.getLogger(__name__)

@dataclass(slots=True)
class SourcePolicy:
    timeout_s: float
    retries: int
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 1.0


def pause_before_retry(error: SourceError, attempt: int, policy: SourcePolicy) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): a 429's Retry-After when it gave one, else
    exponential backoff with full jitter (uniform between 0 and initial·2^(attempt−1), at most backoff_max_s)."""
    if isinstance(error, RateLimited) and error.retry_after is not None:
        return error.retry_after
    return random.uniform(0.0, min(policy.backoff_max_s, policy.backoff_initial_s * 2 ** (attempt - 1)))


async def call_source(connector: Connector, query: SourceQuery, policy: SourcePolicy, deadline: float) -> SourceResult:
    """One source's part of a request: attempts, retries and the outcome, all bounded by `deadline` (loop time).

    A plain loop rather than a retry library: it runs for every source of every request, the policy is a few
    lines, and the library's bookkeeping cost about 30 us a call (bench.perf --only cpu).
    """
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    attempts = 0
    task = asyncio.current_task()
    bounded = BOUNDED_CALL.set(task)  # every attempt runs under a Timeout below
    try:
        while True:
            attempts += 1
            try:
                budget = min(policy.timeout_s, deadline - loop.time())
                if budget <= 0:
                    raise SourceTimeout("no time left in the request's deadline")
                try:
                    with Timeout(budget, task):  # asyncio.timeout's contract, cheaper
                        passages = await connector.search(query)
                except TimeoutError:
                    raise SourceTimeout(f"no answer within {budget:.2f} s") from None
                break
            except SourceError as exc:
                if not exc.retryable or attempts > policy.retries:
                    raise
                pause = pause_before_retry(exc, attempts, policy)
                if loop.time() + pause >= deadline - 0.05:  # no sleep that would reach the deadline
                    raise
                await asyncio.sleep(pause)
        outcome = "ok" if passages else "empty"
        return SourceResult(connector.name, outcome, passages, _ms(started), None, attempts)
    except SourceError as exc:
        return SourceResult(connector.name, exc.outcome, [], _ms(started), str(exc), attempts)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a connector bug: reported as that source's error, logged with its traceback
        log.exception("source %s raised an unexpected error", connector.name)
        return SourceResult(connector.name, "error", [], _ms(started), f"internal error: {type(exc).__name__}", attempts)
    finally:
        BOUNDED_CALL.reset(bounded)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


async def fan_out(calls: dict[str, Coroutine[Any, Any, SourceResult]], deadline: float) -> list[SourceResult]:
    """Run the coroutines in `calls` (name -> coroutine) at once; collect every outcome by `deadline`."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    tasks = {name: loop.create_task(coro) for name, coro in calls.items()}
    if tasks:
        _, pending = await asyncio.wait(tasks.values(), timeout=max(0.0, deadline - loop.time()))
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)  # let cancellation run; connectors release sockets here
    results: list[SourceResult] = []
    for name, task in tasks.items():
        if task.done() and not task.cancelled() and task.exception() is None:
            results.append(task.result())
        elif task.done() and not task.cancelled():
            results.append(SourceResult(name, "error", [], _ms(started), f"internal error: {type(task.exception()).__name__}"))
        else:
            results.append(SourceResult(name, "timeout", [], _ms(started), "cut off at the request deadline"))
    return results


@dataclass(slots=True)
class SourceSlot:
    """A live source and the core's state for it; kept across config reloads while its settings stay the same."""

    connector: Connector
    policy: SourcePolicy
    breaker: CircuitBreaker


async def ask_sources(slots: list[SourceSlot], query: SourceQuery, deadline: float) -> list[SourceResult]:
    """Fan out to the sources whose circuit allows a call; feed every outcome back to its breaker."""
    calls: dict[str, Coroutine[Any, Any, SourceResult]] = {}
    skipped: dict[str, SourceResult] = {}
    for slot in slots:
        name = slot.connector.name
        breaker = slot.breaker
        if breaker.state == "closed" or await breaker.admit():  # closed: every breaker admits, nothing to await
            calls[name] = traced(name, slot.connector.type, call_source(slot.connector, query, slot.policy, deadline))
        else:
            wait = breaker.seconds_until_trial() or 0.0
            skipped[name] = SourceResult(name, "skipped", error=f"circuit open; next trial in {wait:.0f} s")
            traced_skip(name, slot.connector.type, skipped[name])
    answered = {result.name: result for result in await fan_out(calls, deadline)}
    results = [skipped.get(slot.connector.name) or answered[slot.connector.name] for slot in slots]
    verdicts = [slot.breaker.report(result.outcome in SUCCESSES) for slot, result in zip(slots, results) if result.outcome != "skipped"]
    telling = [told for told in verdicts if told is not None]
    if telling:  # shared breakers tell the other replicas (no round trip, and nothing to await, while all is well)
        await asyncio.gather(*telling)
    return results
