"""What the rerank model's stage costs the gateway, against a fake model that answers at once.

    python -m bench.rerank_stage [--rounds 300]

One in-process gateway over the test documents (a `files` source), retrieving with and without the
stage, interleaved in rounds so that drift hits both alike. The fake model (TEI's shape) runs in a
process of its own, so the gateway's latency and CPU count only the stage's work on its side: building
the request, the loopback call, reading the answer and reordering. A real model adds its own inference
time to the latency (tens to hundreds of milliseconds for a cross-encoder over 20 passages).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aggregator.runtime.config import parse_config  # noqa: E402
from aggregator.contract.models import RetrievalRequest  # noqa: E402
from aggregator.retrieval.pipeline import retrieve  # noqa: E402
from aggregator.runtime.gateway import Gateway  # noqa: E402
from testkit.gateway import KEY, write_docs  # noqa: E402
from testkit.loopback import free_port, stop, until, wait_listening  # noqa: E402

FAKE = "import uvicorn; from testkit.fakes import rerank as r; s = r.FakeRerank(relevance={'签名': 0.9}); uvicorn.run(r.app(s), host='127.0.0.1', port={port}, log_level='warning')"


async def measure(rounds: int, url: str, docs: Path) -> dict[str, tuple[float, float]]:
    text = f"""
    server:
      api_keys: [{{key: {KEY}}}]
      cache_ttl_s: 0
      rerank: {{provider: tei, url: '{url}/tei', timeout_s: 1.0}}
    knowledge_bases:
      model: {{connectors: [docs]}}
      plain: {{connectors: [docs], rerank: {{enabled: false}}}}
    connectors:
      docs: {{type: files, path: {docs}}}
    """
    gateway = Gateway(parse_config(textwrap.dedent(text), {}))
    await gateway.start()
    await until(lambda: gateway.ready, 60, "the gateway's first sync")
    requests = {kb: RetrievalRequest.model_validate({"knowledge_id": kb, "query": "signing keys rotation 签名密钥 vpn profile",
                                                     "retrieval_setting": {"top_k": 5, "score_threshold": 0}}) for kb in ("plain", "model")}  # fmt: skip
    wall: dict[str, list[float]] = {kb: [] for kb in requests}
    cpu: dict[str, list[float]] = {kb: [] for kb in requests}
    for round_ in range(rounds + 20):
        for kb, request in requests.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            result = await retrieve(gateway, request)
            if round_ >= 20:  # warm-up: connections, caches
                wall[kb].append((time.perf_counter() - started) * 1000)
                cpu[kb].append((time.process_time() - cpu_started) * 1000)
            assert kb == "plain" or result.sources[-1].outcome == "ok", result.sources_header()
    await gateway.aclose()
    return {kb: (statistics.median(wall[kb]), statistics.mean(cpu[kb])) for kb in requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    port = free_port()
    fake = subprocess.Popen([sys.executable, "-c", FAKE.replace("{port}", str(port))], cwd=ROOT)
    try:
        wait_listening(port, fake, "the fake rerank model")
        with tempfile.TemporaryDirectory() as folder:
            found = asyncio.run(measure(args.rounds, f"http://127.0.0.1:{port}", write_docs(Path(folder) / "docs")))
    finally:
        stop(fake)
    (plain_wall, plain_cpu), (model_wall, model_cpu) = found["plain"], found["model"]
    print(f"{'':<22}{'p50 latency ms':>16}{'CPU ms / retrieval':>20}")
    print(f"{'fusion only':<22}{plain_wall:>16.2f}{plain_cpu:>20.2f}")
    print(f"{'+ rerank model stage':<22}{model_wall:>16.2f}{model_cpu:>20.2f}")
    print(f"{'stage overhead':<22}{model_wall - plain_wall:>16.2f}{model_cpu - plain_cpu:>20.2f}")


if __name__ == "__main__":
    main()
