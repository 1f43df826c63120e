"""The `dify` connector reads answers straight into typed records; whatever the answer holds, it keeps exactly
what reading it as plain JSON would keep."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.base import BadResponse
from connectors.dify import DifyAnswer, decode_answer, parse_records

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
metadata = st.dictionaries(st.sampled_from(["document_id", "path", "url", "chunk_index", "updated_at", "other"]), values, max_size=4)
records = st.one_of(
    st.fixed_dictionaries({}, optional={"content": st.text(max_size=12) | values, "score": values | st.floats(), "title": values,
                                        "metadata": metadata | values}),
    values,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(records, max_size=6))
def test_typed_decoding_keeps_what_plain_json_keeps(answer):
    body = json.dumps({"records": answer}).encode()
    assert parse_records(decode_answer(body, "up"), "up") == parse_records(json.loads(body), "up")


def test_a_usual_answer_is_decoded_without_a_dict_per_record_and_lenient_where_it_must_be():
    body = json.dumps({"records": [
        {"content": "first", "score": 0.9, "title": "A", "metadata": {"document_id": 7, "chunk_index": 2, "updated_at": "2024-01-01"}},
        {"content": "   ", "score": 0.8, "title": "blank"},
        {"content": "third", "score": "high", "title": None, "metadata": {"url": "https://kb/x"}},
    ]}).encode()  # fmt: skip
    decoded = decode_answer(body, "up")
    assert isinstance(decoded, DifyAnswer)
    first, third = parse_records(decoded, "up")
    assert (first.document_id, first.chunk_index, first.updated_at, first.source_score, first.source_rank) == ("7", 2, "2024-01-01", 0.9, 1)
    assert (third.title, third.document_id, third.source_score, third.source_rank) == ("", "https://kb/x", None, 3)


@pytest.mark.parametrize("body", [b"[]", b'{"records": {}}', b'{"data": []}', b"NaN"])
def test_an_answer_without_a_records_list_is_a_bad_response(body):
    with pytest.raises(BadResponse, match="no 'records' list"):
        parse_records(decode_answer(body, "up"), "up")


def test_json_only_the_standard_library_reads_still_gives_its_records():
    body = b'{"records": [{"content": "kept", "score": NaN, "title": "t"}, 3]}'
    [passage] = parse_records(decode_answer(body, "up"), "up")
    assert (passage.content, passage.source_score, passage.document_id) == ("kept", None, "t")


def test_conditions_on_the_gateways_document_id_stay_with_the_gateway():
    """A record's document_id is `<source>:<id>`, which the upstream never holds: pushing it would empty its answer."""
    from connectors._conditions import push_down
    from connectors.dify import pushable_condition

    on_id = {"name": ["document_id"], "comparison_operator": "start with", "value": "partner:ops/"}
    on_space = {"name": ["space"], "comparison_operator": "is", "value": "OPS"}
    assert pushable_condition({"logical_operator": "and", "conditions": [on_id, on_space]}) == {"logical_operator": "and", "conditions": [on_space]}
    assert pushable_condition({"logical_operator": "or", "conditions": [on_id, on_space]}) is None
    assert push_down({"logical_operator": "and", "conditions": [on_id]}, lambda n, o, v: (n, o, v)) is None
