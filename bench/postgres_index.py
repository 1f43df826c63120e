"""The index in PostgreSQL against the embedded store, same passages, same run: query time and agreement.

    python -m bench.postgres_index

Cranfield (1,400 documents) tokenized once and written into both stores; the 225 Cranfield queries, top 20,
after 20 warm-up queries. Agreement: the same top 10 in the same order, and the largest relative score
difference (the embedded store scores in float32, PostgreSQL in float8). PostgreSQL from Debian's packages
on loopback (testkit/servers.py).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aggregator.state import LocalBackend, SyncStatus  # noqa: E402
from aggregator.state.postgres import PostgresBackend  # noqa: E402
from aggregator.text.tokenize import tokenize  # noqa: E402
from bench._cpu import pct  # noqa: E402
from bench._cranfield import load  # noqa: E402
from aggregator.state.sync import prepare_documents  # noqa: E402
from connectors.base import Document  # noqa: E402
from testkit.servers import postgres_server  # noqa: E402


async def compare(url: str, folder: Path) -> None:
    docs, queries, _ = load()
    prepared = prepare_documents([Document(d.id, d.title, d.body, "1") for d in docs], 1500)
    terms = [tokenize(q) for _, q in queries]
    local = LocalBackend(folder).open("docs", "fp")
    assert local.try_lead()
    writer = local.open_writer()
    writer.apply(prepared, [], SyncStatus())
    writer.finish(SyncStatus())
    backend = PostgresBackend(url, "bench")
    await backend.start()
    shared = backend.open("docs", "fp")
    assert await asyncio.to_thread(shared.try_lead)
    started = time.perf_counter()
    await asyncio.to_thread((await asyncio.to_thread(shared.open_writer)).apply, prepared, [], SyncStatus())
    build_s = time.perf_counter() - started
    await backend._poll_once()
    print(f"# bench/postgres_index.py: {len(prepared):,} documents, {shared.info().passages:,} passages, "
          f"{len(terms)} queries, top 20 (PostgreSQL build {build_s:.1f} s)\n")  # fmt: skip
    print("| store | query p50 ms | query p95 ms |\n| --- | ---: | ---: |")
    for name, store in (("embedded (numpy segments + SQLite), the baseline", local), ("PostgreSQL", shared)):
        for query in terms[:20]:
            await store.asearch(query, 20)
        times = []
        for query in terms:
            t = time.perf_counter()
            await store.asearch(query, 20)
            times.append((time.perf_counter() - t) * 1000)
        print(f"| {name} | {pct(times, 0.5):.2f} | {pct(times, 0.95):.2f} |")
    same_order, worst = 0, 0.0
    for query in terms:
        a, b = local.search(query, 10), await shared.asearch(query, 10)
        same_order += [p.document_id for p in a] == [p.document_id for p in b]
        worst = max([worst] + [abs(x.score - y.score) / y.score for x, y in zip(a, b) if x.document_id == y.document_id])
    print(f"\nsame top 10 in the same order: {same_order} of {len(terms)} queries; largest relative score difference {worst:.1e}")
    local.close()
    await backend.aclose()


def main() -> int:
    with postgres_server() as server, tempfile.TemporaryDirectory() as folder:
        asyncio.run(compare(server.create_database("bench"), Path(folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
