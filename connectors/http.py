"""The one way connectors talk HTTP: a client factory and the mapping of answers to typed errors.

Every connector gets its `httpx.AsyncClient` from `make_client`, so pooling,
redirect policy, TLS verification, the user agent and trace propagation (the
W3C `traceparent` of the source call in progress) are the same everywhere,
and reads its answers through `read_json`, so no source can make us buffer
an unbounded body or take a traceback for an unreadable one.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import httpx
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import AfterValidator

from .base import AuthFailed, BadResponse, NotFound, RateLimited, SourceTimeout, Unavailable

USER_AGENT = "dify-knowledge-gateway/0.1"
#: W3C trace context only: baggage a caller sent is not handed on to sources (often someone else's SaaS).
TRACE_CONTEXT = TraceContextTextMapPropagator()
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024


def _base_url(value: str) -> str:
    url = httpx.URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


#: A source's base URL in connectors.yaml: http(s) with a host, kept without its trailing slash.
BaseUrl = Annotated[str, AfterValidator(_base_url)]


async def _propagate_trace(request: httpx.Request) -> None:
    """Pass the current trace on as `traceparent` (and `tracestate`); nothing when no trace is in progress."""
    TRACE_CONTEXT.inject(request.headers)


def make_client(
    base_url: str = "",
    *,
    headers: Mapping[str, str] | None = None,
    auth: httpx.Auth | tuple[str, str] | None = None,
    timeout_s: float = 3.0,
    verify: bool | str = True,
    max_connections: int = 20,
) -> httpx.AsyncClient:
    """A pooled client for one source. Redirects are not followed: a source may not send us elsewhere."""
    return httpx.AsyncClient(
        event_hooks={"request": [_propagate_trace]},
        base_url=base_url,
        headers={"User-Agent": USER_AGENT, **(headers or {})},
        auth=auth,
        timeout=httpx.Timeout(timeout_s),
        verify=verify,
        follow_redirects=False,
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
    )


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def check_status(response: httpx.Response, what: str, detail: str | None = None) -> None:
    """Raise the typed error that an HTTP status means; return for 2xx.

    `detail` is the upstream's own explanation (read from its error envelope),
    appended to the message so that /status says why, not only that.
    """
    status = response.status_code
    if status < 300:
        return
    because = f" ({clip(detail)})" if detail else ""
    if status in (401, 403):
        raise AuthFailed(f"{what}: HTTP {status}, credentials refused{because}")
    if status == 429:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise RateLimited(f"{what}: HTTP 429, rate limited{because}", retry_after)
    if status in (502, 503, 504):
        raise Unavailable(f"{what}: HTTP {status}{because}")
    if status == 404:
        raise NotFound(f"{what}: HTTP 404{because}")
    if 300 <= status < 400:
        raise BadResponse(f"{what}: HTTP {status} redirect not followed")
    raise BadResponse(f"{what}: HTTP {status}{because}")


def clip(text: str, limit: int = 300) -> str:
    """An upstream's message, on one line and bounded: it goes into /status and logs."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def send(
    client: httpx.AsyncClient, request: httpx.Request, what: str, max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES, *, check: bool = True
) -> tuple[httpx.Response, bytes]:
    """Send a request and read at most `max_bytes` of the answer; map transport failures to typed errors.

    With `check=False` an error status is not raised here: the (bounded) body is
    returned with it, for callers that read the upstream's error envelope first.
    """
    try:
        response = await client.send(request, stream=True)
    except httpx.TimeoutException:
        raise SourceTimeout(f"{what}: timed out") from None
    except httpx.TransportError as exc:
        raise Unavailable(f"{what}: {type(exc).__name__}: cannot connect") from None
    try:
        if check:
            check_status(response, what)
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise BadResponse(f"{what}: answer of {int(declared)} bytes is over the {max_bytes}-byte limit")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise BadResponse(f"{what}: answer is over the {max_bytes}-byte limit")
            chunks.append(chunk)
        return response, b"".join(chunks)
    except httpx.TimeoutException:
        raise SourceTimeout(f"{what}: timed out while reading the answer") from None
    except httpx.TransportError as exc:
        raise Unavailable(f"{what}: {type(exc).__name__} while reading the answer") from None
    finally:
        await response.aclose()


def decode_json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise BadResponse(f"{what}: answer is not JSON") from None


#: (status, the error answer's decoded body or None when it is not JSON, `what`) -> the upstream's own
#: words for it; or it raises a more precise SourceError itself (e.g. a 403 that is really a rate limit).
DescribeError = Callable[[int, Any, str], "str | None"]


async def request_json(
    client: httpx.AsyncClient, method: str, url: str, what: str, max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    *, describe_error: DescribeError | None = None, **kwargs: Any,
) -> Any:  # fmt: skip
    """Send, check, bound and decode in one call: the usual path for a JSON API.

    `describe_error` lets a connector read its API's error envelope, so that the
    typed error says what the upstream said (`HTTP 400 (index_not_found: docs)`).
    """
    request = client.build_request(method, url, **kwargs)
    response, body = await send(client, request, what, max_bytes, check=describe_error is None)
    if describe_error is not None and response.status_code >= 300:
        try:
            envelope = json.loads(body) if body else None
        except (ValueError, RecursionError):
            envelope = None
        check_status(response, what, describe_error(response.status_code, envelope, what))
    return decode_json(body, what)
