"""Sustained load: 64 clients for 60 s against a gateway over a folder and two upstreams, one of them dead.

    python -m bench.load [--seconds 60] [--clients 64]
    python -m bench.load --replicas [--seconds 20]

Reports non-200 answers (the goal is none), latency, throughput, and what the
server process holds at the start and the end of the run (resident memory,
open file descriptors, asyncio tasks): none of them may keep growing.

`--replicas` runs the same load, in the same run, against one replica with the
embedded store (the baseline) and against two replicas sharing one PostgreSQL
(the index) and one Redis (breakers, health, the cache), the clients taking
turns between them as a load balancer would: with the response cache off, so
that every request does the whole work, and with it on (`cache_ttl_s: 5`, the
default), where the 225 queries repeat and its hit ratio is reported.
PostgreSQL and Redis come from Debian's packages (tests/servers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


async def hammer(urls: list[str], clients: int, seconds: float, queries: list[str], *also: Any) -> tuple[list[float], dict[int | str, int], float]:
    """`clients` loops posting random queries for `seconds`, taking turns between `urls`; (latencies ms, statuses, elapsed s).
    `also`: coroutines run alongside (a sampler)."""
    rng = random.Random(1)
    latencies: list[float] = []
    statuses: dict[int | str, int] = {}
    turn = itertools.cycle(urls)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=10, limits=limits) as client:
        started = time.monotonic()
        stop = started + seconds

        async def worker() -> None:
            while time.monotonic() < stop:
                body = {"knowledge_id": "kb", "query": rng.choice(queries), "retrieval_setting": {"top_k": 5, "score_threshold": 0}}
                t = time.perf_counter()
                try:
                    response = await client.post(next(turn) + "/retrieval", json=body)
                    code: int | str = response.status_code
                except httpx.TransportError as exc:  # counted, not hidden: a dropped connection is a failure too
                    code = f"{type(exc).__name__}"
                latencies.append((time.perf_counter() - t) * 1000)
                statuses[code] = statuses.get(code, 0) + 1

        await asyncio.gather(*also, *(worker() for _ in range(clients)))
        return latencies, statuses, time.monotonic() - started


async def run(url: str, pid: int, clients: int, seconds: float, queries: list[str]) -> None:
    samples: list[tuple[float, float, int, int]] = []  # (t, rss, fds, tasks)
    started = time.monotonic()

    async def sampler() -> None:
        async with httpx.AsyncClient(timeout=5) as ops:
            while time.monotonic() < started + seconds:
                tasks = (await ops.get(url + "/status")).json()["tasks"]
                samples.append((time.monotonic() - started, rss_mib(pid), open_fds(pid), tasks))
                await asyncio.sleep(1.0)

    latencies, statuses, elapsed = await hammer([url], clients, seconds, queries, sampler())
    first = [s for s in samples if s[0] <= 10] or samples[:1]
    last = [s for s in samples if s[0] >= seconds - 10] or samples[-1:]

    def avg(rows: list[tuple[float, float, int, int]], i: int) -> float:
        return sum(r[i] for r in rows) / len(rows)

    print(f"# bench/load.py: {clients} clients, {seconds:.0f} s, a files source and two upstreams (one refusing connections)\n")
    print("| requests | non-200 | requests/s | p50 ms | p99 ms |\n| ---: | ---: | ---: | ---: | ---: |")
    print(row(latencies, statuses, elapsed) + "\n")
    print("| server process | first 10 s | last 10 s | growth |\n| --- | ---: | ---: | ---: |")
    for name, i in (("resident memory MiB", 1), ("open file descriptors", 2), ("asyncio tasks", 3)):
        a, b = avg(first, i), avg(last, i)
        print(f"| {name} | {a:.1f} | {b:.1f} | {(b - a) / a * 100 if a else 0:+.1f} % |")


def row(latencies: list[float], statuses: dict[int | str, int], elapsed: float, *lead: str) -> str:
    total = len(latencies)
    non_200 = total - statuses.get(200, 0)
    others = {k: v for k, v in statuses.items() if k != 200}
    cells = [*lead, f"{total:,}", f"{non_200}" + (f" {others}" if others else ""), f"{total / elapsed:.0f}",
             f"{pct(latencies, .5):.1f}", f"{pct(latencies, .99):.1f}"]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def write_config(folder: Path, docs_folder: Path, healthy: str, dead: str, server_extra: str = "") -> Path:
    config = folder / "connectors.yaml"
    config.write_text(
        f"server:\n  api_keys: [{{key: {KEY}}}]\n  watch_config: false\n  state_dir: ./state\n{server_extra}"
        "knowledge_bases:\n  kb: {connectors: [docs, partner, dead]}\n"
        f"connectors:\n  docs: {{type: files, path: '{docs_folder}', watch: false}}\n"
        f"  partner: {{type: dify, endpoint: '{healthy}', api_key: x, knowledge_id: kb}}\n"
        f"  dead: {{type: dify, endpoint: '{dead}', api_key: x, knowledge_id: kb}}\n"
    )
    return config


def serve_command(config: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "aggregator", "serve", "--config", str(config), "--port", str(port), "--log-level", "warning"]


def run_replicas(clients: int, seconds: float, queries: list[str], docs_folder: Path, healthy: str, dead: str) -> None:
    """One replica with the embedded store, then two over PostgreSQL and Redis (cache off, then on), same run."""
    from tests.servers import postgres_server, redis_server

    print(f"# bench/load.py --replicas: {clients} clients, {seconds:.0f} s each, a files source (Cranfield), a healthy "
          "upstream and a dead one; two replicas take turns, as behind a load balancer\n")  # fmt: skip
    print("| setup | requests | non-200 | requests/s | p50 ms | p99 ms |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as work, postgres_server() as postgres, redis_server() as redis:
        work_path = Path(work)
        setups = [("one replica, embedded store (baseline)", 1, ""), ("two replicas, PostgreSQL + Redis, cache off", 2, "pg"),
                  ("two replicas, PostgreSQL + Redis, cache on (5 s)", 2, "pg+cache")]  # fmt: skip
        for label, count, kind in setups:
            extra = "  cache_ttl_s: 0\n"
            if kind:
                url = postgres.create_database(f"load_{kind.replace('+', '_')}")
                extra = f"  state_url: {url}\n  redis_url: {redis.url}\n" + ("" if "cache" in kind else extra)
            folders = [work_path / f"{kind or 'local'}-{i}" for i in range(count)]
            configs = []
            for folder in folders:
                folder.mkdir()
                configs.append(write_config(folder, docs_folder, healthy, dead, extra))
            ports = [free_port() for _ in configs]
            with processes(*[serve_command(c, p) for c, p in zip(configs, ports)]):
                urls = [f"http://127.0.0.1:{p}" for p in ports]
                for u in urls:
                    wait_ready(u, timeout=120)
                latencies, statuses, elapsed = asyncio.run(hammer(urls, clients, seconds, queries))
                cache = [httpx.get(u + "/status").json()["cache"] for u in urls]
            print(row(latencies, statuses, elapsed, label), flush=True)
            if "cache" in kind:
                hits = sum(c["hit"] + c["coalesced"] for c in cache)
                total = hits + sum(c["miss"] for c in cache)
                print(f"\ncache: {hits / total:.1%} of {total:,} retrievals answered without asking the sources "
                      f"({sum(c['hit'] for c in cache):,} hits, {sum(c['coalesced'] for c in cache):,} coalesced)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=None, help="length of each run (60; 20 with --replicas)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--replicas", action="store_true", help="one replica with the embedded store against two over PostgreSQL and Redis")
    args = parser.parse_args()
    seconds = args.seconds or (20.0 if args.replicas else 60.0)
    docs, queries, _ = load()
    with tempfile.TemporaryDirectory() as folder, upstreams(1, 0.02) as (healthy,):
        docs_folder = Path(folder) / "docs"
        docs_folder.mkdir()
        for doc in docs:
            (docs_folder / f"{doc.id}.txt").write_text(f"{doc.title}\n\n{doc.body}")
        dead = f"http://127.0.0.1:{free_port()}"
        texts = [q for _, q in queries]
        if args.replicas:
            run_replicas(args.clients, seconds, texts, docs_folder, healthy, dead)
            return 0
        config = write_config(Path(folder), docs_folder, healthy, dead, "  cache_ttl_s: 0\n")
        port = free_port()
        with processes(serve_command(config, port)) as (server,):
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, timeout=60)
            asyncio.run(run(url, server.pid, args.clients, seconds, texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
