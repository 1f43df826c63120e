"""The `files` source: an index built at startup and kept fresh as files come, change and go."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from aggregator.text.tokenize import tokenize
from aggregator.state.sync import IndexedConnector
from connectors.base import SourceQuery
from connectors.files import FilesSettings, FilesSource, title_of
from testkit.loopback import until


async def titles(connector: IndexedConnector, text: str) -> list[str]:
    return [p.title for p in await connector.search(SourceQuery(text, 10))]


async def test_index_follows_added_changed_and_removed_files(tmp_path: Path):
    (tmp_path / "a.md").write_text("# Alpha\n\nThe alpha document talks about kubernetes.")
    async with IndexedConnector(FilesSource("docs", FilesSettings(path=tmp_path, refresh_s=60))) as docs:
        await docs.wait_ready(5)
        assert await titles(docs, "kubernetes") == ["Alpha"]

        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "b.txt").write_text("Beta notes about terraform.")

        async def added() -> bool:
            return await titles(docs, "terraform") == ["b.txt"]

        await until(added, 5, "the index following the added file")

        (tmp_path / "a.md").write_text("# Alpha\n\nNow the alpha document talks about nomad instead.")

        async def changed() -> bool:
            return await titles(docs, "kubernetes") == [] and await titles(docs, "nomad") == ["Alpha"]

        await until(changed, 5, "the index following the changed file")

        (tmp_path / "sub" / "b.txt").unlink()

        async def removed() -> bool:
            return await titles(docs, "terraform") == []

        await until(removed, 5, "the index following the removed file")
        assert docs.stats().documents == 1


async def test_without_a_watcher_a_refresh_finds_changes(tmp_path: Path):
    (tmp_path / "a.md").write_text("first version mentions postgres")
    async with IndexedConnector(FilesSource("docs", FilesSettings(path=tmp_path, watch=False, refresh_s=3600))) as docs:
        await docs.wait_ready(5)
        (tmp_path / "a.md").write_text("second version mentions mysql and is longer")
        await docs.sync()
        assert await titles(docs, "mysql") == ["a.md"] and await titles(docs, "postgres") == []


async def test_metadata_of_a_passage(tmp_path: Path):
    path = tmp_path / "guide.md"
    path.write_text("# The Guide\n\nSome text about backups.")
    os.utime(path, (1_700_000_000, 1_700_000_000))
    async with IndexedConnector(FilesSource("docs", FilesSettings(path=tmp_path))) as docs:
        await docs.wait_ready(5)
        [passage] = await docs.search(SourceQuery("backups", 5))
    assert passage.document_id == "guide.md" and passage.title == "The Guide"
    assert passage.updated_at == "2023-11-14T22:13:20Z"
    assert passage.metadata["path"] == "guide.md"
    assert 0 < passage.source_score <= 1 and passage.source_rank == 1


async def test_collection_statistics_for_the_rerank(tmp_path: Path):
    (tmp_path / "a.md").write_text("# Backups\n\nNightly backups of the database.")
    (tmp_path / "b.md").write_text("# Restores\n\nRestore a database from the nightly snapshot.")
    async with IndexedConnector(FilesSource("docs", FilesSettings(path=tmp_path))) as docs:
        await docs.wait_ready(5)
        stats = docs.term_statistics(tokenize("database backups kubernetes"))
    assert stats.passages == 2 and stats.total_length > 8
    assert dict(stats.frequencies) == {"databas": 2, "backup": 1, "kubernet": 0}


async def test_long_documents_become_several_passages(tmp_path: Path):
    paragraphs = [f"Paragraph {i} about the deployment pipeline and its stages." * 4 for i in range(30)]
    (tmp_path / "long.md").write_text("\n\n".join(paragraphs))
    async with IndexedConnector(FilesSource("docs", FilesSettings(path=tmp_path, chunk_chars=500))) as docs:
        await docs.wait_ready(5)
        found = await docs.search(SourceQuery("deployment pipeline", 100))
    assert len(found) > 5 and all(len(p.content) <= 500 for p in found)
    assert sorted(p.chunk_index for p in found) == list(range(len(found)))


async def test_include_exclude_and_size_limit(tmp_path: Path):
    (tmp_path / "a.md").write_text("widget")
    (tmp_path / "b.txt").write_text("widget")
    (tmp_path / "c.rst").write_text("widget")
    (tmp_path / "drafts").mkdir()
    (tmp_path / "drafts" / "d.md").write_text("widget")
    (tmp_path / "huge.md").write_text("widget " * 1000)
    settings = FilesSettings(path=tmp_path, include=["**/*.md", "**/*.txt"], exclude=["drafts/**"], max_file_bytes=1000)
    async with IndexedConnector(FilesSource("docs", settings)) as docs:
        await docs.wait_ready(5)
        assert sorted(p.document_id for p in await docs.search(SourceQuery("widget", 10))) == ["a.md", "b.txt"]
        assert docs.stats().skipped == 1


async def test_a_missing_folder_is_a_reported_error_not_a_crash(tmp_path: Path):
    async with IndexedConnector(FilesSource("docs", FilesSettings(path=tmp_path / "nope", watch=False))) as docs:
        await docs.wait_ready(5)
        assert docs.ready
        assert "does not exist" in docs.stats().last_refresh_error
        assert await docs.search(SourceQuery("anything", 5)) == []


async def test_metadata_filter_is_applied_before_the_limit(tmp_path: Path):
    for i in range(30):
        (tmp_path / f"doc{i:02}.md").write_text("release checklist " * (30 - i))
    async with IndexedConnector(FilesSource("docs", FilesSettings(path=tmp_path))) as docs:
        await docs.wait_ready(5)
        query = SourceQuery("release checklist", 3, accepts=lambda m: m["document_id"] == "docs:doc29.md")
        assert [p.document_id for p in await docs.search(query)] == ["doc29.md"]


def test_titles():
    assert title_of("a/b.md", "intro\n\n# Real Title #\n\ntext") == "Real Title"
    assert title_of("a/b.md", "---\ntitle: From Front Matter\n---\n# Heading") == "From Front Matter"
    assert title_of("notes.txt", "# not markdown") == "notes.txt"
    assert title_of("x.md", "no heading") == "x.md"


async def test_files_outside_the_folder_are_skipped_and_named_unless_links_are_followed(tmp_path: Path):
    secret = tmp_path / "outside" / "passwd"
    secret.parent.mkdir()
    secret.write_text("root:x:0:0:root:/root:/bin/bash")
    (tmp_path / "outside" / "notes.md").write_text("# Notes\n\nroot shell notes")
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "guide.md").write_text("# Guide\n\nThe root of the documentation.")
    (folder / "passwd.md").symlink_to(secret)
    (folder / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    (folder / "inside.md").symlink_to(folder / "guide.md")  # a link that stays inside is fine
    include = ["**/*.md", "linked/*.md"]  # `**` does not descend into linked folders; a pattern may name one
    async with IndexedConnector(FilesSource("docs", FilesSettings(path=folder, include=include, watch=False))) as docs:
        await docs.wait_ready(5)
        found = {p.document_id for p in await docs.search(SourceQuery("root bash shell", 10))}
        stats = docs.stats()
    assert found == {"guide.md", "inside.md"}
    assert stats.skipped == 2 and stats.skipped_paths == ["linked/notes.md", "passwd.md"]
    async with IndexedConnector(FilesSource("docs", FilesSettings(path=folder, include=include, watch=False, follow_symlinks=True))) as docs:
        await docs.wait_ready(5)
        found = {p.document_id for p in await docs.search(SourceQuery("root bash shell", 10))}
        assert docs.stats().skipped == 0
    assert found == {"guide.md", "inside.md", "passwd.md", "linked/notes.md"}


async def test_a_file_swapped_for_a_link_after_the_scan_is_not_read(tmp_path: Path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private key material")
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.md").write_text("harmless")
    source = FilesSource("docs", FilesSettings(path=folder, watch=False))
    assert "a.md" in await source.list_versions()
    (folder / "a.md").unlink()
    (folder / "a.md").symlink_to(secret)
    assert await source.fetch("a.md") is None
    await source.aclose()


async def test_two_folders_with_the_same_file_give_two_document_ids_that_survive_a_restart(tmp_path: Path):
    """Dify groups a reply's citations by `metadata.document_id`: two folders' README.md must not be one citation."""
    from aggregator.contract.models import RetrievalRequest
    from aggregator.retrieval.pipeline import retrieve
    from aggregator.runtime.gateway import Gateway

    from .conftest import make_config, write_docs

    write_docs(tmp_path / "team-a", {"README.md": "# Team A\n\nRotate the signing keys every year."})
    write_docs(tmp_path / "team-b", {"README.md": "# Team B\n\nRotate the signing keys every month."})
    config = make_config(tmp_path / "team-a", f"team-b:\n  type: files\n  path: {tmp_path / 'team-b'}\n", kb_connectors="[docs, team-b]")

    async def ask(condition: dict | None = None) -> list[tuple[str, str]]:
        """One retrieval on a gateway started for it (the second start reads the stored indexes)."""
        request = {"knowledge_id": "demo", "query": "rotate signing keys", "retrieval_setting": {"top_k": 5}, "metadata_condition": condition}
        gateway = Gateway(config)
        await gateway.start()
        try:
            for slot in gateway.slots.values():
                await slot.connector.wait_ready(10)
            records = (await retrieve(gateway, RetrievalRequest.model_validate(request))).records
        finally:
            await gateway.aclose()
        return sorted((r["metadata"]["document_id"], r["metadata"]["path"]) for r in records)

    first = await ask()
    assert first == [("docs:README.md", "README.md"), ("team-b:README.md", "README.md")]
    assert await ask() == first, "the same ids after a restart on the stored indexes"
    by_id = {"conditions": [{"name": "document_id", "comparison_operator": "is", "value": "team-b:README.md"}]}
    assert await ask(by_id) == [("team-b:README.md", "README.md")]
    by_path = {"conditions": [{"name": "path", "comparison_operator": "is", "value": "README.md"}]}
    assert await ask(by_path) == first, "the source's own id is still in `path`"


@pytest.mark.parametrize("watcher", ["real", "forced"])
async def test_an_edit_reported_while_the_start_up_sync_runs_is_indexed_at_once(tmp_path: Path, watcher: str):
    """Issue 24: after a restart on a stored index, a file rewritten while the start-up sync ran was lost until the
    next full rescan (refresh_s). The race is forced: the edit lands, and the watcher reports it, between the sync's
    listing (which saw the old version, the stored one) and the end of that sync. `real`: the sync waits until the
    real watcher has reported the edit; `forced`: the hook reports it itself, as the watcher would."""
    from aggregator.state import LocalBackend

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.md").write_text("# Notes\n\nThe old wording about lunch.")
    state = LocalBackend(tmp_path / "state")
    settings = FilesSettings(path=folder, watch=watcher == "real", refresh_s=300)

    first = IndexedConnector(FilesSource("docs", settings))
    first.bind_state(state)
    async with first:
        await first.wait_ready(10)
        assert await first.search(SourceQuery("lunch", 3))

    listed = asyncio.Event()  # the restarted source's start-up sync has listed the folder, and the edit was reported
    reported = asyncio.Event()

    class Restarted(IndexedConnector):
        def trigger_refresh(self) -> None:
            super().trigger_refresh()
            if listed.is_set() or watcher == "forced":
                reported.set()

    class Edited(FilesSource):
        async def list_versions(self) -> dict[str, str]:
            versions = await super().list_versions()
            if not listed.is_set():
                listed.set()
                (folder / "notes.md").write_text("# Notes\n\nNew wording: the zeppelin timetable.")
                if watcher == "forced":
                    second.trigger_refresh()
                await asyncio.wait_for(reported.wait(), 10)  # this sync ends only after the watcher told of the edit
            return versions

    second = Restarted(Edited("docs", settings))
    second.bind_state(state)
    async with second:
        await asyncio.wait_for(reported.wait(), 10)
        deadline = asyncio.get_running_loop().time() + 10  # refresh_s is 300: only the report can bring it in
        while not await second.search(SourceQuery("zeppelin timetable", 3)):
            assert asyncio.get_running_loop().time() < deadline, "the edit was lost until the next full rescan"
            await asyncio.sleep(0.02)
        assert not await second.search(SourceQuery("lunch", 3))
