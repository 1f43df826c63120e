"""The wire shapes of Dify's External Knowledge API, as pydantic models."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt

Operator = Literal[
    "contains", "not contains", "start with", "end with", "is", "is not", "in", "not in",
    "empty", "not empty", "=", "≠", ">", "<", "≥", "≤", "before", "after",
]  # fmt: skip

#: Records per answer at most; a larger `top_k` is served as this many.
MAX_TOP_K = 100
#: What a `top_k` that is absent or null means: Dify's own default for a knowledge base.
DEFAULT_TOP_K = 4
MAX_QUERY_CHARS = 4000
MAX_CONDITIONS = 64

#: Where Dify posts its retrievals: `//retrieval` when its endpoint was saved with a trailing slash.
RETRIEVAL_PATHS = frozenset({"/retrieval", "//retrieval"})


def _names_as_list(value: Any) -> Any:
    """Dify 1.x sends `name` as a string; its API page documents a list. Both are a list here."""
    return [value] if isinstance(value, str) else value


def _none_means(default: Any) -> Any:
    """Dify serializes its models whole, so an unset field arrives as null: null means the default."""
    return BeforeValidator(lambda value: default if value is None else value)


def _at_most_max_top_k(value: int) -> int:
    return min(value, MAX_TOP_K)


JsonScalar = str | StrictInt | StrictFloat | bool | None


class Condition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[list[Annotated[str, Field(max_length=256)]], BeforeValidator(_names_as_list)] = Field(
        min_length=1, max_length=32
    )
    comparison_operator: Operator
    value: JsonScalar | list[JsonScalar] = None


class MetadataCondition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    logical_operator: Annotated[Literal["and", "or"], _none_means("and")] = "and"
    conditions: Annotated[list[Condition], _none_means([])] = Field(default_factory=list, max_length=MAX_CONDITIONS)


class RetrievalSetting(BaseModel):
    """`top_k` 0 asks for nothing and gets nothing; above MAX_TOP_K it gets MAX_TOP_K records at most."""

    model_config = ConfigDict(extra="ignore")

    top_k: Annotated[StrictInt, _none_means(DEFAULT_TOP_K), Field(ge=0), AfterValidator(_at_most_max_top_k)] = DEFAULT_TOP_K
    score_threshold: Annotated[StrictFloat | StrictInt, _none_means(0.0)] = Field(0.0, ge=0.0, le=1.0)


class RetrievalRequest(BaseModel):
    """The body of `POST /retrieval`. Extra fields are ignored: newer Dify versions may add some."""

    model_config = ConfigDict(extra="ignore")

    knowledge_id: str = Field(min_length=1, max_length=256)
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    retrieval_setting: Annotated[RetrievalSetting, _none_means({})] = Field(default_factory=RetrievalSetting)
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
