"""A Dify-compatible upstream for the benchmarks: fixed records after a fixed delay.

    python -m bench._upstream --port 9001 --delay 0.15
"""

from __future__ import annotations

import argparse
import asyncio

import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response

WORDS = "rotate signing keys release pipeline vpn profile expense policy backup restore incident postmortem".split()


def app(delay_s: float, records: int = 20) -> FastAPI:
    api = FastAPI()
    # The answer is built once: the benchmark measures the gateway, not this server.
    import json

    body = json.dumps({"records": [
        {"content": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(60)) + f" passage {i}",
         "score": round(1 - i / records, 3), "title": f"Doc {i}", "metadata": {"document_id": f"doc-{i}"}}
        for i in range(records)
    ]}).encode()  # fmt: skip

    @api.post("/retrieval")
    async def retrieval() -> Response:
        if delay_s:
            await asyncio.sleep(delay_s)
        return Response(body, media_type="application/json")

    return api


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(app(args.delay), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
