"""The configuration examples of the search-API sources, in README.md and docs/, are valid configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from aggregator.runtime.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
TYPES = ("elasticsearch", "dify_dataset", "ragflow", "http")


def examples() -> list[tuple[str, str]]:
    found = []
    for name in ("README.md", "docs/search-sources.md"):
        for block in re.findall(r"```yaml\n(.*?)```", (ROOT / name).read_text(encoding="utf-8"), re.S):
            kinds = re.findall(r"^\s+type: (\w+)", block, re.M)
            if kinds and all(kind in TYPES for kind in kinds):
                found.append((f"{name}: {kinds[0]}", block if block.startswith("connectors:") else "connectors:\n" + block))
    return found


@pytest.mark.parametrize("where,block", examples(), ids=[w for w, _ in examples()])
def test_example_is_a_valid_config(where, block):
    names = list(yaml.safe_load(block)["connectors"])
    env = {var: "value-of-" + var.lower() for var in re.findall(r"\$\{(\w+)", block)}
    text = f"server: {{api_keys: [{{key: k}}]}}\nknowledge_bases: {{kb: {{connectors: {names}}}}}\n{block}"
    config = parse_config(text, env)
    assert {config.connectors[n].type for n in names} <= set(TYPES)


def test_every_type_has_examples_in_both_places():
    seen = {where for where, _ in examples()}
    assert seen == {f"{doc}: {kind}" for doc in ("README.md", "docs/search-sources.md") for kind in TYPES}
