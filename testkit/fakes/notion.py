"""A fake Notion API that answers with the documented shapes: search (with its `sort` by `last_edited_time`), block
children, pagination, 429, 401."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

VERSION = "2022-06-28"


def rich(text: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": {"content": text, "link": None}, "plain_text": text, "href": None}]


def block(block_id: str, kind: str, text: str = "", children: list[dict] | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"rich_text": rich(text), **extra} if kind != "table_row" else extra
    return {"object": "block", "id": block_id, "type": kind, "has_children": bool(children), kind: body, "_children": children or []}


@dataclass
class FakeNotion:
    token: str
    pages: dict[str, dict[str, Any]] = field(default_factory=dict)
    blocks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    page_size: int = 2
    rate_limit_next: int = 0
    retry_after: str = "1"
    requests: list[tuple[float, str]] = field(default_factory=list)
    clients: list[str] = field(default_factory=list)  # the client address of each request, in the same order
    versions_seen: set[str] = field(default_factory=set)

    def add_page(self, page_id: str, title: str, blocks: list[dict[str, Any]], edited: str = "2025-03-10T12:00:00.000Z",
                 parent: dict[str, Any] | None = None, properties: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.pages[page_id] = {
            "object": "page", "id": page_id, "created_time": "2025-01-01T00:00:00.000Z", "last_edited_time": edited,
            "archived": False, "in_trash": False, "url": f"https://www.notion.so/{page_id.replace('-', '')}",
            "parent": parent or {"type": "workspace", "workspace": True},
            "properties": {"title": {"id": "title", "type": "title", "title": rich(title)}, **(properties or {})},
        }  # fmt: skip
        self._store(page_id, blocks)

    def _store(self, parent_id: str, blocks: list[dict[str, Any]]) -> None:
        self.blocks[parent_id] = [{k: v for k, v in b.items() if k != "_children"} for b in blocks]
        for b in blocks:
            if b["_children"]:
                self._store(b["id"], b["_children"])


def _paginate(items: list[dict[str, Any]], cursor: str | None, size: int) -> dict[str, Any]:
    start = int(cursor or 0)
    window = items[start : start + size]
    more = start + size < len(items)
    return {"object": "list", "results": window, "next_cursor": str(start + size) if more else None, "has_more": more}


def app(state: FakeNotion) -> FastAPI:
    api = FastAPI()

    def refuse(request: Request) -> JSONResponse | None:
        state.requests.append((time.monotonic(), request.url.path))
        state.clients.append(f"{request.client.host}:{request.client.port}" if request.client else "")
        state.versions_seen.add(request.headers.get("notion-version", ""))
        if request.headers.get("authorization") != f"Bearer {state.token}":
            return JSONResponse({"object": "error", "status": 401, "code": "unauthorized", "message": "API token is invalid."}, status_code=401)
        if state.rate_limit_next > 0:
            state.rate_limit_next -= 1
            return JSONResponse({"object": "error", "status": 429, "code": "rate_limited", "message": "Rate limited"},
                                status_code=429, headers={"Retry-After": state.retry_after})  # fmt: skip
        return None

    @api.post("/v1/search")
    async def search(request: Request) -> JSONResponse:
        if (refused := refuse(request)) is not None:
            return refused
        body = await request.json()
        pages = sorted(state.pages.values(), key=lambda p: p["id"])
        sort = body.get("sort")
        if sort is not None:  # the one sort Notion's search has: by last_edited_time
            if sort.get("timestamp") != "last_edited_time" or sort.get("direction") not in ("ascending", "descending"):
                return JSONResponse({"object": "error", "status": 400, "code": "validation_error", "message": "body.sort is invalid."}, status_code=400)
            pages.sort(key=lambda p: p["last_edited_time"], reverse=sort["direction"] == "descending")
        return JSONResponse(_paginate(pages, body.get("start_cursor"), min(state.page_size, body.get("page_size", 100))))

    @api.get("/v1/blocks/{block_id}/children")
    async def children(request: Request, block_id: str, start_cursor: str | None = None, page_size: int = 100) -> JSONResponse:
        if (refused := refuse(request)) is not None:
            return refused
        if block_id not in state.blocks:
            return JSONResponse({"object": "error", "status": 404, "code": "object_not_found", "message": "not found"}, status_code=404)
        return JSONResponse(_paginate(state.blocks[block_id], start_cursor, min(state.page_size, page_size)))

    return api
