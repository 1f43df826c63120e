"""Tasks: the one way to stop a background one, and a cheap timeout for the task in progress."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any


async def cancel_and_wait(task: "asyncio.Task[Any] | None") -> None:
    """Cancel a background task and wait until it has stopped (its own error, if any, is not ours to raise)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


class Timeout:
    """`asyncio.timeout(seconds)` for the current task, as a plain `with` block at a third of the cost.

    The fan-out puts one around every source call: asyncio's own (an async context manager, its state kept in
    an enum) cost about 3 us a call. Same contract: when time is up the task is cancelled, and the
    cancellation comes out of the block as TimeoutError, unless someone else cancelled the task too (then the
    CancelledError goes on). `seconds` <= 0 expires at the first suspension.
    """

    __slots__ = ("_loop", "_task", "_seconds", "_handle", "_cancelling", "expired")

    def __init__(self, seconds: float, task: "asyncio.Task[Any] | None" = None) -> None:
        self._loop = asyncio.get_running_loop()
        current = task or asyncio.current_task()
        if current is None:
            raise RuntimeError("Timeout must be used inside a task")
        self._task: asyncio.Task[Any] = current
        self._seconds = seconds
        self._handle: asyncio.TimerHandle | None = None
        self._cancelling = 0
        self.expired = False

    def __enter__(self) -> "Timeout":
        self._cancelling = self._task.cancelling()
        self._handle = self._loop.call_later(self._seconds, self._expire)
        return self

    def _expire(self) -> None:
        self.expired = True
        self._task.cancel()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: TracebackType | None) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.expired and self._task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
            raise TimeoutError from error
