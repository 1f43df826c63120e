"""Property-based tests: any Unicode, any JSON value, and the filter, tokenizer and chunker neither crash nor hang."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from aggregator.text.chunking import split_passages
from aggregator.contract.conditions import compile_filter
from aggregator.contract.models import MetadataCondition
from aggregator.text.tokenize import tokenize

FAST = settings(max_examples=200, deadline=1000)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
OPERATORS = ["contains", "not contains", "start with", "end with", "is", "is not", "in", "not in", "empty", "not empty",
             "=", "≠", ">", "<", "≥", "≤", "before", "after"]  # fmt: skip


@FAST
@given(
    op=st.sampled_from(OPERATORS) | st.text(max_size=10),
    names=json_values,
    value=json_values,
    logical=json_values,
    metadata=st.dictionaries(st.text(max_size=8), json_values, max_size=6),
)
def test_any_condition_is_rejected_cleanly_or_gives_a_boolean(op, names, value, logical, metadata):
    raw = {"logical_operator": logical, "conditions": [{"name": names, "comparison_operator": op, "value": value}]}
    try:
        predicate = compile_filter(MetadataCondition.model_validate(raw))
    except ValidationError:
        return
    if predicate is not None:
        assert predicate(metadata) in (True, False)
        for name in names if isinstance(names, list) else [names]:
            assert predicate({**metadata, name: value}) in (True, False)


@FAST
@given(st.text())
def test_tokenizer_on_any_text(text):
    terms = tokenize(text)
    assert all(isinstance(t, str) and t and not t.isspace() for t in terms)
    assert tokenize(text) == terms, "deterministic"
    assert tokenize(text + " " + text) == terms + terms, "a separator between copies adds nothing else"


@FAST
@given(st.text(), st.integers(min_value=50, max_value=3000))
def test_chunker_keeps_every_word_in_order_within_the_size(text, chunk_chars):
    passages = split_passages(text, chunk_chars)
    assert all(p.strip() and len(p) <= chunk_chars for p in passages)
    words = text.split()
    # every word of the input appears, in order, in the passages (overlap may repeat some)
    joined = " ".join(" ".join(p.split()) for p in passages)
    position = 0
    for word in words:
        found = joined.find(word, position)
        if found < 0:  # a word longer than a passage is cut into pieces; its pieces are there
            assert len(word) > chunk_chars // 2 or any(piece in joined for piece in re.findall(r".{1,40}", word))
            continue
        position = found + len(word)


@FAST
@given(st.text(alphabet=st.characters(max_codepoint=127)))
def test_the_ascii_shortcut_tokenizes_exactly_like_the_general_path(text):
    from aggregator.text.tokenize import tokenize_unicode

    assert tokenize(text) == tokenize_unicode(text)
