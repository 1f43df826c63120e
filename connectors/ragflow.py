"""`ragflow`: RAGFlow's native retrieval API over one or more of its datasets.

Follows RAGFlow's HTTP API reference as of v0.27.0 (2026-08-19), "Retrieve
chunks", and its implementation (`api/apps/restful_apis/chunk_api.py`):

    POST {base_url}/api/v1/retrieval                   Authorization: Bearer <RAGFlow API key>
    {"question", "dataset_ids", "document_ids", "page", "page_size" (1..100),
     "similarity_threshold", "vector_similarity_weight", "top_k", "rerank_id", "keyword",
     "cross_languages", "use_kg", "metadata_condition": {"logic", "conditions": [{"name",
     "comparison_operator", "value"}]}, "reference_metadata": {"include": true}}
    -> {"code": 0, "data": {"chunks": [{"id", "content", "document_id", "document_keyword",
        "dataset_id", "similarity", "term_similarity", "vector_similarity", "important_keywords",
        "document_metadata" (v0.26 and later, when asked)}], "doc_aggs", "total"}}
    -> {"code": <not 0>, "message": "..."}

RAGFlow reports most failures in that envelope, often with HTTP 200: `code`
109 (bad API key, older versions), 401, 108 and 403 and "You don't own the
dataset" (102) are `auth_failed`; 105 and 106 (its own backend unreachable or
busy) are transient; the rest are errors whose message is shown. HTTP 429
from a proxy in front of it carries Retry-After as usual.

`source_score` is the chunk's `similarity` as given (RAGFlow's weighted mix of
term and vector similarity). Metadata conditions go to RAGFlow only where its
evaluation (case-insensitive, a document without the field never matches) is
at least as broad as the gateway's: `contains`, `start with`, `not empty`, and
`is` with a text value (sent as `=`); the gateway filters the rest itself.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr

from aggregator.contract.conditions import as_number, as_text

from connectors._conditions import push_down
from connectors._remote import GATEWAY_FIELDS, Call, RemoteConnector, dig, public_url, raw_score, upstream_metadata
from connectors.base import AuthFailed, BadResponse, ConnectorSettings, NotFound, Passage, SourceError, SourceQuery, Unavailable
from connectors.http import DEFAULT_MAX_RESPONSE_BYTES, BaseUrl, clip

#: RAGFlow's `RetCode`s (common/constants.py) and what each means here.
AUTH_CODES = frozenset({108, 109, 401, 403})
TRANSIENT_CODES = frozenset({105, 106})
DATA_ERROR = 102
MAX_PAGE_SIZE = 100
#: Fields this connector sets from the chunk itself: RAGFlow's metadata filter knows nothing of them.
CHUNK_FIELDS = frozenset({"dataset_id", "chunk_id", "document_name", "similarity", "term_similarity", "vector_similarity", "important_keywords"})


class RagflowSettings(ConnectorSettings):
    type: Literal["ragflow"] = "ragflow"
    base_url: BaseUrl = Field(description="RAGFlow's address, e.g. http://ragflow.internal:9380 (the API under /api/v1).")
    api_key: SecretStr
    dataset_ids: list[str] = Field(min_length=1)
    document_ids: list[str] = Field(default_factory=list, description="Only these documents; all when empty.")
    page_size: int = Field(30, ge=1, le=MAX_PAGE_SIZE, description="Chunks asked per query, at most.")
    similarity_threshold: float = Field(0.2, ge=0, le=1)
    vector_similarity_weight: float = Field(0.3, ge=0, le=1)
    top_k: int = Field(1024, ge=1, description="Chunks engaged in the vector similarity computation.")
    rerank_id: str | None = None
    keyword: bool = Field(False, description="Let RAGFlow's chat model add keywords to the question.")
    use_kg: bool = False
    cross_languages: list[str] = Field(default_factory=list)
    document_metadata: bool = Field(True, description="Ask for each document's metadata (RAGFlow v0.26+).")
    filter_metadata: bool = Field(True, description="Push metadata_condition down to RAGFlow where it is safe.")
    verify_tls: bool | str = Field(True, description="False, or a CA bundle path for a private CA.")
    max_response_bytes: int = Field(DEFAULT_MAX_RESPONSE_BYTES, ge=1024)


def ragflow_condition(name: str, operator: str, value: Any) -> dict[str, Any] | None:
    """One condition as RAGFlow's metadata filter takes it, when RAGFlow cannot narrow it; else None."""
    if name in GATEWAY_FIELDS or name in CHUNK_FIELDS or name.startswith("ragflow_") or isinstance(value, list):
        return None
    if operator in ("contains", "start with"):
        return {"name": name, "comparison_operator": operator, "value": as_text(value)}
    if operator == "not empty":
        return {"name": name, "comparison_operator": operator, "value": ""}
    if operator == "is" and isinstance(value, str) and as_number(value) is None:
        # RAGFlow's `=` compares numbers as numbers and text lower-cased: only non-numeric text is safe
        return {"name": name, "comparison_operator": "=", "value": value}
    return None


def envelope_error(envelope: Any, what: str) -> SourceError | None:
    """The typed error a `{"code", "message"}` envelope means, or None for code 0."""
    code = dig(envelope, "code")
    if code == 0:
        return None
    message = clip(str(dig(envelope, "message") or "no message"))
    text = f"{what}: RAGFlow code {code}: {message}"
    if code in AUTH_CODES or (code == DATA_ERROR and "don't own" in message):
        return AuthFailed(text)
    if code in TRANSIENT_CODES:
        return Unavailable(text)
    if code == 404:
        return NotFound(text)
    return BadResponse(text)


def describe_error(status: int, envelope: Any, what: str) -> str | None:
    """An error status with RAGFlow's envelope: its words; a refusal it reports as 400 is still a refusal."""
    error = envelope_error(envelope, what)
    if error is None:
        return None
    if isinstance(error, AuthFailed) and status not in (401, 403):
        raise error
    return f"RAGFlow code {dig(envelope, 'code')}: {clip(str(dig(envelope, 'message') or ''))}"


class RagflowConnector(RemoteConnector):
    describe_error = staticmethod(describe_error)
    settings_model = RagflowSettings
    settings: RagflowSettings

    def retrieves_by_meaning(self) -> bool:
        """RAGFlow's similarity mixes term and vector similarity: by meaning whenever the vector part has a weight."""
        return self.settings.vector_similarity_weight > 0

    def client_options(self) -> dict[str, Any]:
        s = self.settings
        return {"base_url": s.base_url, "headers": {"Authorization": f"Bearer {s.api_key.get_secret_value()}"}, "verify": s.verify_tls}

    def request_body(self, query: SourceQuery) -> dict[str, Any]:
        s = self.settings
        body: dict[str, Any] = {
            "question": query.text, "dataset_ids": s.dataset_ids, "page": 1, "page_size": min(query.limit, s.page_size),
            "similarity_threshold": s.similarity_threshold, "vector_similarity_weight": s.vector_similarity_weight,
            "top_k": s.top_k, "keyword": s.keyword, "highlight": False,
        }  # fmt: skip
        optional = {"document_ids": s.document_ids, "rerank_id": s.rerank_id, "use_kg": s.use_kg, "cross_languages": s.cross_languages}
        body.update({k: v for k, v in optional.items() if v})
        if s.document_metadata:
            body["reference_metadata"] = {"include": True}
        pushed = push_down(query.metadata_condition, ragflow_condition) if s.filter_metadata and not s.document_ids else None
        if pushed is not None:  # RAGFlow ignores metadata_condition when document_ids are given
            body["metadata_condition"] = {"logic": pushed.logical_operator, "conditions": pushed.clauses}
        return body

    def parse(self, data: Any, what: str) -> list[Passage]:
        error = envelope_error(data, what) if isinstance(data, dict) and "code" in data else None
        if error is not None:
            raise error
        chunks = dig(data, "data", "chunks")
        if not isinstance(chunks, list):
            raise BadResponse(f"{what}: answer has no data.chunks list")
        passages: list[Passage] = []
        for rank, chunk in enumerate(chunks, start=1):
            content = dig(chunk, "content")
            if not isinstance(content, str) or not content.strip():
                continue
            metadata = upstream_metadata(chunk.get("document_metadata"), "ragflow")
            name = chunk.get("document_keyword")
            metadata.update({
                "dataset_id": chunk.get("dataset_id"), "chunk_id": chunk.get("id"), "document_name": name,
                "term_similarity": raw_score(chunk.get("term_similarity")),
                "vector_similarity": raw_score(chunk.get("vector_similarity")),
            })  # fmt: skip
            keywords = [k for k in chunk.get("important_keywords") or [] if isinstance(k, str) and k]
            if keywords:
                metadata["important_keywords"] = keywords
            document_id = str(chunk.get("document_id") or chunk.get("id") or f"chunk-{rank}")
            passages.append(Passage(
                content=content, title=str(name or document_id), document_id=document_id, metadata=metadata,
                source_score=raw_score(chunk.get("similarity")), source_rank=rank,
            ))  # fmt: skip
        return passages

    def call(self, query: SourceQuery) -> Call:
        what = f"POST {public_url(self.settings.base_url)}/api/v1/retrieval"
        return Call("POST", "/api/v1/retrieval", what, {"json": self.request_body(query)})
