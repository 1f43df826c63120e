"""Paraphrase and cross-language cases of `bench.quality`: where a semantic source's best answer lands.

A `dify` source answers like an embedding search (its best passage first, similarity 0.86, sharing no word
with the query; testkit/fakes/semantic.py's cases, one of them a Chinese question answered by an English
runbook, plus one more), beside a `files` folder of look-alikes that share the query's words. For each
case: the answer's place among the records at thresholds 0 and 0.5, in the source alone and in the mix,
with no judge, the local judge (WordLlama) and the API judge (all-MiniLM-L6-v2 behind the `openai`
provider, where it is installed), and whether the judge's model itself prefers the answer to its look-alike.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from aggregator.runtime.config import parse_config
from aggregator.runtime.gateway import Gateway
from testkit.fakes.semantic import ANSWERS, CASES, LOOKALIKES, semantic_config, semantic_upstream
from testkit.gateway import ask_gateway, write_docs
from testkit.loopback import serve

from . import _transformer
from ._semantic import embed

#: The look-alike of each case, by the case's order.
PAIRED = list(LOOKALIKES.values())
async def place(gateway: Gateway, kb: str, query: str, threshold: float) -> str:
    records = (await ask_gateway(gateway, query, kb, threshold=threshold)).records
    contents = [r["content"] for r in records]
    if ANSWERS[query] in contents:
        return f"{contents.index(ANSWERS[query]) + 1} of {len(contents)}"
    return f"— of {len(contents)}"


async def run() -> None:
    print("\nParaphrase and cross-language cases: the semantic source's answer, its place among the records"
          " (— : not among them).\n")  # fmt: skip
    print("| query | model prefers the answer | judge | alone, ≥ 0 | alone, ≥ 0.5 | mixed, ≥ 0 | mixed, ≥ 0.5 |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    with serve(semantic_upstream()) as endpoint, tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        folder = write_docs(Path(tmp) / "folder", LOOKALIKES)
        judges: dict[str, tuple[dict[str, object], Callable[[list[str]], np.ndarray]]] = {
            "none": ({}, embed), "local": ({"embeddings": {"provider": "local"}}, embed)}  # fmt: skip
        if _transformer.missing() is None:
            url = stack.enter_context(serve(_transformer.TransformerEndpoint().app()))
            judges["API"] = ({"embeddings": _transformer.judge(url)}, _transformer.embed)
        for judge, (server, model) in judges.items():
            gateway = Gateway(parse_config(semantic_config(endpoint, folder, True, **server), {}))
            await gateway.start()
            try:
                await gateway.slots["folder"].connector.wait_ready(60)  # type: ignore[attr-defined]
                for (query, (answer, *_)), lookalike in zip(CASES.items(), PAIRED):
                    q, a, look = model([query, answer, lookalike])
                    prefers = "yes" if q @ a > q @ look else "no"
                    cells = [await place(gateway, kb, query, t) for kb in ("alone", "mixed") for t in (0.0, 0.5)]
                    print(f"| {query} | {prefers} ({q @ a:.2f} vs {q @ look:.2f}) | {judge} | " + " | ".join(cells) + " |")
            finally:
                await gateway.aclose()
