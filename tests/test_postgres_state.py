"""The PostgreSQL store (`server.state_url`) against a real server: the BM25 formula, readers that never write,
one syncer per store with takeover, the schema the gateway creates and versions, and an outage."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random

import psycopg
import pytest

from aggregator.state import PreparedDocument, StoreUnavailable, SyncStatus
from aggregator.state.postgres import SCHEMA_VERSION, PostgresBackend, remove_stores, unused_stores
from testkit.loopback import until

from .test_bm25 import WORDS, reference

pytestmark = pytest.mark.usefixtures("postgres")


def doc(document_id: str, passages: list[list[str]], version: str = "1", **metadata: object) -> PreparedDocument:
    return PreparedDocument(document_id, version, f"title {document_id}", None, {"k": document_id, **metadata},
                            [(" ".join(t), t) for t in passages])  # fmt: skip


async def started(url: str, replica: str) -> PostgresBackend:
    backend = PostgresBackend(url, replica)
    await backend.start()
    return backend


async def lead(backend: PostgresBackend, source: str = "src", fingerprint: str = "fp"):  # type: ignore[no-untyped-def]
    store = backend.open(source, fingerprint)
    assert await asyncio.to_thread(store.try_lead)
    return store, await asyncio.to_thread(store.open_writer)


async def test_scores_follow_the_formula_through_churn(pg_url: str):
    rng = random.Random(5)
    backend = await started(pg_url, "a")
    reader_backend = await started(pg_url, "b")  # another replica, which only reads
    try:
        store, writer = await lead(backend)
        reader = reader_backend.open("src", "fp")
        docs: dict[str, list[list[str]]] = {}
        for step in range(25):
            batch: dict[str, PreparedDocument] = {}
            removed: set[str] = set()
            for _ in range(rng.randrange(1, 30)):
                key = f"d{rng.randrange(150)}"
                if key in docs and rng.random() < 0.3:
                    removed.add(key)
                    docs.pop(key)
                    batch.pop(key, None)
                else:
                    passages = [[rng.choice(WORDS[: rng.randrange(5, 40)]) for _ in range(rng.randrange(1, 30))] for _ in range(rng.randrange(1, 4))]
                    docs[key] = passages
                    batch[key] = doc(key, passages)
                    removed.discard(key)
            await asyncio.to_thread(writer.apply, list(batch.values()), sorted(removed), SyncStatus())
            await reader_backend._poll_once()
            flat = {f"{k}#{i}": terms for k, ps in docs.items() for i, terms in enumerate(ps)}
            query = [rng.choice(WORDS) for _ in range(4)] + ["unknown-word"]
            got = {f"{p.document_id}#{p.chunk_index}": p.score for p in await reader.asearch(query, len(flat) + 1)}
            want = reference(flat, query)
            assert set(got) == set(want)
            assert all(math.isclose(got[k], want[k], rel_tol=1e-9) for k in want), "float8 sums: the formula to 1e-9"
            passages, total, frequencies = reader.term_statistics(query)
            assert passages == len(flat) and total == sum(map(len, flat.values()))
            assert frequencies == {t: sum(t in terms for terms in flat.values()) for t in query}
        top = await reader.asearch(["w1", "w2"], 5)
        assert [p.score for p in top] == sorted((p.score for p in top), reverse=True)
        assert reader.info().documents == len(docs) and not reader.leading
    finally:
        await backend.aclose()
        await reader_backend.aclose()


async def test_a_filter_reads_further_pages_and_text_and_metadata_come_back_whole(pg_url: str):
    backend = await started(pg_url, "a")
    try:
        store, writer = await lead(backend)
        documents = [doc(f"d{i:03}", [["alpha"] * (1 + i % 7) + ["beta"]], team="ops" if i % 50 == 0 else "dev", note="naïve café 发布") for i in range(300)]
        await asyncio.to_thread(writer.apply, documents, [], SyncStatus())
        await asyncio.to_thread(writer.finish, SyncStatus(last_sync="2026-01-01T00:00:00Z"))
        await backend._poll_once()
        found = await store.asearch(["alpha"], 3, accept=lambda p: p.metadata["team"] == "ops")
        assert [p.document_id for p in found] == ["d250", "d200", "d150"], "the best three of the 6 the filter accepts, of 300"
        assert all(p.metadata == {"k": p.document_id, "team": "ops", "note": "naïve café 发布"} for p in found)
        assert found[0].content == "alpha " * 6 + "beta" and found[0].title == "title d250"
        info = store.info()
        assert info.synced_once and info.documents == 300 and info.passages == 300 and info.bytes_on_disk > 0
        assert info.status.last_sync == "2026-01-01T00:00:00Z"
        # replacing and removing documents keeps the counts exact
        await asyncio.to_thread(writer.apply, [doc("d001", [["gamma"]], version="2")], ["d002"], SyncStatus())
        await backend._poll_once()
        assert store.term_statistics(["alpha", "gamma"]) == (299, 300 * 0 + sum(1 + i % 7 + 1 for i in range(300)) - (2 + 1) - (3 + 1) + 1, {"alpha": 298, "gamma": 1})
        assert writer.versions()["d001"] == "2" and "d002" not in writer.versions()
    finally:
        await backend.aclose()


async def test_one_syncer_per_store_and_the_next_takes_over_when_its_connection_dies(pg_url: str, caplog: pytest.LogCaptureFixture):
    first, second = await started(pg_url, "replica-1"), await started(pg_url, "replica-2")
    try:
        store_a, writer = await lead(first)
        store_b = second.open("src", "fp")
        assert not await asyncio.to_thread(store_b.try_lead), "the lock is held"
        await asyncio.to_thread(writer.apply, [doc("d1", [["alpha"]])], [], SyncStatus())
        await second._poll_once()
        assert store_b.syncer == "replica-1"
        # the syncer's session ends (its process died, PostgreSQL restarted it, an admin terminated it)
        pid = store_a._connection.info.backend_pid
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))  # sends the signal; the backend ends soon after
            gone = lambda: admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0] == 0  # noqa: E731
            await until(gone, 10, "the terminated backend gone (and its advisory lock with it)")
        with caplog.at_level(logging.WARNING, "aggregator.state"):
            await first._poll_once()
        assert not store_a.leading, "the old syncer knows it lost the lead"
        assert "sync lock in PostgreSQL was lost" in caplog.text
        with pytest.raises(psycopg.Error):
            await asyncio.to_thread(writer.apply, [doc("d2", [["beta"]])], [], SyncStatus())
        assert await asyncio.to_thread(store_b.try_lead), "another replica takes over"
        writer_b = await asyncio.to_thread(store_b.open_writer)
        assert writer_b.versions() == {"d1": "1"}, "and carries on from the last commit"
        await asyncio.to_thread(writer_b.apply, [doc("d2", [["beta"]])], [], SyncStatus())
        await first._poll_once()
        assert [p.document_id for p in await store_a.asearch(["beta"], 5)] == ["d2"]
        assert store_a.syncer == "replica-2"
    finally:
        await first.aclose()
        await second.aclose()


async def test_asking_for_a_held_lock_uses_no_store_ids(pg_url: str):
    """Every replica that does not sync asks for the lock each second: that must not use up gw_stores' id sequence."""
    first, second = await started(pg_url, "replica-1"), await started(pg_url, "replica-2")
    try:
        await lead(first)
        store_b = second.open("src", "fp")

        def last_id() -> int:
            with psycopg.connect(pg_url, autocommit=True) as admin:
                row = admin.execute("SELECT last_value FROM gw_stores_id_seq").fetchone()
            assert row is not None
            return int(row[0])

        before = last_id()
        for _ in range(5):
            assert not await asyncio.to_thread(store_b.try_lead), "the lock is held"
        assert last_id() == before
    finally:
        await first.aclose()
        await second.aclose()


async def test_the_syncer_is_named_as_its_peers_name_it(pg_url: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AGGREGATOR_REPLICA", "gateway-7")
    backend = await started(pg_url, "")
    try:
        store, _ = await lead(backend)
        await backend._poll_once()
        assert store.syncer == f"gateway-7/{os.getpid()}", "the replica's name from $AGGREGATOR_REPLICA, as in /status"
    finally:
        await backend.aclose()


async def test_the_schema_is_created_once_versioned_and_a_newer_one_refused(pg_url: str, postgres, caplog: pytest.LogCaptureFixture):  # type: ignore[no-untyped-def]
    backend = await started(pg_url, "a")
    await backend.aclose()
    assert backend.schema_version == SCHEMA_VERSION
    again = await started(pg_url, "b")  # a second start finds the schema current and changes nothing
    await again.aclose()
    assert postgres.sql("SELECT version FROM gateway_schema", pg_url.rsplit("/", 1)[1]) == str(SCHEMA_VERSION)
    postgres.sql("UPDATE gateway_schema SET version = 99", pg_url.rsplit("/", 1)[1])
    with caplog.at_level(logging.ERROR, "aggregator.state"):
        newer = await started(pg_url, "c")
    try:
        store = newer.open("src", "fp")
        assert not await asyncio.to_thread(store.try_lead), "nothing is written into a schema this version does not know"
        assert "version 99, newer than this gateway's" in caplog.text
        assert "upgrade the gateway" in newer.describe()["error"]
    finally:
        await newer.aclose()


async def test_an_unreachable_database_is_an_unavailable_source_not_a_crash(postgres):  # type: ignore[no-untyped-def]
    url = postgres.create_database("outage")
    backend = await started(url, "a")
    try:
        store, writer = await lead(backend)
        await asyncio.to_thread(writer.apply, [doc("d1", [["alpha"]])], [], SyncStatus())
        await backend._poll_once()
        assert len(await store.asearch(["alpha"], 5)) == 1
        postgres.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'outage' AND pid <> pg_backend_pid()")
        postgres.sql("ALTER DATABASE outage ALLOW_CONNECTIONS false")
        await backend._poll_once()
        assert not backend.reachable and backend.describe()["error"]
        with pytest.raises(StoreUnavailable):
            await store.asearch(["alpha"], 5)
        assert store.term_statistics(["alpha"])[2] == {"alpha": 1}, "statistics stay what was last seen"
        postgres.sql("ALTER DATABASE outage ALLOW_CONNECTIONS true")
        for _ in range(40):  # the pool reconnects with a backoff
            await backend._poll_once()
            if backend.reachable:
                break
            await asyncio.sleep(0.25)
        assert backend.reachable and len(await store.asearch(["alpha"], 5)) == 1
    finally:
        await backend.aclose()


async def test_stores_of_other_settings_and_of_removed_sources_are_deleted(pg_url: str):
    backend = await started(pg_url, "a")
    try:
        old, old_writer = await lead(backend, "src", "old-settings")
        await asyncio.to_thread(old_writer.apply, [doc("d1", [["alpha"]])], [], SyncStatus())
        old.close()  # the replica on the old settings stopped
        gone, gone_writer = await lead(backend, "renamed", "fp")
        await asyncio.to_thread(gone_writer.apply, [doc("d1", [["alpha"]])], [], SyncStatus())
        store, writer = await lead(backend, "src", "new-settings")
        await asyncio.to_thread(writer.apply, [doc("d1", [["beta"]])], [], SyncStatus())
        await asyncio.to_thread(writer.finish, SyncStatus())
        listed = await asyncio.to_thread(unused_stores, pg_url, {"src"})
        assert [row[1] for row in listed] == ["renamed"], "the old settings' store went at the first finished sync"
        assert await asyncio.to_thread(remove_stores, pg_url, [listed[0][0]]) == [False], "kept: a replica syncs it"
        gone.close()
        assert await asyncio.to_thread(remove_stores, pg_url, [listed[0][0]]) == [True]
        assert await asyncio.to_thread(unused_stores, pg_url, {"src"}) == []
    finally:
        await backend.aclose()


async def test_gc_deletes_the_indexes_of_sources_no_longer_configured(pg_url: str, tmp_path, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    from aggregator.cli import main

    backend = await started(pg_url, "a")
    store, writer = await lead(backend, "old-source", "fp")
    await asyncio.to_thread(writer.apply, [doc("d1", [["alpha"]])], [], SyncStatus())
    store.close()
    await backend.aclose()
    (tmp_path / "docs").mkdir()
    config = tmp_path / "connectors.yaml"
    config.write_text(f"server:\n  api_keys: [{{key: k}}]\n  state_url: {pg_url}\nknowledge_bases:\n  kb: {{connectors: [docs]}}\n"
                      f"connectors:\n  docs: {{type: files, path: {tmp_path / 'docs'}}}\n")  # fmt: skip
    assert await asyncio.to_thread(main, ["gc", "--config", str(config), "--dry-run"]) == 0
    assert "would delete the index of old-source" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["gc", "--config", str(config)]) == 0
    assert "deleted the index of old-source" in capsys.readouterr().out
    assert await asyncio.to_thread(unused_stores, pg_url, {"docs"}) == []


async def test_a_source_is_ready_only_once_its_own_view_of_the_shared_store_holds_the_first_sync(pg_url: str, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """Readers see a commit when they next poll the database. A first sync that ends between two polls must not
    make the service ready before its own answers come from the index (it answered nothing, flakily, before)."""
    import aggregator.state.postgres.store as postgres_module
    from aggregator.contract.models import RetrievalRequest
    from aggregator.retrieval.pipeline import retrieve
    from aggregator.runtime.service import Service

    from .conftest import KEY, write_docs

    monkeypatch.setattr(postgres_module, "POLL_S", 3.0)  # a slow poll: the sync ends long before the next one
    path = tmp_path / "connectors.yaml"
    path.write_text(
        f"server:\n  api_keys: [{{key: {KEY}}}]\n  state_url: {pg_url}\n  watch_config: false\n"
        f"knowledge_bases:\n  demo: {{connectors: [docs]}}\n"
        f"connectors:\n  docs: {{type: files, path: {write_docs(tmp_path / 'docs')}, watch: false}}\n"
    )
    service = Service.from_path(path)
    await service.start()
    try:
        while not service.gateway.ready:
            await asyncio.sleep(0.01)
        request = RetrievalRequest.model_validate({"knowledge_id": "demo", "query": "rotate signing keys"})
        result = await retrieve(service.gateway, request)
        assert result.sources_header() == "docs=ok" and result.records, "ready, and answering from the index"
    finally:
        await service.aclose()
