"""`confluence`: pages (and optionally blog posts) of Confluence Cloud or Data Center, searched at query time.

Confluence has full-text search, so nothing is indexed here: each query
becomes one CQL search (`/rest/api/content/search`), restricted to the
configured spaces, content types and labels, plus what `metadata_condition`
says about space, labels and dates. Bodies are fetched per page and cached by
(page id, version), so a page is downloaded again only after it changed.

Auth: Cloud uses the account's email and an API token (HTTP Basic); Data
Center / Server uses a personal access token (Bearer). With `email` set the
Cloud form is used, without it the Data Center form, unless `auth` says.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any, Literal
from urllib.parse import urljoin

import httpx
from pydantic import Field, SecretStr

from aggregator.text.chunking import split_passages
from aggregator.contract.conditions import as_instant

from connectors._html import html_to_text
from connectors._remote import ClientConnector
from connectors.base import BadResponse, ConnectorSettings, NotFound, Passage, SourceQuery
from connectors.http import BaseUrl, request_json

#: Characters with a meaning in the Lucene syntax behind CQL's `text ~`; replaced by spaces.
_LUCENE_SPECIAL = re.compile(r'[+\-&|!(){}\[\]^"~*?:\\/]')
_OPERATORS = re.compile(r"\b(AND|OR|NOT|TO)\b")
#: Confluence macros and other storage-format elements that carry no prose.
MACRO_TAGS = ("ac:structured-macro", "ac:parameter", "ri:attachment", "ac:image", "ac:emoticon", "ac:placeholder")
BODY_CACHE_PAGES = 2000


class ConfluenceSettings(ConnectorSettings):
    type: Literal["confluence"] = "confluence"
    base_url: BaseUrl = Field(description="e.g. https://acme.atlassian.net/wiki (Cloud) or https://confluence.acme.com")
    email: str | None = Field(None, description="Cloud: the account's email; omit for Data Center.")
    api_token: SecretStr = Field(description="Cloud API token, or a Data Center personal access token.")
    auth: Literal["basic", "bearer"] | None = Field(None, description="Defaults to basic with email, bearer without.")
    spaces: list[str] = Field(default_factory=list, description="Space keys to search; all spaces when empty.")
    content_types: list[Literal["page", "blogpost"]] = Field(default_factory=lambda: ["page"], min_length=1)
    labels: list[str] = Field(default_factory=list, description="Only content with one of these labels.")
    max_results: int = Field(10, ge=1, le=100, description="Pages read per query.")
    body_format: Literal["storage", "view"] = "storage"
    verify_tls: bool | str = True

    @property
    def auth_mode(self) -> Literal["basic", "bearer"]:
        """`auth` when set, else what `email` implies: basic with it (Cloud), bearer without (Data Center)."""
        if self.auth is not None:
            return self.auth
        return "basic" if self.email else "bearer"



def cql_string(value: str) -> str:
    """A CQL string literal: double quotes, with backslashes and quotes escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cql_text(query: str) -> str:
    """The user's words as a CQL `text ~` operand that searches for them and nothing else.

    Lucene operators and special characters are neutralised so that a query
    like `foo" OR space = X` or `NOT (a*)` is searched as words, never parsed.
    """
    words = _LUCENE_SPECIAL.sub(" ", query)
    words = _OPERATORS.sub(lambda m: m.group(1).lower(), words)
    return cql_string(" ".join(words.split()))


def _cql_date(value: Any) -> str | None:
    instant = as_instant(value)
    if instant is None:
        return None
    return cql_string(datetime.fromtimestamp(instant, tz=timezone.utc).strftime("%Y-%m-%d %H:%M"))


def pushdown_clauses(condition: dict[str, Any] | None) -> list[str]:
    """CQL clauses for the conditions Confluence can evaluate; only under `and` (the core filters again anyway)."""
    if not condition or condition.get("logical_operator", "and") != "and":
        return []
    clauses: list[str] = []
    for c in condition.get("conditions") or []:
        names, op, value = c.get("name") or [], c.get("comparison_operator"), c.get("value")
        if len(names) != 1:
            continue
        field = {"space": "space", "labels": "label", "label": "label", "updated_at": "lastmodified"}.get(names[0])
        if field in ("space", "label"):
            if op == "is" and isinstance(value, (str, int)):
                clauses.append(f"{field} = {cql_string(str(value))}")
            elif op == "in" and value:
                items = value if isinstance(value, list) else str(value).split(",")
                clauses.append(f"{field} in ({', '.join(cql_string(str(i).strip()) for i in items)})")
        elif field == "lastmodified" and op in ("before", "after"):
            date = _cql_date(value)
            if date:
                clauses.append(f"lastmodified {'<' if op == 'before' else '>'} {date}")
    return clauses


class ConfluenceConnector(ClientConnector):
    settings_model = ConfluenceSettings
    settings: ConfluenceSettings
    pushdown_fields = frozenset({"space", "labels", "updated_at"})

    def __init__(self, name: str, settings: ConfluenceSettings) -> None:
        super().__init__(name, settings)
        self._bodies: OrderedDict[tuple[str, int], str] = OrderedDict()

    def auth_headers(self) -> tuple[dict[str, str], tuple[str, str] | None]:
        s = self.settings
        token = s.api_token.get_secret_value()
        if s.auth_mode == "basic":
            return {}, (s.email if s.email is not None else "", token)
        return {"Authorization": f"Bearer {token}"}, None

    def client_options(self) -> dict[str, Any]:
        headers, auth = self.auth_headers()
        return {"base_url": self.settings.base_url, "headers": {"Accept": "application/json", **headers}, "auth": auth,
                "verify": self.settings.verify_tls}  # fmt: skip

    def cql(self, query: SourceQuery) -> str:
        s = self.settings
        clauses = [f"type in ({', '.join(s.content_types)})"]
        if s.spaces:
            clauses.append(f"space in ({', '.join(cql_string(k) for k in s.spaces)})")
        if s.labels:
            clauses.append(f"label in ({', '.join(cql_string(k) for k in s.labels)})")
        clauses.extend(pushdown_clauses(query.metadata_condition))
        clauses.append(f"text ~ {cql_text(query.text)}")
        return " AND ".join(clauses)

    async def _search(self, cql: str) -> tuple[list[dict[str, Any]], str]:
        """Up to max_results matching pages, following `_links.next`; and the site's base URL for links."""
        assert self._client is not None
        wanted = self.settings.max_results
        url: str | None = "/rest/api/content/search"
        params: dict[str, Any] | None = {"cql": cql, "limit": min(wanted, 25), "expand": "version,space,metadata.labels"}
        found: list[dict[str, Any]] = []
        base = self.settings.base_url
        while url and len(found) < wanted:
            data = await request_json(self._client, "GET", url, "Confluence search", params=params)
            if not isinstance(data, dict) or not isinstance(data.get("results"), list):
                raise BadResponse("Confluence search: answer has no 'results' list")
            found.extend(r for r in data["results"] if isinstance(r, dict) and r.get("id"))
            links = data.get("_links") or {}
            base = links.get("base") or base
            following = links.get("next")
            url, params = (self._relative(following), None) if following else (None, None)
        return found[:wanted], base

    def _relative(self, link: str) -> str:
        """`_links.next` is relative to the site (with its /wiki context); make it relative to base_url."""
        context = httpx.URL(self.settings.base_url).path.rstrip("/")
        if context and link.startswith(context + "/"):
            return link[len(context) :]
        return link

    async def _body(self, page: dict[str, Any]) -> str:
        page_id, version = str(page["id"]), int((page.get("version") or {}).get("number") or 0)
        cached = self._bodies.get((page_id, version))
        if cached is not None:
            self._bodies.move_to_end((page_id, version))
            return cached
        assert self._client is not None
        fmt = self.settings.body_format
        data = await request_json(self._client, "GET", f"/rest/api/content/{page_id}", "Confluence page", params={"expand": f"body.{fmt},version"})
        html = (((data or {}).get("body") or {}).get(fmt) or {}).get("value") if isinstance(data, dict) else None
        if not isinstance(html, str):
            raise BadResponse(f"Confluence page {page_id}: answer has no body.{fmt}.value")
        text = html_to_text(html, drop=MACRO_TAGS)
        for stale in [k for k in self._bodies if k[0] == page_id]:
            del self._bodies[stale]
        self._bodies[(page_id, version)] = text
        if len(self._bodies) > BODY_CACHE_PAGES:
            self._bodies.popitem(last=False)
        return text

    async def search(self, query: SourceQuery) -> list[Passage]:
        await self.client()
        found, base = await self._search(self.cql(query))
        fetched = await asyncio.gather(*(self._body(page) for page in found), return_exceptions=True)
        for outcome in fetched:  # a page deleted since the search is skipped; anything else fails the source
            if isinstance(outcome, BaseException) and not isinstance(outcome, NotFound):
                raise outcome
        pages = [page for page, body in zip(found, fetched) if isinstance(body, str)]
        bodies = [body for body in fetched if isinstance(body, str)]
        chunk_chars = self.settings.chunk_chars
        passages: list[Passage] = []
        for rank, (page, body) in enumerate(zip(pages, bodies), start=1):
            version = page.get("version") or {}
            metadata = {
                "url": urljoin(base.rstrip("/") + "/", str((page.get("_links") or {}).get("webui", "")).lstrip("/")),
                "space": (page.get("space") or {}).get("key"),
                "labels": [l.get("name") for l in ((page.get("metadata") or {}).get("labels") or {}).get("results", []) if isinstance(l, dict)],
                "content_type": page.get("type"),
                "version": version.get("number"),
            }
            author = (version.get("by") or {}).get("displayName")
            if author:
                metadata["author"] = author
            for index, content in enumerate(split_passages(body, chunk_chars)):
                passages.append(Passage(
                    content=content, title=str(page.get("title") or page["id"]), document_id=str(page["id"]),
                    chunk_index=index, metadata=metadata, updated_at=version.get("when"), source_rank=rank,
                ))  # fmt: skip
        return passages[: query.limit]
