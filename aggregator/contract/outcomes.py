"""What became of one source's (or one stage's) part of a request: the outcome words, written once.

Every report uses these words: the `X-Sources` header, `/status` and its page, metrics, the log line,
traces and `explain`. A retrieval's stages (the embedding judge, the rerank model) report in the same
shape as sources, so every report shows them without code of its own.
"""

from __future__ import annotations

from collections.abc import Coroutine
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from connectors.base import Passage

#: Outcomes reported per source, in the order reports list them.
OUTCOMES = ("ok", "empty", "timeout", "error", "rate_limited", "auth_failed", "skipped")
#: A source that answered, with records or without.
SUCCESSES = frozenset({"ok", "empty"})
#: A source that was asked and failed (a skipped source was not asked).
FAILURES = frozenset({"timeout", "error", "rate_limited", "auth_failed"})


@dataclass(slots=True)
class SourceResult:
    name: str
    outcome: str
    passages: list[Passage] = field(default_factory=list)
    elapsed_ms: float = 0.0
    error: str | None = None
    attempts: int = 0


class CallTracer(Protocol):
    """How the calls of one request are traced: handed down by whoever opened the request's span."""

    def call(self, name: str, kind: str, call: Coroutine[Any, Any, SourceResult]) -> Coroutine[Any, Any, SourceResult]:
        """`call` inside a span of its own (so that an HTTP source passes the span on as `traceparent`)."""

    def skipped(self, name: str, kind: str, result: SourceResult) -> None:
        """A call that was not made (its breaker is open) gets a span too."""


#: The request's call tracer; None (the default, and the CLI's and benchmarks') traces nothing. A context
#: variable, set for the span of one request, so the request path holds no reference to the tracing code.
CALL_TRACER: ContextVar[CallTracer | None] = ContextVar("aggregator_call_tracer", default=None)


def traced(name: str, kind: str, call: Coroutine[Any, Any, SourceResult]) -> Coroutine[Any, Any, SourceResult]:
    """`call` as the request's tracer wants it run: itself when nothing traces this request."""
    tracer = CALL_TRACER.get()
    return call if tracer is None else tracer.call(name, kind, call)


def traced_skip(name: str, kind: str, result: SourceResult) -> None:
    tracer = CALL_TRACER.get()
    if tracer is not None:
        tracer.skipped(name, kind, result)
