"""`dify`: any server that speaks Dify's External Knowledge API (another gateway, RAGFlow, a plugin).

The upstream already returns passages, so they are not re-split; their scores
are kept as the upstream gave them (even outside [0, 1]) for the rerank to map. We ask for more than the user's `top_k` (the core's `limit`) with no
threshold, so that the rerank has candidates to choose from, and pass
`metadata_condition` on. Conditions on fields that only this gateway sets
(`source`, `source_type`, `title`) are left out of what is passed on: under `and`
dropping one only widens the upstream's answer (the core's post-filter still
applies); under `or` the whole condition is kept local when any part of it
must be, since a partial `or` would narrow the answer wrongly.
"""

from __future__ import annotations

from typing import Any, Literal

import httpx
from pydantic import Field, SecretStr

from ._remote import raw_score
from .base import BadResponse, Connector, ConnectorSettings, Passage, SourceQuery
from .http import DEFAULT_MAX_RESPONSE_BYTES, BaseUrl, make_client, request_json

#: Fields the gateway sets itself: an upstream may not have them, so conditions on them stay local.
GATEWAY_FIELDS = frozenset({"source", "source_type", "title"})
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
    """The part of a metadata_condition the upstream can evaluate, or None."""
    if not condition or not condition.get("conditions"):
        return None
    conditions = condition["conditions"]
    keep = [c for c in conditions if not GATEWAY_FIELDS.intersection(c.get("name") or [])]
    if condition.get("logical_operator") == "or" and len(keep) != len(conditions):
        return None
    return {**condition, "conditions": keep} if keep else None


def parse_records(data: Any, what: str) -> list[Passage]:
    """Read `{"records": [...]}` strictly enough to trust it, leniently enough to keep what is usable."""
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise BadResponse(f"{what}: answer has no 'records' list")
    passages: list[Passage] = []
    for position, record in enumerate(data["records"]):
        if not isinstance(record, dict) or not isinstance(record.get("content"), str) or not record["content"].strip():
            continue
        metadata = record.get("metadata")
        metadata = dict(metadata) if isinstance(metadata, dict) else {}
        title = record.get("title")
        document_id = metadata.get("document_id")
        if document_id is None:
            document_id = metadata.get("path") or metadata.get("url") or (title if isinstance(title, str) and title else f"record-{position}")
        updated = metadata.get("updated_at")
        passages.append(
            Passage(
                content=record["content"],
                title=title if isinstance(title, str) else str(title or ""),
                document_id=str(document_id),
                chunk_index=metadata["chunk_index"] if isinstance(metadata.get("chunk_index"), int) else 0,
                metadata=metadata,
                updated_at=updated if isinstance(updated, str) else None,
                source_score=raw_score(record.get("score")),
                source_rank=position + 1,
            )
        )
    return passages


class DifyConnector(Connector):
    settings_model = DifySettings
    settings: DifySettings

    def __init__(self, name: str, settings: DifySettings) -> None:
        super().__init__(name, settings)
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        if self._client is None:
            self._client = make_client(
                headers={"Authorization": f"Bearer {self.settings.api_key.get_secret_value()}"},
                timeout_s=self.settings.timeout_s or 3.0,
                verify=self.settings.verify_tls,
            )

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

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

    async def search(self, query: SourceQuery) -> list[Passage]:
        if self._client is None:
            await self.start()
        assert self._client is not None
        what = f"POST {self.settings.endpoint}/retrieval"
        data = await request_json(
            self._client, "POST", f"{self.settings.endpoint}/retrieval", what,
            max_bytes=self.settings.max_response_bytes, json=self.request_body(query),
        )  # fmt: skip
        return parse_records(data, what)
