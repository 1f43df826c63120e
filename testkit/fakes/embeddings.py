"""A fake OpenAI-compatible embeddings API: `POST /v1/embeddings` with the documented shapes.

    -> {"object": "list", "data": [{"object": "embedding", "embedding": [...], "index": 0}], "model": "...",
        "usage": {"prompt_tokens": n, "total_tokens": n}}
    errors: {"error": {"message", "type", "param", "code"}} with 401, 429 (Retry-After), 500, ...

Backed by a real model (WordLlama, whose weights ship in its wheel) so that tests can assert quality, or by
a hash of the words when a test only needs vectors. `mode` makes it fail on purpose: "auth", "rate_limited",
"error", "slow" (sleeps `delay_s`), "garbage" (answers the wrong number of embeddings).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

API_KEY = "sk-test-embeddings"


def hashed_vectors(texts: list[str], dimensions: int = 64) -> np.ndarray:
    """Bag of words hashed into `dimensions`: texts sharing words are similar, others near orthogonal."""
    out = np.zeros((len(texts), dimensions), np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            out[row, int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little") % dimensions] += 1.0
    return out


def wordllama_vectors(texts: list[str], dimensions: int | None = None) -> np.ndarray:
    from aggregator.retrieval.embeddings import LocalProvider

    vectors = LocalProvider.load("wordllama").embed(texts, norm=False)
    return vectors[:, :dimensions] if dimensions else vectors


@dataclass
class FakeEmbeddings:
    model: str = "wordllama-l2-supercat"
    real: bool = True
    mode: str = "ok"
    delay_s: float = 0.0
    calls: list[dict[str, Any]] = field(default_factory=list)
    authorization: list[str | None] = field(default_factory=list)

    def embed(self, texts: list[str], dimensions: int | None) -> np.ndarray:
        return wordllama_vectors(texts, dimensions) if self.real else hashed_vectors(texts, dimensions or 64)

    def app(self) -> FastAPI:
        app = FastAPI()

        def failure(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
            body = {"error": {"message": message, "type": kind, "param": None, "code": kind}}
            return JSONResponse(body, status_code=status, headers=headers)

        @app.post("/v1/embeddings")
        async def embeddings(request: Request) -> Any:
            body = await request.json()
            self.calls.append(body)
            self.authorization.append(request.headers.get("authorization"))
            if request.headers.get("authorization") != f"Bearer {API_KEY}" or self.mode == "auth":
                return failure(401, "Incorrect API key provided", "invalid_api_key")
            if self.mode == "rate_limited":
                return failure(429, "Rate limit reached for requests", "rate_limit_exceeded", {"Retry-After": "20"})
            if self.mode == "error":
                return failure(500, "The server had an error while processing your request", "server_error")
            if self.mode == "slow":
                await asyncio.sleep(self.delay_s)
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            vectors = self.embed(texts, body.get("dimensions"))
            if self.mode == "garbage":
                vectors = vectors[:-1]
            data = [{"object": "embedding", "embedding": v.tolist(), "index": i} for i, v in enumerate(vectors)]
            tokens = sum(len(t.split()) for t in texts)
            return {"object": "list", "data": data[::-1], "model": body["model"], "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

        return app
