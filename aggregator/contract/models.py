"""The wire shapes of Dify's External Knowledge API, as pydantic models."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt, model_validator,
)

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
#: Values one condition may compare with (a list, or the items of a comma-separated `in` string).
MAX_VALUES_PER_CONDITION = 256
#: Characters of one compared value: a metadata value longer than this is not something a filter names.
MAX_VALUE_CHARS = 1024
#: What a whole `metadata_condition` may cost each passage, which an indexed source pays on every candidate it
#: reads: fields named (summed over the conditions), and field tests (each name against each value, summed).
MAX_FILTER_FIELDS = 64
MAX_FILTER_TESTS = 256

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

    @model_validator(mode="after")
    def _bounded_value(self) -> "Condition":
        for item in self.value if isinstance(self.value, list) else [self.value]:
            if isinstance(item, str) and len(item) > MAX_VALUE_CHARS:
                raise ValueError(f"a value is {len(item)} characters long; at most {MAX_VALUE_CHARS} are allowed")
        if self.values() > MAX_VALUES_PER_CONDITION:
            raise ValueError(f"{self.values()} values in one condition; at most {MAX_VALUES_PER_CONDITION} are allowed")
        return self

    def values(self) -> int:
        """How many values the condition compares with: a list's items, an `in` string's comma-separated items, or one."""
        if isinstance(self.value, list):
            return len(self.value)
        if isinstance(self.value, str) and self.comparison_operator in ("in", "not in"):
            return self.value.count(",") + 1
        return 1

    def tests(self) -> int:
        """Field tests this condition costs a passage: each name against each value."""
        return len(set(self.name)) * max(1, self.values())


class MetadataCondition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    logical_operator: Annotated[Literal["and", "or"], _none_means("and")] = "and"
    conditions: Annotated[list[Condition], _none_means([])] = Field(default_factory=list, max_length=MAX_CONDITIONS)

    @model_validator(mode="after")
    def _bounded_work(self) -> "MetadataCondition":
        fields = sum(len(set(condition.name)) for condition in self.conditions)
        if fields > MAX_FILTER_FIELDS:
            raise ValueError(f"{fields} field names summed over the conditions; at most {MAX_FILTER_FIELDS} are allowed")
        tests = sum(condition.tests() for condition in self.conditions)
        if tests > MAX_FILTER_TESTS:
            raise ValueError(
                f"{tests} field tests (names × values, summed over the conditions); at most {MAX_FILTER_TESTS} are allowed"
            )
        return self


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
