"""What an indexed source needs from the place its index lives, whatever that place is.

The embedded default is a folder per source under `server.state_dir`
(`local.LocalBackend`); a shared database can implement the same classes
(`StateBackend` opens an `IndexStore` per source) so that sources, the sync
loop and the status page do not change with it.

An `IndexStore` is used from two sides, each a class of its own:
- every process reads it through its `IndexReader` (`refresh`, `asearch`,
  `term_statistics`, `info`, which the store passes on), cheaply, on the event
  loop: lookups in memory-mapped or cached data, or a query to a database for
  `asearch`;
- one process per source syncs it: it calls `try_lead()` until it wins,
  then writes through the `IndexWriter` of `open_writer()` (from a worker
  thread). A shared database can take the lead away (its connection died):
  `leading` turns false and the syncer goes back to asking for it.

What both backends' readers and writers do alike is written once beside this:
`reading` (paging through ranked candidates, the metadata cache) and
`vocabulary` (term ids).
"""

from __future__ import annotations

import abc
import asyncio
import functools
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aggregator.ranking.bm25 import K1, idf
from aggregator.text.chunking import split_passages
from aggregator.text.tokenize import TOKENIZER_VERSION, tokenize

#: Bumped when the layout of what is stored changes; a store of another layout is rebuilt.
STORE_FORMAT = 1

_PROBE = (
    "Rotating the release signing keys: the HSM keeps them; rotation happens yearly. "
    "发布签名密钥每十二个月轮换一次。 Ｆｕｌｌ-width ＡＢＣ, naïve café, 2024-06-30.\n\n"
) * 3


@functools.cache  # a fixed text through the code of this process: the same answer every time
def analysis_fingerprint() -> str:
    """What the tokenizer and the splitter make of a fixed text: a change in either discards stored indexes."""
    probe = {"tokenizer": TOKENIZER_VERSION, "terms": tokenize(_PROBE), "passages": split_passages(_PROBE, 200)}
    return hashlib.sha256(json.dumps(probe, ensure_ascii=False).encode()).hexdigest()[:16]


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """One string for the settings that shape an index, the analysis and the store format."""
    described = {"format": STORE_FORMAT, "analysis": analysis_fingerprint(), "settings": settings}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:24]


def query_weights(terms: Sequence[str], passages: int, lookup: Callable[[str], tuple[int, int]]) -> tuple[list[int], list[float], float]:
    """Term ids and weights (qtf * idf) of the query's terms present in the collection, and the query's ceiling
    (every term's weight * (k1 + 1), absent ones too), which scores are divided by. `lookup(term)` gives the
    term's (id, document frequency), (0, 0) when the collection lacks it. One copy for every store, so that
    they rank alike (aggregator/ranking/bm25.py)."""
    ids: list[int] = []
    weights: list[float] = []
    ceiling = 0.0
    for term, qtf in Counter(terms).items():
        term_id, df = lookup(term)
        weight = qtf * idf(passages, df)
        ceiling += weight * (K1 + 1)
        if df:
            ids.append(term_id)
            weights.append(weight)
    return ids, weights, ceiling


def tie_key(document_id: str, chunk_index: int) -> int:
    """A stable order for passages that score the same: the same on every build, restart, worker and store."""
    return int.from_bytes(hashlib.blake2b(f"{document_id}\0{chunk_index}".encode(), digest_size=8).digest(), "little")


@dataclass(slots=True)
class PreparedDocument:
    """A document split into passages and tokenized, ready to be stored (terms include the title's)."""

    document_id: str
    version: str
    title: str
    updated_at: str | None
    metadata: dict[str, Any]
    passages: list[tuple[str, list[str]]]  # (content, terms)


@dataclass(slots=True)
class StoredPassage:
    """A passage as read back from a store, with its score for the query that found it."""

    document_id: str
    chunk_index: int
    title: str
    content: str
    metadata: dict[str, Any]
    updated_at: str | None
    score: float = 0.0  # BM25 normalised by the query's ceiling (aggregator/ranking/bm25.py)


@dataclass(slots=True)
class SyncStatus:
    """The syncer's account of its work, published in the store so every worker shows the same."""

    syncing: bool = False
    done: int = 0  # documents fetched in the sync running now
    total: int = 0  # documents that sync has to fetch
    passages_per_s: float | None = None  # rate of the last sync that indexed something
    last_sync: str | None = None
    syncs: int = 0  # syncs ended (done or failed) since the store was built: a test or an operator sees one happen
    last_error: str | None = None
    last_outcome: str | None = None
    skipped: int = 0
    skipped_paths: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({k: getattr(self, k) for k in self.__slots__})  # type: ignore[attr-defined]

    @classmethod
    def from_json(cls, text: str | None) -> "SyncStatus":
        """Fields it no longer has (`started_at`, saved by earlier versions) are ignored."""
        try:
            data = json.loads(text or "{}")
            return cls(**{k: data[k] for k in cls.__slots__ if k in data})  # type: ignore[attr-defined]
        except (ValueError, TypeError):
            return cls()


@dataclass(slots=True)
class StoreInfo:
    documents: int = 0
    passages: int = 0
    bytes_on_disk: int = 0
    synced_once: bool = False  # a complete sync (or a failed one) has finished at least once
    status: SyncStatus = field(default_factory=SyncStatus)


class StoreUnavailable(Exception):
    """The store cannot be read now (its database is unreachable); the source answers as unavailable."""


class IndexWriter(abc.ABC):
    """The syncer's handle. Methods block (disk I/O): call them from a worker thread."""

    @abc.abstractmethod
    def versions(self) -> dict[str, str]:
        """Every stored document id with the version it was stored at."""

    @abc.abstractmethod
    def apply(self, documents: Sequence[PreparedDocument], removed: Sequence[str], status: SyncStatus) -> None:
        """Store new or changed documents and drop removed ones, atomically, with the sync's status."""

    @abc.abstractmethod
    def finish(self, status: SyncStatus) -> None:
        """A sync ended (well or not): publish its status, mark the store as synced once, tidy up."""

    @abc.abstractmethod
    def close(self) -> None: ...


class IndexReader(abc.ABC):
    """Every process's side of a store: what the syncer committed, read cheaply, from several threads at once."""

    @abc.abstractmethod
    def refresh(self) -> None:
        """See what the syncer committed since the last call. Cheap when nothing changed."""

    @abc.abstractmethod
    def search(
        self, terms: Sequence[str], limit: int, accept: Callable[[StoredPassage], bool] | None = None
    ) -> list[StoredPassage]:
        """The `limit` best passages for the query terms, best first; ties ordered by a stable key.

        Called on worker threads, several at once, while the event loop calls `refresh`, `term_statistics` and
        `info`: an implementation guards what it shares. `accept` may raise to stop the search (a deadline)."""

    async def asearch(
        self, terms: Sequence[str], limit: int, accept: Callable[[StoredPassage], bool] | None = None
    ) -> list[StoredPassage]:
        """`search` for the event loop, on a worker thread: scoring, reading passages and `accept` (a request's
        filter) are CPU work that must not hold up other requests. A store whose data is remote overrides it."""
        return await asyncio.to_thread(self.search, terms, limit, accept)

    @abc.abstractmethod
    def term_statistics(self, terms: Sequence[str]) -> tuple[int, int, dict[str, int]]:
        """(passages, total length, document frequency of each term) over the live collection."""

    @abc.abstractmethod
    def info(self) -> StoreInfo: ...


class IndexStore(abc.ABC):
    """One source's index, shared by every process of the gateway: its reader, and the lead that opens its writer.

    Reading goes to `reader`; the methods below pass it on, so that a source holds one object per store."""

    reader: IndexReader

    @property
    @abc.abstractmethod
    def leading(self) -> bool:
        """True while this process is the source's syncer."""

    @abc.abstractmethod
    def try_lead(self) -> bool:
        """Become the syncer if no live process is (blocking I/O; from a thread)."""

    @abc.abstractmethod
    def open_writer(self) -> IndexWriter:
        """Validate what is stored (discarding it, with one log line, if it belongs to other settings or is
        damaged) and return the writer. Only while leading; from a thread."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the lead (if held) and every handle."""

    def refresh(self) -> None:
        self.reader.refresh()

    def search(
        self, terms: Sequence[str], limit: int, accept: Callable[[StoredPassage], bool] | None = None
    ) -> list[StoredPassage]:
        return self.reader.search(terms, limit, accept)

    async def asearch(
        self, terms: Sequence[str], limit: int, accept: Callable[[StoredPassage], bool] | None = None
    ) -> list[StoredPassage]:
        return await self.reader.asearch(terms, limit, accept)

    def term_statistics(self, terms: Sequence[str]) -> tuple[int, int, dict[str, int]]:
        return self.reader.term_statistics(terms)

    def info(self) -> StoreInfo:
        return self.reader.info()


class StateBackend(abc.ABC):
    """Where every source's store lives."""

    @abc.abstractmethod
    def open(self, source: str, fingerprint: str) -> IndexStore: ...

    async def start(self) -> None:
        """Connect (a database backend); called once before any store is opened. Must not fail on an outage."""

    async def aclose(self) -> None:
        """Release connections; called once when the service stops."""

    def describe(self) -> dict[str, Any]:
        """Where the indexes live and whether that place answers, for /status."""
        return {}
