"""A fake Dify Knowledge API: `POST /v1/datasets/{dataset_id}/retrieve` and `GET /v1/datasets/{dataset_id}` (the
dataset detail: `id`, `name`, `provider`, `indexing_technique`, `retrieval_model_dict`, ...) with the documented shapes.

Answers `{"query": {"content"}, "records": [{"segment": {..., "document": {...}}, "child_chunks",
"score", "tsne_position", "files", "summary"}]}`; errors as `{"status", "code", "message"}`
(401 unauthorized, 404 not_found, 400 invalid_param for a query over 250 characters or a
retrieval_model missing a required field, 403 forbidden for the plan's rate limit, and a 429
with Retry-After as a proxy in front of Dify sends). Metadata conditions are evaluated the way
Dify's SQL does (a missing field fails), and every body is recorded. As a real Dify 1.13 does: an `economy` dataset
answers 400 invalid_param to every method but `keyword_search`, and keyword search scores every record 0.0 and
ignores the threshold; an `external` dataset answers `{"records": []}` to every query.
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
    indexing_technique: str = "high_quality"  # or "economy"
    provider: str = "vendor"  # or "external"
    search_method: str = "semantic_search"  # the dataset's own retrieval_model_dict.search_method
    detail_status: int = 200  # 405: an older Dify whose route serves DELETE only
    detail_reads: int = 0


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

    @api.get("/v1/datasets/{dataset_id}")
    async def detail(request: Request, dataset_id: str) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {state.api_key}":
            return _error(401, "unauthorized", "Access token is invalid")
        state.detail_reads += 1
        if state.detail_status == 405:
            return _error(405, "method_not_allowed", "The method is not allowed for the requested URL.")
        if dataset_id != state.dataset_id:
            return _error(404, "not_found", "Dataset not found.")
        return JSONResponse({
            "id": state.dataset_id, "name": "Handbook", "description": "", "provider": state.provider, "permission": "only_me",
            "data_source_type": "upload_file", "indexing_technique": state.indexing_technique, "app_count": 0,
            "document_count": len({s.document_id for s in state.segments}), "word_count": 120, "created_by": "user-1",
            "created_at": 1741267200, "updated_by": "user-1", "updated_at": 1741267200,
            "embedding_model": None if state.indexing_technique == "economy" else "text-embedding-3-small",
            "embedding_model_provider": None if state.indexing_technique == "economy" else "langgenius/openai/openai",
            "embedding_available": state.indexing_technique != "economy",
            "retrieval_model_dict": {"search_method": state.search_method, "reranking_enable": False, "reranking_mode": None,
                                     "reranking_model": {"reranking_provider_name": "", "reranking_model_name": ""},
                                     "weights": None, "top_k": 3, "score_threshold_enabled": False, "score_threshold": None},
            "tags": [], "doc_form": "text_model",
            "external_knowledge_info": {"external_knowledge_id": "kb" if state.provider == "external" else None,
                                        "external_knowledge_api_id": None, "external_knowledge_api_name": None,
                                        "external_knowledge_api_endpoint": None},
            "external_retrieval_model": {"top_k": 2, "score_threshold": 0.0, "score_threshold_enabled": None},
            "doc_metadata": [], "built_in_field_enabled": False,
        })  # fmt: skip

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
        if state.provider == "external":
            return JSONResponse({"query": {"content": query}, "records": []})
        keyword = model["search_method"] == "keyword_search"
        if state.indexing_technique == "economy" and not keyword:
            return _error(400, "invalid_param", "Default model not found for text-embedding")
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
        threshold = (model.get("score_threshold") or 0.0) if model["score_threshold_enabled"] and not keyword else 0.0
        scored = [s for s in sorted(scored, key=lambda x: -x[0]) if s[0] >= threshold][: model["top_k"]]
        if keyword:
            scored = [(0.0, seg) for _, seg in scored]
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
