"""What an embedding judge behind an OpenAI-compatible API costs a retrieval's latency, against one embedding call.

    python -m bench.judge_api [--rounds 200] [--delay-ms 20]

Issue 22's goal: with an API judge, p50 latency at most today's plus one embedding call. One in-process
gateway over the test documents (a `files` source), with and without a judge, interleaved in rounds so that
drift hits both alike. The fake endpoint (testkit/fakes/embeddings.py, hashed vectors) runs in a process of its
own and waits `--delay-ms` before each answer, standing in for a model's inference time. Three rows:

- words only: the knowledge base without a judge (the baseline);
- judge, nothing cached: the judge's caches emptied before every retrieval, so the query is embedded beside
  the sources' calls and every passage in one batched call after them (the worst case);
- judge, passages seen before: the usual case for repeated and similar questions;

against one embedding call of the same batch measured alone, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aggregator.contract.models import RetrievalRequest  # noqa: E402
from aggregator.retrieval.embeddings import VectorCache  # noqa: E402
from aggregator.retrieval.pipeline import retrieve  # noqa: E402
from aggregator.runtime.config import parse_config  # noqa: E402
from aggregator.runtime.gateway import Gateway  # noqa: E402
from testkit.gateway import KEY, write_docs  # noqa: E402
from testkit.fakes.embeddings import API_KEY  # noqa: E402
from testkit.loopback import free_port, stop, until, wait_listening  # noqa: E402

FAKE = (
    "import uvicorn; from testkit.fakes.embeddings import FakeEmbeddings; "
    "f = FakeEmbeddings(real=False, mode='slow', delay_s={delay}); "
    "uvicorn.run(f.app(), host='127.0.0.1', port={port}, log_level='warning')"
)
QUERY = "signing keys rotation 签名密钥 vpn profile"


async def measure(rounds: int, url: str, docs: Path) -> dict[str, float]:
    text = f"""
    server:
      api_keys: [{{key: {KEY}}}]
      cache_ttl_s: 0
    knowledge_bases:
      plain: {{connectors: [docs]}}
      judged:
        connectors: [docs]
        embeddings: {{provider: openai, url: '{url}/v1', model: m, api_key: {API_KEY}, timeout_s: 2.0}}
    connectors:
      docs: {{type: files, path: {docs}}}
    """
    gateway = Gateway(parse_config(textwrap.dedent(text), {}))
    await gateway.start()
    await until(lambda: gateway.ready, 60, "the gateway's first sync")
    judge = gateway.judge("judged")
    assert judge is not None

    def request(kb: str) -> RetrievalRequest:
        return RetrievalRequest.model_validate({"knowledge_id": kb, "query": QUERY, "retrieval_setting": {"top_k": 5, "score_threshold": 0}})

    passages = 0
    wall: dict[str, list[float]] = {"words only": [], "judge, nothing cached": [], "judge, passages seen before": []}
    for round_ in range(rounds + 10):
        for label in wall:
            if label == "judge, nothing cached":
                judge.cache, judge.queries = VectorCache(judge.settings.cache_passages), type(judge.queries)()
            started = time.perf_counter()
            result = await retrieve(gateway, request("plain" if label == "words only" else "judged"))
            elapsed = (time.perf_counter() - started) * 1000
            if label != "words only":
                assert result.sources[-1].outcome == "ok", result.sources_header()
                passages = max(passages, len(judge.cache))
            if round_ >= 10:  # warm-up: connections
                wall[label].append(elapsed)
    await gateway.aclose()
    found = {label: statistics.median(times) for label, times in wall.items()}
    async with httpx.AsyncClient() as client:  # one embedding call of the same batch, alone
        body = {"model": "m", "input": [f"passage {i} " * 100 for i in range(passages)]}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        alone = []
        for _ in range(rounds // 4 + 5):
            started = time.perf_counter()
            (await client.post(f"{url}/v1/embeddings", json=body, headers=headers)).raise_for_status()
            alone.append((time.perf_counter() - started) * 1000)
    found[f"one embedding call of {passages} passages, alone"] = statistics.median(alone[5:])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--delay-ms", type=float, default=20.0, help="the fake model's inference time per call")
    args = parser.parse_args()
    port = free_port()
    fake = subprocess.Popen([sys.executable, "-c", FAKE.format(delay=args.delay_ms / 1000, port=port)], cwd=ROOT)
    try:
        wait_listening(port, fake, "the fake embedding model")
        with tempfile.TemporaryDirectory() as folder:
            found = asyncio.run(measure(args.rounds, f"http://127.0.0.1:{port}", write_docs(Path(folder) / "docs")))
    finally:
        stop(fake)
    base = found["words only"]
    print(f"# bench/judge_api.py: the fake model answers after {args.delay_ms:g} ms; {args.rounds} rounds\n")
    print("| retrieval | p50 ms | over words only, ms |")
    print("| --- | ---: | ---: |")
    for label, p50 in found.items():
        extra = "" if label.startswith("one embedding call") or label == "words only" else f"{p50 - base:.2f}"
        print(f"| {label} | {p50:.2f} | {extra} |")


if __name__ == "__main__":
    main()
