"""The one way connectors talk HTTP: a client factory and the mapping of answers to typed errors.

Every connector gets its client from `make_client`, so pooling, redirect
policy, TLS verification, proxies, the user agent and trace propagation (the
W3C `traceparent` of the source call in progress) are the same everywhere,
and reads its answers through `send` / `request_json`, so no source can make
us buffer an unbounded body or take a traceback for an unreadable one.

Underneath is one `aiohttp.ClientSession` per client: chosen by measurement
(`python -m bench.perf --only cpu`), it costs a fraction of the CPU of httpx's
default transport for the same calls, and the gateway spends most of its time
in these calls. What httpx gave for free is kept here: a base URL, per-source
timeouts, `verify_tls` with certifi's roots or a CA bundle, proxies from
`HTTP_PROXY` / `HTTPS_PROXY` / `ALL_PROXY` / `NO_PROXY`, no redirects, and
answers decoded as the standard library would (msgspec first, for speed).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import os
import ssl
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import aiohttp
import certifi
import httpx
import msgspec
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import AfterValidator
from yarl import URL

from connectors.base import BOUNDED_CALL, AuthFailed, BadResponse, NotFound, RateLimited, SourceTimeout, Unavailable

USER_AGENT = "dify-knowledge-gateway/0.1"
#: W3C trace context only: baggage a caller sent is not handed on to sources (often someone else's SaaS).
TRACE_CONTEXT = TraceContextTextMapPropagator()
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
#: Idle pooled connections are closed after this long: below the 5 s of common servers (uvicorn), as httpx did.
KEEPALIVE_S = 5.0
#: Longest response header line accepted (aiohttp's default, 8 KiB, refuses some real CSP and cookie headers).
MAX_HEADER_BYTES = 64 * 1024
_URLS_CACHED = 256
#: The timeouts of a request that the fan-out's own timeout bounds (see `connectors.base.BOUNDED_CALL`).
UNTIMED = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=None, sock_read=None)
_decode = msgspec.json.Decoder().decode


def _base_url(value: str) -> str:
    url = httpx.URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


#: A source's base URL in connectors.yaml: http(s) with a host, kept without its trailing slash.
BaseUrl = Annotated[str, AfterValidator(_base_url)]


def tls_context(verify: bool | str) -> ssl.SSLContext | bool:
    """What `verify_tls` means, as httpx read it: certifi's roots (or `SSL_CERT_FILE` / `SSL_CERT_DIR` when set),
    a CA bundle file or folder given as a path, or False for no verification at all."""
    if verify is False:
        return False
    return _tls_context(verify, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@lru_cache(maxsize=16)
def _tls_context(verify: bool | str, cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """One context per distinct setting: loading a bundle of roots costs milliseconds."""
    if isinstance(verify, str):
        return ssl.create_default_context(capath=verify) if Path(verify).is_dir() else ssl.create_default_context(cafile=verify)
    if cert_file and Path(cert_file).is_file():
        return ssl.create_default_context(cafile=cert_file)
    if cert_dir and Path(cert_dir).is_dir():
        return ssl.create_default_context(capath=cert_dir)
    return ssl.create_default_context(cafile=certifi.where())


def basic_auth(user: str, password: str) -> str:
    """An `Authorization` header value for HTTP Basic (UTF-8, as httpx encoded it)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


class Proxies:
    """The proxy for each URL: from the standard environment variables, read when the client is made (as httpx
    did), or from a mapping like `{"http": ..., "https": ..., "all": ..., "no": "localhost,.internal"}`.
    The choice is cached per scheme and host: it costs nothing per request."""

    def __init__(self, proxies: Mapping[str, str] | None = None) -> None:
        self._proxies = dict(urllib.request.getproxies_environment() if proxies is None else proxies)
        self._chosen: dict[tuple[str, str], tuple[URL, str | None] | None] = {}

    def for_url(self, url: URL) -> tuple[URL, str | None] | None:
        """(proxy URL without credentials, its Proxy-Authorization or None), or None to connect directly."""
        key = (url.scheme, url.host_port_subcomponent or "")
        if key not in self._chosen:
            self._chosen[key] = self._choose(url)
        return self._chosen[key]

    def _choose(self, url: URL) -> tuple[URL, str | None] | None:
        found = self._proxies.get(url.scheme) or self._proxies.get("all")
        if not found or urllib.request.proxy_bypass_environment(url.host or "", self._proxies):
            return None
        proxy = URL(found if "://" in found else f"http://{found}")
        if proxy.scheme not in ("http", "https"):  # socks and others need a client of their own: not followed
            return None
        credentials = basic_auth(proxy.user or "", proxy.password or "") if proxy.user else None
        return proxy.with_user(None), credentials


@dataclass(slots=True)
class Request:
    """One request, built by `HttpClient.build_request`, sent by `send`."""

    method: str
    url: URL
    headers: dict[str, str]
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """What `send` hands back besides the body: the status and the headers (case-insensitive)."""

    status_code: int
    headers: Mapping[str, str]


class HttpClient:
    """One source's pooled HTTP client. Made by `make_client`; its session opens on first use, in the running loop."""

    def __init__(
        self, base_url: str, headers: dict[str, str], timeout_s: float, verify: bool | str, max_connections: int,
        auth_given: bool = False, proxies: Proxies | None = None,
    ) -> None:  # fmt: skip
        self.base_url = base_url.rstrip("/")
        #: Absolute URLs (links an upstream hands back) must stay here: the client's credentials go with them.
        self.origin = _origin(URL(self.base_url)) if self.base_url else None
        self.headers = headers
        self.auth_given = auth_given
        self.timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_connect=timeout_s, sock_read=timeout_s)
        self.max_connections = max_connections
        self._tls = tls_context(verify)
        self._proxies = proxies or Proxies()
        self._urls: dict[str, URL] = {}
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=KEEPALIVE_S, ssl=self._tls)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self.timeout, cookie_jar=aiohttp.DummyCookieJar(),
                max_line_size=MAX_HEADER_BYTES, max_field_size=MAX_HEADER_BYTES,
            )  # fmt: skip
        return self._session

    def url(self, url: str | URL, params: Mapping[str, Any] | None = None) -> tuple[URL, str | None]:
        """`url` made absolute against the base URL (httpx's rule: the path is appended), with `params` added;
        and the Basic `Authorization` that credentials written into it stand for (they leave the URL).
        An absolute URL on another origin than the base URL's is refused (BadResponse): a client carries its
        source's credentials, and a link an upstream hands back (a next page) may not take them elsewhere.
        A `yarl.URL` is taken as the caller built it (absolute, already encoded: nothing is normalised)."""
        if isinstance(url, URL):
            if not url.is_absolute() or params:
                raise ValueError("a yarl.URL is given absolute and complete")
            if self.origin is not None and _origin(url) != self.origin:
                raise BadResponse(f"a link to {public_origin(url)} is not followed: it leaves {public_origin(URL(self.base_url))}")
            return (url.with_user(None), basic_auth(url.user or "", url.password or "")) if url.user is not None else (url, None)
        if params:
            url += ("&" if "?" in url else "?") + urlencode({k: _param(v) for k, v in params.items()})
        found = self._urls.get(url)
        if found is None:
            absolute = url if url.startswith(("http://", "https://")) or not self.base_url else f"{self.base_url}/{url.lstrip('/')}"
            try:
                parsed = URL(absolute)
            except (ValueError, TypeError):
                raise BadResponse(f"{url!r} is not a valid URL") from None
            if self.origin is not None and _origin(parsed) != self.origin:
                raise BadResponse(f"a link to {public_origin(parsed)} is not followed: it leaves {public_origin(URL(self.base_url))}")
            userinfo = parsed.user is not None or parsed.password is not None
            found = (parsed.with_user(None), basic_auth(parsed.user or "", parsed.password or "")) if userinfo else (parsed, None)
            if len(self._urls) >= _URLS_CACHED:
                self._urls.clear()
            self._urls[url] = found
        return found

    def build_request(
        self, method: str, url: str | URL, *, params: Mapping[str, Any] | None = None, json: Any = None, content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Request:  # fmt: skip
        merged = {**self.headers, **(headers or {})}
        target, credentials = self.url(url, params)
        if credentials is not None and not self.auth_given:  # as httpx: the URL's user and password, unless `auth` was given
            merged["Authorization"] = credentials
        if json is not None:
            content = msgspec.json.encode(json)
            merged.setdefault("Content-Type", "application/json")
        return Request(method, target, merged, content)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _origin(url: URL) -> tuple[str, str | None, int | None]:
    """Scheme, host and port (the scheme's default when not written): what makes two URLs the same server."""
    return url.scheme, (url.host or "").lower() or None, url.port


def public_origin(url: URL) -> str:
    """Where a URL points, for messages: scheme, host and port only."""
    try:
        return str(url.origin())
    except ValueError:
        return "a URL without a host"


def _param(value: Any) -> str:
    """A query parameter as httpx wrote it: true/false for booleans, empty for None."""
    if value is True or value is False:
        return "true" if value else "false"
    return "" if value is None else str(value)


def make_client(
    base_url: str = "",
    *,
    headers: Mapping[str, str] | None = None,
    auth: tuple[str, str] | None = None,
    timeout_s: float = 3.0,
    verify: bool | str = True,
    max_connections: int = 20,
) -> HttpClient:
    """A pooled client for one source. Redirects are not followed: a source may not send us elsewhere.

    `auth` is HTTP Basic (user, password); other schemes go in `headers`.
    """
    merged = {"User-Agent": USER_AGENT, **(headers or {})}
    if auth is not None:
        merged["Authorization"] = basic_auth(*auth)
    return HttpClient(base_url, merged, timeout_s, verify, max_connections, auth_given=auth is not None)


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


def check_status(response: Reply, what: str, detail: str | None = None) -> None:
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


#: How much of an upstream's own message a typed error keeps. Far more than any output shows: outputs scrub the
#: config's secrets first and cut to 300 characters after (`aggregator.ops.health.redact`), so that a secret an
#: upstream echoes is never cut in two here, where its first part would escape the scrub.
DETAIL_CHARS = 4000


def clip(text: str, limit: int = DETAIL_CHARS) -> str:
    """An upstream's message, on one line and bounded in memory; outputs scrub it, then cut it shorter."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def send(
    client: HttpClient, request: Request, what: str, max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES, *, check: bool = True
) -> tuple[Reply, bytes]:
    """Send a request and read at most `max_bytes` of the answer; map transport failures to typed errors.

    With `check=False` an error status is not raised here: the (bounded) body is
    returned with it, for callers that read the upstream's error envelope first.
    A call cancelled midway (the request's deadline) closes its connection. Within a source call of the
    fan-out, whose own timeout always comes first, the client's timeouts start no timers (`BOUNDED_CALL`).
    """
    headers = request.headers
    TRACE_CONTEXT.inject(headers)  # the source call's span, or the caller's trace; nothing when there is none
    options: dict[str, Any] = {}
    bounded = BOUNDED_CALL.get()
    if bounded is not None and bounded is asyncio.current_task():
        options["timeout"] = UNTIMED
    proxy = client._proxies.for_url(request.url)
    if proxy is not None:
        options["proxy"], credentials = proxy
        if credentials is not None:  # to the proxy: on CONNECT for https, on the request itself for http
            if request.url.scheme == "https":
                options["proxy_headers"] = {"Proxy-Authorization": credentials}
            else:
                headers["Proxy-Authorization"] = credentials
    try:
        response = await client.session().request(
            request.method, request.url, headers=headers, data=request.body, allow_redirects=False, **options
        )
    except TimeoutError:
        raise SourceTimeout(f"{what}: timed out") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise Unavailable(f"{what}: {type(exc).__name__}: cannot connect") from None
    done = False
    try:
        answer = Reply(response.status, response.headers)
        if check:
            check_status(answer, what)
        declared = response.content_length
        if declared is not None and declared > max_bytes:
            raise BadResponse(f"{what}: answer of {declared} bytes is over the {max_bytes}-byte limit")
        chunks: list[bytes] = []
        size = 0
        content = response.content
        while chunk := await content.readany():
            size += len(chunk)
            if size > max_bytes:
                raise BadResponse(f"{what}: answer is over the {max_bytes}-byte limit")
            chunks.append(chunk)
        done = True
        return answer, chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except TimeoutError:
        raise SourceTimeout(f"{what}: timed out while reading the answer") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise Unavailable(f"{what}: {type(exc).__name__} while reading the answer") from None
    finally:
        if done:
            response.release()  # read to the end: the connection goes back to the pool
        else:
            response.close()  # an error or a cancellation midway: the connection is closed, never reused


def decode_json(body: bytes, what: str) -> Any:
    """The answer decoded exactly as the standard library would: msgspec reads standard JSON (huge integers
    included) in a third of the time; what only the standard library reads (NaN, a BOM, UTF-16, lone
    surrogates) falls back to it."""
    try:
        return _decode(body)
    except (msgspec.DecodeError, RecursionError):
        pass
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise BadResponse(f"{what}: answer is not JSON") from None


def _error_envelope(body: bytes) -> Any:
    if not body:
        return None
    try:
        return decode_json(body, "")
    except BadResponse:
        return None


#: (status, the error answer's decoded body or None when it is not JSON, `what`) -> the upstream's own
#: words for it; or it raises a more precise SourceError itself (e.g. a 403 that is really a rate limit).
DescribeError = Callable[[int, Any, str], "str | None"]


async def request_json(
    client: HttpClient, method: str, url: str | URL, what: str, max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    *, describe_error: DescribeError | None = None, decode: Callable[[bytes, str], Any] = decode_json, **kwargs: Any,
) -> Any:  # fmt: skip
    """Send, check, bound and decode in one call: the usual path for a JSON API.

    `describe_error` lets a connector read its API's error envelope, so that the
    typed error says what the upstream said (`HTTP 400 (index_not_found: docs)`).
    `decode` reads a successful answer (e.g. straight into typed records), `decode_json` unless given.
    `kwargs` are those of `HttpClient.build_request`: `params`, `json`, `content`, `headers`.
    """
    request = client.build_request(method, url, **kwargs)
    response, body = await send(client, request, what, max_bytes, check=describe_error is None)
    if describe_error is not None and response.status_code >= 300:
        check_status(response, what, describe_error(response.status_code, _error_envelope(body), what))
    return decode(body, what)
