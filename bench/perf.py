"""What the gateway itself costs: latency overhead, throughput, rerank time, and a large local index.

    python -m bench.perf                 # everything (a few minutes)
    python -m bench.perf --only rerank   # one part: overhead, throughput, rerank, index, cpu
    python -m bench.perf --only cpu --baseline main   # CPU per retrieval, also of another commit in the same run

Every figure is compared with a baseline measured in the same run. All
traffic stays on loopback; servers are started by this script and stopped
at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._cpu import hammer, pct  # noqa: E402
from tests.loopback import free_port, wait_ready  # noqa: E402

KEY = "bench"


@contextlib.contextmanager
def processes(*commands: list[str]) -> Iterator[list[subprocess.Popen]]:
    started = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in commands]
    try:
        yield started
    finally:
        for p in started:
            p.terminate()
        for p in started:
            p.wait(10)


def wait_port(url: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.post(url + "/retrieval", json={}, timeout=2)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def upstreams(count: int, delay: float) -> Iterator[list[str]]:
    ports = [free_port() for _ in range(count)]
    with processes(*[[sys.executable, "-m", "bench._upstream", "--port", str(p), "--delay", str(delay)] for p in ports]):
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for url in urls:
            wait_port(url)
        yield urls


@contextlib.contextmanager
def gateway(urls: list[str]) -> Iterator[str]:
    connectors = "".join(
        f"  up{i}:\n    type: dify\n    endpoint: {u}\n    api_key: x\n    knowledge_id: kb\n    candidates: 20\n    retries: 0\n"
        for i, u in enumerate(urls)
    )
    names = ", ".join(f"up{i}" for i in range(len(urls)))
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "connectors.yaml"
        config.write_text(f"server:\n  api_keys: [{{key: {KEY}}}]\n  watch_config: false\nknowledge_bases:\n  kb: {{connectors: [{names}]}}\nconnectors:\n{connectors}")
        port = free_port()
        with processes([sys.executable, "-m", "aggregator", "serve", "--config", str(config), "--port", str(port), "--log-level", "warning"]):
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, timeout=30)
            yield url


BODY = {"knowledge_id": "kb", "query": "how do we rotate the release signing keys", "retrieval_setting": {"top_k": 5, "score_threshold": 0}}


async def sequential(url: str, n: int) -> list[float]:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as client:
        for _ in range(5):
            await client.post(url + "/retrieval", json=BODY)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            r = await client.post(url + "/retrieval", json=BODY)
            times.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200
        return times


def overhead() -> None:
    print("\n## Overhead: three upstreams that each take 150 ms\n")
    with upstreams(3, 0.15) as urls, gateway(urls) as gw:
        direct = asyncio.run(sequential(urls[0], 100))
        through = asyncio.run(sequential(gw, 100))
    print("| path | p50 ms | p99 ms |\n| --- | ---: | ---: |")
    print(f"| one upstream, called directly | {pct(direct, .5):.1f} | {pct(direct, .99):.1f} |")
    print(f"| gateway over three such upstreams | {pct(through, .5):.1f} | {pct(through, .99):.1f} |")
    print(f"| ratio | {pct(through, .5) / pct(direct, .5):.3f} | {pct(through, .99) / pct(direct, .99):.3f} |")


def throughput(seconds: float) -> None:
    print(f"\n## Throughput: 64 concurrent clients for {seconds:.0f} s, three fast upstreams\n")
    with upstreams(3, 0.0) as urls, gateway(urls) as gw:
        direct = asyncio.run(hammer(httpx.URL(urls[0]).port or 80, None, 64, seconds, [BODY["query"]]))
        through = asyncio.run(hammer(httpx.URL(gw).port or 80, None, 64, seconds, [BODY["query"]]))
    print("| target | requests/s | p50 ms | p99 ms | non-200 |\n| --- | ---: | ---: | ---: | ---: |")
    for label, run in (("one upstream directly", direct), ("gateway (3 upstreams per request)", through)):
        print(f"| {label} | {run['rps']:.0f} | {run['p50']:.1f} | {run['p99']:.1f} | {run['non200']:.0f} |")
    print(f"| ratio gateway / upstream | {through['rps'] / direct['rps']:.3f} | | | |")


def rerank_times() -> None:
    from rank_bm25 import BM25Okapi

    from aggregator.ranking.pool import TermCache
    from aggregator.ranking.rerank import Candidate, group, rank
    from aggregator.text.tokenize import tokenize
    from bench._cranfield import load
    from connectors.base import Passage

    docs, queries, _ = load()
    rng = random.Random(7)
    print("\n## Rerank: time per query (Cranfield passages, 20 queries)\n")
    print("| candidates | first sight: dedupe + tokenize + score, ms | seen before: dedupe + score, ms | seen before: score only (calibrate, fuse, sort), ms | rank-bm25 BM25Okapi, pre-tokenized, ms |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in (50, 200, 1000):
        pool = rng.sample(docs, n)
        # four sources, each with its own score scale, as the fusion meets them
        candidates = [
            Candidate(Passage(d.body, d.title, d.id, source_score=(10 ** (i % 4)) * rng.random(), source_rank=i // 4 + 1), f"s{i % 4}", "dify")
            for i, d in enumerate(pool)
        ]  # fmt: skip
        texts = [q for _, q in queries[:20]]
        cold, warm, score_only, okapi = [], [], [], []
        for text in texts:
            cache = TermCache()
            t = time.perf_counter()
            rank(text, group(candidates), cache)
            cold.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            unique = group(candidates)
            rank(text, unique, cache)
            warm.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            rank(text, unique, cache)
            score_only.append((time.perf_counter() - t) * 1000)
        tokenized = [tokenize(d.title) + tokenize(d.body) for d in pool]
        for text in texts:
            t = time.perf_counter()
            BM25Okapi(tokenized).get_scores(tokenize(text))
            okapi.append((time.perf_counter() - t) * 1000)
        print(f"| {n} | {statistics.median(cold):.2f} | {statistics.median(warm):.2f} | {statistics.median(score_only):.2f} | {statistics.median(okapi):.2f} |")


def index_scale(passages: int) -> None:
    from aggregator.text.tokenize import tokenize  # noqa: F401  (warm imports before measuring)
    from bench._cranfield import load
    from connectors.base import SourceQuery
    from connectors.files import FilesConnector, FilesSettings

    docs, queries, _ = load()
    sentences = [s.strip() for d in docs for s in d.body.split(" . ") if len(s.split()) > 4]
    rng = random.Random(11)
    print(f"\n## Index scale: a `files` source of {passages:,} passages\n")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        per_file = 10
        for f in range(passages // per_file):  # 10 paragraphs of ~1,000 characters per file: one passage each
            paragraphs = []
            for _ in range(per_file):
                text = ""
                while len(text) < 950:
                    text += rng.choice(sentences) + ". "
                paragraphs.append(text.strip())
            (root / f"doc{f:06}.txt").write_text("\n\n".join(paragraphs))

        async def run() -> tuple[float, int, int, list[float], int]:
            gc.collect()
            tracemalloc.start()
            connector = FilesConnector("big", FilesSettings(path=root, watch=False))
            t = time.perf_counter()
            await connector.start()
            await connector.wait_ready(3600)
            build = time.perf_counter() - t
            _, peak = tracemalloc.get_traced_memory()
            gc.collect()
            current, _ = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            times = []
            for _, text in queries[:200]:
                t = time.perf_counter()
                await connector.search(SourceQuery(text, 20))
                times.append((time.perf_counter() - t) * 1000)
            count = connector.stats().passages
            await connector.aclose()
            return build, current, peak, times, count

        build, current, peak, times, count = asyncio.run(run())
    print("| passages indexed | build s | memory held MiB | peak MiB | query p50 ms | query p95 ms |\n| ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {count:,} | {build:.1f} | {current / 2**20:.0f} | {peak / 2**20:.0f} | {pct(times, .5):.1f} | {pct(times, .95):.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["overhead", "throughput", "rerank", "index", "cpu"])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of the throughput run")
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=2000, help="cpu: retrievals per batch")
    parser.add_argument("--rounds", type=int, default=3, help="cpu: batches per server, alternating (the median counts)")
    parser.add_argument("--baseline", metavar="REV", help="cpu: also measure the gateway at this commit (e.g. main)")
    parser.add_argument("--all-clients", action="store_true", help="cpu: bare fan-outs over every HTTP client measured")
    parser.add_argument("--no-profile", action="store_true", help="cpu: skip the py-spy breakdown")
    args = parser.parse_args()
    print(f"# bench/perf.py on {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    from bench import _cpu

    parts = {
        "overhead": overhead, "throughput": lambda: throughput(args.seconds), "rerank": rerank_times,
        "index": lambda: index_scale(args.passages),
        "cpu": lambda: _cpu.run(args.requests, args.rounds, args.baseline, args.all_clients, not args.no_profile),
    }  # fmt: skip
    for name, part in parts.items():
        if args.only in (None, name):
            part()
    return 0


if __name__ == "__main__":
    sys.exit(main())
