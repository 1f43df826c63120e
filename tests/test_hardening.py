"""Findings of a hostile review (issue 23) that have no better home: log lines, hard links, slow connections."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path

from aggregator.ops.logs import configure_logging
from aggregator.state.sync import IndexedConnector
from connectors.base import SourceQuery
from connectors.files import FilesSettings, FilesSource


@contextlib.contextmanager
def gateway_log(level: str = "info") -> Iterator[io.StringIO]:
    """What `aggregator serve` would write to its terminal, in text format; logging is put back as it was."""
    root = logging.getLogger()
    handlers, root_level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in list(logging.root.manager.loggerDict)}
    output = io.StringIO()
    try:
        configure_logging(level)
        root.handlers[0].setStream(output)  # type: ignore[attr-defined]
        yield output
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)
        for name, value in levels.items():
            logging.getLogger(name).setLevel(value)


async def test_a_file_name_cannot_forge_a_log_line(tmp_path: Path):
    """A file name holding a newline (and a terminal escape) is written on its own line's terms, escaped."""
    outside = tmp_path / "outside.txt"
    outside.write_text("not for the index")
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "guide.md").write_text("# Guide\n\nSomething to index.")
    forged = "evil.md\n2026-12-04 00:00:00,000 INFO aggregator.access: retrieval id=forged kb=demo\x1b[2K"
    (folder / f"{forged}.md").symlink_to(outside)  # skipped, and named in a warning
    with gateway_log() as output:
        async with IndexedConnector(FilesSource("docs", FilesSettings(path=folder, watch=False))) as docs:
            await docs.wait_ready(5)
            await docs.search(SourceQuery("guide", 5))
    lines = output.getvalue().splitlines()
    warning = [line for line in lines if "lead outside the folder" in line]
    assert len(warning) == 1 and "evil.md\\n2026-12-04" in warning[0] and "\\x1b[2K" in warning[0], lines
    assert not any(line.startswith("2026-12-04 00:00:00,000") for line in lines), "no line of its own"


async def test_hard_links_are_skipped_when_the_config_asks(tmp_path: Path):
    """A hard link to a file outside the folder passes the real-path check; `hard_links: false` refuses it."""
    outside = tmp_path / "private.txt"
    outside.write_text("root password hint: hunter2")
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "guide.md").write_text("# Guide\n\nA password policy guide.")
    (folder / "planted.md").hardlink_to(outside)
    async with IndexedConnector(FilesSource("docs", FilesSettings(path=folder, watch=False))) as docs:
        await docs.wait_ready(5)
        found = {p.document_id for p in await docs.search(SourceQuery("password hint", 10))}
    assert found == {"guide.md", "planted.md"}, "by default a hard link is indexed: the documented limit"
    async with IndexedConnector(FilesSource("docs", FilesSettings(path=folder, watch=False, hard_links=False))) as docs:
        await docs.wait_ready(5)
        found = {p.document_id for p in await docs.search(SourceQuery("password hint", 10))}
        stats = docs.stats()
        assert docs.source._read("planted.md") is None, "checked again when the file is read"
    assert found == {"guide.md"} and stats.skipped_paths == ["planted.md"]


def test_connections_that_never_finish_their_headers_are_closed_and_capped(tmp_path: Path):
    """`aggregator serve` closes a connection whose request head is not complete in time (silent, or dripping
    headers), and closes at once a connection over the cap, so descriptors cannot run out before a key check."""
    import socket
    import time


    from .conftest import DOCS, write_docs
    from testkit.loopback import serve_cli, wait_ready

    folder = write_docs(tmp_path / "docs", DOCS)
    config = tmp_path / "c.yaml"
    config.write_text(f"server:\n  api_keys: [{{key: k-123456}}]\nknowledge_bases:\n  demo: {{connectors: [docs]}}\nconnectors:\n  docs: {{type: files, path: {folder}}}\n")
    with serve_cli("--config", str(config), "--header-timeout", "1", "--max-connections", "4") as (url, _):
        port = int(url.rsplit(":", 1)[1])
        silent, dripping = socket.create_connection(("127.0.0.1", port)), socket.create_connection(("127.0.0.1", port))
        started = time.monotonic()
        dripping.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for sock in (silent, dripping):
            sock.settimeout(0.2)
        closed: dict[str, float] = {}
        while len(closed) < 2 and time.monotonic() - started < 8:
            for name, sock in (("silent", silent), ("dripping", dripping)):
                if name in closed:
                    continue
                try:
                    if name == "dripping":
                        sock.sendall(b"X-Drip: 1\r\n")
                    if sock.recv(1024) == b"":
                        closed[name] = time.monotonic() - started
                except TimeoutError:
                    pass
                except OSError:  # reset, or a broken pipe while dripping: closed by the server too
                    closed[name] = time.monotonic() - started
        assert set(closed) == {"silent", "dripping"} and all(0.8 <= t < 4 for t in closed.values()), closed
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]  # the cap, silently open
        try:
            extra = socket.create_connection(("127.0.0.1", port))
            extra.settimeout(3)
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                assert extra.recv(1024) == b"", "over the cap: closed without an answer"
            except ConnectionResetError:
                pass
        finally:
            for sock in held:
                sock.close()
        wait_ready(url, timeout=5)  # served again once they are gone (the server sees the closes on its next turn)
