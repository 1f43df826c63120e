"""CPU per retrieval: the server process's own CPU time, read from /proc, against a bare fan-out in the same run.

Setup (issue 16): three loopback `dify` upstreams, each answering 20
passages of about 800 characters drawn from a pool of 1,000; Cranfield
queries; 8 client threads, each with one keep-alive connection. The CPU
time of the server process (user + system, every thread) is read from
`/proc/<pid>/stat` before and after a batch of requests, so neither the
upstreams nor the client count, and other load on the machine changes the
figure little. The breakdown by stage comes from py-spy's samples of the
server (on-CPU samples only), each sample assigned to the stage of its
innermost recognised frame, scaled to the measured CPU time.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testkit.loopback import free_port, stop, wait_ready  # noqa: E402

KEY = "bench"
FLOOR_LABEL = "this tree without its rerank (a sort on source scores: bench/_floor.py)"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
POOL = 1000
THREADS = 8


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat(5))


@contextlib.contextmanager
def started(command: list[str], cwd: Path = ROOT, port: int | None = None) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if port is not None:
            wait_ready(f"http://127.0.0.1:{port}", 60, process, ready=(200, 404))  # 404: a bare fan-out has no /readyz
        yield process
    finally:
        stop(process)


@contextlib.contextmanager
def pool_upstreams(count: int = 3, delay: float = 0.0) -> Iterator[list[str]]:
    """`count` upstreams drawing 20 passages per answer from one pool of 1,000, each with its own random stream."""
    ports = [free_port() for _ in range(count)]
    with contextlib.ExitStack() as stack:
        for i, port in enumerate(ports):
            command = [sys.executable, "-m", "bench._upstream", "--port", str(port), "--pool", str(POOL), "--seed", str(i), "--delay", str(delay)]
            stack.enter_context(started(command, port=port))
        yield [f"http://127.0.0.1:{p}" for p in ports]


def gateway_config(folder: Path, urls: list[str], tree: Path = ROOT, judge: bool = False) -> Path:
    """A knowledge base of the `urls` as `dify` sources, for the gateway of `tree`. The response cache is off
    where the tree has one: the queries repeat, and a cache hit would measure the cache, not the retrieval."""
    connectors = "".join(f"  up{i}:\n    type: dify\n    endpoint: {u}\n    api_key: x\n    knowledge_id: kb\n    retries: 0\n" for i, u in enumerate(urls))
    names = ", ".join(f"up{i}" for i in range(len(urls)))
    config_module = next(p for p in (tree / "aggregator" / "runtime" / "config.py", tree / "aggregator" / "config.py") if p.exists())
    cache = "  cache_ttl_s: 0\n" if "cache_ttl_s" in config_module.read_text() else ""  # a tree before the cache has none
    if judge:  # the embedding judge in process (WordLlama): what a static local model costs per retrieval
        cache += "  embeddings: {provider: local}\n"
    config = folder / f"connectors-{abs(hash(str(tree))):x}{'-judge' if judge else ''}.yaml"
    config.write_text(f"server:\n  api_keys: [{{key: {KEY}}}]\n  watch_config: false\n{cache}"
                      f"knowledge_bases:\n  kb: {{connectors: [{names}]}}\nconnectors:\n{connectors}")  # fmt: skip
    return config


def checkout(revision: str, into: Path) -> Path:
    """The tree of `revision` of this repository (for measuring an earlier commit in the same run), with its
    compiled parts built in place when it has any (setup.py), as an install of it would have them."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    if (into / "setup.py").exists():
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=into, check=False, capture_output=True)
    return into


@dataclass
class Target:
    """A server to measure: a label and how to start it on a port."""

    label: str
    kind: str  # "gateway", "floor" (the gateway without its rerank: bench/_floor.py) or "bare"
    tree: Path = ROOT  # the source tree a gateway runs from
    client: str = "aiohttp"  # bare only
    codec: str = "orjson"  # bare only
    workers: int = 1  # gateway only: `serve --workers N`
    judge: bool = False  # gateway only: with the local embedding judge

    def command(self, port: int, urls: list[str], folder: Path) -> list[str]:
        if self.kind == "bare":
            return [sys.executable, "-m", "bench._bare", "--port", str(port), "--client", self.client, "--json", self.codec, *urls]
        config = gateway_config(folder, urls, self.tree, self.judge)
        workers = ["--workers", str(self.workers)] if self.workers > 1 else []
        module = "bench._floor" if self.kind == "floor" else "aggregator"
        return [sys.executable, "-m", module, "serve", "--config", str(config), "--port", str(port), "--log-level", "warning", *workers]

    @contextlib.contextmanager
    def serve(self, urls: list[str], folder: Path) -> Iterator[tuple[int, subprocess.Popen]]:
        """The server on a free port (a gateway's config is written in `folder`)."""
        port = free_port()
        # The gateway's package comes from the tree it runs in (python -m puts the working directory first).
        with started(self.command(port, urls, folder), cwd=self.tree if self.kind == "gateway" else ROOT, port=port) as process:
            yield port, process


@dataclass
class Batch:
    requests: int
    seconds: float
    cpu_s: float
    statuses: dict[int | str, int] = field(default_factory=dict)

    @property
    def cpu_ms(self) -> float:
        return self.cpu_s * 1000 / self.requests


def missing_source(x_sources: str | None) -> bool:
    """Whether a gateway's answer lacks a source (timed out, failed, skipped by its breaker): such a 200 costs
    less and comes faster, but it is not the answer being measured. The bare fan-out sends no X-Sources."""
    return any(part.partition("=")[2] not in ("ok", "empty") for part in (x_sources or "").split(";") if part)


def drive(port: int, requests: int, queries: list[str], threads: int = THREADS, seed: int = 3) -> tuple[float, dict[int | str, int]]:
    """`requests` retrievals from `threads` threads, each on one keep-alive connection; (seconds, statuses)."""
    lock = threading.Lock()
    issued = 0
    statuses: dict[int | str, int] = {}
    rng = random.Random(seed)
    bodies = [json.dumps({"knowledge_id": "kb", "query": q, "retrieval_setting": {"top_k": 5, "score_threshold": 0}}).encode()
              for q in rng.choices(queries, k=requests)]  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def worker() -> None:
        nonlocal issued
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            with lock:
                if issued >= requests:
                    break
                body = bodies[issued]
                issued += 1
            try:
                connection.request("POST", "/retrieval", body, headers)
                response = connection.getresponse()
                response.read()
                code: int | str = response.status
                if code == 200 and missing_source(response.getheader("X-Sources")):
                    code = "200 missing a source"
            except (OSError, http.client.HTTPException) as exc:
                code = type(exc).__name__
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            with lock:
                statuses[code] = statuses.get(code, 0) + 1
        connection.close()

    started_at = time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - started_at, statuses


def measure(port: int, pid: int, requests: int, queries: list[str], seed: int = 3) -> Batch:
    before = cpu_seconds(pid)
    seconds, statuses = drive(port, requests, queries, seed=seed)
    return Batch(requests, seconds, cpu_seconds(pid) - before, statuses)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the workers of `serve --workers N`, and helpers such as
    multiprocessing's resource tracker), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and its children."""
    return rss_mib(pid) + sum(rss_mib(child) for child in children(pid))


@dataclass
class Round:
    """One load round's figures."""

    latencies: list[float]  # ms, one per request
    statuses: dict[int | str, int]  # HTTP status or the transport error's name -> count
    elapsed: float  # s
    missing: int = 0  # 200 answers without some source's passages (see missing_source)
    peak_rss: float = 0.0  # MiB, of the process given as `pid` and its children

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.elapsed

    @property
    def non_200(self) -> int:
        return len(self.latencies) - self.statuses.get(200, 0)


async def hammer(
    urls: list[str], clients: int, seconds: float, queries: list[str], *also: Awaitable[Any], key: str = KEY, pid: int | None = None,
    seed: int = 1,
) -> Round:  # fmt: skip
    """`clients` loops posting random queries for `seconds`, each on its own keep-alive connection, taking turns
    between `urls` (replicas behind a balancer); `also`: coroutines run alongside (a sampler); with `pid`, that
    process's peak resident memory. aiohttp: far cheaper per request than httpx, and the generator shares the
    cores with what it measures."""
    import aiohttp

    rng = random.Random(seed)
    turn = itertools.cycle(urls)
    result = Round([], {}, 0.0)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=aiohttp.ClientTimeout(total=10)) as session:
        started = time.monotonic()
        stop = started + seconds

        async def client() -> None:
            while time.monotonic() < stop:
                body = json.dumps({"knowledge_id": "kb", "query": rng.choice(queries), "retrieval_setting": {"top_k": 5, "score_threshold": 0}})
                t = time.perf_counter()
                try:
                    async with session.post(next(turn) + "/retrieval", data=body, headers=headers) as response:
                        await response.read()
                        code: int | str = response.status
                        result.missing += code == 200 and missing_source(response.headers.get("X-Sources"))
                except (aiohttp.ClientError, TimeoutError) as exc:  # counted, not hidden: a dropped connection is a failure too
                    code = type(exc).__name__
                result.latencies.append((time.perf_counter() - t) * 1000)
                result.statuses[code] = result.statuses.get(code, 0) + 1

        async def memory() -> None:
            while pid is not None and time.monotonic() < stop:
                result.peak_rss = max(result.peak_rss, tree_rss_mib(pid))
                await asyncio.sleep(0.5)

        await asyncio.gather(memory(), *also, *(client() for _ in range(clients)))
        result.elapsed = time.monotonic() - started
    return result


# -- where the time goes ---------------------------------------------------------------------------------

STAGES = (
    "request parsing and auth",
    "fan-out and HTTP client",
    "decoding answers",
    "tokenizing",
    "rerank, filter and records",
    "encoding the answer",
    "health, metrics, log line",
    "server: uvicorn, Starlette, FastAPI",
    "event loop and other",
)

#: (stage, path fragment, function names or None for any): a sample goes to the stage of its innermost frame
#: that matches a rule (rules tried in order for each frame, innermost frame first).
RULES: tuple[tuple[str, str, frozenset[str] | None], ...] = (
    ("tokenizing", "aggregator/text/tokenize.py", None),
    ("decoding answers", "connectors/http.py", frozenset({"decode_json", "loads"})),
    ("decoding answers", "connectors/dify.py", frozenset({"decode_answer", "parse_records"})),
    ("request parsing and auth", "aggregator/web/api.py", frozenset({"parse_request", "find_key", "bearer_token", "read_body", "describe_validation_error"})),
    ("request parsing and auth", "aggregator/contract/models.py", None),
    ("encoding the answer", "starlette/responses.py", frozenset({"render"})),
    ("encoding the answer", "aggregator/web/api.py", frozenset({"render", "encode_json"})),
    ("rerank, filter and records", "aggregator/ranking/", None),
    ("rerank, filter and records", "aggregator/contract/conditions.py", None),
    ("rerank, filter and records", "connectors/base.py", frozenset({"record_metadata"})),
    ("health, metrics, log line", "aggregator/runtime/service.py", None),
    ("health, metrics, log line", "aggregator/ops/health.py", None),
    ("health, metrics, log line", "aggregator/ops/history.py", None),
    ("health, metrics, log line", "aggregator/ops/metrics.py", None),
    ("health, metrics, log line", "prometheus_client/", None),
    ("health, metrics, log line", "logging/", None),
    ("fan-out and HTTP client", "aggregator/retrieval/fanout.py", None),
    ("fan-out and HTTP client", "aggregator/retrieval/breaker.py", None),
    ("fan-out and HTTP client", "aggregator/ops/tracing.py", None),
    ("fan-out and HTTP client", "opentelemetry/", None),
    ("fan-out and HTTP client", "connectors/", None),
    *(("fan-out and HTTP client", f"{package}/", None) for package in ("aiohttp", "httpx", "httpcore", "httpx_aiohttp", "anyio", "h11", "yarl", "multidict", "aiohappyeyeballs", "idna", "ssl")),
    ("rerank, filter and records", "aggregator/retrieval/pipeline.py", None),
    ("rerank, filter and records", "bench/_floor.py", None),
    ("server: uvicorn, Starlette, FastAPI", "aggregator/web/api.py", None),
    *(("server: uvicorn, Starlette, FastAPI", f"{package}/", None) for package in ("uvicorn", "starlette", "fastapi", "httptools", "h11")),
)


#: Where the event loop itself runs: a sample whose innermost recognised frame is this is the loop's own work
#: (uvloop's C code: polling, reading sockets, scheduling), not the request handler's above it in the stack.
LOOP_ENTRIES = frozenset({"Runner.run", "BaseEventLoop.run_forever", "BaseEventLoop.run_until_complete", "BaseEventLoop._run_once"})


def stage_of(stack: list[str]) -> str:
    """`stack`: py-spy frames, outermost first, each `function (path:line)`."""
    for frame in reversed(stack):
        function, _, where = frame.partition(" (")
        if function in LOOP_ENTRIES:
            return "event loop and other"
        name = function.rsplit(".", 1)[-1]  # py-spy qualifies names: JSONResponse.render, create_app.<locals>.answer
        for stage, fragment, functions in RULES:
            if fragment in where and (functions is None or name in functions):
                return stage
    return "event loop and other"


def breakdown(raw: str) -> dict[str, float]:
    """Share of on-CPU samples per stage, from py-spy's raw (collapsed) output."""
    counts = dict.fromkeys(STAGES, 0)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[stage_of(stack.split(";"))] += int(count)
    total = sum(counts.values()) or 1
    return {stage: n / total for stage, n in counts.items()}


def profile(port: int, pid: int, requests: int, queries: list[str]) -> dict[str, float] | None:
    """Stage shares from py-spy attached while `requests` more retrievals run; None when py-spy cannot attach."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return None
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "stacks.txt"
        recorder = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "1000", "--nonblocking", "--format", "raw", "--output", str(out)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        time.sleep(1.0)
        if recorder.poll() is not None:
            return None
        drive(port, requests, queries, seed=11)
        recorder.send_signal(signal.SIGINT)
        try:
            recorder.wait(30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            return None
        return breakdown(out.read_text()) if out.exists() else None


def run(requests: int = 2000, rounds: int = 3, baseline: str | None = None, all_clients: bool = False, profiled: bool = True,
        floor: bool = False, judge: bool = False) -> None:  # fmt: skip
    from bench._cranfield import load

    _, cranfield, _ = load()
    queries = [text for _, text in cranfield]
    reference = Target("bare fan-out: aiohttp + orjson (reference)", "bare", client="aiohttp", codec="orjson")
    targets = [reference, Target("bare fan-out: httpx + stdlib json", "bare", client="httpx", codec="stdlib")]
    if all_clients:
        targets += [
            Target("bare fan-out: httpx + orjson", "bare", client="httpx", codec="orjson"),
            Target("bare fan-out: httpx over httpx-aiohttp + orjson", "bare", client="httpx-aiohttp", codec="orjson"),
            Target("bare fan-out: the gateway's client factory + orjson", "bare", client="factory", codec="orjson"),
        ]
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if baseline:
            tree = checkout(baseline, folder / "baseline")
            targets.append(Target(f"gateway at {baseline}", "gateway", tree=tree))
        targets.append(Target("gateway (this tree)", "gateway"))
        if judge:
            targets.append(Target("gateway (this tree), local embedding judge", "gateway", judge=True))
        if floor:
            targets.append(Target(FLOOR_LABEL, "floor"))
        urls = stack.enter_context(pool_upstreams())
        servers = {t.label: stack.enter_context(t.serve(urls, folder)) for t in targets}
        for t in targets:  # warm up: connections, caches of passages and queries seen before (each seen many times over)
            drive(servers[t.label][0], 300 if t.kind == "bare" else 2000, queries, seed=1)
        batches: dict[str, list[Batch]] = {t.label: [] for t in targets}
        for r in range(rounds):
            for t in targets:
                port, process = servers[t.label]
                batches[t.label].append(measure(port, process.pid, requests, queries, seed=100 + r))
        shares = {}
        if profiled:
            for t in targets:
                if t.kind != "bare":
                    port, process = servers[t.label]
                    shares[t.label] = profile(port, process.pid, max(2000, requests), queries)

    def cpu_ms(label: str) -> float:
        runs = sorted(b.cpu_ms for b in batches[label])
        return runs[len(runs) // 2]

    unit = cpu_ms(reference.label)
    print("\n## CPU per retrieval: three `dify` upstreams on loopback, each answering 20 passages of ~800 characters")
    print(f"## from a pool of {POOL:,}; Cranfield queries from {THREADS} client threads; {requests:,} requests x {rounds} rounds\n")
    print("| server, same requests, same run | CPU ms per retrieval | ratio to the reference | requests/s | not a full 200 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for t in targets:
        b = batches[t.label]
        rps = sum(x.requests for x in b) / sum(x.seconds for x in b)
        failed = sum(n for x in b for code, n in x.statuses.items() if code != 200)
        print(f"| {t.label} | {cpu_ms(t.label):.2f} | {cpu_ms(t.label) / unit:.2f} | {rps:.0f} | {failed} |")
    if not shares:
        return
    labels = [label for label, found in shares.items() if found]
    if not labels:
        print("\n(no breakdown: py-spy could not attach to the server; it needs ptrace permission)")
        return
    print("\nWhere a gateway's CPU goes (py-spy's on-CPU samples per stage, scaled to the CPU per retrieval above), ms:\n")
    print("| stage | " + " | ".join(labels) + " |")
    print("| --- |" + " ---: |" * len(labels))
    for stage in STAGES:
        cells = " | ".join(f"{shares[label][stage] * cpu_ms(label):.2f} ({shares[label][stage]:.0%})" for label in labels)
        print(f"| {stage} | {cells} |")
    print("| total | " + " | ".join(f"{cpu_ms(label):.2f}" for label in labels) + " |")
