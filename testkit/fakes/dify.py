"""A Dify-compatible upstream (`POST /retrieval`) whose behaviour a test switches, and that remembers what it was sent.

    upstream = FakeUpstream()
    with serve(upstream.app()) as url:
        upstream.mode = "error"   # "ok", "error" (HTTP 500) or "slow" (answers after `slow_s`)
        ...
        upstream.headers[-1]["traceparent"]
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

RECORD = {"content": "rotate the signing keys at the partner console", "score": 0.8, "title": "Remote", "metadata": {}}


@dataclass
class FakeUpstream:
    mode: str = "ok"
    slow_s: float = 2.0
    headers: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/retrieval")
        async def retrieval(request: Request) -> JSONResponse:
            self.headers.append(dict(request.headers))
            if self.mode == "error":
                return JSONResponse({"error_code": 5001, "error_msg": "boom"}, status_code=500)
            if self.mode == "slow":
                await asyncio.sleep(self.slow_s)
            return JSONResponse({"records": [RECORD]})

        return app
