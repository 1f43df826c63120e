"""The CISI collection (held out: run once with the settings tuned on Cranfield, never tuned on)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from ._cranfield import Doc

HOLDOUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "holdout" / "cisi"


def _records(text: str) -> dict[str, str]:
    """`.I <id>` records with a `.W` text (the simplified files hold nothing else)."""
    found: dict[str, str] = {}
    for block in re.split(r"^\.I\s+", text, flags=re.MULTILINE)[1:]:
        head, _, rest = block.partition("\n")
        body = rest.split(".W", 1)[1] if ".W" in rest else rest
        found[head.strip()] = " ".join(body.split())
    return found


def load(folder: Path = HOLDOUT) -> tuple[list[Doc], list[tuple[str, str]], dict[str, dict[str, int]]]:
    """Documents, judged (query id, text) pairs and binary judgements, in the shapes of `_cranfield.load`."""
    docs = [Doc(doc_id, "", text) for doc_id, text in _records((folder / "CISI_simplified.ALL").read_text()).items()]
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    for line in (folder / "CISI_simplified.REL").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            qrels[parts[0]][parts[1]] = 1
    queries = [(qid, text) for qid, text in _records((folder / "CISI_simplified.QRY").read_text()).items() if qrels.get(qid)]
    return docs, queries, dict(qrels)
