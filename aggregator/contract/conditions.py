"""Dify's `metadata_condition`, evaluated on each record's metadata.

Semantics (DESIGN section 1):
- A condition names one or more fields; it holds when it holds for any of them.
- String operators compare text, case-sensitively. `in` / `not in` take a list
  or a comma-separated string. Numbers and booleans are compared by their JSON
  text (`3`, `true`).
- `=` `≠` `>` `<` `≥` `≤` compare numbers; `before` / `after` compare instants
  (ISO 8601 date or datetime, naive taken as UTC, or Unix seconds).
- A field holding a list (labels, tags) satisfies a positive operator when any
  element does.
- A missing field (absent or null) fails every operator except `empty`,
  `not contains`, `is not`, `not in` and `≠`, which are the negations of
  `not empty`, `contains`, `is`, `in` and `=` and hold exactly when those fail.

Whatever Dify's models can produce is answered, never refused (Dify shows
its user any non-200 as an error page): a condition whose value is null is
left out, as Dify does when it filters its own knowledge bases; a list value
holds when any of its items does; a value the operator cannot use (a number
operator given "abc") matches nothing and is logged with its place.

What no Dify produces is refused with 400/3001 by the request model
(`aggregator/contract/models.py`): more values in a condition, more field names over
all conditions, or more (name, value) tests than a passage may cost. Within
those limits each field is read once per passage and each condition's values
are folded into one test (a set, a tuple, a bound, one pattern), so an indexed
source that tests every candidate stays inside the request's deadline.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from aggregator.contract.models import Condition, MetadataCondition

log = logging.getLogger(__name__)

Predicate = Callable[[dict[str, Any]], bool]

NEGATIONS = {"not contains": "contains", "is not": "is", "not in": "in", "≠": "=", "empty": "not empty"}
STRING_OPS = {"contains", "start with", "end with", "is", "in", "not empty"}
NUMBER_OPS = {"=", ">", "<", "≥", "≤"}
DATE_OPS = {"before", "after"}


def as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        try:
            number = float(str(value).strip())
        except ValueError:
            return None
    return number if math.isfinite(number) else None


def as_instant(value: Any) -> float | None:
    """Seconds since the epoch for a date, a datetime or a Unix time; None if unreadable."""
    number = as_number(value)
    if number is not None:
        return number
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _elements(value: Any) -> list[Any]:
    """The values a field offers to an operator: a list's items, or the value itself."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, set)):
        return [v for v in value if v is not None]
    return [value]


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, (list, tuple, set, dict)) and not value)


def _never(_values: Any) -> bool:
    return False


#: How a test reads a field: as it is, as texts, as numbers or as instants (each computed once per passage).
Reading = str
RAW, TEXTS, NUMBERS, INSTANTS = "raw", "texts", "numbers", "instants"
#: A positive test of one field, as its reading gives it.
FieldTest = Callable[[Any], bool]


def _read(field: Any, reading: Reading) -> Any:
    if reading == RAW:
        return field
    elements = _elements(field)
    if reading == TEXTS:
        return [as_text(item) for item in elements]
    convert = as_number if reading == NUMBERS else as_instant
    return [x for x in map(convert, elements) if x is not None]


def _values(value: Any) -> list[Any]:
    """The non-null values a condition compares with (a list value holds when any of its items does)."""
    items = value if isinstance(value, list) else [value]
    return [item for item in items if item is not None]


def listed(value: Any) -> list[str]:
    """The allowed values of `in` / `not in`: a list, or a comma-separated string, each as text, trimmed. The
    gateway's own filter and every pushdown to an upstream read them so."""
    items = value if isinstance(value, list) else value.split(",") if isinstance(value, str) else [value]
    return [as_text(item).strip() for item in items if item is not None]


def _text_test(op: str, wanted: list[str]) -> Callable[[str], bool]:
    """One test of a text against every wanted value at once: a set, a tuple or one substring search each.

    `in` and `is` are one hash lookup whatever the number of values; `start with` and `end with` one C
    call over a tuple; `contains` one substring search, or one scan by an alternation of the values.
    """
    if op in ("is", "in"):
        return frozenset(wanted).__contains__
    if op == "start with":
        prefixes = tuple(wanted)
        return lambda text: text.startswith(prefixes)
    if op == "end with":
        suffixes = tuple(wanted)
        return lambda text: text.endswith(suffixes)
    needles = list(dict.fromkeys(wanted))
    if len(needles) == 1:
        needle = needles[0]
        return lambda text: needle in text
    search = re.compile("|".join(map(re.escape, needles))).search  # one scan in C for all of them
    return lambda text: search(text) is not None


def _usable(values: list[Any], convert: Callable[[Any], float | None], needs: str, op: str, value: Any, where: str) -> list[float]:
    """The values `convert` can read; the others match nothing, and the condition's place is logged."""
    usable = [x for x in map(convert, values) if x is not None]
    if len(usable) < len(values):
        log.info("%s: '%s' needs %s, got %r; such a value matches nothing", where, op, needs, value)
    return usable


def _compile_one(op: str, value: Any, where: str) -> tuple[Reading, FieldTest]:
    """How to read a field, and the test of that reading for a positive operator (negations are built on top).

    Every value of the condition is folded into that one test (a set, a tuple, a
    bound), so its cost per field does not grow with Python loops over the
    values (one request must not stall the service).

    A value the operator cannot use (`>` given "abc", `before` given "soon")
    matches no field: no number is greater than "abc". It is logged, not
    refused, because Dify shows every non-200 to its user as an error page, and
    an automatic (LLM-written) filter can produce such values.
    """
    if op == "not empty":
        return RAW, lambda field: not _is_empty(field)
    values = _values(value)
    if op in STRING_OPS:
        wanted = listed(value) if op == "in" else [as_text(item) for item in values]
        if not wanted:
            return TEXTS, _never
        test = _text_test(op, wanted)
        return TEXTS, lambda texts: any(map(test, texts))
    if op in NUMBER_OPS:
        targets = _usable(values, as_number, "a number", op, value, where)
        if not targets:
            return NUMBERS, _never
        if op == "=":
            equal = frozenset(targets)
            return NUMBERS, lambda numbers: any(map(equal.__contains__, numbers))
        bound = min(targets) if op in (">", "≥") else max(targets)  # holding for any value: for the loosest one
        compare: Callable[[float], bool] = {
            ">": bound.__lt__, "<": bound.__gt__, "≥": bound.__le__, "≤": bound.__ge__,
        }[op]  # fmt: skip
        return NUMBERS, lambda numbers: any(map(compare, numbers))
    if op in DATE_OPS:
        moments = _usable(values, as_instant, "an ISO 8601 date or Unix seconds", op, value, where)
        if not moments:
            return INSTANTS, _never
        is_in_range = max(moments).__gt__ if op == "before" else min(moments).__lt__
        return INSTANTS, lambda instants: any(map(is_in_range, instants))
    raise ValueError(f"{where}: unknown comparison_operator {op!r}")  # the request model prevents this


class _Compiled:
    """A condition compiled: its field names, how it reads them, its test, and whether it is a negation."""

    __slots__ = ("names", "reading", "test", "negated")

    def __init__(self, names: tuple[str, ...], reading: Reading, test: FieldTest, negated: bool) -> None:
        self.names, self.reading, self.test, self.negated = names, reading, test, negated


def compile_condition(condition: Condition, where: str) -> _Compiled | None:
    """The condition compiled, or None when it has no value to compare with and so is left out.

    Dify itself leaves such conditions out when it filters its own knowledge
    bases (a condition added in its UI with the value still empty arrives as
    `"value": null`), so the gateway does the same.
    """
    op = condition.comparison_operator
    if condition.value is None and op not in ("empty", "not empty"):
        return None
    reading, test = _compile_one(NEGATIONS.get(op, op), condition.value, f"{where}.value")
    return _Compiled(tuple(dict.fromkeys(condition.name)), reading, test, op in NEGATIONS)


class Filter:
    """The whole `metadata_condition` as one predicate over a record's metadata.

    Each field a passage is asked about is read once per passage (as texts, numbers or
    instants), however many conditions name it, so the work per passage is one pass
    over the fields plus one folded test per (condition, name): bounded by the
    request model's limits (`MAX_FILTER_FIELDS`, `MAX_FILTER_TESTS`).
    """

    __slots__ = ("conditions", "any_of", "fields")

    def __init__(self, conditions: list[_Compiled], any_of: bool) -> None:
        self.conditions = conditions
        self.any_of = any_of
        #: The metadata names it reads: a source that knows which of them are the same for every passage of a
        #: document tests each document once.
        self.fields = frozenset(name for condition in conditions for name in condition.names)

    def __call__(self, metadata: dict[str, Any]) -> bool:
        read: dict[Any, Any] = {}
        for condition in self.conditions:
            holds = False
            texts = condition.reading == TEXTS
            for name in condition.names:
                key = name if texts else (name, condition.reading)  # texts, the usual reading, keyed by the bare name
                field = read.get(key, read)
                if field is read:
                    field = read[key] = _read(metadata.get(name), condition.reading)
                if condition.test(field) is not condition.negated:
                    holds = True
                    break
            if holds is self.any_of:  # `or`: one holding decides; `and`: one failing decides
                return holds
        return not self.any_of


def compile_filter(metadata_condition: MetadataCondition | None) -> Predicate | None:
    """One predicate for the whole `metadata_condition`, or None when there is nothing to check."""
    if metadata_condition is None:
        return None
    compiled = (
        compile_condition(condition, f"metadata_condition.conditions[{i}]")
        for i, condition in enumerate(metadata_condition.conditions)
    )
    conditions = [c for c in compiled if c is not None]
    if not conditions:
        return None
    return Filter(conditions, metadata_condition.logical_operator == "or")
