"""Fake rerank servers, one per provider's documented shape, under a prefix each on one app:

- `/cohere/v1/rerank`, `/cohere/v2/rerank`: `{model, query, documents, top_n}` -> `{id, results: [{index, relevance_score}], meta}`;
  errors `{"message": …}`.
- `/jina/v1/rerank`: the same request (and `return_documents`) -> `{model, usage, results: [{index, relevance_score, document?}]}`;
  errors `{"detail": …}`.
- `/xinference/v1/rerank`: -> `{id, results: [{index, relevance_score, document: null}], meta}`; errors `{"detail": …}`.
- `/vllm/v1/rerank`, `/vllm/rerank`: -> `{id, model, usage, results: [{index, document: {text}, relevance_score}]}`;
  errors `{"error": {"message", "type", "code"}}`.
- `/tei/rerank`: `{query, texts, raw_scores, truncate}` -> `[{index, score}]`; errors `{"error", "error_type"}`.

Results come best first, cut at `top_n`. A document's score is `relevance[substring]` for the first
substring of `relevance` it contains, else `default`. Faults for tests: `rate_limit_next` (429 with
`Retry-After`), `fail_next` (HTTP `fail_status`), `delay_s` (a slow model), `malformed` (an index out of
range), `logits` (raw scores around 0 instead of probabilities). Every request is recorded.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


@dataclass
class FakeRerank:
    api_key: str | None = None
    relevance: dict[str, float] = field(default_factory=dict)
    default: float = 0.05
    rate_limit_next: int = 0
    retry_after: str = "1"
    fail_next: int = 0
    fail_status: int = 503
    delay_s: float = 0.0
    malformed: bool = False
    logits: bool = False
    requests: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)  # (path, headers, body)

    def score(self, text: str) -> float:
        probability = next((score for part, score in self.relevance.items() if part in text), self.default)
        if not self.logits:
            return probability
        probability = min(max(probability, 1e-6), 1 - 1e-6)
        return math.log(probability / (1 - probability))  # the same judgement, as a raw logit

    def reset(self) -> None:
        self.api_key, self.relevance, self.default = None, {}, 0.05
        self.rate_limit_next, self.retry_after, self.fail_next, self.fail_status = 0, "1", 0, 503
        self.delay_s, self.malformed, self.logits = 0.0, False, False
        self.requests.clear()


def _error(flavor: str, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body: Any
    if flavor == "cohere":
        body = {"message": message}
    elif flavor == "tei":
        body = {"error": message, "error_type": "overloaded" if status == 429 else "backend"}
    elif flavor == "vllm":
        body = {"error": {"message": message, "type": "BadRequestError", "code": status}}
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def app(state: FakeRerank) -> FastAPI:
    api = FastAPI()

    async def answer(request: Request, flavor: str) -> JSONResponse:
        body = await request.json()
        state.requests.append((request.url.path, dict(request.headers), body))
        if state.api_key is not None and request.headers.get("authorization") != f"Bearer {state.api_key}":
            return _error(flavor, 401, "invalid api token")
        if state.rate_limit_next > 0:
            state.rate_limit_next -= 1
            return _error(flavor, 429, "Model is overloaded", {"Retry-After": state.retry_after})
        if state.fail_next > 0:
            state.fail_next -= 1
            return _error(flavor, state.fail_status, "CUDA out of memory")
        slept = 0.0
        while slept < state.delay_s:  # a slow model; `reset()` ends the wait, so no handler outlives its test
            await asyncio.sleep(0.02)
            slept += 0.02
        texts: list[str] = body["texts"] if flavor == "tei" else body["documents"]
        ranked = sorted(((state.score(text), i) for i, text in enumerate(texts)), key=lambda pair: (-pair[0], pair[1]))
        if flavor == "tei":
            items: Any = [{"index": i, "score": s} for s, i in ranked]
            if state.malformed:
                items[0]["index"] = len(texts) + 3
            return JSONResponse(items)
        ranked = ranked[: body.get("top_n") or len(ranked)]
        results: list[dict[str, Any]] = [{"index": i, "relevance_score": s} for s, i in ranked]
        if state.malformed:
            results[0]["index"] = len(texts) + 3
        if flavor == "jina" and body.get("return_documents", True):
            for r in results:
                r["document"] = {"text": texts[r["index"]]} if r["index"] < len(texts) else None
        if flavor == "xinference":
            for r in results:
                r["document"] = None
        if flavor == "vllm":
            for r in results:
                r["document"] = {"text": texts[r["index"]]} if r["index"] < len(texts) else None
        envelope: dict[str, Any] = {"results": results}
        if flavor in ("cohere", "xinference"):
            envelope = {"id": str(uuid.uuid4()), **envelope, "meta": {"billed_units": {"search_units": 1}}}
        else:
            envelope = {"id": str(uuid.uuid4()), "model": body.get("model"), "usage": {"total_tokens": 10 * len(texts)}, **envelope}
        return JSONResponse(envelope)

    for path, flavor in (("/cohere/v1/rerank", "cohere"), ("/cohere/v2/rerank", "cohere"), ("/jina/v1/rerank", "jina"),
                         ("/xinference/v1/rerank", "xinference"), ("/vllm/v1/rerank", "vllm"), ("/vllm/rerank", "vllm"),
                         ("/tei/rerank", "tei")):  # fmt: skip

        async def route(request: Request, flavor: str = flavor) -> JSONResponse:
            return await answer(request, flavor)

        api.post(path)(route)
    return api
