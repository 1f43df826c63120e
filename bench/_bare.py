"""The bare fan-out the CPU and load benchmarks measure the gateway against: what a 30-line service would do.

    python -m bench._bare --port 9000 [--client aiohttp|httpx|httpx-aiohttp|factory] [--json orjson|stdlib] UPSTREAM_URL...

`POST /retrieval` reads the JSON body, asks every upstream at once (the body
the gateway's `dify` connector sends), merges their records, sorts them by
the upstreams' scores and answers the best `top_k`. No auth, validation,
dedupe, rerank, health or metrics: the floor from which the gateway's own
work is measured. Same server as the gateway (uvicorn, Starlette). `--client factory` makes its
calls through the gateway's own client factory (`connectors/http.py`), to show what that layer costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def make_app(upstreams: list[str], client: str = "aiohttp", codec: str = "orjson") -> Starlette:
    loads: Callable[[bytes], Any] = orjson.loads if codec == "orjson" else json.loads
    dumps: Callable[[Any], bytes] = orjson.dumps if codec == "orjson" else (lambda value: json.dumps(value).encode())
    session: Any = None

    async def ask(url: str, body: bytes) -> list[dict[str, Any]]:
        headers = {"Authorization": "Bearer x", "Content-Type": "application/json"}
        if client == "factory":
            from connectors.http import send

            _, raw = await send(session[url], session[url].build_request("POST", "/retrieval", content=body, headers=headers), url)
            return loads(raw)["records"]
        if client == "aiohttp":
            async with session.post(url + "/retrieval", data=body, headers=headers) as response:
                return loads(await response.read())["records"]
        response = await session.post(url + "/retrieval", content=body, headers=headers)
        return loads(response.content)["records"]

    async def retrieval(request: Request) -> Response:
        query = loads(await request.body())
        body = dumps({"knowledge_id": "kb", "query": query["query"], "retrieval_setting": {"top_k": 30, "score_threshold": 0.0}})
        answers = await asyncio.gather(*(ask(url, body) for url in upstreams), return_exceptions=True)
        if not all(isinstance(answer, list) for answer in answers):  # shows as non-200 in the benchmark's table
            return Response(b'{"error": "an upstream failed"}', status_code=502, media_type="application/json")
        records = [r for answer in answers for r in answer]
        records.sort(key=lambda r: r.get("score") or 0.0, reverse=True)
        return Response(dumps({"records": records[: query["retrieval_setting"]["top_k"]]}), media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        nonlocal session
        if client == "factory":
            from connectors.http import make_client

            session = {url: make_client(url) for url in upstreams}
        elif client == "aiohttp":
            import aiohttp

            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3.0))
        else:
            import httpx

            transport = None
            if client == "httpx-aiohttp":
                from httpx_aiohttp import AiohttpTransport

                transport = AiohttpTransport()
            session = httpx.AsyncClient(timeout=3.0, transport=transport)
        yield
        if client == "factory":
            for each in session.values():
                await each.aclose()
        else:
            await (session.close() if client == "aiohttp" else session.aclose())

    return Starlette(routes=[Route("/retrieval", retrieval, methods=["POST"])], lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client", choices=("aiohttp", "httpx", "httpx-aiohttp", "factory"), default="aiohttp")
    parser.add_argument("--json", choices=("orjson", "stdlib"), default="orjson")
    parser.add_argument("upstreams", nargs="+")
    args = parser.parse_args()
    app = make_app(args.upstreams, args.client, args.json)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", log_config=None, timeout_keep_alive=75)


if __name__ == "__main__":
    main()
