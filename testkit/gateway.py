"""A gateway under test: its API key, a folder of documents, its config, and asking it for passages.

    text = config_text({"docs": {"type": "files", "path": str(write_docs(tmp_path / "docs"))}}, cache_ttl_s=0)
    response = ask(url, "rotate the signing keys")          # over HTTP, as Dify asks
    result = await ask_gateway(gateway, "signing keys")     # in-process, through the pipeline

One way to write each: tests and benchmarks vary what they ask and which sources they configure, not how.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
import httpx
import yaml

from aggregator.contract.models import RetrievalRequest
from aggregator.retrieval.pipeline import RetrievalResult, retrieve
from aggregator.runtime.gateway import Gateway

#: The API key of every test config.
KEY = "test-key-0123456789"
#: The question the tests ask when the question itself does not matter (the README's first example).
QUERY = "rotate the signing keys"

DOCS = {
    "vpn.md": "# VPN setup\n\nInstall WireGuard and import the VPN profile from the IT portal.\n\nProfiles expire after 180 days.",
    "keys.md": "# Key rotation\n\nWe rotate the release signing keys every twelve months in the hardware security module.",
    "expenses.txt": "Expense reports\n\nSubmit receipts within thirty days. Meals are reimbursed up to the daily allowance.",
    "zh/请假.md": "# 请假制度\n\n员工每年享有十五天带薪年假，需要提前五个工作日申请。",
    "zh/密钥.md": "# 签名密钥轮换\n\n发布签名密钥每十二个月轮换一次，保存在硬件安全模块中。",
}


def write_docs(folder: Path, docs: Mapping[str, str] = DOCS) -> Path:
    """Write `docs` (relative path -> text) under `folder`, which is returned."""
    for relative, text in docs.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return folder


def config_text(
    connectors: Mapping[str, Mapping[str, object]],
    knowledge_bases: Mapping[str, object] | None = None,
    *,
    keys: list[Mapping[str, object]] | None = None,
    defaults: Mapping[str, object] | None = None,
    **server: object,
) -> str:
    """A connectors.yaml: `server` settings with the test key (or `keys`), optional `defaults`, the knowledge
    bases (by default `demo` over every connector; a value is a list of connector names or a knowledge base's
    own mapping) and the connectors, each a mapping of its fields."""
    bases = knowledge_bases if knowledge_bases is not None else {"demo": list(connectors)}
    document: dict[str, object] = {"server": {"api_keys": keys if keys is not None else [{"key": KEY}], **server}}
    if defaults:
        document["defaults"] = dict(defaults)
    document["knowledge_bases"] = {kb: {"connectors": v} if isinstance(v, list) else dict(v) for kb, v in bases.items()}  # type: ignore[call-overload]
    document["connectors"] = {name: dict(fields) for name, fields in connectors.items()}
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def retrieval_body(query: str = QUERY, kb: str = "demo", top_k: int = 5, threshold: float | None = 0.0, **fields: object) -> dict:
    """The body of a retrieval as Dify posts it; `fields` adds others (`metadata_condition`, ...)."""
    return {"knowledge_id": kb, "query": query, "retrieval_setting": {"top_k": top_k, "score_threshold": threshold}, **fields}


def ask(
    url: str,
    query: str = QUERY,
    kb: str = "demo",
    top_k: int = 5,
    threshold: float | None = 0.0,
    *,
    key: str = KEY,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    **fields: object,
) -> httpx.Response:
    """POST a retrieval to the gateway at `url`, on a connection of its own (with several workers, any may answer)."""
    return httpx.post(
        url + "/retrieval", json=retrieval_body(query, kb, top_k, threshold, **fields),
        headers={"Authorization": f"Bearer {key}", **(headers or {})}, timeout=timeout,
    )  # fmt: skip


async def ask_gateway(gateway: Gateway, query: str = QUERY, kb: str = "demo", top_k: int = 5, threshold: float | None = 0.0) -> RetrievalResult:
    """The same retrieval in-process, through the pipeline, without HTTP."""
    return await retrieve(gateway, RetrievalRequest.model_validate(retrieval_body(query, kb, top_k, threshold)))
