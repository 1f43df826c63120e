"""The persistent index store: the BM25 formula through churn and merges, reopening, discarding, the sync lock."""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aggregator.state import LocalBackend, PreparedDocument, SyncStatus
from aggregator.state import local
from aggregator.state.local import writer as local_writer
from testkit.bm25_index import BM25Index

from .test_bm25 import WORDS, reference


def doc(document_id: str, passages: list[list[str]], version: str = "1") -> PreparedDocument:
    return PreparedDocument(document_id, version, f"title {document_id}", None, {"k": document_id}, [(" ".join(t), t) for t in passages])


def writer_of(folder: Path, fingerprint: str = "fp"):  # type: ignore[no-untyped-def]
    store = LocalBackend(folder).open("src", fingerprint)
    assert store.try_lead()
    return store, store.open_writer()


def test_scores_follow_the_formula_through_churn_and_merges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(local_writer, "MAX_SEGMENTS", 3)
    rng = random.Random(5)
    store, writer = writer_of(tmp_path)
    docs: dict[str, list[list[str]]] = {}
    for step in range(40):
        batch, removed = [], []
        for _ in range(rng.randrange(1, 30)):
            key = f"d{rng.randrange(200)}"
            if key in docs and rng.random() < 0.3:
                removed.append(key)
                docs.pop(key)
                batch = [d for d in batch if d.document_id != key]
            else:
                passages = [[rng.choice(WORDS[: rng.randrange(5, 40)]) for _ in range(rng.randrange(1, 30))] for _ in range(rng.randrange(1, 4))]
                docs[key] = passages
                batch = [d for d in batch if d.document_id != key] + [doc(key, passages)]
                removed = [r for r in removed if r != key]
        writer.apply(batch, removed, SyncStatus())
        if step % 10 == 9:
            writer.finish(SyncStatus())
        flat = {f"{k}#{i}": terms for k, ps in docs.items() for i, terms in enumerate(ps)}
        query = [rng.choice(WORDS) for _ in range(4)] + ["unknown-word"]
        got = {f"{p.document_id}#{p.chunk_index}": p.score for p in store.search(query, len(flat) + 1)}
        want = reference(flat, query)
        assert set(got) == set(want)
        assert all(math.isclose(got[k], want[k], rel_tol=1e-5) for k in want)
        passages, total, frequencies = store.term_statistics(query)
        assert passages == len(flat) and total == sum(map(len, flat.values()))
        assert frequencies == {t: sum(t in terms for terms in flat.values()) for t in query}
    assert len(store.reader._view.segments) <= 4, "segments were merged"
    store.close()


def test_a_reopened_store_answers_the_same_without_a_writer(tmp_path: Path):
    store, writer = writer_of(tmp_path)
    writer.apply([doc(f"d{i}", [["alpha", "beta"] * (i % 3 + 1), ["gamma"]]) for i in range(50)], [], SyncStatus())
    writer.finish(SyncStatus(last_sync="2026-01-01T00:00:00Z"))
    before = [(p.document_id, p.chunk_index, p.score, p.content, p.metadata) for p in store.search(["alpha", "gamma"], 20)]
    store.close()
    reader = LocalBackend(tmp_path).open("src", "fp")  # not leading: a worker that reads only
    after = [(p.document_id, p.chunk_index, p.score, p.content, p.metadata) for p in reader.search(["alpha", "gamma"], 20)]
    assert after == before and len(after) == 20
    info = reader.info()
    assert info.synced_once and info.documents == 50 and info.passages == 100 and info.bytes_on_disk > 0
    assert info.status.last_sync == "2026-01-01T00:00:00Z"
    reader.close()


def test_ties_do_not_depend_on_the_order_documents_arrived_in(tmp_path: Path):
    orders = []
    for attempt, names in enumerate((["b", "a", "c", "e", "d"], ["e", "d", "c", "b", "a"])):
        store, writer = writer_of(tmp_path / str(attempt))
        for name in names:  # one commit each: the passages land in different segments in a different order
            writer.apply([doc(name, [["same", "words"]])], [], SyncStatus())
        orders.append([p.document_id for p in store.search(["same"], 3)])
        store.close()
    assert orders[0] == orders[1]


def test_a_store_of_other_settings_is_never_served_and_is_discarded(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    store, writer = writer_of(tmp_path, "old-settings")
    writer.apply([doc("d", [["alpha"]])], [], SyncStatus())
    store.close()
    reader = LocalBackend(tmp_path).open("src", "new-settings")
    assert reader.search(["alpha"], 5) == [] and not reader.info().synced_once
    with caplog.at_level(logging.WARNING, "aggregator.state"):
        store, writer = writer_of(tmp_path, "new-settings")
    assert [r.getMessage() for r in caplog.records if "discarding" in r.getMessage()] == [
        "source src: discarding the stored index (written under other settings, another tokenizer or another store format); rebuilding it"
    ]
    assert writer.versions() == {} and store.search(["alpha"], 5) == []
    writer.apply([doc("d", [["alpha"]])], [], SyncStatus())
    assert [p.document_id for p in reader.search(["alpha"], 5)] == ["d"], "a reader follows the new store"
    store.close()
    reader.close()


@pytest.mark.parametrize("victim", ["segment", "database"])
def test_a_truncated_store_is_detected_and_rebuilt(tmp_path: Path, victim: str, caplog: pytest.LogCaptureFixture):
    store, writer = writer_of(tmp_path)
    writer.apply([doc(f"d{i}", [["alpha", "beta", f"w{i}"]]) for i in range(300)], [], SyncStatus())
    store.close()
    folder = tmp_path / "src"
    path = next(folder.glob("seg-*.bin")) if victim == "segment" else folder / local.DB_NAME
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    reader = LocalBackend(tmp_path).open("src", "fp")
    reader.search(["alpha"], 5)  # may serve nothing, must not raise
    with caplog.at_level(logging.WARNING, "aggregator.state"):
        store, writer = writer_of(tmp_path)
    assert any("discarding the stored index (damaged" in r.getMessage() or "unreadable" in r.getMessage() for r in caplog.records)
    assert writer.versions() == {}
    writer.apply([doc("d", [["alpha"]])], [], SyncStatus())
    assert [p.document_id for p in store.search(["alpha"], 5)] == ["d"]
    store.close()
    reader.close()


def test_files_no_commit_names_are_removed_when_a_writer_opens(tmp_path: Path):
    store, writer = writer_of(tmp_path)
    writer.apply([doc("d", [["alpha"]])], [], SyncStatus())
    store.close()
    (tmp_path / "src" / "seg-99999999.bin").write_bytes(b"half a segment from a killed sync")
    store, writer = writer_of(tmp_path)
    assert not (tmp_path / "src" / "seg-99999999.bin").exists()
    assert [p.document_id for p in store.search(["alpha"], 5)] == ["d"]
    store.close()


def test_the_state_folder_is_private(tmp_path: Path):
    store, writer = writer_of(tmp_path / "state")
    writer.apply([doc("d", [["alpha"]])], [], SyncStatus())
    for folder in (tmp_path / "state", tmp_path / "state" / "src"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state" / "src" / local.DB_NAME).stat().st_mode) == 0o600
    store.close()


def test_one_syncer_and_the_lock_passes_on_when_its_holder_dies(tmp_path: Path):
    first = LocalBackend(tmp_path).open("src", "fp")
    second = LocalBackend(tmp_path).open("src", "fp")
    assert first.try_lead() and not second.try_lead()
    first.close()
    assert second.try_lead()
    second.close()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from aggregator.state import LocalBackend
            store = LocalBackend(Path({str(tmp_path)!r})).open("src", "fp")
            assert store.try_lead()
            print("leading", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "leading"
        third = LocalBackend(tmp_path).open("src", "fp")
        assert not third.try_lead()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        assert third.try_lead(), "the lock of a killed process is free"
        third.close()
    finally:
        if holder.poll() is None:
            holder.kill()


def test_the_in_memory_index_agrees_with_the_store(tmp_path: Path):
    """BM25Index (the in-memory baseline the benchmark compares with) and the store score alike."""
    rng = random.Random(9)
    store, writer = writer_of(tmp_path)
    memory = BM25Index()
    documents = []
    for i in range(120):
        terms = [rng.choice(WORDS) for _ in range(rng.randrange(3, 25))]
        memory.add(f"d{i}#0", terms)
        documents.append(doc(f"d{i}", [terms]))
    writer.apply(documents, [], SyncStatus())
    query = ["w1", "w2", "w3"]
    want = memory.search(query, 10)
    got = store.search(query, 10)
    assert [k.split("#")[0] for k, _ in want] == [p.document_id for p in got]
    assert all(math.isclose(s, p.score, rel_tol=1e-6) for (_, s), p in zip(want, got))
    store.close()


def test_statistics_and_search_before_anything_is_committed_are_empty(tmp_path: Path):
    """A query can arrive while the syncer has created the database file but not yet its tables."""
    import sqlite3

    store = LocalBackend(tmp_path).open("src", "fp")
    folder = tmp_path / "src"
    folder.mkdir(parents=True, exist_ok=True)
    sqlite3.connect(folder / local.DB_NAME).close()  # an empty database: no tables yet
    assert store.term_statistics(["key", "rotat"]) == (0, 0, {"key": 0, "rotat": 0})
    assert store.search(["key"], 5) == []


def test_a_status_saved_by_an_earlier_version_still_loads():
    saved = '{"syncing": false, "done": 7, "total": 9, "started_at": "2025-01-01T00:00:00Z", "last_sync": "2025-01-01T00:01:00Z"}'
    status = SyncStatus.from_json(saved)
    assert (status.done, status.total, status.last_sync) == (7, 9, "2025-01-01T00:01:00Z")
    assert "started_at" not in SyncStatus.from_json(status.to_json()).to_json()
