"""`http`: any JSON search API, described in connectors.yaml instead of code.

The request is a template: `method`, a `url` in which `{query}` becomes the
user's text URL-encoded (and `{limit}` the number of results wanted), query
`params` and an optional JSON `body` in which the same placeholders are filled
(a string that is exactly `"{limit}"` becomes a number), and `headers` for
credentials (`${VAR}` from the environment). Header values are treated as
secrets: scrubbed from every message; the URL's query string never appears in
messages either.

The answer is read with JMESPath (https://jmespath.org, the `jmespath`
package, specification 1.0): `results` selects the list of results, and
`record.content`, `title`, `url`, `score`, `id`, `updated_at` and `metadata`
are evaluated on each result. Expressions are compiled when the config is
loaded, so `aggregator validate` reports a broken one with its place.
`source_score` is whatever `record.score` yields, unscaled. Long contents are
split into passages of `chunk_chars`.

No metadata filter is pushed down (the API's filter syntax is unknown); the
gateway filters every record itself.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import quote, urlencode

import httpx
import jmespath
from jmespath.exceptions import JMESPathError
from yarl import URL
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from aggregator.contract.conditions import as_number, as_text
from aggregator.text.chunking import split_passages

from connectors._remote import Call, RemoteConnector, iso_time, public_url, raw_score, upstream_metadata
from connectors.base import BadResponse, ConnectorSettings, Passage, SourceQuery
from connectors.http import DEFAULT_MAX_RESPONSE_BYTES

QUERY, LIMIT = "{query}", "{limit}"
JsonValue = Any


def _expression(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        jmespath.compile(value)
    except JMESPathError as exc:
        detail = " ".join(str(exc).split()).removeprefix("Invalid jmespath expression: ")
        raise ValueError(f"not a valid JMESPath expression: {detail}") from None
    return value


class RecordMapping(BaseModel):
    """JMESPath expressions evaluated on each result."""

    model_config = ConfigDict(extra="forbid")

    content: str = Field(description="The text; required.")
    title: str | None = None
    url: str | None = None
    score: str | None = Field(None, description="The API's own relevance, passed on unscaled.")
    id: str | None = Field(None, description="A stable document id; defaults to the url, then the title.")
    updated_at: str | None = Field(None, description="ISO 8601 text, or Unix seconds or milliseconds.")
    metadata: str | None = Field(None, description="An object, e.g. {team: owner.team, tags: tags}.")

    _check = field_validator("content", "title", "url", "score", "id", "updated_at", "metadata")(_expression)


class HttpSearchSettings(ConnectorSettings):
    type: Literal["http"] = "http"
    method: Literal["GET", "POST"] = "GET"
    url: str = Field(description="e.g. https://search.internal/api/search?q={query}&size={limit}")
    params: dict[str, str | int | float | bool] = Field(default_factory=dict)
    headers: dict[str, SecretStr] = Field(default_factory=dict, description="Values are secrets: never shown.")
    body: dict[str, JsonValue] | list[JsonValue] | None = Field(None, description="A JSON template, sent with POST.")
    results: str = Field(description="JMESPath to the list of results, e.g. data.items")
    record: RecordMapping
    max_results: int = Field(50, ge=1, le=1000, description="Results used per query, at most.")
    verify_tls: bool | str = Field(True, description="False, or a CA bundle path for a private CA.")
    max_response_bytes: int = Field(DEFAULT_MAX_RESPONSE_BYTES, ge=1024)

    _check = field_validator("results")(_expression)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value.replace(QUERY, "q").replace(LIMIT, "1"))
        except httpx.InvalidURL:
            raise ValueError("not a valid URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http:// or https:// URL")
        if url.userinfo:
            raise ValueError("put credentials in headers, not in the URL")
        return value

    @model_validator(mode="after")
    def _query_goes_somewhere(self) -> "HttpSearchSettings":
        places = [self.url, *map(str, self.params.values()), repr(self.body)]
        if not any(QUERY in place for place in places):
            raise ValueError("{query} must appear in url, params or body")
        if self.body is not None and self.method == "GET":
            raise ValueError("a body is sent with method POST")
        return self


_PLACEHOLDERS = re.compile(r"\{query\}|\{limit\}")
#: The placeholders as they read in a URL that yarl has put in its normal form (braces percent-encoded).
_URL_PLACEHOLDERS = re.compile(r"%7Bquery%7D|%7Blimit%7D", re.IGNORECASE)


def _fill_text(template: str, text: str, limit: int, pattern: re.Pattern[str] = _PLACEHOLDERS) -> str:
    """Both placeholders filled in one pass: a `{limit}` the user typed stays text, never becomes the number."""
    return pattern.sub(lambda m: str(limit) if "limit" in m.group().lower() else text, template)


def opaque(text: str) -> str:
    """The user's text for a URL: every character but letters, digits, `-`, `_` and `~` percent-encoded, dots
    too, so that a query `..` or `.` is a value and not a path segment that a URL's normalisation removes."""
    return quote(text, safe="").replace(".", "%2E")


def fill(template: Any, text: str, limit: int) -> Any:
    """The body template with `{query}` and `{limit}` filled; `"{limit}"` alone becomes a number."""
    if isinstance(template, str):
        if template == LIMIT:
            return limit
        return _fill_text(template, text, limit)
    if isinstance(template, dict):
        return {key: fill(value, text, limit) for key, value in template.items()}
    if isinstance(template, list):
        return [fill(value, text, limit) for value in template]
    return template


def describe_error(status: int, envelope: Any, what: str) -> str | None:
    """An unknown API's error body: its `message`, `error` or `detail` when it has one of them as text."""
    if isinstance(envelope, dict):
        for key in ("message", "error", "detail", "error_msg"):
            value = envelope.get(key)
            if isinstance(value, str) and value:
                return value
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return value["message"]
    return None


class HttpSearchConnector(RemoteConnector):
    describe_error = staticmethod(describe_error)
    settings_model = HttpSearchSettings
    settings: HttpSearchSettings

    def __init__(self, name: str, settings: HttpSearchSettings) -> None:
        super().__init__(name, settings)
        self._results = jmespath.compile(settings.results)
        # The template in yarl's normal form (its own dot segments resolved, other characters encoded) once, so
        # that each query only fills placeholders into an encoded URL and nothing normalises the user's text.
        self._url_template = str(URL(settings.url))
        self._fields = {key: jmespath.compile(expr) for key, expr in settings.record.model_dump().items() if expr is not None}
        # how messages name the call: the URL template without its query string, so no query text or key shows
        marked = public_url(settings.url.replace(QUERY, "QUERY_").replace(LIMIT, "LIMIT_"))
        self._what = f"{settings.method} {marked.replace('QUERY_', QUERY).replace('LIMIT_', LIMIT)}"

    def client_options(self) -> dict[str, Any]:
        s = self.settings
        return {"headers": {k: v.get_secret_value() for k, v in s.headers.items()}, "verify": s.verify_tls}

    def call(self, query: SourceQuery) -> Call:
        """The request with its templates filled."""
        s = self.settings
        limit = min(query.limit, s.max_results)
        url = _fill_text(self._url_template, opaque(query.text), limit, _URL_PLACEHOLDERS)
        if s.params:  # added to the URL's own query string, which httpx's `params` would replace
            pairs = {k: as_text(fill(v, query.text, limit)) for k, v in s.params.items()}
            url += ("&" if "?" in url else "?") + urlencode(pairs, quote_via=quote)
        options: dict[str, Any] = {}
        if s.body is not None:
            options["json"] = fill(s.body, query.text, limit)
        return Call(s.method, URL(url, encoded=True), self._what, options)  # encoded: sent exactly as built

    def _get(self, name: str, result: Any, what: str) -> Any:
        expression = self._fields.get(name)
        if expression is None:
            return None
        try:
            return expression.search(result)
        except JMESPathError as exc:
            raise BadResponse(f"{what}: record.{name} cannot be evaluated on a result ({type(exc).__name__})") from None

    def parse(self, data: Any, what: str) -> list[Passage]:
        try:
            results = self._results.search(data)
        except JMESPathError as exc:
            raise BadResponse(f"{what}: `results` cannot be evaluated on the answer ({type(exc).__name__})") from None
        if not isinstance(results, list):
            raise BadResponse(f"{what}: `results` gave {type(results).__name__}, not a list")
        passages: list[Passage] = []
        chunk_chars = self.settings.chunk_chars
        for rank, result in enumerate(results[: self.settings.max_results], start=1):
            content = self._get("content", result, what)
            if isinstance(content, list):
                content = "\n\n".join(as_text(c) for c in content if c is not None and not isinstance(c, (dict, list)))
            if not isinstance(content, str) or not content.strip():
                continue
            title, url = self._get("title", result, what), self._get("url", result, what)
            extra = self._get("metadata", result, what)
            if extra is not None and not isinstance(extra, dict):
                raise BadResponse(f"{what}: record.metadata gave {type(extra).__name__}, not an object")
            metadata = upstream_metadata(extra, "http")
            if url is not None:
                metadata["url"] = as_text(url)
            identity = self._get("id", result, what)
            document_id = next((as_text(v) for v in (identity, url, title) if v not in (None, "")), f"result-{rank}")
            score = raw_score(as_number(self._get("score", result, what)))
            updated = iso_time(self._get("updated_at", result, what))
            for index, text in enumerate(split_passages(content, chunk_chars)):
                passages.append(Passage(
                    content=text, title=as_text(title) if title not in (None, "") else document_id, document_id=document_id,
                    chunk_index=index, metadata=metadata, updated_at=updated, source_score=score, source_rank=rank,
                ))  # fmt: skip
        return passages
