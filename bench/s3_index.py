"""Indexing 10,000 small objects from an S3-compatible server (moto, on loopback).

    python -m bench.s3_index [--objects 10000]

Reports the time and memory to index them through the `s3` connector and the
query latency over that index. Baseline, same run: the `files` connector over
the same 10,000 texts on local disk.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import sys
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._cranfield import load  # noqa: E402
from aggregator.state.sync import IndexedConnector  # noqa: E402
from connectors.base import Connector, SourceQuery  # noqa: E402
from testkit.loopback import free_port, wait_listening  # noqa: E402


def texts(count: int) -> list[str]:
    docs, _, _ = load()
    rng = random.Random(5)
    sentences = [s.strip() for d in docs for s in d.body.split(" . ") if len(s.split()) > 4]
    return [". ".join(rng.choice(sentences) for _ in range(3)) + "." for _ in range(count)]


async def measure(connector: Connector, queries: list[str]) -> tuple[float, float, list[float]]:
    gc.collect()
    tracemalloc.start()
    started = time.perf_counter()
    await connector.start()
    await connector.wait_ready(3600)  # type: ignore[attr-defined]
    build = time.perf_counter() - started
    gc.collect()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    latencies = []
    for text in queries:
        t = time.perf_counter()
        await connector.search(SourceQuery(text, 20))
        latencies.append((time.perf_counter() - t) * 1000)
    stats = connector.stats()
    assert stats is not None and stats.last_refresh_error is None, stats
    await connector.aclose()
    return build, held / 2**20, sorted(latencies)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=10_000)
    args = parser.parse_args()

    import boto3
    import subprocess

    from connectors.files import FilesSettings, FilesSource
    from connectors.s3 import S3Settings, S3Source

    corpus = texts(args.objects)
    _, queries, _ = load()
    query_texts = [q for _, q in queries[:200]]
    port = free_port()
    # Its own process, as a real store would be: in a thread it would share the GIL with the indexer.
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_listening(port, server, "moto's S3 server")
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench", aws_secret_access_key="bench")
        client.create_bucket(Bucket="bench")
        t = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item: client.put_object(Bucket="bench", Key=f"docs/{item[0]:05}.txt", Body=item[1].encode()), enumerate(corpus)))
        upload = time.perf_counter() - t
        s3 = IndexedConnector(S3Source("bench", S3Settings(bucket="bench", endpoint_url=url, access_key_id="bench", secret_access_key="bench", timeout_s=30)))
        s3_build, s3_mem, s3_lat = asyncio.run(measure(s3, query_texts))
    finally:
        server.terminate()
        server.wait(10)
    with tempfile.TemporaryDirectory() as folder:
        for i, text in enumerate(corpus):
            (Path(folder) / f"{i:05}.txt").write_text(text)
        files = IndexedConnector(FilesSource("bench", FilesSettings(path=Path(folder), watch=False)))
        f_build, f_mem, f_lat = asyncio.run(measure(files, query_texts))

    def p(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * (len(values) - 1)))]

    print(f"# {args.objects:,} objects of ~{sum(map(len, corpus)) // len(corpus)} characters (upload to the server took {upload:.1f} s)\n")
    print("| source | index build s | memory held MiB | query p50 ms | query p95 ms |\n| --- | ---: | ---: | ---: | ---: |")
    print(f"| s3 (moto on loopback) | {s3_build:.1f} | {s3_mem:.0f} | {p(s3_lat, .5):.2f} | {p(s3_lat, .95):.2f} |")
    print(f"| files, same texts on local disk (baseline) | {f_build:.1f} | {f_mem:.0f} | {p(f_lat, .5):.2f} | {p(f_lat, .95):.2f} |")
    print(f"| ratio s3 / files | {s3_build / f_build:.2f} | {s3_mem / f_mem:.2f} | {p(s3_lat, .5) / p(f_lat, .5):.2f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
