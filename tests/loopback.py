"""Real HTTP over loopback for tests: run any ASGI app under uvicorn in a background thread.

    with serve(app) as base_url:
        httpx.get(base_url + "/healthz")

The server listens on 127.0.0.1 on a free port and is shut down (connections
closed, lifespan finished) when the block ends.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

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
