"""`notion`: the pages shared with a Notion integration, indexed locally.

Notion's search matches titles, not page text, so the text of every shared
page is kept in a local index: pages are listed with an empty search
(paginated), each page's blocks are read recursively, and the index is
refreshed every `refresh_s`, re-reading only pages whose `last_edited_time`
changed; pages that were removed, archived or unshared leave it. Most refreshes
list only what changed (`list_changed`: the same search sorted by
`last_edited_time`, newest first, read until it reaches pages older than the
newest one stored), so an edit is found after one or two requests, not after
paging through the whole workspace at three requests a second. Requests
go through a limiter that keeps under Notion's rate limit (about three per
second per integration, shared by every connector, process and replica that uses the same token when the
gateway has Redis: the core hands it over, see `rate_limit`); a 429 makes the sync stop and the next one start
after the `Retry-After` it named, keeping what was indexed so far.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

import httpx
from pydantic import Field, SecretStr

from connectors.base import BadResponse, Document, DocumentSource, IndexedSettings, NotFound, RateLimit
from connectors.http import BaseUrl, make_client, request_json

NOTION_VERSION = "2022-06-28"
#: Blocks whose rich text is prose, and how to prefix it so the text keeps its shape.
TEXT_BLOCKS = {
    "paragraph": "", "heading_1": "# ", "heading_2": "## ", "heading_3": "### ", "bulleted_list_item": "- ",
    "numbered_list_item": "1. ", "quote": "> ", "callout": "", "toggle": "", "to_do": "", "code": "",
}  # fmt: skip
MAX_DEPTH = 8


class NotionSettings(IndexedSettings):
    type: Literal["notion"] = "notion"
    token: SecretStr = Field(description="The integration's internal secret.")
    base_url: BaseUrl = Field("https://api.notion.com", description="Another value for a proxy or a test server.")
    requests_per_second: float = Field(3.0, gt=0, le=100, description="Stay under Notion's limit of about 3/s (more only for a proxy or a test server).")
    verify_tls: bool | str = True


def plain_text(rich_text: Any) -> str:
    if not isinstance(rich_text, list):
        return ""
    return "".join(str(part.get("plain_text", "")) for part in rich_text if isinstance(part, dict))


def flatten_property(prop: dict[str, Any]) -> Any:
    """A database property as a simple value a metadata_condition can compare; None if it has none."""
    kind = prop.get("type")
    value = prop.get(kind) if isinstance(kind, str) else None
    if kind in ("title", "rich_text"):
        return plain_text(value) or None
    if kind in ("number", "checkbox", "url", "email", "phone_number"):
        return value
    if kind in ("select", "status"):
        return value.get("name") if isinstance(value, dict) else None
    if kind == "multi_select":
        return [v.get("name") for v in value or [] if isinstance(v, dict)]
    if kind == "date":
        return value.get("start") if isinstance(value, dict) else None
    if kind in ("created_time", "last_edited_time"):
        return value
    return None


def page_title(page: dict[str, Any]) -> str:
    for prop in (page.get("properties") or {}).values():
        if isinstance(prop, dict) and prop.get("type") == "title":
            return plain_text(prop.get("title")) or "Untitled"
    return "Untitled"


def parent_of(page: dict[str, Any]) -> str:
    parent = page.get("parent") or {}
    kind = parent.get("type")
    if kind == "database_id":
        return f"database:{parent.get('database_id')}"
    if kind == "page_id":
        return f"page:{parent.get('page_id')}"
    return str(kind or "workspace")


def block_text(block: dict[str, Any]) -> str:
    kind = block.get("type")
    body = block.get(kind) if isinstance(kind, str) else None
    if not isinstance(body, dict):
        return ""
    if kind in TEXT_BLOCKS:
        text = plain_text(body.get("rich_text"))
        if kind == "to_do":
            return ("[x] " if body.get("checked") else "[ ] ") + text
        return TEXT_BLOCKS[kind] + text if text else ""
    if kind == "table_row":
        return " | ".join(plain_text(cell) for cell in body.get("cells") or [])
    if kind == "child_page":
        return str(body.get("title") or "")
    return ""


class NotionSource(DocumentSource):
    settings_model = NotionSettings
    settings: NotionSettings
    fetch_concurrency = 3
    batch_size = 9  # pages are slow to read (3 requests a second): commit progress often

    def __init__(self, name: str, settings: NotionSettings) -> None:
        super().__init__(name, settings)
        self._client: httpx.AsyncClient | None = None
        self._pages: dict[str, dict[str, Any]] = {}

    def rate_limit(self) -> RateLimit:
        """Notion's limit is per integration: sources (and replicas) with the same token share it."""
        settings = self.settings
        return RateLimit(f"notion {settings.base_url} {settings.token.get_secret_value()}", settings.requests_per_second)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = make_client(
                self.settings.base_url,
                headers={"Authorization": f"Bearer {self.settings.token.get_secret_value()}", "Notion-Version": NOTION_VERSION},
                timeout_s=max(self.settings.timeout_s, 10.0), verify=self.settings.verify_tls,
            )  # fmt: skip
        return self._client

    async def _call(self, method: str, url: str, what: str, **kwargs: Any) -> dict[str, Any]:
        async with self.limiter:
            data = await request_json(self._http(), method, url, what, **kwargs)
        if not isinstance(data, dict):
            raise BadResponse(f"{what}: answer is not an object")
        return data

    async def _search_pages(self, newest_first: bool = False) -> AsyncIterator[list[dict[str, Any]]]:
        """The shared pages, one answer of Notion's search at a time (archived and trashed ones left out)."""
        cursor: str | None = None
        while True:
            body: dict[str, Any] = {"filter": {"property": "object", "value": "page"}, "page_size": 100}
            if newest_first:
                body["sort"] = {"direction": "descending", "timestamp": "last_edited_time"}
            if cursor:
                body["start_cursor"] = cursor
            data = await self._call("POST", "/v1/search", "Notion search", json=body)
            yield [
                page for page in data.get("results") or []
                if isinstance(page, dict) and page.get("object") == "page" and not page.get("archived") and not page.get("in_trash")
            ]  # fmt: skip
            cursor = data.get("next_cursor") if data.get("has_more") else None
            if not cursor:
                return

    async def list_versions(self) -> dict[str, str]:
        pages: dict[str, dict[str, Any]] = {}
        async for answer in self._search_pages():
            pages.update((str(page["id"]), page) for page in answer)
        self._pages = pages
        return {page_id: str(page.get("last_edited_time")) for page_id, page in pages.items()}

    async def list_changed(self, stored: dict[str, str]) -> dict[str, str] | None:
        """Pages edited since the newest stored edit, newest first. `last_edited_time` is rounded to the minute, so
        pages edited in that same minute are read too (and fetched only if their time differs from the stored one)."""
        newest = max(stored.values())
        changed: dict[str, str] = {}
        async for answer in self._search_pages(newest_first=True):
            for page in answer:
                version = str(page.get("last_edited_time"))
                if version < newest:  # every page from here on is older than anything new
                    return changed
                page_id = str(page["id"])
                if stored.get(page_id) != version:
                    self._pages[page_id] = page
                    changed[page_id] = version
        return changed

    async def _blocks(self, block_id: str, depth: int = 0) -> list[str]:
        lines: list[str] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"page_size": 100}
            if cursor:
                params["start_cursor"] = cursor
            data = await self._call("GET", f"/v1/blocks/{block_id}/children", "Notion blocks", params=params)
            for block in data.get("results") or []:
                if not isinstance(block, dict):
                    continue
                text = block_text(block)
                if text:
                    lines.append(text)
                if block.get("has_children") and block.get("type") != "child_page" and depth < MAX_DEPTH:
                    lines.extend(await self._blocks(str(block["id"]), depth + 1))
            cursor = data.get("next_cursor") if data.get("has_more") else None
            if not cursor:
                return lines

    async def fetch(self, document_id: str) -> Document | None:
        page = self._pages.get(document_id)
        if page is None:
            return None
        try:
            lines = await self._blocks(document_id)
        except NotFound:  # deleted or unshared since the listing
            return None
        metadata: dict[str, Any] = {"url": page.get("url"), "parent": parent_of(page)}
        for name, prop in (page.get("properties") or {}).items():
            if isinstance(prop, dict) and prop.get("type") != "title":
                value = flatten_property(prop)
                if value is not None and name not in metadata:
                    metadata[name] = value
        return Document(
            document_id=document_id,
            title=page_title(page),
            text="\n\n".join(lines),
            version=str(page.get("last_edited_time")),
            updated_at=page.get("last_edited_time"),
            metadata=metadata,
        )

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
