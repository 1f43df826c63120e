"""Dify's `metadata_condition`, translated for upstreams that can filter by themselves.

The gateway's own post-filter (`aggregator/contract/conditions.py`) runs on every record
after the sources answer, so what a connector pushes down may be broader than
Dify's meaning, never narrower: a record the upstream leaves out is lost for
good. Two rules follow, written once here for every source:

- under `and`, a condition that cannot be translated is left out of what is
  sent: the upstream answers a superset and the post-filter trims it;
- under `or`, leaving one out would narrow the answer, so either every
  condition translates or nothing is pushed down.

A condition whose value is null is ignored by the gateway (as Dify does), so it
is never sent either. Only single-name conditions are translated: a list of
names means "any of them", which no upstream here spells.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aggregator.contract.conditions import as_text

Clause = TypeVar("Clause")
#: (field name, comparison_operator, value) -> the upstream's clause, or None when it has none as safe.
Translate = Callable[[str, str, Any], "Clause | None"]

#: Operators that hold for a record whose field is missing (see aggregator/contract/conditions.py).
NEGATIVE_OPERATORS = frozenset({"not contains", "is not", "not in", "≠", "empty"})


@dataclass(frozen=True, slots=True)
class PushedDown(Generic[Clause]):
    """What an upstream is asked to filter: its clauses, joined by `logical_operator`."""

    logical_operator: str
    clauses: list[Clause]


def push_down(condition: dict[str, Any] | None, translate: Translate[Clause]) -> PushedDown[Clause] | None:
    """The translatable part of a validated `metadata_condition`, or None when nothing can be pushed."""
    if not condition:
        return None
    logical_operator = condition.get("logical_operator") or "and"
    clauses: list[Clause] = []
    for item in condition.get("conditions") or []:
        operator, value = item.get("comparison_operator"), item.get("value")
        if value is None and operator not in ("empty", "not empty"):
            continue  # the gateway leaves it out too
        names = item.get("name") or []
        # A record's document_id is the gateway's `<source>:<id>` (base.record_document_id), which no upstream holds.
        clause = translate(names[0], operator, value) if len(names) == 1 and names[0] != "document_id" else None
        if clause is None:
            if logical_operator == "or":
                return None
            continue
        clauses.append(clause)
    return PushedDown(logical_operator, clauses) if clauses else None


def scalar_text(value: Any) -> str | None:
    """A single value as the gateway compares text (`3`, `true`), or None for a list."""
    return None if isinstance(value, list) else as_text(value)
