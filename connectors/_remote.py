"""What every source behind a search API of its own shares: one pooled client, one call per query, raw scores.

Each such connector says how its client is made (`client_options`), what one
query sends (`call`) and how the answer reads (`parse`, `describe_error` for
its error envelope). Opening and closing the client, the bounded JSON call
through `connectors.http` and the cut at the query's limit are written once here.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar

import httpx
from yarl import URL

from connectors.base import Connector, Passage, SourceQuery
from connectors.http import DEFAULT_MAX_RESPONSE_BYTES, DescribeError, HttpClient, make_client, request_json


#: Names the gateway puts on every record (see `base.record_metadata` and the pipeline): an upstream's own
#: metadata field of the same name is kept under a prefixed name instead of hiding the gateway's.
GATEWAY_FIELDS = frozenset({"source", "source_type", "document_id", "title", "chunk_index", "updated_at", "score_detail", "also_in"})


def upstream_metadata(fields: Any, prefix: str) -> dict[str, Any]:
    """An upstream's metadata object kept whole, with gateway names renamed `<prefix>_<name>`."""
    if not isinstance(fields, dict):
        return {}
    return {(f"{prefix}_{key}" if key in GATEWAY_FIELDS else str(key)): value for key, value in fields.items()}


@dataclass(frozen=True, slots=True)
class Call:
    """One request of a query: method, URL (absolute or relative to the client's base), how messages name it."""

    method: str
    url: str | URL  # a yarl.URL is sent exactly as built (see connectors.http.HttpClient.url)
    what: str  # e.g. "POST https://kb.example.com/v1/datasets/…/retrieve": no credentials, no query string
    options: dict[str, Any] = field(default_factory=dict)  # for request_json: json=..., params=...


class ClientConnector(Connector):
    """A query-time source reached over HTTP through one client made by `make_client`: its lifecycle, once."""

    _client: HttpClient | None = None

    @abc.abstractmethod
    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for `make_client` (base URL, headers, auth, TLS); secrets are read here only."""

    async def start(self) -> None:
        if self._client is None:
            options = {"timeout_s": self.settings.timeout_s, **self.client_options()}
            self._client = make_client(**options)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def client(self) -> HttpClient:
        """The open client, opened on first use when `start` was not called."""
        if self._client is None:
            await self.start()
        assert self._client is not None
        return self._client


class RemoteConnector(ClientConnector):
    """A source answered by one call per query: it says what the call is and how its answer reads."""

    #: Reads the API's error envelope into the typed error's message (see `connectors.http.request_json`).
    describe_error: ClassVar[DescribeError | None] = None
    #: False for an API asked for more candidates than the query's limit on purpose (the fusion reads them all).
    cut_to_limit: ClassVar[bool] = True

    @abc.abstractmethod
    def call(self, query: SourceQuery) -> Call:
        """The request that asks the API for `query`."""

    @abc.abstractmethod
    def parse(self, data: Any, what: str) -> list[Passage]:
        """The decoded answer as passages, best first; BadResponse when it does not have the documented shape."""

    async def search(self, query: SourceQuery) -> list[Passage]:
        call = self.call(query)
        data = await request_json(
            await self.client(), call.method, call.url, call.what,
            max_bytes=getattr(self.settings, "max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES),
            describe_error=type(self).describe_error, **call.options,
        )  # fmt: skip
        passages = self.parse(data, call.what)
        return passages[: query.limit] if self.cut_to_limit else passages


def raw_score(value: Any) -> float | None:
    """The source's score exactly as it gave it (never clamped or rescaled); None when not a finite number."""
    if type(value) is float and value - value == 0.0:  # the usual case, first: a finite float (inf - inf and NaN are NaN)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def iso_time(value: Any) -> str | None:
    """An update time as ISO 8601: a string is kept as given; a number is Unix seconds (or milliseconds)."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    seconds = value / 1000 if abs(value) >= 1e11 else value
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def dig(data: Any, *keys: str) -> Any:
    """`data[k1][k2]…` when every level is an object, else None: answers are read, never trusted."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def public_url(url: str | httpx.URL) -> str:
    """A URL fit for messages: no user info and no query string, where credentials may hide."""
    parsed = httpx.URL(str(url))
    return str(parsed.copy_with(userinfo=b"", query=None, fragment=None))
