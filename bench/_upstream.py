"""A Dify-compatible upstream for the benchmarks.

    python -m bench._upstream --port 9001 --delay 0.15     # the same 20 records after a fixed delay
    python -m bench._upstream --port 9001 --pool 1000      # 20 records drawn from a pool of 1,000 passages

With `--pool`, every answer is 20 passages of about 800 characters (Cranfield
abstracts) drawn at random from a fixed pool, best first, so the gateway sees
what a real source gives it: mostly passages it has seen before, in a new mix
each time. Answers are assembled from records encoded once at startup: the
benchmarks measure the gateway, not this server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

WORDS = "rotate signing keys release pipeline vpn profile expense policy backup restore incident postmortem".split()
PASSAGE_CHARS = 800
RECORDS = 20

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def fixed_records(records: int = RECORDS) -> list[bytes]:
    return [
        json.dumps({"content": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(60)) + f" passage {i}",
                    "score": round(1 - i / records, 3), "title": f"Doc {i}", "metadata": {"document_id": f"doc-{i}"}}).encode()
        for i in range(records)
    ]  # fmt: skip


def pool_passages(size: int, seed: int = 5) -> list[tuple[str, str, str]]:
    """(id, title, text of about PASSAGE_CHARS) for `size` passages: Cranfield abstracts, extended or cut at a word."""
    from bench._cranfield import load

    docs, _, _ = load()
    rng = random.Random(seed)
    passages = []
    for n in range(size):
        doc = docs[n % len(docs)]
        text = doc.body
        while len(text) < PASSAGE_CHARS:  # short abstracts borrow sentences from others, as a chunker's passage would
            text += " " + rng.choice(docs).body
        cut = text.rfind(" ", 0, PASSAGE_CHARS)
        passages.append((f"cran-{doc.id}-{n // len(docs)}", doc.title, text[: cut if cut > 0 else PASSAGE_CHARS]))
    return passages


def pool_records(size: int) -> list[bytes]:
    """Each pool passage as a record without its score (the score depends on its place in an answer)."""
    return [
        json.dumps({"content": text, "title": title, "metadata": {"document_id": pid, "url": f"https://kb.example.com/doc/{pid}"}})[:-1].encode()
        for pid, title, text in pool_passages(size)
    ]  # fmt: skip


def app(delay_s: float, pool: int = 0, seed: int | None = None) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """A bare ASGI app: every POST gets `{"records": [...]}`, whatever it asked."""
    rng = random.Random(seed)
    fixed = b'{"records": [' + b", ".join(fixed_records()) + b"]}" if not pool else b""
    records = pool_records(pool) if pool else []

    def answer() -> bytes:
        if not pool:
            return fixed
        picked = rng.sample(records, RECORDS)
        return b'{"records": [' + b", ".join(r + b', "score": %.3f}' % (0.9 - 0.03 * i) for i, r in enumerate(picked)) + b"]}"

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        while (await receive()).get("more_body"):
            pass
        if delay_s:
            await asyncio.sleep(delay_s)
        body = answer()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return asgi


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--pool", type=int, default=0, help="draw 20 records per answer from a pool of this many passages")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    uvicorn.run(app(args.delay, args.pool, args.seed), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
