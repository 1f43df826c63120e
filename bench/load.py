"""Sustained load: 64 clients against a gateway, for faults and leaks, or side by side with a bare fan-out.

    python -m bench.load [--seconds 60] [--clients 64]
    python -m bench.load --compare [--baseline REV] [--seconds 20] [--rounds 2]

The first form runs a gateway over a folder and two upstreams, one of them
dead, and reports non-200 answers (the goal is none), latency, throughput,
and what the server process holds at the start and the end of the run
(resident memory, open file descriptors, asyncio tasks): none of them may
keep growing.

`--compare` puts the bare aiohttp + orjson fan-out (bench/_bare.py), the
gateway at REV (when given) and this tree's gateway in front of the same
three upstreams as `bench.perf --only cpu`, one after the other in rounds
(the order turning each round), and reports throughput, latency, non-200
answers and the server's peak resident memory, with ratios. The load
generator shares the machine: compare ratios from one run, not figures
across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import _cpu  # noqa: E402
from bench._cranfield import load  # noqa: E402
from bench._cpu import pct, rss_mib  # noqa: E402
from bench.perf import processes, upstreams  # noqa: E402
from tests.loopback import free_port, wait_ready  # noqa: E402

KEY = "load"


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def run(url: str, pid: int, clients: int, seconds: float, queries: list[str]) -> None:
    rng = random.Random(1)
    latencies: list[float] = []
    statuses: dict[int | str, int] = {}
    samples: list[tuple[float, float, int, int]] = []  # (t, rss, fds, tasks)
    import aiohttp  # far cheaper per request than httpx: the generator shares the cores with the server

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as client:
        started = time.monotonic()
        stop = started + seconds

        async def sampler() -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as ops:
                while time.monotonic() < stop:
                    async with ops.get(url + "/status") as answer:
                        tasks = (await answer.json())["tasks"]
                    samples.append((time.monotonic() - started, rss_mib(pid), open_fds(pid), tasks))
                    await asyncio.sleep(1.0)

        async def worker() -> None:
            while time.monotonic() < stop:
                body = json.dumps({"knowledge_id": "kb", "query": rng.choice(queries), "retrieval_setting": {"top_k": 5, "score_threshold": 0}})
                t = time.perf_counter()
                try:
                    async with client.post(url + "/retrieval", data=body, headers=headers) as response:
                        await response.read()
                        code: int | str = response.status
                except (aiohttp.ClientError, TimeoutError) as exc:  # counted, not hidden: a dropped connection is a failure too
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


def compare(clients: int, seconds: float, rounds: int, baseline: str | None) -> None:
    _, cranfield, _ = load()
    queries = [text for _, text in cranfield]
    targets = [_cpu.Target("bare fan-out: aiohttp + orjson", "bare")]
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if baseline:
            targets.append(_cpu.Target(f"gateway at {baseline}", "gateway", tree=_cpu.checkout(baseline, folder / "baseline")))
        targets.append(_cpu.Target("gateway (this tree)", "gateway"))
        urls = stack.enter_context(_cpu.pool_upstreams())
        config = _cpu.gateway_config(folder, urls)
        servers = {t.label: stack.enter_context(t.serve(urls, config)) for t in targets}
        for t in targets:
            _cpu.drive(servers[t.label][0], 300, queries, seed=1)  # warm: connections, caches
        runs: dict[str, list[dict[str, float]]] = {t.label: [] for t in targets}
        for r in range(rounds):
            for t in targets[r % len(targets):] + targets[: r % len(targets)]:
                port, process = servers[t.label]
                runs[t.label].append(asyncio.run(_cpu.hammer(port, process.pid, clients, seconds, queries, seed=r)))

    def mean(label: str, key: str) -> float:
        return statistics.fmean(run[key] for run in runs[label])

    bare, today = targets[0].label, targets[1].label if baseline else None
    print(f"# bench/load.py --compare: {clients} clients, {rounds} rounds of {seconds:.0f} s per server, three `dify` upstreams\n")
    print("| server | requests | requests/s | ratio to bare | p50 ms | p99 ms | p99 ratio to today | non-200 | peak memory MiB | memory ratio to today |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in targets:
        label = t.label
        p99_ratio = f"{mean(label, 'p99') / mean(today, 'p99'):.2f}" if today and t.kind == "gateway" else ""
        rss_ratio = f"{mean(label, 'rss') / mean(today, 'rss'):.2f}" if today and t.kind == "gateway" else ""
        print(f"| {label} | {sum(run['requests'] for run in runs[label]):,.0f} | {mean(label, 'rps'):.0f} | {mean(label, 'rps') / mean(bare, 'rps'):.2f} "
              f"| {mean(label, 'p50'):.1f} | {mean(label, 'p99'):.1f} | {p99_ratio} | {sum(run['non200'] for run in runs[label]):.0f} "
              f"| {max(run['rss'] for run in runs[label]):.0f} | {rss_ratio} |")  # fmt: skip
    print("\nPer round, requests/s: " + "; ".join(f"{t.label}: " + ", ".join(f"{run['rps']:.0f}" for run in runs[t.label]) for t in targets))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=None, help="per run (default 60; with --compare, 20 per server and round)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--compare", action="store_true", help="bare fan-out, the gateway at --baseline and this tree, same upstreams")
    parser.add_argument("--baseline", metavar="REV", help="with --compare: also the gateway at this commit (e.g. main)")
    parser.add_argument("--rounds", type=int, default=2, help="with --compare: rounds per server")
    args = parser.parse_args()
    if args.compare:
        compare(args.clients, args.seconds or 20.0, args.rounds, args.baseline)
        return 0
    args.seconds = args.seconds or 60.0
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
