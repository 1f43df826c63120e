"""Sustained load: 64 clients for 60 s against a gateway over a folder and two upstreams, one of them dead.

    python -m bench.load [--seconds 60] [--clients 64]
    python -m bench.load --replicas [--seconds 20]
    python -m bench.load --compare [--baseline REV] [--seconds 20] [--rounds 2] [--workers N] [--floor]

Reports non-200 answers (the goal is none), latency, throughput, and what the
server process holds at the start and the end of the run (resident memory,
open file descriptors, asyncio tasks): none of them may keep growing.

`--replicas` runs the same load, in the same run, against one replica with the
embedded store (the baseline) and against two replicas sharing one PostgreSQL
(the index) and one Redis (breakers, health, the cache), the clients taking
turns between them as a load balancer would: with the response cache off, so
that every request does the whole work, and with it on (`cache_ttl_s: 5`, the
default), where the 225 queries repeat and its hit ratio is reported.
PostgreSQL and Redis come from Debian's packages (testkit/servers.py).

`--compare` puts the bare aiohttp + orjson fan-out (bench/_bare.py), the
gateway at REV (when given) and this tree's gateway, cache off, in front of
the same three upstreams as `bench.perf --only cpu`, one after the other in
rounds (the order turning each round), and reports throughput, latency,
non-200 answers, 200 answers missing a source (fast, but not the same
answer), and the server's peak resident memory, with ratios. The load
generator shares the machine: compare ratios from one run, not figures
across runs. `--floor` adds this tree with its rerank replaced by a sort on
the sources' scores (bench/_floor.py): what everything but the ranking costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import _cpu  # noqa: E402
from bench._cpu import hammer, pct, rss_mib  # noqa: E402
from bench._cranfield import load  # noqa: E402
from bench.perf import processes, upstreams  # noqa: E402
from testkit.loopback import free_port, wait_ready  # noqa: E402

KEY = "load"


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def run(url: str, pid: int, clients: int, seconds: float, queries: list[str]) -> None:
    samples: list[tuple[float, float, int, int]] = []  # (t, rss, fds, tasks)
    started = time.monotonic()

    async def sampler() -> None:
        async with httpx.AsyncClient(timeout=5) as ops:
            while time.monotonic() < started + seconds:
                tasks = (await ops.get(url + "/status")).json()["tasks"]
                samples.append((time.monotonic() - started, rss_mib(pid), open_fds(pid), tasks))
                await asyncio.sleep(1.0)

    round_ = await hammer([url], clients, seconds, queries, sampler(), key=KEY)
    latencies, statuses, elapsed = round_.latencies, round_.statuses, round_.elapsed
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
    from testkit.servers import postgres_server, redis_server

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
                round_ = asyncio.run(hammer(urls, clients, seconds, queries, key=KEY))
                latencies, statuses, elapsed = round_.latencies, round_.statuses, round_.elapsed
                cache = [httpx.get(u + "/status").json()["cache"] for u in urls]
            print(row(latencies, statuses, elapsed, label), flush=True)
            if "cache" in kind:
                hits = sum(c["hit"] + c["coalesced"] for c in cache)
                total = hits + sum(c["miss"] for c in cache)
                print(f"\ncache: {hits / total:.1%} of {total:,} retrievals answered without asking the sources "
                      f"({sum(c['hit'] for c in cache):,} hits, {sum(c['coalesced'] for c in cache):,} coalesced)")  # fmt: skip


def compare(clients: int, seconds: float, rounds: int, baseline: str | None, queries: list[str], workers: int = 1, floor: bool = False) -> None:
    """The bare fan-out, the gateway at `baseline` and this tree's, in turns, in front of the same upstreams.

    With `workers` > 1, this tree's gateway also as `serve --workers N` (a row of its own: not like for like
    with the one-process fan-out, but how a replica on an N-core machine is run)."""
    targets = [_cpu.Target("bare fan-out: aiohttp + orjson", "bare")]
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if baseline:
            targets.append(_cpu.Target(f"gateway at {baseline}", "gateway", tree=_cpu.checkout(baseline, folder / "baseline")))
        targets.append(_cpu.Target("gateway (this tree)", "gateway"))
        if floor:
            targets.append(_cpu.Target(_cpu.FLOOR_LABEL, "floor"))
        if workers > 1:
            targets.append(_cpu.Target(f"gateway (this tree), {workers} workers", "gateway", workers=workers))
        urls = stack.enter_context(_cpu.pool_upstreams())
        servers = {t.label: stack.enter_context(t.serve(urls, folder)) for t in targets}
        for t in targets:
            _cpu.drive(servers[t.label][0], 300, queries, seed=1)  # warm: connections, caches
        runs: dict[str, list[_cpu.Round]] = {t.label: [] for t in targets}
        for r in range(rounds):
            for t in targets[r % len(targets):] + targets[: r % len(targets)]:
                port, process = servers[t.label]
                runs[t.label].append(asyncio.run(hammer([f"http://127.0.0.1:{port}"], clients, seconds, queries, pid=process.pid, seed=r)))

    def mean(label: str, figure: Callable[[_cpu.Round], float]) -> float:
        return statistics.fmean(figure(run) for run in runs[label])

    def p99(run: _cpu.Round) -> float:
        return pct(run.latencies, 0.99)

    bare, today = targets[0].label, targets[1].label if baseline else None
    print(f"# bench/load.py --compare: {clients} clients, {rounds} rounds of {seconds:.0f} s per server, three `dify` upstreams, cache off\n")
    print("| server | requests | requests/s | ratio to bare | p50 ms | p99 ms | p99 ratio to today | non-200 | 200 missing a source | peak memory MiB | memory ratio to today |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in targets:
        label = t.label
        compared = today is not None and t.kind != "bare"
        p99_ratio = f"{mean(label, p99) / mean(today, p99):.2f}" if compared and today else ""
        rss_ratio = f"{mean(label, lambda r: r.peak_rss) / mean(today, lambda r: r.peak_rss):.2f}" if compared and today else ""
        print(f"| {label} | {sum(len(run.latencies) for run in runs[label]):,} | {mean(label, lambda r: r.rps):.0f} "
              f"| {mean(label, lambda r: r.rps) / mean(bare, lambda r: r.rps):.2f} | {mean(label, lambda r: pct(r.latencies, 0.5)):.1f} "
              f"| {mean(label, p99):.1f} | {p99_ratio} | {sum(run.non_200 for run in runs[label])} | {sum(run.missing for run in runs[label])} "
              f"| {max(run.peak_rss for run in runs[label]):.0f} | {rss_ratio} |")  # fmt: skip
    print("\nPer round, requests/s: " + "; ".join(f"{t.label}: " + ", ".join(f"{run.rps:.0f}" for run in runs[t.label]) for t in targets))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=None, help="length of each run (60; 20 with --replicas or --compare)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--replicas", action="store_true", help="one replica with the embedded store against two over PostgreSQL and Redis")
    parser.add_argument("--compare", action="store_true", help="bare fan-out, the gateway at --baseline and this tree, same upstreams")
    parser.add_argument("--baseline", metavar="REV", help="with --compare: also the gateway at this commit (e.g. main)")
    parser.add_argument("--rounds", type=int, default=2, help="with --compare: rounds per server")
    parser.add_argument("--workers", type=int, default=1, help="with --compare: also this tree's gateway with N worker processes")
    parser.add_argument("--floor", action="store_true", help="with --compare: also this tree with its rerank replaced by a sort (bench/_floor.py)")
    args = parser.parse_args()
    seconds = args.seconds or (20.0 if args.replicas or args.compare else 60.0)
    docs, queries, _ = load()
    if args.compare:
        compare(args.clients, seconds, args.rounds, args.baseline, [q for _, q in queries], args.workers, args.floor)
        return 0
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
