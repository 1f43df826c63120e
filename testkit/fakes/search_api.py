"""A fake internal search service of the kind the `http` source describes: JSON over GET or POST.

`GET /api/search?q=&size=&page=` and `POST /api/query` (`{"query": {"text"}, "size"}`) answer
`{"data": {"items": [{"id", "title", "snippet", "links": {"self"}, "relevance", "owner": {"team"},
"tags", "modified"}], "page", "has_more"}}`; a missing or wrong `X-Api-Key` gets
`401 {"error": {"code": "unauthorized", "message": ...}}`, a rate limit `429` with Retry-After.
Every request's query string and body are recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

_WORD = re.compile(r"\w+")


@dataclass
class FakeSearchApi:
    api_key: str
    items: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    rate_limit_next: int = 0
    retry_after: str = "1"
    malformed: bool = False

    def hits(self, text: str) -> list[dict[str, Any]]:
        terms = {w.lower() for w in _WORD.findall(text)}
        scored = []
        for item in self.items:
            words = [w.lower() for w in _WORD.findall(item["title"] + " " + item["snippet"])]
            relevance = sum(words.count(t) for t in terms) * 4.25
            if relevance:
                scored.append({**item, "relevance": relevance})
        return sorted(scored, key=lambda i: -i["relevance"])


def app(state: FakeSearchApi) -> FastAPI:
    api = FastAPI()

    def refuse(request: Request) -> JSONResponse | None:
        if request.headers.get("x-api-key") != state.api_key:
            return JSONResponse({"error": {"code": "unauthorized", "message": "missing or invalid API key"}}, status_code=401)
        if state.rate_limit_next > 0:
            state.rate_limit_next -= 1
            return JSONResponse({"error": {"code": "rate_limited", "message": "slow down"}}, status_code=429, headers={"Retry-After": state.retry_after})
        return None

    def answer(text: str, size: int, page: int) -> JSONResponse:
        if state.malformed:
            return JSONResponse({"data": {"items": "nothing here"}})
        hits = state.hits(text)
        window = hits[(page - 1) * size : page * size]
        return JSONResponse({"data": {"items": window, "page": page, "has_more": page * size < len(hits)}})

    @api.get("/api/search")
    async def search(request: Request, q: str, size: int = 10, page: int = 1) -> JSONResponse:
        if (refused := refuse(request)) is not None:
            return refused
        state.requests.append({"params": dict(request.query_params)})
        return answer(q, size, page)

    @api.post("/api/query")
    async def query(request: Request) -> JSONResponse:
        if (refused := refuse(request)) is not None:
            return refused
        body = await request.json()
        state.requests.append({"params": dict(request.query_params), "body": body})
        return answer(body["query"]["text"], body.get("size", 10), 1)

    return api
