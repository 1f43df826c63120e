"""`files`: a local folder of text documents, indexed and kept fresh.

The folder is watched (inotify through `watchfiles`, where the platform has
it) so that an added, changed or removed file is searchable within about a
second; a full rescan every `refresh_s` catches anything a watcher can miss
(network filesystems, editors that swap files).

The source stays inside its folder: a file whose real path is elsewhere (a
symlink to `/etc/passwd`, a linked directory outside) is skipped and named in
/status, unless `follow_symlinks: true`. A documentation folder is often a git
checkout, where anyone who can commit can add a symlink. A hard link cannot be
told from the file it links (both are the same inode, with no "real path"
elsewhere): `hard_links: false` skips every file with more than one link, for
folders that someone with a shell on this host could plant one in.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from connectors.base import Document, DocumentSource, IndexedSettings, SourceError, iso_utc

log = logging.getLogger(__name__)

_HEADING = re.compile(r"^\s{0,3}#\s+(.+?)\s*#*\s*$", re.MULTILINE)
_FRONT_MATTER_TITLE = re.compile(r"\A---\s*\n(?:.*\n)*?title:\s*[\"']?(.+?)[\"']?\s*\n(?:.*\n)*?---\s*\n")


class FilesSettings(IndexedSettings):
    type: Literal["files"] = "files"
    path: Path = Field(description="The folder to index; relative paths are relative to connectors.yaml.")
    include: list[str] = Field(default_factory=lambda: ["**/*.md", "**/*.txt"], min_length=1)
    exclude: list[str] = Field(default_factory=list)
    max_file_bytes: int = Field(5 * 1024 * 1024, ge=1)
    watch: bool = Field(True, description="React to changes at once instead of waiting for refresh_s.")
    follow_symlinks: bool = Field(False, description="Index files whose real path is outside the folder (through symlinks).")
    hard_links: bool = Field(
        True, description="false: skip files with more than one hard link (one to a file outside looks like the file itself)."
    )

    @field_validator("include", "exclude")
    @classmethod
    def _relative_globs(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if pattern.startswith("/") or ".." in Path(pattern).parts:
                raise ValueError(f"{pattern!r}: globs are relative to path and may not leave it")
        return patterns


def title_of(relative: str, text: str) -> str:
    """A Markdown file's front-matter title or first `# heading`; otherwise the file name."""
    if relative.endswith(".md"):
        for pattern in (_FRONT_MATTER_TITLE, _HEADING):
            match = pattern.search(text)
            if match:
                return match.group(1).strip()
    return Path(relative).name


class FilesSource(DocumentSource):
    settings_model = FilesSettings
    settings: FilesSettings

    async def watch(self, changed: Callable[[], None]) -> None:
        """Report every change in the folder (`watch: true`); the core runs this where the folder is synced."""
        if not self.settings.watch:
            return
        import watchfiles

        root = self.settings.path
        while True:
            if not root.is_dir():  # wait for the folder to appear rather than fail
                await asyncio.sleep(self.settings.refresh_s)
                continue
            try:
                async for _changes in watchfiles.awatch(root, debounce=200, step=50, recursive=True):
                    changed()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # e.g. inotify limits reached: polling by refresh_s still works
                log.warning("source %s: file watching stopped (%s); relying on refresh_s", self.name, exc)
                return

    def _scan(self) -> dict[str, str]:
        root = self.settings.path
        if not root.is_dir():
            raise SourceError(f"folder {root} does not exist or is not a directory")
        real_root = root.resolve()
        found: dict[str, str] = {}
        skipped = 0
        outside: list[str] = []
        linked: list[str] = []  # hard links, when `hard_links: false`
        for pattern in self.settings.include:
            for path in root.glob(pattern):
                relative = path.relative_to(root).as_posix()
                if relative in found or relative in outside or relative in linked or self._excluded(relative):
                    continue
                try:
                    if not path.is_file():
                        continue
                    if not self.settings.follow_symlinks and self._inside(path, real_root) is None:
                        outside.append(relative)
                        continue
                    stat = path.stat()
                except OSError:  # vanished, or a link loop: not a document
                    continue
                if not self.settings.hard_links and stat.st_nlink > 1:
                    linked.append(relative)
                    continue
                if stat.st_size > self.settings.max_file_bytes:
                    skipped += 1
                    continue
                found[relative] = f"{stat.st_mtime_ns}:{stat.st_size}"
        if outside:
            log.warning("source %s: %d file(s) lead outside the folder and are skipped (follow_symlinks: false): %s",
                        self.name, len(outside), ", ".join(sorted(outside)[:5]))  # fmt: skip
        if linked:
            log.warning("source %s: %d file(s) have other hard links and are skipped (hard_links: false): %s",
                        self.name, len(linked), ", ".join(sorted(linked)[:5]))  # fmt: skip
        self.set_skipped(skipped + len(outside) + len(linked), sorted(outside + linked))
        return found

    @staticmethod
    def _inside(path: Path, real_root: Path) -> Path | None:
        """The real path of `path` if it lies in the folder (whose real path is `real_root`), else None."""
        real = path.resolve()
        return real if real.is_relative_to(real_root) else None

    def _excluded(self, relative: str) -> bool:
        """`exclude` globs match the relative path; `*` may span folders, so `drafts/*` drops a whole tree."""
        return any(fnmatch.fnmatchcase(relative, pattern) for pattern in self.settings.exclude)

    async def list_versions(self) -> dict[str, str]:
        return await asyncio.to_thread(self._scan)

    def _read(self, relative: str, real_root: Path | None = None) -> Document | None:
        """One file; `real_root` is the folder's real path (a batch resolves it once; None: resolved here)."""
        path = self.settings.path / relative
        try:
            if not self.settings.follow_symlinks:
                # Checked again at reading time: the file may have become a link since the scan.
                inside = self._inside(path, real_root or self.settings.path.resolve())
                if inside is None:
                    return None
                path = inside
            with open(path, "rb") as handle:
                stat = os.fstat(handle.fileno())
                if stat.st_size > self.settings.max_file_bytes or (not self.settings.hard_links and stat.st_nlink > 1):
                    return None
                raw = handle.read(self.settings.max_file_bytes + 1)
        except (FileNotFoundError, NotADirectoryError):
            return None
        text = raw.decode("utf-8", errors="replace").lstrip("\ufeff")
        return Document(
            document_id=relative,
            title=title_of(relative, text),
            text=text,
            version=f"{stat.st_mtime_ns}:{stat.st_size}",
            updated_at=iso_utc(stat.st_mtime),
            metadata={"path": relative, "size": stat.st_size, "extension": Path(relative).suffix.lstrip(".")},
        )

    async def fetch(self, document_id: str) -> Document | None:
        return await asyncio.to_thread(self._read, document_id)

    async def fetch_many(self, document_ids: Sequence[str]) -> list[Document | None | BaseException]:
        """Local reads are fast: a whole batch in one thread hop, not one task per file."""
        return await asyncio.to_thread(self._read_many, document_ids)

    def _read_many(self, document_ids: Sequence[str]) -> list[Document | None | BaseException]:
        results: list[Document | None | BaseException] = []
        real_root = self.settings.path.resolve()
        for relative in document_ids:
            try:
                results.append(self._read(relative, real_root))
            except OSError as exc:
                results.append(SourceError(f"{relative}: cannot read ({exc.strerror or exc})"))
        return results
