"""Sustained load: 64 clients for 60 s against a gateway over a folder and two upstreams, one of them dead.

    python -m bench.load [--seconds 60] [--clients 64]

Reports non-200 answers (the goal is none), latency, throughput, and what the
server process holds at the start and the end of the run (resident memory,
open file descriptors, asyncio tasks): none of them may keep growing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._cranfield import load  # noqa: E402
from bench.perf import pct, processes, upstreams  # noqa: E402
from tests.loopback import free_port, wait_ready  # noqa: E402

KEY = "load"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def run(url: str, pid: int, clients: int, seconds: float, queries: list[str]) -> None:
    rng = random.Random(1)
    latencies: list[float] = []
    statuses: dict[int | str, int] = {}
    samples: list[tuple[float, float, int, int]] = []  # (t, rss, fds, tasks)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=10, limits=limits) as client:
        started = time.monotonic()
        stop = started + seconds

        async def sampler() -> None:
            async with httpx.AsyncClient(timeout=5) as ops:
                while time.monotonic() < stop:
                    tasks = (await ops.get(url + "/status")).json()["tasks"]
                    samples.append((time.monotonic() - started, rss_mib(pid), open_fds(pid), tasks))
                    await asyncio.sleep(1.0)

        async def worker() -> None:
            while time.monotonic() < stop:
                body = {"knowledge_id": "kb", "query": rng.choice(queries), "retrieval_setting": {"top_k": 5, "score_threshold": 0}}
                t = time.perf_counter()
                try:
                    response = await client.post(url + "/retrieval", json=body)
                    code = response.status_code
                except httpx.TransportError as exc:  # counted, not hidden: a dropped connection is a failure too
                    code = f"{type(exc).__name__}"
                latencies.append((time.perf_counter() - t) * 1000)
                statuses[code] = statuses.get(code, 0) + 1

        await asyncio.gather(sampler(), *(worker() for _ in range(clients)))
        elapsed = time.monotonic() - started

    first = [s for s in samples if s[0] <= 10] or samples[:1]
    last = [s for s in samples if s[0] >= seconds - 10] or samples[-1:]

    def avg(rows: list[tuple[float, float, int, int]], i: int) -> float:
        return sum(r[i] for r in rows) / len(rows)

    total = len(latencies)
    non_200 = total - statuses.get(200, 0)
    print(f"# bench/load.py: {clients} clients, {seconds:.0f} s, a files source and two upstreams (one refusing connections)\n")
    print("| requests | non-200 | requests/s | p50 ms | p99 ms |\n| ---: | ---: | ---: | ---: | ---: |")
    print(f"| {total:,} | {non_200} | {total / elapsed:.0f} | {pct(latencies, .5):.1f} | {pct(latencies, .99):.1f} |\n")
    if non_200:
        print(f"answers other than 200: {dict((k, v) for k, v in statuses.items() if k != 200)}\n")
    print("| server process | first 10 s | last 10 s | growth |\n| --- | ---: | ---: | ---: |")
    for name, i in (("resident memory MiB", 1), ("open file descriptors", 2), ("asyncio tasks", 3)):
        a, b = avg(first, i), avg(last, i)
        print(f"| {name} | {a:.1f} | {b:.1f} | {(b - a) / a * 100 if a else 0:+.1f} % |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=64)
    args = parser.parse_args()
    docs, queries, _ = load()
    with tempfile.TemporaryDirectory() as folder, upstreams(1, 0.02) as (healthy,):
        for doc in docs:
            (Path(folder) / f"{doc.id}.txt").write_text(f"{doc.title}\n\n{doc.body}")
        dead = f"http://127.0.0.1:{free_port()}"
        config = Path(folder) / "connectors.yaml"
        config.write_text(
            f"server:\n  api_keys: [{{key: {KEY}}}]\n  watch_config: false\n"
            "knowledge_bases:\n  kb: {connectors: [docs, partner, dead]}\n"
            f"connectors:\n  docs: {{type: files, path: '{folder}', watch: false}}\n"
            f"  partner: {{type: dify, endpoint: '{healthy}', api_key: x, knowledge_id: kb}}\n"
            f"  dead: {{type: dify, endpoint: '{dead}', api_key: x, knowledge_id: kb}}\n"
        )
        port = free_port()
        command = [sys.executable, "-m", "aggregator", "serve", "--config", str(config), "--port", str(port), "--log-level", "warning"]
        with processes(command) as (server,):
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, timeout=60)
            asyncio.run(run(url, server.pid, args.clients, args.seconds, [q for _, q in queries]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
