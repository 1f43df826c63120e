"""uvicorn's HTTP/1.1 protocol (httptools) with the two bounds it lacks: a header timeout and a connection cap.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`, but a connection that has not sent
a complete request head yet (nothing at all, or headers dripping in a byte at a time) is never timed out,
and it accepts connections until the process runs out of file descriptors. Both happen before any key is
checked, so anyone who can reach the port could hold the service that way. Here:

- a connection must complete each request's head within `header_timeout_s` of opening (or of the request's
  first byte, on a kept-alive connection), else it is closed;
- a connection over `max_connections` open at once is closed as soon as it is accepted, before it is read.

The body has its own bound in the app (`aggregator.web.route.BODY_TIMEOUT_S`). `aggregator serve` sets both
(`--header-timeout`, `--max-connections`) through `functools.partial`, which also reaches `--workers`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: Seconds a client has to send a request's line and headers: as long as it has for the body.
HEADER_TIMEOUT_S = 10.0
#: Connections open at once, per process: well under the usual 1,024 descriptors, which indexes need too.
MAX_CONNECTIONS = 512


class BoundedHttpProtocol(HttpToolsProtocol):
    """One connection; uvicorn makes one per accepted socket."""

    def __init__(
        self, *args: Any, header_timeout_s: float = HEADER_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.logger.warning("connection refused: %d connections are open (--max-connections)", self.max_connections)
            transport.close()
            return
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()
