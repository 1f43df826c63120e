"""The wire shapes of Dify's External Knowledge API, as pydantic models."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt

Operator = Literal[
    "contains", "not contains", "start with", "end with", "is", "is not", "in", "not in",
    "empty", "not empty", "=", "≠", ">", "<", "≥", "≤", "before", "after",
]  # fmt: skip

MAX_TOP_K = 100
MAX_QUERY_CHARS = 4000
MAX_CONDITIONS = 64


def _names_as_list(value: Any) -> Any:
    """Dify sends `name` as a list; a bare string is accepted as a list of one."""
    return [value] if isinstance(value, str) else value


def _none_means_and(value: Any) -> Any:
    return "and" if value is None else value


def _none_means_zero(value: Any) -> Any:
    return 0.0 if value is None else value


JsonScalar = str | StrictInt | StrictFloat | bool | None


class Condition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], BeforeValidator(_names_as_list)] = Field(
        min_length=1, max_length=32
    )
    comparison_operator: Operator
    value: JsonScalar | list[JsonScalar] = None


class MetadataCondition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    logical_operator: Annotated[Literal["and", "or"], BeforeValidator(_none_means_and)] = "and"
    conditions: list[Condition] = Field(default_factory=list, max_length=MAX_CONDITIONS)


class RetrievalSetting(BaseModel):
    model_config = ConfigDict(extra="ignore")

    top_k: StrictInt = Field(5, ge=1, le=MAX_TOP_K)
    score_threshold: Annotated[StrictFloat | StrictInt, BeforeValidator(_none_means_zero)] = Field(0.0, ge=0.0, le=1.0)


class RetrievalRequest(BaseModel):
    """The body of `POST /retrieval`. Extra fields are ignored: newer Dify versions may add some."""

    model_config = ConfigDict(extra="ignore")

    knowledge_id: str = Field(min_length=1, max_length=256)
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    retrieval_setting: RetrievalSetting = Field(default_factory=RetrievalSetting)
    metadata_condition: MetadataCondition | None = None


class ScoreDetail(BaseModel):
    bm25: float
    source_score: float | None
    source_rank: int | None


class Record(BaseModel):
    content: str
    score: float
    title: str
    metadata: dict[str, Any]


class RetrievalResponse(BaseModel):
    records: list[Record]


class ErrorBody(BaseModel):
    error_code: int
    error_msg: str
