"""`dify_dataset`: one of Dify's own knowledge bases, through Dify's Knowledge API.

Follows the Knowledge (dataset) part of Dify's Service API as documented for
Dify 1.x (docs aligned with Dify 1.16, `openapi_service.json`
"Retrieve Chunks from a Knowledge Base / Test Retrieval") and implemented by
`api/controllers/service_api/dataset/hit_testing.py`:

    POST {api_base}/datasets/{dataset_id}/retrieve      Authorization: Bearer <dataset API key>
    {"query": "...",                                     (at most 250 characters)
     "retrieval_model": {"search_method", "reranking_enable", "reranking_mode", "reranking_model",
                         "weights", "top_k", "score_threshold_enabled", "score_threshold",
                         "metadata_filtering_conditions": {"logical_operator", "conditions": [...]}}}
    -> {"query": {"content"}, "records": [{"segment": {"id", "position", "document_id", "content",
        "answer", "keywords", "document": {"id", "name", "data_source_type", "doc_metadata"}},
        "child_chunks": [{"id", "content", "position", "score"}], "score", "files", "summary"}]}
    errors: {"status", "code", "message"}; 401 unauthorized; 403 forbidden (API access off, or the
    plan's knowledge request rate limit); 404 not_found; 400 invalid_param, dataset_not_initialized, ...

The `retrieval_model` is sent whole (Dify then ignores the dataset's own
settings, whose `top_k` is usually 3): no reranking and no threshold unless the
config says otherwise. `source_score` is Dify's score as given (keyword search
always gives 0.0 and ignores any threshold: the rerank then reads ranks).

The search method is the config's `search_method`; unset, it follows the
dataset, read once from `GET {api_base}/datasets/{dataset_id}` (the dataset
detail, as a Knowledge API key may read it): an `economy` dataset (keyword
index, no embeddings) only answers `keyword_search` (any other method is a 400
`invalid_param`); a `high_quality` one answers its own `retrieval_model_dict.
search_method`, else `semantic_search`. A dataset whose `provider` is
`external` (Dify's own link to an External Knowledge API) is refused with that
reason: Dify's Service API answers `{"records": []}` for it, never an error.
A Dify without that route (404/405) gets `semantic_search`.

Metadata filtering: Dify evaluates conditions in SQL on the document's
metadata, where a missing field fails every operator and `empty` does not
count "". So only what can never narrow the answer is pushed down: the
positive operators on single names that come from the documents' metadata
(not the fields this connector adds), numbers as numbers and dates as Unix
seconds, which is how Dify stores time metadata. The rest stays with the
gateway's post-filter (see `connectors/_conditions.py`).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from aggregator.contract.conditions import as_instant, as_number, listed

from connectors._conditions import push_down, scalar_text
from connectors._remote import GATEWAY_FIELDS, Call, RemoteConnector, dig, iso_time, public_url, raw_score, upstream_metadata
from connectors.base import BadResponse, ConnectorSettings, NotFound, Passage, RateLimited, SourceQuery
from connectors.http import DEFAULT_MAX_RESPONSE_BYTES, BaseUrl, clip, request_json

#: Dify refuses longer queries (`HitTestingService.hit_testing_args_check`).
MAX_QUERY_CHARS = 250
#: Fields this connector sets from the segment itself: Dify's metadata filter knows nothing of them.
SEGMENT_FIELDS = frozenset({"dify_dataset_id", "segment_id", "document_name", "data_source_type", "doc_type", "keywords", "child_chunks"})
SEARCH_METHODS = ("semantic_search", "full_text_search", "hybrid_search", "keyword_search")
#: Dify's own default, for a dataset whose detail names no usable method (or before it was read).
DIFY_SEARCH_METHOD = "semantic_search"
#: What Flask's `uuid` route converter accepts: any other dataset id is an HTML 404 with no reason from Dify.
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_PUSHABLE_TEXT = ("contains", "start with", "end with", "is")
_PUSHABLE_NUMBER = ("=", ">", "<", "≥", "≤")


class RerankingModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reranking_provider_name: str = Field(min_length=1, description="e.g. langgenius/cohere/cohere")
    reranking_model_name: str = Field(min_length=1, description="e.g. rerank-v3.5")


class DifyDatasetSettings(ConnectorSettings):
    type: Literal["dify_dataset"] = "dify_dataset"
    api_base: BaseUrl = Field("https://api.dify.ai/v1", description="Dify's API base URL, ending in /v1.")
    api_key: SecretStr = Field(description="A Knowledge API key (Knowledge -> Service API), not an app key.")
    dataset_id: str = Field(min_length=1, description="The knowledge base's UUID, from its URL in Dify.")
    search_method: Literal["semantic_search", "full_text_search", "hybrid_search", "keyword_search"] | None = Field(
        None, description="Unset: what the dataset supports (keyword_search for economy, else its own method)."
    )
    top_k: int = Field(20, ge=1, le=100, description="Records asked per query, at most.")
    score_threshold: float | None = Field(None, ge=0, le=1, description="Dify's own threshold; unset: off.")
    reranking_enable: bool = False
    reranking_mode: Literal["reranking_model", "weighted_score"] | None = None
    reranking_model: RerankingModel | None = None
    weights: dict[str, Any] | None = Field(None, description="Dify's weights object, for hybrid search with weighted_score.")
    filter_metadata: bool = Field(True, description="Push metadata_condition down to Dify where it is safe.")
    verify_tls: bool | str = Field(True, description="False, or a CA bundle path for a private CA.")
    max_response_bytes: int = Field(DEFAULT_MAX_RESPONSE_BYTES, ge=1024)

    @field_validator("dataset_id")
    @classmethod
    def _a_uuid(cls, value: str) -> str:
        if not _UUID.fullmatch(value.strip()):
            raise ValueError(f"{value!r} is not a dataset id: a UUID such as 3f1c8a52-6f0e-4c57-9b3e-0d6f2a9c1b11, from the knowledge base's URL in Dify")
        return value.strip()


def search_method_for(detail: Any) -> str:
    """The search method a dataset answers, from its detail (`GET /datasets/{id}`); BadResponse for an external one."""
    if dig(detail, "provider") == "external":
        raise BadResponse(
            "the dataset is one of Dify's external knowledge bases: Dify's Knowledge API answers no records for it; "
            "add its External Knowledge API to the gateway as a `dify` source instead"
        )
    if dig(detail, "indexing_technique") == "economy":
        return "keyword_search"
    own = dig(detail, "retrieval_model_dict", "search_method")
    return own if own in SEARCH_METHODS and own != "keyword_search" else DIFY_SEARCH_METHOD


def dify_condition(name: str, operator: str, value: Any) -> dict[str, Any] | None:
    """One condition as Dify's metadata filter takes it, when Dify cannot narrow it; else None."""
    if name in GATEWAY_FIELDS or name in SEGMENT_FIELDS or name.startswith("dify_"):
        return None
    if operator in _PUSHABLE_TEXT:
        text = scalar_text(value)
        sent: Any = text
    elif operator == "in":
        sent = listed(value)
    elif operator == "not empty":
        sent = None
    elif operator in _PUSHABLE_NUMBER:
        sent = None if isinstance(value, list) else as_number(value)
    elif operator in ("before", "after"):
        sent = None if isinstance(value, list) else as_instant(value)
    else:
        return None  # negations and `empty`: a missing field fails them in Dify, passes them here
    if sent is None and operator != "not empty":
        return None
    return {"name": name, "comparison_operator": operator, "value": sent}


def describe_error(status: int, envelope: Any, what: str) -> str | None:
    """Dify's `{"status", "code", "message"}`; a 403 about the plan's rate limit is a rate limit, not a bad key."""
    code, message = dig(envelope, "code"), dig(envelope, "message")
    if status == 403 and isinstance(message, str) and "rate limit" in message.lower():
        raise RateLimited(f"{what}: HTTP 403, {clip(message)}")
    return ": ".join(str(p) for p in (code, message) if p) or None


class DifyDatasetConnector(RemoteConnector):
    describe_error = staticmethod(describe_error)
    settings_model = DifyDatasetSettings
    settings: DifyDatasetSettings
    #: What `aggregator check` says when the dataset answered no records.
    empty_hint: ClassVar[str] = (
        "Dify answered no records: an economy dataset answers keyword_search only, "
        "and one of Dify's external knowledge bases never answers through the Knowledge API"
    )
    #: The search method read from the dataset's detail, when the config gives none (once per connector).
    _detected: str = DIFY_SEARCH_METHOD
    _probed: bool = False

    def detail_call(self) -> Call:
        url = f"{self.settings.api_base}/datasets/{quote(self.settings.dataset_id, safe='')}"
        return Call("GET", url, f"GET {public_url(url)}")

    async def search(self, query: SourceQuery) -> list[Passage]:
        if self.settings.search_method is None and not self._probed:
            call = self.detail_call()
            try:
                detail = await request_json(
                    await self.client(), call.method, call.url, call.what,
                    max_bytes=self.settings.max_response_bytes, describe_error=describe_error,
                )  # fmt: skip
            except NotFound:  # a Dify without the route, or no such dataset: the retrieve says which
                detail = {}
            except BadResponse as exc:
                if "HTTP 405" not in str(exc):  # older Dify: the route serves DELETE only
                    raise
                detail = {}
            self._detected, self._probed = search_method_for(detail), True
        return await super().search(query)

    @property
    def search_method(self) -> str:
        return self.settings.search_method or self._detected

    def retrieves_by_meaning(self) -> bool:
        """Dify's semantic and hybrid searches rank by its embedding model (the configured method, else the one
        read from the dataset at the first search, else Dify's default: semantic)."""
        return self.search_method in ("semantic_search", "hybrid_search")

    def client_options(self) -> dict[str, Any]:
        s = self.settings
        return {"headers": {"Authorization": f"Bearer {s.api_key.get_secret_value()}"}, "verify": s.verify_tls}

    def retrieval_model(self, query: SourceQuery) -> dict[str, Any]:
        s = self.settings
        model: dict[str, Any] = {
            "search_method": self.search_method,
            "reranking_enable": s.reranking_enable,
            "top_k": min(query.limit, s.top_k),
            "score_threshold_enabled": s.score_threshold is not None,
            "score_threshold": s.score_threshold,
        }
        if s.reranking_mode is not None:
            model["reranking_mode"] = s.reranking_mode
        if s.reranking_model is not None:
            model["reranking_model"] = s.reranking_model.model_dump()
        if s.weights is not None:
            model["weights"] = s.weights
        pushed = push_down(query.metadata_condition, dify_condition) if s.filter_metadata else None
        if pushed is not None:
            model["metadata_filtering_conditions"] = {"logical_operator": pushed.logical_operator, "conditions": pushed.clauses}
        return model

    def request_body(self, query: SourceQuery) -> dict[str, Any]:
        return {"query": query.text[:MAX_QUERY_CHARS], "retrieval_model": self.retrieval_model(query)}

    def parse(self, data: Any, what: str) -> list[Passage]:
        records = dig(data, "records")
        if not isinstance(records, list):
            raise BadResponse(f"{what}: answer has no 'records' list")
        passages: list[Passage] = []
        for rank, record in enumerate(records, start=1):
            segment = dig(record, "segment")
            content = dig(segment, "content")
            if not isinstance(content, str) or not content.strip():
                continue
            answer = segment.get("answer")
            if isinstance(answer, str) and answer.strip():  # a Q&A chunk: the question and its answer
                content = f"{content}\n{answer}"
            document = segment.get("document") if isinstance(segment.get("document"), dict) else {}
            doc_metadata = document.get("doc_metadata") if isinstance(document.get("doc_metadata"), dict) else {}
            metadata = upstream_metadata(doc_metadata, "dify")
            metadata.update({
                "dify_dataset_id": self.settings.dataset_id, "segment_id": segment.get("id"),
                "document_name": document.get("name"), "data_source_type": document.get("data_source_type"),
            })  # fmt: skip
            if segment.get("keywords"):
                metadata["keywords"] = segment["keywords"]
            children = [
                {"content": c.get("content"), "score": raw_score(c.get("score")), "position": c.get("position")}
                for c in (record.get("child_chunks") or []) if isinstance(c, dict) and isinstance(c.get("content"), str)
            ]  # fmt: skip
            if children:
                metadata["child_chunks"] = children
            position = segment.get("position")
            document_id = segment.get("document_id") or document.get("id") or segment.get("id") or f"record-{rank}"
            passages.append(Passage(
                content=content, title=str(document.get("name") or document_id), document_id=str(document_id),
                chunk_index=position - 1 if isinstance(position, int) and position > 0 else 0,
                metadata=metadata, updated_at=iso_time(doc_metadata.get("last_update_date")),
                source_score=raw_score(record.get("score")), source_rank=rank,
            ))  # fmt: skip
        return passages

    def call(self, query: SourceQuery) -> Call:
        url = f"{self.settings.api_base}/datasets/{quote(self.settings.dataset_id, safe='')}/retrieve"
        return Call("POST", url, f"POST {public_url(url)}", {"json": self.request_body(query)})
