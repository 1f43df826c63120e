"""Real HTTP over loopback for tests and benchmarks: run any ASGI app under uvicorn in a background thread,
or the gateway as its own process, and wait for events by polling.

    with serve(app) as base_url:
        httpx.get(base_url + "/healthz")

The server listens on 127.0.0.1 on a free port and is shut down (connections
closed, lifespan finished) when the block ends. `eventually` (a test's thread) and
`until` (a test on the event loop) poll for the event a test waits for, instead of
sleeping and hoping it came.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Container, Iterator
from typing import Any

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # running in a thread: leave signals to pytest
        pass


@contextlib.contextmanager
def serve(app: Any, port: int | None = None, startup_timeout: float = 20.0, **options: Any) -> Iterator[str]:
    port = port or free_port()
    options.setdefault("timeout_graceful_shutdown", 1)  # a test's hung handler must not hold the suite
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="auto", **options)
    server = _Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("test server failed to start")
        if time.monotonic() > deadline:
            raise TimeoutError("test server did not start in time")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll `check` until it holds; fail, saying `what`, if it does not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what or 'the event waited for'}"
        time.sleep(0.05)


async def until(check: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = "") -> None:
    """`eventually` for a test on the event loop: poll `check` (plain or async) without blocking the loop."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        held = check()
        if await held if inspect.isawaitable(held) else held:
            return
        assert asyncio.get_running_loop().time() < deadline, f"not within {timeout} s: {what or 'the event waited for'}"
        await asyncio.sleep(0.02)


def wait_listening(port: int, process: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    """Wait until a server process listens on `port` of loopback; fail with its last output if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise RuntimeError(f"{what} exited with status {process.returncode}: {output[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not listen on port {port} within {timeout} s")
        time.sleep(0.05)


def wait_ready(
    base_url: str, timeout: float = 20.0, process: subprocess.Popen | None = None, ready: Container[int] = (200,)
) -> None:
    """Poll /readyz until the gateway says it is ready (and fail early if its process died). `ready=(200, 404)`
    also takes a server without /readyz (a benchmark's bare fan-out) as ready once it answers HTTP."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(base_url + "/readyz").status_code in ready:
                return
        except httpx.TransportError:
            pass
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url} did not become ready in {timeout} s")
        time.sleep(0.05)


@contextlib.contextmanager
def serve_cli(*args: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run `python -m aggregator serve ARGS --port <free>` as a user would, until the block ends."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "aggregator", "serve", *args, "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=30, process=process)
        yield url, process
    finally:
        stop(process)


def stop(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM (a clean shutdown), then SIGKILL if it has not exited within `grace_s` (and reaped)."""
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
