"""An upstream that answers like an embedding search, and the cases it answers: a paraphrase or a Chinese question
whose answer shares no word with it, first with a cosine-like 0.86, beside two weaker passages; and look-alikes
for a `files` folder, passages that share the queries' words but answer none of them. tests/test_semantic.py
and bench's paraphrase scenarios ask the same cases.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from testkit.gateway import config_text

#: query -> (the answer by meaning, two weaker passages of the same collection)
CASES: dict[str, tuple[str, str, str]] = {
    "how do I get reimbursed for a business trip": (
        "Travel expense claims: file the expense report within ten working days of returning, with receipts for lodging and fares.",
        "Company cars are booked through the facilities desk.",
        "Conference attendance needs a manager's approval.",
    ),
    "我的电脑连不上公司网络怎么办": (
        "VPN troubleshooting: if the laptop cannot reach the corporate network, restart WireGuard and import a fresh profile.",
        "Printers on the third floor are managed by facilities.",
        "Password resets are done in the self-service portal.",
    ),
    "who do I call when production breaks at night": (
        "On-call escalation: outside office hours an outage pages the engineer on duty, who may wake the incident commander.",
        "Release notes are published every second Tuesday.",
        "The staging cluster is rebuilt every weekend.",
    ),
    "how long can I stay home after my child is born": (
        "Parental leave: employees receive sixteen weeks of paid leave following a birth or an adoption.",
        "Sick days need a doctor's note after three days.",
        "Public holidays follow the office's country calendar.",
    ),
}
#: Passages that share the queries' words and answer none of them.
LOOKALIKES = {
    "trip.md": "# Business trip visas\n\nHow do I get a visa for a business trip? Ask the travel desk for an invitation letter.",
    "network.md": "# 公司网络使用规定\n\n公司网络仅供工作使用，电脑须安装杀毒软件。",
    "night.md": "# Night builds\n\nProduction builds run at night; when one breaks, the build bot calls a retry.",
    "home.md": "# Working from home\n\nHow long can I work from home? Stay home up to two days a week after your manager agrees.",
}
ANSWERS = {query: texts[0] for query, texts in CASES.items()}


def semantic_upstream() -> FastAPI:
    app = FastAPI()

    @app.post("/retrieval")
    async def retrieval(body: dict) -> dict:
        texts = CASES[body["query"]]
        return {"records": [{"content": text, "title": f"Page {i}", "score": score, "metadata": {"document_id": f"p{i}"}}
                            for i, (text, score) in enumerate(zip(texts, (0.86, 0.62, 0.55)))]}  # fmt: skip

    return app


def semantic_config(endpoint: str, folder: Path, semantic: bool, **server: object) -> str:
    """`alone`: the upstream as a `dify` source (`wiki`, `semantic` as given); `mixed`: it beside a `files` folder."""
    wiki = {"type": "dify", "endpoint": endpoint, "api_key": "k", "knowledge_id": "x", "semantic": semantic}
    folder_source = {"type": "files", "path": str(folder), "watch": False}
    return config_text({"wiki": wiki, "folder": folder_source}, {"alone": ["wiki"], "mixed": ["wiki", "folder"]}, cache_ttl_s=0, **server)
