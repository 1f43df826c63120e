"""What the gateway itself costs: latency overhead, throughput, rerank time, and a large local index.

    python -m bench.perf                 # everything (a few minutes)
    python -m bench.perf --only rerank   # one part: overhead, throughput, rerank, index, engines, cpu
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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._cpu import children, hammer, pct  # noqa: E402
from testkit.loopback import free_port, wait_listening, wait_ready  # noqa: E402

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


@contextlib.contextmanager
def upstreams(count: int, delay: float) -> Iterator[list[str]]:
    ports = [free_port() for _ in range(count)]
    with processes(*[[sys.executable, "-m", "bench._upstream", "--port", str(p), "--delay", str(delay)] for p in ports]) as started:
        for port, process in zip(ports, started):
            wait_listening(port, process, f"the upstream on port {port}")
        yield [f"http://127.0.0.1:{p}" for p in ports]


@contextlib.contextmanager
def gateway(urls: list[str]) -> Iterator[str]:
    connectors = "".join(
        f"  up{i}:\n    type: dify\n    endpoint: {u}\n    api_key: x\n    knowledge_id: kb\n    candidates: 20\n    retries: 0\n"
        for i, u in enumerate(urls)
    )
    names = ", ".join(f"up{i}" for i in range(len(urls)))
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "connectors.yaml"
        config.write_text(f"server:\n  api_keys: [{{key: {KEY}}}]\n  watch_config: false\n  cache_ttl_s: 0\nknowledge_bases:\n  kb: {{connectors: [{names}]}}\nconnectors:\n{connectors}")
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
        direct = asyncio.run(hammer([urls[0]], 64, seconds, [BODY["query"]]))
        through = asyncio.run(hammer([gw], 64, seconds, [BODY["query"]]))
    print("| target | requests/s | p50 ms | p99 ms | non-200 |\n| --- | ---: | ---: | ---: | ---: |")
    for label, run in (("one upstream directly", direct), ("gateway (3 upstreams per request)", through)):
        print(f"| {label} | {run.rps:.0f} | {pct(run.latencies, .5):.1f} | {pct(run.latencies, .99):.1f} | {run.non_200} |")
    print(f"| ratio gateway / upstream | {through.rps / direct.rps:.3f} | | | |")


def rerank_times() -> None:
    from rank_bm25 import BM25Okapi

    from aggregator.ranking.pool import TermCache
    from aggregator.ranking.rerank import Answer, rerank
    from aggregator.text.tokenize import tokenize
    from bench._cranfield import load
    from connectors.base import Passage

    docs, queries, _ = load()
    rng = random.Random(7)
    print("\n## Rerank: time per query (Cranfield passages, 20 queries; four sources, each with its own score scale)\n")
    print("| candidates | first sight: dedupe + tokenize + score, ms | seen before, ms | seen before, without the compiled kernel, ms | rank-bm25 BM25Okapi, pre-tokenized, ms |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in (50, 200, 1000):
        pool = rng.sample(docs, n)
        answers = [
            Answer(f"s{s}", "dify", [Passage(d.body, d.title, d.id, source_score=(10**s) * rng.random(), source_rank=i + 1)
                                     for i, d in enumerate(pool[s::4])])
            for s in range(4)
        ]  # fmt: skip
        texts = [q for _, q in queries[:20]]
        cold, warm, reference, okapi = [], [], [], []
        for text in texts:
            cache = TermCache()
            t = time.perf_counter()
            rerank(text, answers, cache)
            cold.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            rerank(text, answers, cache)
            warm.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            rerank(text, answers, cache, compiled=False)
            reference.append((time.perf_counter() - t) * 1000)
        tokenized = [tokenize(d.title) + tokenize(d.body) for d in pool]
        for text in texts:
            t = time.perf_counter()
            BM25Okapi(tokenized).get_scores(tokenize(text))
            okapi.append((time.perf_counter() - t) * 1000)
        print(f"| {n} | {statistics.median(cold):.2f} | {statistics.median(warm):.2f} | {statistics.median(reference):.2f} "
              f"| {statistics.median(okapi):.2f} |")


def _paragraphs(count: int) -> Iterator[str]:
    """`count` paragraphs of about 1,000 characters of Cranfield sentences, the same ones on every call."""
    from bench._cranfield import load

    docs, _, _ = load()
    sentences = [s.strip() for d in docs for s in d.body.split(" . ") if len(s.split()) > 4]
    rng = random.Random(11)
    for _ in range(count):
        text = ""
        while len(text) < 950:
            text += rng.choice(sentences) + ". "
        yield text.strip()


def _corpus_folder(root: Path, passages: int) -> None:
    """`passages` paragraphs (`_paragraphs`), 10 per file: one passage each."""
    per_file = 10
    paragraphs = list(_paragraphs(passages // per_file * per_file))
    for f in range(passages // per_file):
        (root / f"doc{f:06}.txt").write_text("\n\n".join(paragraphs[f * per_file : (f + 1) * per_file]))


def _queries() -> list[str]:
    from bench._cranfield import load

    return [text for _, text in load()[1][:200]]


def _pss_kib(pid: int) -> int:
    """Proportional set size: pages shared with other processes (a mapped index) count once in all."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def _workers_of(pid: int) -> list[int]:
    """The worker processes of `serve` (itself when it has none), multiprocessing's resource tracker left out."""
    workers = []
    for child in children(pid):
        with contextlib.suppress(OSError):
            if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
    return workers or [pid]


def _serve_memory(config: Path, workers: int, queries: list[str]) -> tuple[float, int, float]:
    """(seconds from process start to ready, processes, total PSS MiB after 100 queries) of `serve --workers N`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    command = [sys.executable, "-m", "aggregator", "serve", "--config", str(config), "--port", str(port),
               "--log-level", "warning", "--workers", str(workers)]  # fmt: skip
    with processes(command) as [process]:
        wait_ready(url, timeout=120)
        ready = time.perf_counter() - started
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
            for text in queries[:100]:
                body = {"knowledge_id": "kb", "query": text, "retrieval_setting": {"top_k": 5, "score_threshold": 0}}
                client.post(url + "/retrieval", json=body, headers={"Connection": "close"})
        time.sleep(0.5)
        pids = _workers_of(process.pid)
        total = sum(_pss_kib(p) for p in pids) / 1024
    return ready, len(pids), total


def index_scale(passages: int) -> None:
    """The persistent store against today's in-memory BM25Index, on the same files, in the same run."""
    from aggregator.state import LocalBackend
    from aggregator.state.sync import IndexedConnector
    from aggregator.text.chunking import split_passages
    from aggregator.text.tokenize import tokenize
    from connectors.base import SourceQuery
    from connectors.files import FilesSettings, FilesSource
    from testkit.bm25_index import BM25Index

    queries = _queries()
    print(f"\n## Index scale: a `files` source of {passages:,} passages\n")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "docs"
        root.mkdir()
        state = Path(folder) / "state"
        _corpus_folder(root, passages)

        # Baseline: today's in-memory index, built as fast as one process can (read, split, tokenize, add).
        gc.collect()
        before = _pss_kib(os.getpid())
        t = time.perf_counter()
        memory, texts = BM25Index(), {}
        for path in sorted(root.iterdir()):
            for i, passage in enumerate(split_passages(path.read_text(), 1500)):
                key = f"{path.name}#{i}"
                texts[key] = passage
                memory.add(key, tokenize(path.name) + tokenize(passage))
        base_build = time.perf_counter() - t
        gc.collect()
        base_memory = (_pss_kib(os.getpid()) - before) * 1024
        base_times = []
        for text in queries:
            t = time.perf_counter()
            memory.search(tokenize(text), 20)
            base_times.append((time.perf_counter() - t) * 1000)
        del memory, texts
        gc.collect()

        async def build_and_restart() -> tuple[float, float, float, list[float], int, float | None]:
            connector = IndexedConnector(FilesSource("big", FilesSettings(path=root, watch=False)))
            connector.bind_state(LocalBackend(state))
            lags: list[float] = []

            async def ticker() -> None:  # how long the event loop is held while the build runs
                while True:
                    t0 = time.perf_counter()
                    await asyncio.sleep(0.005)
                    lags.append((time.perf_counter() - t0) * 1000 - 5)

            tick = asyncio.create_task(ticker())
            t0 = time.perf_counter()
            await connector.start()
            await connector.wait_ready(3600)
            build = time.perf_counter() - t0
            tick.cancel()
            rate = connector.stats().passages_per_s
            await connector.aclose()
            t0 = time.perf_counter()
            connector = IndexedConnector(FilesSource("big", FilesSettings(path=root, watch=False)))
            connector.bind_state(LocalBackend(state))
            await connector.start()
            await connector.wait_ready(3600)
            restart = time.perf_counter() - t0
            await asyncio.wait_for(connector._first_attempt.wait(), 600)  # its background sync (nothing changed) is done
            for text in queries[:10]:
                await connector.search(SourceQuery(text, 20))
            times = []
            for text in queries:
                t0 = time.perf_counter()
                await connector.search(SourceQuery(text, 20))
                times.append((time.perf_counter() - t0) * 1000)
            count = connector.stats().passages
            await connector.aclose()
            return build, restart, pct(lags, 0.99), times, count, rate

        build, restart, lag, times, count, rate = asyncio.run(build_and_restart())
        disk = sum(p.stat().st_size for p in (state / "big").iterdir()) / 2**20

        empty = Path(folder) / "empty"
        empty.mkdir()
        for target, name in ((root, "full"), (empty, "empty")):
            (Path(folder) / f"{name}.yaml").write_text(
                f"server:\n  api_keys: [{{key: {KEY}}}]\n  watch_config: false\n  state_dir: {state}\n"
                f"knowledge_bases:\n  kb: {{connectors: [big]}}\nconnectors:\n  big: {{type: files, path: {target}, watch: false}}\n"
            )
        served = {}
        for name in ("empty", "full"):
            if name == "empty":
                shutil.rmtree(state / "big", ignore_errors=True)  # the empty folder's own (tiny) store
            for workers in (1, 3):
                served[name, workers] = _serve_memory(Path(folder) / f"{name}.yaml", workers, queries)
            if name == "empty":  # rebuild the full store once so the served runs start from a persisted index
                shutil.rmtree(state / "big", ignore_errors=True)
                _serve_memory(Path(folder) / "full.yaml", 1, queries[:1])

    held = {w: served["full", w][2] - served["empty", w][2] for w in (1, 3)}
    print(f"{count:,} passages in {passages // 10:,} files; queries: 200 Cranfield queries, 20 results each.\n")
    print("| index | first build s | restart to ready s | query p50 ms | query p95 ms | memory MiB | disk MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| in-memory `BM25Index` (baseline: read, split, tokenize, add; one process) | {base_build:.1f} | {base_build:.1f} (rebuilt) "
          f"| {pct(base_times, .5):.2f} | {pct(base_times, .95):.2f} | {base_memory / 2**20:.0f} (PSS growth) | 0 |")
    print(f"| persistent store (`files` source, in-process) | {build:.1f} | {restart:.2f} | {pct(times, .5):.2f} "
          f"| {pct(times, .95):.2f} | {held[1]:.0f} (one worker, PSS over an empty source) | {disk:.0f} |")
    print(f"\nBuild rate reported in /status: {rate} passages/s; event loop held at most {lag:.1f} ms (p99 of 5 ms ticks) during the build.\n")
    print("| `aggregator serve` on the persisted store | workers | process start to ready s | PSS MiB, all workers | over an empty source MiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for workers in (1, 3):
        ready, procs, total = served["full", workers]
        print(f"| {workers} worker(s) | {procs} | {ready:.2f} | {total:.0f} | {held[workers]:.0f} |")
    print(f"\nIndex memory of 3 workers / 1 worker: **{held[3] / held[1]:.2f}×** (goal ≤ 1.5×).")


def _engine_corpus(passages: int) -> tuple[list[list[str]], list[list[str]]]:
    """Pre-tokenized passages (as `_corpus_folder` writes them) and pre-tokenized queries."""
    from aggregator.text.tokenize import tokenize

    return [tokenize(text) for text in _paragraphs(passages)], [tokenize(q) for q in _queries()]


def _agreement(reference: list[list[tuple[int, float]]], found: list[list[tuple[int, float]]]) -> tuple[float, float]:
    """Share of the reference top 20 found in the engine's top 20, and the largest relative score error over them."""
    overlap, error = [], 0.0
    for want, got in zip(reference, found):
        if not want:
            continue
        scores = dict(got)
        overlap.append(len(set(scores) & {k for k, _ in want}) / len(want))
        for key, score in want:
            if key in scores:
                error = max(error, abs(scores[key] - score) / score)
    return statistics.mean(overlap), error


def engines(passages: int) -> None:
    """The candidates for the persistent index, on the same pre-tokenized passages, scored against bm25.py."""
    import math
    import sqlite3
    from collections import Counter

    from aggregator.ranking.bm25 import K1, idf
    from aggregator.state import LocalBackend, PreparedDocument, SyncStatus
    from testkit.bm25_index import BM25Index

    corpus, queries = _engine_corpus(passages)
    print(f"\n## Engines: {passages:,} pre-tokenized passages of about 1,000 characters, 200 queries, top 20\n")
    rows = []

    def timed(search) -> tuple[list[float], list[list[tuple[int, float]]]]:  # type: ignore[no-untyped-def]
        for terms in queries[:10]:
            search(terms)
        times, answers = [], []
        for terms in queries:
            t = time.perf_counter()
            answers.append(search(terms))
            times.append((time.perf_counter() - t) * 1000)
        return times, answers

    # The reference: today's in-memory index, which computes the formula of bm25.py.
    t = time.perf_counter()
    memory = BM25Index()
    for pid, terms in enumerate(corpus):
        memory.add(pid, terms)
    build = time.perf_counter() - t
    times, reference = timed(lambda terms: memory.search(terms, 20))
    rows.append(("in-memory `BM25Index` (today; the reference)", build, times, 0.0, 1.0, 0.0, "exact"))

    with tempfile.TemporaryDirectory() as folder:
        # The chosen store: SQLite for documents and text, numpy segments for postings.
        store = LocalBackend(Path(folder) / "numpy").open("bench", "fp")
        store.try_lead()
        writer = store.open_writer()
        t = time.perf_counter()
        for start in range(0, len(corpus), 5000):
            batch = [PreparedDocument(str(pid), "1", "", None, {}, [("", terms)]) for pid, terms in enumerate(corpus[start : start + 5000], start)]
            writer.apply(batch, [], SyncStatus())
        writer.finish(SyncStatus())
        build = time.perf_counter() - t
        times, found = timed(lambda terms: [(int(p.document_id), p.score) for p in store.search(terms, 20)])
        disk = sum(p.stat().st_size for p in (Path(folder) / "numpy" / "bench").iterdir())
        overlap, error = _agreement(reference, found)
        rows.append(("numpy segments + SQLite (chosen)", build, times, disk, overlap, error, "bm25.py's formula; df exact after removals"))
        store.close()

        # SQLite FTS5, standard library; the terms as space-separated text.
        db = sqlite3.connect(Path(folder) / "fts5.sqlite3")
        db.execute("CREATE VIRTUAL TABLE p USING fts5(terms, tokenize = 'unicode61 remove_diacritics 0')")
        t = time.perf_counter()
        with db:
            db.executemany("INSERT INTO p (rowid, terms) VALUES (?, ?)", ((pid, " ".join(terms)) for pid, terms in enumerate(corpus)))
        db.execute("INSERT INTO p (p) VALUES ('optimize')")
        build = time.perf_counter() - t

        def fts5(terms: list[str]) -> list[tuple[int, float]]:
            match = " OR ".join(f'"{term}"' for term in dict.fromkeys(terms))
            rows = db.execute("SELECT rowid, -bm25(p) FROM p WHERE p MATCH ? ORDER BY bm25(p) LIMIT 20", (match,)).fetchall()
            return [(pid, score) for pid, score in rows]

        times, found = timed(fts5)
        disk = (Path(folder) / "fts5.sqlite3").stat().st_size
        overlap, _ = _agreement(reference, found)
        rows.append(("SQLite FTS5 `bm25()`", build, times, disk, overlap, float("nan"), "its own idf (log((N-n+0.5)/(n+0.5)), floored), query terms counted once"))
        db.close()

        try:
            import tantivy
        except ImportError:
            print("(tantivy not installed: `pip install -e '.[bench]'` to include it)\n")
            tantivy = None
        if tantivy is not None:
            builder = tantivy.SchemaBuilder()
            builder.add_text_field("terms", tokenizer_name="whitespace", index_option="freq")
            builder.add_unsigned_field("pid", stored=True)
            schema = builder.build()
            (Path(folder) / "tantivy").mkdir()
            index = tantivy.Index(schema, path=str(Path(folder) / "tantivy"))
            t = time.perf_counter()
            writer = index.writer(heap_size=256_000_000, num_threads=2)
            for pid, terms in enumerate(corpus):
                writer.add_document(tantivy.Document(pid=pid, terms=" ".join(terms)))
            writer.commit()
            writer.wait_merging_threads()
            index.reload()
            build = time.perf_counter() - t
            searcher = index.searcher()
            n = searcher.num_docs

            def tantivy_search(terms: list[str]) -> list[tuple[int, float]]:
                counts = Counter(terms)
                query = tantivy.Query.boolean_query(
                    [(tantivy.Occur.Should, tantivy.Query.term_query(schema, "terms", term)) for term in terms]
                )
                ceiling = sum(q * idf(n, searcher.doc_freq("terms", term)) * (K1 + 1) for term, q in counts.items())
                hits = searcher.search(query, 20).hits
                return [(searcher.doc(address)["pid"][0], score / ceiling) for score, address in hits] if ceiling else []

            times, found = timed(tantivy_search)
            disk = sum(p.stat().st_size for p in (Path(folder) / "tantivy").rglob("*") if p.is_file())
            overlap, error = _agreement(reference, found)
            version = tantivy.__version__.replace("tantivy", "").split(",")[0].strip()
            rows.append((f"tantivy {version} (Rust, on-disk segments)",
                         build, times, disk, overlap, error, "lengths rounded to one byte; df counts deleted documents until a merge"))  # fmt: skip
    print("| engine | build s | query p50 ms | query p95 ms | disk MiB | top-20 agreement | largest score error | scoring |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, build, times, disk, overlap, error, note in rows:
        shown = "–" if math.isnan(error) else f"{error:.1e}"
        print(f"| {name} | {build:.1f} | {pct(times, .5):.2f} | {pct(times, .95):.2f} | {disk / 2**20:.0f} | {overlap:.3f} | {shown} | {note} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["overhead", "throughput", "rerank", "index", "engines", "cpu"])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of the throughput run")
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=2000, help="cpu: retrievals per batch")
    parser.add_argument("--rounds", type=int, default=3, help="cpu: batches per server, alternating (the median counts)")
    parser.add_argument("--baseline", metavar="REV", help="cpu: also measure the gateway at this commit (e.g. main)")
    parser.add_argument("--all-clients", action="store_true", help="cpu: bare fan-outs over every HTTP client measured")
    parser.add_argument("--no-profile", action="store_true", help="cpu: skip the py-spy breakdown")
    parser.add_argument("--judge", action="store_true", help="cpu: also this tree with the local embedding judge (WordLlama)")
    parser.add_argument("--floor", action="store_true", help="cpu: also this tree with its rerank replaced by a sort (what the rest costs)")
    args = parser.parse_args()
    print(f"# bench/perf.py on {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    from bench import _cpu

    parts = {
        "overhead": overhead, "throughput": lambda: throughput(args.seconds), "rerank": rerank_times,
        "index": lambda: index_scale(args.passages), "engines": lambda: engines(args.passages),
        "cpu": lambda: _cpu.run(args.requests, args.rounds, args.baseline, args.all_clients, not args.no_profile, args.floor, args.judge),
    }  # fmt: skip
    for name, part in parts.items():
        if args.only in (None, name):
            part()
    return 0


if __name__ == "__main__":
    sys.exit(main())
