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

Conditions are compiled once per request, so an unusable value (a number
operator given "abc") is reported as a bad request naming the condition,
rather than silently matching nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from .models import Condition, MetadataCondition

Predicate = Callable[[dict[str, Any]], bool]

NEGATIONS = {"not contains": "contains", "is not": "is", "not in": "in", "≠": "=", "empty": "not empty"}
STRING_OPS = {"contains", "start with", "end with", "is", "in", "not empty"}
NUMBER_OPS = {"=", ">", "<", "≥", "≤"}
DATE_OPS = {"before", "after"}


class InvalidCondition(ValueError):
    """A condition that cannot be evaluated; `field` says where it is in the request body."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


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


def _compile_one(op: str, value: Any, where: str) -> Callable[[Any], bool]:
    """A test of one field value for a positive operator (negations are built on top)."""
    if op == "not empty":
        return lambda field: not _is_empty(field)
    if op in ("contains", "start with", "end with", "is"):
        wanted = "" if value is None else as_text(value)
        if isinstance(value, (list, dict)):
            raise InvalidCondition(where, f"'{op}' takes a single value, not a {type(value).__name__}")
        check: Callable[[str], bool] = {
            "contains": lambda text: wanted in text,
            "start with": lambda text: text.startswith(wanted),
            "end with": lambda text: text.endswith(wanted),
            "is": lambda text: text == wanted,
        }[op]
        return lambda field: any(check(as_text(item)) for item in _elements(field))
    if op == "in":
        if value is None:
            raise InvalidCondition(where, "'in' needs a list or a comma-separated string")
        items = value if isinstance(value, list) else str(value).split(",") if isinstance(value, str) else [value]
        allowed = {as_text(item).strip() for item in items}
        return lambda field: any(as_text(item) in allowed for item in _elements(field))
    if op in NUMBER_OPS:
        target = as_number(value)
        if target is None:
            raise InvalidCondition(where, f"'{op}' needs a number, got {value!r}")
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
            raise InvalidCondition(where, f"'{op}' needs an ISO 8601 date or Unix seconds, got {value!r}")
        if op == "before":
            return lambda field: any((t := as_instant(item)) is not None and t < moment for item in _elements(field))
        return lambda field: any((t := as_instant(item)) is not None and t > moment for item in _elements(field))
    raise InvalidCondition(where, f"unknown comparison_operator {op!r}")  # the request model prevents this


def compile_condition(condition: Condition, where: str) -> Predicate:
    op = condition.comparison_operator
    positive_op = NEGATIONS.get(op, op)
    test = _compile_one(positive_op, condition.value, f"{where}.value")
    names = condition.name
    if op in NEGATIONS:
        return lambda metadata: any(not test(metadata.get(name)) for name in names)
    return lambda metadata: any(test(metadata.get(name)) for name in names)


def compile_filter(metadata_condition: MetadataCondition | None) -> Predicate | None:
    """One predicate for the whole `metadata_condition`, or None when there is nothing to check."""
    if metadata_condition is None or not metadata_condition.conditions:
        return None
    predicates = [
        compile_condition(condition, f"metadata_condition.conditions[{i}]")
        for i, condition in enumerate(metadata_condition.conditions)
    ]
    if metadata_condition.logical_operator == "or":
        return lambda metadata: any(p(metadata) for p in predicates)
    return lambda metadata: all(p(metadata) for p in predicates)
