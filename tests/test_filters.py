"""metadata_condition: every operator, and/or, name lists, missing fields, as Dify sends them."""

from __future__ import annotations

import pytest

from aggregator.contract.conditions import compile_filter
from aggregator.contract.models import MetadataCondition

RECORD = {
    "source": "confluence-eng",
    "space": "OPS",
    "labels": ["runbook", "security"],
    "chunk_index": 3,
    "size": "1200",
    "updated_at": "2025-03-10T12:00:00Z",
    "draft": False,
    "empty_text": "",
}


def holds(op: str, value=None, name="space", record=RECORD, logical="and") -> bool:
    condition = MetadataCondition.model_validate(
        {"logical_operator": logical, "conditions": [{"name": [name] if isinstance(name, str) else name, "comparison_operator": op, "value": value}]}
    )
    predicate = compile_filter(condition)
    assert predicate is not None
    return predicate(record)


@pytest.mark.parametrize(
    "op,value,name,expected",
    [
        ("contains", "P", "space", True),
        ("contains", "x", "space", False),
        ("not contains", "x", "space", True),
        ("not contains", "OP", "space", False),
        ("start with", "OP", "space", True),
        ("start with", "PS", "space", False),
        ("end with", "PS", "space", True),
        ("end with", "OP", "space", False),
        ("is", "OPS", "space", True),
        ("is", "ops", "space", False),  # text comparison is case-sensitive
        ("is not", "OPS", "space", False),
        ("is not", "ENG", "space", True),
        ("in", ["ENG", "OPS"], "space", True),
        ("in", "ENG, OPS", "space", True),  # comma-separated string
        ("in", ["ENG"], "space", False),
        ("not in", ["ENG"], "space", True),
        ("not in", "OPS,ENG", "space", False),
        ("empty", None, "empty_text", True),
        ("empty", None, "space", False),
        ("not empty", None, "space", True),
        ("not empty", None, "empty_text", False),
        ("=", 3, "chunk_index", True),
        ("=", "3", "chunk_index", True),
        ("≠", 3, "chunk_index", False),
        ("≠", 4, "chunk_index", True),
        (">", 2, "chunk_index", True),
        (">", 3, "chunk_index", False),
        ("<", 4, "chunk_index", True),
        ("<", 3, "chunk_index", False),
        ("≥", 3, "chunk_index", True),
        ("≥", 3.5, "chunk_index", False),
        ("≤", 3, "chunk_index", True),
        ("≤", 2.9, "chunk_index", False),
        (">", 1000, "size", True),  # numeric strings compare as numbers
        ("before", "2025-04-01", "updated_at", True),
        ("before", "2025-03-10T11:00:00Z", "updated_at", False),
        ("after", "2025-03-10", "updated_at", True),
        ("after", 1741608000 + 1, "updated_at", False),  # Unix seconds; 1741608000 is the record's instant
        ("before", 1741608000 + 1, "updated_at", True),
        ("after", "2025-03-10T13:00:00+02:00", "updated_at", True),  # offsets are honoured
        ("is", "false", "draft", True),  # booleans compare by their JSON text
    ],
)
def test_each_operator(op, value, name, expected):
    assert holds(op, value, name) is expected


def test_list_fields_match_when_any_element_does():
    assert holds("is", "security", "labels")
    assert holds("contains", "run", "labels")
    assert holds("in", ["security", "other"], "labels")
    assert not holds("is", "secret", "labels")
    assert holds("not in", ["other"], "labels")
    assert not holds("not contains", "secur", "labels")


@pytest.mark.parametrize(
    "op,value,expected",
    [
        ("contains", "x", False), ("start with", "x", False), ("end with", "x", False), ("is", "x", False),
        ("in", ["x"], False), ("not empty", None, False), ("=", 1, False), (">", 1, False), ("<", 1, False),
        ("≥", 1, False), ("≤", 1, False), ("before", "2030-01-01", False), ("after", "1970-01-01", False),
        ("empty", None, True), ("not contains", "x", True), ("is not", "x", True), ("not in", ["x"], True), ("≠", 1, True),
    ],
)  # fmt: skip
def test_missing_field_fails_all_but_the_negations(op, value, expected):
    assert holds(op, value, "no_such_field") is expected


def test_null_field_counts_as_missing():
    assert holds("empty", None, "author", {"author": None})
    assert not holds("is", "x", "author", {"author": None})


def test_name_list_holds_when_any_name_holds():
    assert holds("is", "OPS", ["team", "space"])
    assert not holds("is", "ENG", ["team", "space"])


def test_and_or():
    both = {"conditions": [
        {"name": ["space"], "comparison_operator": "is", "value": "OPS"},
        {"name": ["source"], "comparison_operator": "is", "value": "notion"},
    ]}  # fmt: skip
    assert compile_filter(MetadataCondition.model_validate({**both, "logical_operator": "or"}))(RECORD)
    assert not compile_filter(MetadataCondition.model_validate({**both, "logical_operator": "and"}))(RECORD)
    assert not compile_filter(MetadataCondition.model_validate(both))(RECORD), "and is the default"
    assert not compile_filter(MetadataCondition.model_validate({**both, "logical_operator": None}))(RECORD)


def test_no_conditions_means_no_filter():
    assert compile_filter(None) is None
    assert compile_filter(MetadataCondition.model_validate({"logical_operator": "and", "conditions": []})) is None


@pytest.mark.parametrize("op,value", [(">", "abc"), ("≤", ""), ("before", "next tuesday"), ("after", [])])
def test_a_value_the_operator_cannot_use_matches_nothing_and_its_negation_everything(op, value):
    assert not holds(op, value, "chunk_index")
    assert not holds(op, value, "updated_at")
    condition = {"name": "chunk_index", "comparison_operator": op, "value": value}
    negated = MetadataCondition.model_validate({"logical_operator": "or", "conditions": [condition,
        {"name": "chunk_index", "comparison_operator": "≠", "value": "abc"}]})  # fmt: skip
    assert compile_filter(negated)(RECORD), "≠ 'abc': every number differs from 'abc'"


@pytest.mark.parametrize("op", ["is", "is not", "contains", "in", "not in", "=", ">", "before", "after"])
def test_a_condition_with_a_null_value_is_left_out_as_dify_does(op):
    left_out = {"name": "space", "comparison_operator": op, "value": None}
    kept = {"name": "space", "comparison_operator": "is", "value": "ENG"}
    assert compile_filter(MetadataCondition.model_validate({"conditions": [left_out]})) is None
    assert not compile_filter(MetadataCondition.model_validate({"conditions": [left_out, kept]}))(RECORD)


def test_a_list_value_holds_when_any_item_does():
    assert holds("is", ["ENG", "OPS"], "space")
    assert not holds("is", ["ENG", "HR"], "space")
    assert holds("is not", ["ENG", "HR"], "space")
    assert holds("contains", ["xx", "P"], "space")
    assert holds("≥", [100, 1], "chunk_index")


def test_string_name_is_accepted_as_a_list_of_one():
    condition = MetadataCondition.model_validate({"conditions": [{"name": "space", "comparison_operator": "is", "value": "OPS"}]})
    assert compile_filter(condition)(RECORD)
