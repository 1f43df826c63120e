"""A fake Dify Knowledge API: `POST /v1/datasets/{dataset_id}/retrieve` with the documented shapes.

Answers `{"query": {"content"}, "records": [{"segment": {..., "document": {...}}, "child_chunks",
"score", "tsne_position", "files", "summary"}]}`; errors as `{"status", "code", "message"}`
(401 unauthorized, 404 not_found, 400 invalid_param for a query over 250 characters or a
retrieval_model missing a required field, 403 forbidden for the plan's rate limit, and a 429
with Retry-After as a proxy in front of Dify sends). Metadata conditions are evaluated the way
Dify's SQL does (a missing field fails), and every body is recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

_WORD = re.compile(r"\w+")
REQUIRED = ("search_method", "reranking_enable", "top_k", "score_threshold_enabled")


@dataclass
class Segment:
    id: str
    document_id: str
    document_name: str
    content: str
    position: int = 1
    answer: str = ""
    doc_metadata: dict[str, Any] | None = None
    child_chunks: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class FakeDify:
    api_key: str
    dataset_id: str = "3f1c8a52-6f0e-4c57-9b3e-0d6f2a9c1b11"
    segments: list[Segment] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    rate_limit_next: int = 0
    plan_limit_next: int = 0
    retry_after: str = "1"
    malformed: bool = False


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"status": status, "code": code, "message": message}, status_code=status, headers=headers)


def _holds(metadata: dict[str, Any], condition: dict[str, Any]) -> bool:
    name, op, value = condition["name"], condition["comparison_operator"], condition.get("value")
    if name not in metadata or metadata[name] is None:
        return op == "empty"
    field_value = metadata[name]
    text = str(field_value)
    if op == "contains":
        return str(value) in text
    if op == "start with":
        return text.startswith(str(value))
    if op == "end with":
        return text.endswith(str(value))
    if op in ("is", "="):
        return text == value if isinstance(value, str) else float(field_value) == value
    if op in ("in", "not in"):
        allowed = value if isinstance(value, list) else [v.strip() for v in str(value).split(",")]
        return (text in allowed) == (op == "in")
    if op == "not empty":
        return True
    number = float(field_value)
    return {"before": number < value, "<": number < value, "after": number > value, ">": number > value,
            "≥": number >= value, "≤": number <= value}[op]  # fmt: skip


def app(state: FakeDify) -> FastAPI:
    api = FastAPI()

    @api.post("/v1/datasets/{dataset_id}/retrieve")
    async def retrieve(request: Request, dataset_id: str) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {state.api_key}":
            return _error(401, "unauthorized", "Access token is invalid")
        if state.rate_limit_next > 0:
            state.rate_limit_next -= 1
            return _error(429, "too_many_requests", "Too many requests", {"Retry-After": state.retry_after})
        if state.plan_limit_next > 0:
            state.plan_limit_next -= 1
            return _error(403, "forbidden", "Sorry, you have reached the knowledge base request rate limit of your subscription.")
        if dataset_id != state.dataset_id:
            return _error(404, "not_found", "Dataset not found.")
        body = await request.json()
        state.bodies.append(body)
        query, model = body.get("query") or "", body.get("retrieval_model")
        if len(query) > 250:
            return _error(400, "invalid_param", "Query cannot exceed 250 characters")
        if not isinstance(model, dict) or any(k not in model for k in REQUIRED):
            return _error(400, "invalid_param", "retrieval_model: field required")
        if state.malformed:
            return JSONResponse({"query": {"content": query}, "records": {"oops": True}})
        conditions = (model.get("metadata_filtering_conditions") or {})
        terms = {w.lower() for w in _WORD.findall(query)}
        scored = []
        for segment in state.segments:
            metadata = segment.doc_metadata or {}
            checks = [_holds(metadata, c) for c in conditions.get("conditions") or []]
            if checks and not (any(checks) if conditions.get("logical_operator") == "or" else all(checks)):
                continue
            words = {w.lower() for w in _WORD.findall(segment.content)}
            overlap = len(terms & words) / max(1, len(terms))
            if overlap:
                scored.append((round(0.45 + 0.5 * overlap, 4), segment))
        threshold = (model.get("score_threshold") or 0.0) if model["score_threshold_enabled"] else 0.0
        scored = [s for s in sorted(scored, key=lambda x: -x[0]) if s[0] >= threshold][: model["top_k"]]
        records = [{
            "segment": {
                "id": seg.id, "position": seg.position, "document_id": seg.document_id, "content": seg.content,
                "sign_content": "", "answer": seg.answer, "word_count": len(seg.content.split()), "tokens": 12,
                "keywords": sorted(terms & {w.lower() for w in _WORD.findall(seg.content)}), "index_node_id": f"node-{seg.id}",
                "index_node_hash": "abc123", "hit_count": 1, "enabled": True, "disabled_at": None, "disabled_by": None,
                "status": "completed", "created_by": "user-1", "created_at": 1741267200, "indexing_at": 1741267200,
                "completed_at": 1741267200, "error": None, "stopped_at": None,
                "document": {"id": seg.document_id, "data_source_type": "upload_file", "name": seg.document_name,
                             "doc_type": None, "doc_metadata": seg.doc_metadata},
            },
            "child_chunks": seg.child_chunks, "score": score, "tsne_position": None, "files": [], "summary": None,
        } for score, seg in scored]  # fmt: skip
        return JSONResponse({"query": {"content": query}, "records": records})

    return api
