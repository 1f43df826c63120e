"""A fake RAGFlow (v0.27 HTTP API): `POST /api/v1/retrieval` answering with the documented shapes.

Success is `{"code": 0, "data": {"chunks": [...], "doc_aggs": [...], "total": n}}` with `page` /
`page_size` pagination; failures use RAGFlow's `{"code", "message"}` envelope: HTTP 401 with code
401 for a bad key (v0.27), or HTTP 200 with code 109 in `legacy_auth` mode (older versions), HTTP
200 with code 102 for a dataset the key does not own or a missing `dataset_ids`. A 429 with
Retry-After stands for a proxy in front of it. Metadata conditions are evaluated the way RAGFlow
does (lower-cased, a document without the field never matches); every body is recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

_WORD = re.compile(r"\w+")


@dataclass
class Chunk:
    id: str
    document_id: str
    document_name: str
    content: str
    dataset_id: str = "kb-1"
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class FakeRagflow:
    api_key: str
    datasets: set[str] = field(default_factory=lambda: {"kb-1"})
    chunks: list[Chunk] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    legacy_auth: bool = False
    rate_limit_next: int = 0
    retry_after: str = "1"
    malformed: bool = False


def _holds(metadata: dict[str, Any], condition: dict[str, Any]) -> bool:
    name, op, value = condition["name"], condition["comparison_operator"], str(condition["value"]).lower()
    if name not in metadata:
        return False
    text = str(metadata[name]).lower()
    return {"contains": value in text, "not contains": value not in text, "start with": text.startswith(value),
            "=": text == value, "≠": text != value, "not empty": bool(text), "empty": not text}[op]  # fmt: skip


def app(state: FakeRagflow) -> FastAPI:
    api = FastAPI()

    @api.post("/api/v1/retrieval")
    async def retrieval(request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {state.api_key}":
            if state.legacy_auth:
                return JSONResponse({"code": 109, "message": "Authentication error: API key is invalid!", "data": False})
            return JSONResponse({"code": 401, "message": "<Unauthorized '401: Unauthorized'>", "data": None}, status_code=401)
        if state.rate_limit_next > 0:
            state.rate_limit_next -= 1
            return JSONResponse({"code": 429, "message": "Too Many Requests"}, status_code=429, headers={"Retry-After": state.retry_after})
        req = await request.json()
        state.bodies.append(req)
        if not req.get("dataset_ids"):
            return JSONResponse({"code": 102, "message": "`dataset_ids` is required."})
        for kb in req["dataset_ids"]:
            if kb not in state.datasets:
                return JSONResponse({"code": 102, "message": f"You don't own the dataset {kb}."})
        if state.malformed:
            return JSONResponse({"code": 0, "data": {"chunks": {"not": "a list"}}})
        page, size = int(req.get("page", 1)), int(req.get("page_size", 30))
        threshold, weight = float(req.get("similarity_threshold", 0.2)), float(req.get("vector_similarity_weight", 0.3))
        terms = {w.lower() for w in _WORD.findall(req["question"])}
        condition = req.get("metadata_condition") or {}
        found = []
        for chunk in state.chunks:
            if chunk.dataset_id not in req["dataset_ids"]:
                continue
            checks = [_holds(chunk.metadata, c) for c in condition.get("conditions", [])]
            if checks and not (any(checks) if condition.get("logic") == "or" else all(checks)):
                continue
            words = {w.lower() for w in _WORD.findall(chunk.content)}
            term = len(terms & words) / max(1, len(terms))
            vector = 0.5 + 0.4 * term
            similarity = (1 - weight) * term + weight * vector
            if term and similarity >= threshold:
                found.append((similarity, term, vector, chunk))
        found.sort(key=lambda x: -x[0])
        window = found[(page - 1) * size : page * size]
        include = (req.get("reference_metadata") or {}).get("include")
        chunks = []
        for similarity, term, vector, chunk in window:
            out = {
                "content": chunk.content, "content_ltks": chunk.content.lower(), "document_id": chunk.document_id,
                "document_keyword": chunk.document_name, "highlight": "", "id": chunk.id, "image_id": "",
                "important_keywords": [""], "tag_kwd": [], "dataset_id": chunk.dataset_id, "positions": [""],
                "similarity": similarity, "term_similarity": term, "vector_similarity": vector,
            }  # fmt: skip
            if include and chunk.metadata:
                out["document_metadata"] = chunk.metadata
            chunks.append(out)
        aggs = [{"count": sum(1 for f in found if f[3].document_id == d), "doc_id": d, "doc_name": n}
                for d, n in dict.fromkeys((f[3].document_id, f[3].document_name) for f in found)]  # fmt: skip
        return JSONResponse({"code": 0, "data": {"chunks": chunks, "doc_aggs": aggs, "total": len(found)}})

    return api
