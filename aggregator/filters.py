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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from .models import Condition, MetadataCondition

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


def _never(_field: Any) -> bool:
    return False


def _compile_one(op: str, value: Any, where: str) -> Callable[[Any], bool]:
    """A test of one field value for a positive operator (negations are built on top).

    A value the operator cannot use (`>` given "abc", `before` given "soon")
    makes a test that no field passes: no number is greater than "abc". It is
    logged, not refused, because Dify shows every non-200 to its user as an
    error page, and an automatic (LLM-written) filter can produce such values.
    """
    if op == "not empty":
        return lambda field: not _is_empty(field)
    if op == "in":
        items = value if isinstance(value, list) else str(value).split(",") if isinstance(value, str) else [value]
        allowed = {as_text(item).strip() for item in items if item is not None}
        return lambda field: any(as_text(item) in allowed for item in _elements(field))
    if isinstance(value, list):  # several values: the condition holds when it holds for any of them
        tests = [_compile_one(op, item, where) for item in value if item is not None]
        return lambda field: any(test(field) for test in tests)
    if op in ("contains", "start with", "end with", "is"):
        wanted = as_text(value)
        check: Callable[[str], bool] = {
            "contains": lambda text: wanted in text,
            "start with": lambda text: text.startswith(wanted),
            "end with": lambda text: text.endswith(wanted),
            "is": lambda text: text == wanted,
        }[op]
        return lambda field: any(check(as_text(item)) for item in _elements(field))
    if op in NUMBER_OPS:
        target = as_number(value)
        if target is None:
            log.info("%s: '%s' needs a number, got %r; the condition matches nothing", where, op, value)
            return _never
        compare: Callable[[float], bool] = {
            "=": lambda x: x == target,
            ">": lambda x: x > target,
            "<": lambda x: x < target,
            "≥": lambda x: x >= target,
            "≤": lambda x: x <= target,
        }[op]
        return lambda field: any((n := as_number(item)) is not None and compare(n) for item in _elements(field))
    if op in DATE_OPS:
        moment = as_instant(value)
        if moment is None:
            log.info("%s: '%s' needs an ISO 8601 date or Unix seconds, got %r; the condition matches nothing", where, op, value)
            return _never
        if op == "before":
            return lambda field: any((t := as_instant(item)) is not None and t < moment for item in _elements(field))
        return lambda field: any((t := as_instant(item)) is not None and t > moment for item in _elements(field))
    raise ValueError(f"{where}: unknown comparison_operator {op!r}")  # the request model prevents this


def compile_condition(condition: Condition, where: str) -> Predicate | None:
    """The condition as a predicate, or None when it has no value to compare with and so is left out.

    Dify itself leaves such conditions out when it filters its own knowledge
    bases (a condition added in its UI with the value still empty arrives as
    `"value": null`), so the gateway does the same.
    """
    op = condition.comparison_operator
    if condition.value is None and op not in ("empty", "not empty"):
        return None
    positive_op = NEGATIONS.get(op, op)
    test = _compile_one(positive_op, condition.value, f"{where}.value")
    names = condition.name
    if op in NEGATIONS:
        return lambda metadata: any(not test(metadata.get(name)) for name in names)
    return lambda metadata: any(test(metadata.get(name)) for name in names)


def compile_filter(metadata_condition: MetadataCondition | None) -> Predicate | None:
    """One predicate for the whole `metadata_condition`, or None when there is nothing to check."""
    if metadata_condition is None:
        return None
    compiled = (
        compile_condition(condition, f"metadata_condition.conditions[{i}]")
        for i, condition in enumerate(metadata_condition.conditions)
    )
    predicates = [p for p in compiled if p is not None]
    if not predicates:
        return None
    if metadata_condition.logical_operator == "or":
        return lambda metadata: any(p(metadata) for p in predicates)
    return lambda metadata: all(p(metadata) for p in predicates)
