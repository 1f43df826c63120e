"""`dify`: any server that speaks Dify's External Knowledge API (another gateway, RAGFlow, a plugin).

The upstream already returns passages, so they are not re-split; their scores
are kept as the upstream gave them (even outside [0, 1]) for the rerank to map. We ask for more than the user's `top_k` (the core's `limit`) with no
threshold, so that the rerank has candidates to choose from, and pass
`metadata_condition` on. Conditions on fields that only this gateway sets
(`source`, `source_type`, `title`, and `document_id`, which it prefixes with the
source's name) are left out of what is passed on: under `and`
dropping one only widens the upstream's answer (the core's post-filter still
applies); under `or` the whole condition is kept local when any part of it
must be, since a partial `or` would narrow the answer wrongly.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from pydantic import Field, SecretStr

from connectors._remote import GATEWAY_FIELDS, Call, RemoteConnector, raw_score
from connectors.base import BadResponse, ConnectorSettings, Passage, SourceQuery
from connectors.http import DEFAULT_MAX_RESPONSE_BYTES, BaseUrl, decode_json

MAX_UPSTREAM_TOP_K = 100


class DifySettings(ConnectorSettings):
    type: Literal["dify"] = "dify"
    endpoint: BaseUrl = Field(description="Base URL; /retrieval is appended, as Dify does.")
    api_key: SecretStr
    knowledge_id: str = Field(min_length=1)
    candidates: int = Field(30, ge=1, le=MAX_UPSTREAM_TOP_K, description="Records asked of the upstream per query, at least.")
    max_response_bytes: int = Field(DEFAULT_MAX_RESPONSE_BYTES, ge=1024)
    verify_tls: bool | str = Field(True, description="False, or a CA bundle path for a private CA.")



def pushable_condition(condition: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of a metadata_condition the upstream can evaluate, or None: conditions on the fields the gateway
    sets itself (GATEWAY_FIELDS) stay local, since an upstream may not have them."""
    if not condition or not condition.get("conditions"):
        return None
    conditions = condition["conditions"]
    keep = [c for c in conditions if not GATEWAY_FIELDS.intersection(c.get("name") or [])]
    if condition.get("logical_operator") == "or" and len(keep) != len(conditions):
        return None
    return {**condition, "conditions": keep} if keep else None


class DifyRecord(msgspec.Struct):
    """One record of an answer, as decoded: any field may hold anything (or be absent); `parse_records` judges."""

    content: Any = None
    score: Any = None
    title: Any = None
    metadata: Any = None


class DifyAnswer(msgspec.Struct):
    records: list[DifyRecord]


_decode_answer = msgspec.json.Decoder(DifyAnswer).decode


def decode_answer(body: bytes, what: str) -> DifyAnswer | Any:
    """An answer decoded straight into records (no dict per record); what does not have that shape, or is
    JSON only the standard library reads, is decoded as any other answer and judged by `parse_records`."""
    try:
        return _decode_answer(body)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return decode_json(body, what)


def parse_records(data: DifyAnswer | Any, what: str) -> list[Passage]:
    """Read `{"records": [...]}` strictly enough to trust it, leniently enough to keep what is usable."""
    if isinstance(data, DifyAnswer):
        records: list[DifyRecord | None] = data.records  # type: ignore[assignment]
    elif isinstance(data, dict) and isinstance(data.get("records"), list):
        records = [
            DifyRecord(r.get("content"), r.get("score"), r.get("title"), r.get("metadata")) if isinstance(r, dict) else None
            for r in data["records"]
        ]  # fmt: skip
    else:
        raise BadResponse(f"{what}: answer has no 'records' list")
    passages: list[Passage] = []
    for position, record in enumerate(records):
        if record is None:
            continue
        content = record.content
        if not isinstance(content, str) or not content or content.isspace():  # blank: nothing to rank
            continue
        metadata = record.metadata
        metadata = metadata if isinstance(metadata, dict) else {}  # decoded for this call: ours, no copy needed
        title = record.title
        document_id = metadata.get("document_id")
        if document_id is None:
            document_id = metadata.get("path") or metadata.get("url") or (title if isinstance(title, str) and title else f"record-{position}")
        chunk_index = metadata.get("chunk_index", 0)
        updated = metadata.get("updated_at")
        # Positional: a third of the cost of keywords, for every record of every answer (order of `Passage`'s fields).
        passages.append(Passage(
            content,
            title if isinstance(title, str) else str(title or ""),
            document_id if isinstance(document_id, str) else str(document_id),
            chunk_index if isinstance(chunk_index, int) else 0,
            metadata,
            updated if isinstance(updated, str) else None,
            raw_score(record.score),
            position + 1,
        ))  # fmt: skip
    return passages


class DifyConnector(RemoteConnector):
    settings_model = DifySettings
    settings: DifySettings
    cut_to_limit = False  # `candidates` asks for more than the limit: the fusion reads them all

    def client_options(self) -> dict[str, Any]:
        return {"headers": {"Authorization": f"Bearer {self.settings.api_key.get_secret_value()}"}, "verify": self.settings.verify_tls}

    def call(self, query: SourceQuery) -> Call:
        url = f"{self.settings.endpoint}/retrieval"
        return Call("POST", url, f"POST {url}", {"json": self.request_body(query), "decode": decode_answer})

    def parse(self, data: Any, what: str) -> list[Passage]:
        return parse_records(data, what)

    def request_body(self, query: SourceQuery) -> dict[str, Any]:
        body: dict[str, Any] = {
            "knowledge_id": self.settings.knowledge_id,
            "query": query.text,
            "retrieval_setting": {
                "top_k": min(MAX_UPSTREAM_TOP_K, max(query.limit, self.settings.candidates)),
                "score_threshold": 0.0,
            },
        }
        pushed = pushable_condition(query.metadata_condition)
        if pushed is not None:
            body["metadata_condition"] = pushed
        return body
