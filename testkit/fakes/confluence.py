"""A fake Confluence (Cloud or Data Center) that answers with the REST API's documented shapes.

Only what the connector uses: `GET /rest/api/content/search` (CQL, `start`/`limit`,
`_links.next` relative to the site with its `/wiki` context) and
`GET /rest/api/content/{id}` with `expand=body.storage,version`. It understands
just enough CQL to filter by `type`, `space`, `label` and the words of `text ~`,
and records every request so tests can look at what was asked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


@dataclass
class Page:
    id: str
    title: str
    space: str
    html: str
    labels: list[str] = field(default_factory=list)
    version: int = 1
    when: str = "2025-03-10T12:00:00.000Z"
    author: str = "Ada Lovelace"
    type: str = "page"


@dataclass
class FakeConfluence:
    expected_auth: str
    pages: dict[str, Page] = field(default_factory=dict)
    searches: list[str] = field(default_factory=list)
    body_fetches: list[str] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    rate_limit_next: int = 0
    retry_after: str = "1"
    page_size: int = 2

    def add(self, page: Page) -> None:
        self.pages[page.id] = page


def _in_list(cql: str, field_name: str) -> list[str] | None:
    match = re.search(rf'\b{field_name} in \(([^)]*)\)', cql) or re.search(rf'\b{field_name} = ("[^"]*")', cql)
    return re.findall(r'"((?:[^"\\]|\\.)*)"', match.group(1)) if match else None


def _matches(page: Page, cql: str) -> bool:
    types = re.search(r"type in \(([^)]*)\)", cql)
    if types and page.type not in [t.strip() for t in types.group(1).split(",")]:
        return False
    spaces = _in_list(cql, "space")
    if spaces is not None and page.space not in spaces:
        return False
    labels = _in_list(cql, "label")
    if labels is not None and not set(labels) & set(page.labels):
        return False
    text = re.search(r'text ~ "((?:[^"\\]|\\.)*)"', cql)
    words = text.group(1).lower().split() if text else []
    haystack = (page.title + " " + re.sub(r"<[^>]+>", " ", page.html)).lower()
    return any(w in haystack for w in words)


def app(state: FakeConfluence) -> FastAPI:
    api = FastAPI()

    def refuse(request: Request) -> JSONResponse | None:
        header = request.headers.get("authorization", "")
        state.auth_headers.append(header)
        if header != state.expected_auth:
            return JSONResponse({"statusCode": 401, "message": "Unauthorized"}, status_code=401)
        if state.rate_limit_next > 0:
            state.rate_limit_next -= 1
            return JSONResponse({"statusCode": 429, "message": "Rate limited"}, status_code=429, headers={"Retry-After": state.retry_after})
        return None

    def summary(page: Page) -> dict[str, Any]:
        return {
            "id": page.id, "type": page.type, "status": "current", "title": page.title,
            "space": {"key": page.space, "name": f"{page.space} space"},
            "version": {"number": page.version, "when": page.when, "by": {"displayName": page.author}},
            "metadata": {"labels": {"results": [{"prefix": "global", "name": n} for n in page.labels], "size": len(page.labels)}},
            "_links": {"webui": f"/spaces/{page.space}/pages/{page.id}", "self": f"/rest/api/content/{page.id}"},
        }  # fmt: skip

    @api.get("/wiki/rest/api/content/search")
    async def search(request: Request, cql: str, start: int = 0, limit: int = 25) -> JSONResponse:
        if (refused := refuse(request)) is not None:
            return refused
        state.searches.append(cql)
        hits = [p for p in state.pages.values() if _matches(p, cql)]
        size = min(limit, state.page_size)
        window = hits[start : start + size]
        links: dict[str, str] = {"base": str(request.base_url).rstrip("/") + "/wiki", "context": "/wiki"}
        if start + size < len(hits):
            links["next"] = "/wiki/rest/api/content/search?" + urlencode({"cql": cql, "start": start + size, "limit": limit})
        return JSONResponse({"results": [summary(p) for p in window], "start": start, "limit": size, "size": len(window), "_links": links})

    @api.get("/wiki/rest/api/content/{page_id}")
    async def content(request: Request, page_id: str) -> JSONResponse:
        if (refused := refuse(request)) is not None:
            return refused
        page = state.pages.get(page_id)
        if page is None:
            return JSONResponse({"statusCode": 404, "message": "No content found"}, status_code=404)
        state.body_fetches.append(page_id)
        return JSONResponse({**summary(page), "body": {"storage": {"value": page.html, "representation": "storage"}}})

    return api
