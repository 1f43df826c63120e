"""Indexes that survive restarts, as a user runs the service: real processes, a fake Notion on loopback."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from aggregator.state import LocalBackend
from aggregator.state.sync import IndexedConnector
from connectors.base import SourceQuery
from connectors.files import FilesSettings, FilesSource

from testkit.fakes.notion import FakeNotion, app, block
from testkit.gateway import ask, config_text
from testkit.loopback import eventually, free_port, serve, serve_cli, until

TOKEN = "secret_notion_token_for_persistence"


def stored_config(folder: Path, notion_url: str, state: Path, rps: int = 50) -> str:
    """`demo` over a fake Notion and a folder, indexed under `state`; no response cache: these tests watch the index change."""
    wiki = {"type": "notion", "token": TOKEN, "base_url": notion_url, "requests_per_second": rps, "refresh_s": 1}
    return config_text({"wiki": wiki, "docs": {"type": "files", "path": str(folder)}}, state_dir=str(state), cache_ttl_s=0)


def hits(url: str, query: str) -> list[tuple[str, str, float]]:
    """(source, document, score) of each record: `ask` opens a new connection each time, so with several workers any may answer."""
    response = ask(url, query)
    assert response.status_code == 200, response.text
    return [(r["metadata"]["source"], r["metadata"]["document_id"].split(":", 1)[1], r["score"]) for r in response.json()["records"]]


def wiki_index(url: str) -> dict:
    return {s["name"]: s["index"] for s in httpx.get(url + "/status").json()["sources"]}["wiki"]


def block_reads(state: FakeNotion) -> Counter[str]:
    return Counter(path.split("/")[3] for _, path in state.requests if path.startswith("/v1/blocks/"))


@pytest.fixture
def notion() -> Iterator[tuple[FakeNotion, str]]:
    state = FakeNotion(token=TOKEN, page_size=100)
    state.add_page("p-runbook", "Incident runbook", [block("b1", "paragraph", "Page the incident commander for SEV1.")])
    state.add_page("p-wifi", "Office wifi", [block("w1", "paragraph", "Guests use the Guest network.")])
    state.add_page("p-keys", "Key rotation", [block("k1", "paragraph", "Rotate the signing keys in the HSM.")])
    with serve(app(state)) as url:
        yield state, url



def syncs(url: str, name: str) -> int:
    """How many syncs of source `name` have ended, as /status tells (any worker: the count is in the store)."""
    with httpx.Client() as client:
        sources = client.get(url + "/status").json()["sources"]
    return next(s for s in sources if s["name"] == name)["index"]["syncs"]

def test_a_restart_serves_the_stored_index_and_fetches_only_what_changed(tmp_path: Path, notion):
    fake, notion_url = notion
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "vpn.md").write_text("# VPN\n\nImport the WireGuard profile from the portal.")
    (folder / "backup.md").write_text("# Backups\n\nNightly snapshots of the database.")
    (tmp_path / "private.txt").write_text("database password hunter2")
    (folder / "escape.md").symlink_to(tmp_path / "private.txt")
    config = tmp_path / "connectors.yaml"
    config.write_text(stored_config(folder, notion_url, tmp_path / "state"))
    queries = ["incident commander", "wireguard profile", "signing keys", "nightly database snapshots", "password hunter2"]
    with serve_cli("--config", str(config)) as (url, _):
        before = {q: hits(url, q) for q in queries}
    assert before["incident commander"][0][:2] == ("wiki", "p-runbook")
    assert set(block_reads(fake)) == {"p-runbook", "p-wifi", "p-keys"}

    fake.requests.clear()
    started = time.monotonic()
    with serve_cli("--config", str(config)) as (url, process):
        ready_after = time.monotonic() - started
        synced = syncs(url, "wiki")
        assert {q: hits(url, q) for q in queries} == before, "the same answers from the stored index"
        eventually(lambda: syncs(url, "wiki") > synced)  # a background sync has run (refresh_s: 1)
        assert any(path == "/v1/search" for _, path in fake.requests), "the restart listed the pages"
        assert block_reads(fake) == Counter(), "no unchanged page was fetched again"

        fake.add_page("p-wifi", "Office wifi", [block("w1", "paragraph", "Visitors use the Lobby network.")], edited="2025-06-01T00:00:00.000Z")
        (folder / "vpn.md").write_text("# VPN\n\nImport the Tailscale profile from the portal.")
        eventually(lambda: [r[:2] for r in hits(url, "lobby")] == [("wiki", "p-wifi")])
        eventually(lambda: [r[:2] for r in hits(url, "tailscale")] == [("docs", "vpn.md")])
        assert hits(url, "wireguard") == []
        assert block_reads(fake) == Counter({"p-wifi": 1}), "only the changed page was fetched"
        status = httpx.get(url + "/status").json()
    assert ready_after < 10
    sources = {s["name"]: s["index"] for s in status["sources"]}
    assert sources["wiki"]["documents"] == 3 and sources["docs"]["documents"] == 2
    assert sources["wiki"]["syncer"] and sources["wiki"]["store_bytes"] > 0 and sources["wiki"]["last_refresh"]
    assert sources["docs"]["skipped"] == 1 and sources["docs"]["skipped_paths"] == ["escape.md"]
    assert all("hunter2" not in str(r) for r in before.values())


def test_sigkill_mid_sync_loses_nothing_and_the_next_start_finishes_it(tmp_path: Path, notion):
    fake, notion_url = notion
    for i in range(40):
        fake.add_page(f"p-{i:02}", f"Page {i}", [block(f"x{i}", "paragraph", f"Paragraph about topic{i} and shared words.")])
    folder = tmp_path / "docs"
    folder.mkdir()
    config = tmp_path / "connectors.yaml"
    config.write_text(stored_config(folder, notion_url, tmp_path / "state", rps=8))
    port = free_port()
    command = [sys.executable, "-m", "aggregator", "serve", "--config", str(config), "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def committed() -> int:
            with contextlib.suppress(httpx.TransportError):
                return wiki_index(f"http://127.0.0.1:{port}")["documents"]
            return 0

        eventually(lambda: committed() > 0, timeout=20)  # the first commit (every 2 s of fetching) is in
        assert committed() < 43, "killed in the middle of the first sync"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    fetched_before = set(block_reads(fake))
    fake.requests.clear()
    with serve_cli("--config", str(config)) as (url, server):
        eventually(lambda: all(hits(url, f"topic{i}") for i in (0, 20, 39)), timeout=20)
        eventually(lambda: wiki_index(url)["documents"] == 43)
        server.terminate()
        output = server.communicate(timeout=15)[0]
    assert "discarding" not in output, "the store was not damaged by the kill"
    refetched = set(block_reads(fake))
    assert len(refetched) < 43, "pages committed before the kill were kept, not fetched again"
    assert len(fetched_before | refetched) == 43


def test_three_workers_fetch_each_page_once_and_all_answer(tmp_path: Path, notion):
    fake, notion_url = notion
    folder = tmp_path / "docs"
    folder.mkdir()
    config = tmp_path / "connectors.yaml"
    config.write_text(stored_config(folder, notion_url, tmp_path / "state"))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    (tmp_path / "metrics").mkdir()
    with serve_cli("--config", str(config), "--workers", "3", env=env) as (url, _):
        for _ in range(20):
            assert hits(url, "signing keys HSM")[0][:2] == ("wiki", "p-keys")
        seen: dict[int, bool] = {}
        for _ in range(40):
            with httpx.Client() as client:
                status = client.get(url + "/status").json()
            seen[status["pid"]] = {s["name"]: s["index"] for s in status["sources"]}["wiki"]["syncer"]
        synced = syncs(url, "wiki")
        eventually(lambda: syncs(url, "wiki") > synced, timeout=10)  # another sync (refresh_s: 1) has read nothing new
        assert block_reads(fake) == Counter({"p-runbook": 1, "p-wifi": 1, "p-keys": 1})
        fake.add_page("p-wifi", "Office wifi", [block("w1", "paragraph", "Visitors use the Lobby network.")], edited="2025-06-01T00:00:00.000Z")
        eventually(lambda: [r[:2] for r in hits(url, "lobby")] == [("wiki", "p-wifi")], timeout=5)
        changed_at = time.monotonic()
        for _ in range(12):  # every worker, not only the syncer, answers from the updated store
            assert [r[:2] for r in hits(url, "lobby")] == [("wiki", "p-wifi")]
        assert time.monotonic() - changed_at < 5
    assert block_reads(fake) == Counter({"p-runbook": 1, "p-wifi": 2, "p-keys": 1})
    assert len(seen) >= 2, "several workers answered"
    assert list(seen.values()).count(True) <= 1 and len(seen) - list(seen.values()).count(True) >= 1


async def test_an_index_of_other_settings_is_discarded_and_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "long.md").write_text("\n\n".join(f"Paragraph {i} on the deployment pipeline." * 6 for i in range(20)))
    state = LocalBackend(tmp_path / "state")
    counts = []
    for chunk_chars in (500, 1000):
        connector = IndexedConnector(FilesSource("docs", FilesSettings(path=folder, chunk_chars=chunk_chars, watch=False)))
        connector.bind_state(state)
        with caplog.at_level(logging.WARNING, "aggregator.state"):
            async with connector:
                await connector.wait_ready(10)
                found = await connector.search(SourceQuery("deployment pipeline", 100))
                counts.append(len(found))
                assert all(len(p.content) <= chunk_chars for p in found)
    assert counts[0] > counts[1]
    assert len([r for r in caplog.records if "discarding the stored index" in r.getMessage()]) == 1


async def test_a_store_that_cannot_be_opened_once_is_tried_again_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """The syncer keeps the lock while its store fails to open (SQLite busy, a full disk): it must try again,
    or no process would ever index the source until a restart."""
    import aggregator.state.sync as indexed

    monkeypatch.setattr(indexed, "OPEN_RETRY_S", 0.05)
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "runbook.md").write_text("Page the incident commander for every SEV1 outage.")
    connector = IndexedConnector(FilesSource("docs", FilesSettings(path=folder, watch=False)))
    connector.bind_state(LocalBackend(tmp_path / "state"))
    store = connector._open_store()
    real_open, failures = store.open_writer, []

    def open_writer():  # type: ignore[no-untyped-def]
        if not failures:
            failures.append(1)
            raise OSError(28, "No space left on device")
        return real_open()

    monkeypatch.setattr(store, "open_writer", open_writer)
    with caplog.at_level(logging.ERROR, "aggregator.state.sync"):
        async with connector:
            await until(lambda: connector.search(SourceQuery("incident commander", 5)), what="indexed after the failed open")
            found = await connector.search(SourceQuery("incident commander", 5))
            assert [p.document_id for p in found] == ["runbook.md"], "indexed after the failed open, without a restart"
            assert connector.stats().last_refresh_error is None and connector.syncing_here
    assert failures and "cannot open its index store" in caplog.text
