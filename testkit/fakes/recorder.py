"""A loopback server that answers each route with a set JSON answer and remembers every request it got.

For unit tests of a connector's HTTP handling over real HTTP (what respx did
for httpx's transport):

    recorder = Recorder({("GET", "/rest/api/content/search"): (200, {"results": []})})
    with serve(recorder.app()) as url:
        ...
    recorder.requests[-1].headers["authorization"]

A request to a route without an answer gets a 404 with a JSON error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Recorder:
    answers: dict[tuple[str, str], tuple[int, Any]]
    requests: list[Recorded] = field(default_factory=list)

    def app(self) -> Starlette:
        async def answer(request: Request) -> JSONResponse:
            path = "/" + request.path_params["path"]
            self.requests.append(Recorded(request.method, path, dict(request.query_params), dict(request.headers), await request.body()))
            status, body = self.answers.get((request.method, path), (404, {"message": f"no answer for {request.method} {path}"}))
            return JSONResponse(body, status_code=status)

        return Starlette(routes=[Route("/{path:path}", answer, methods=["GET", "POST", "PUT", "DELETE"])])
