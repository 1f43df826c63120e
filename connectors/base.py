"""The contract between the gateway's core and every source.

A connector knows one API: how to ask it, how to read its answer and which
metadata conditions it can evaluate itself. It owns no policy. It never
retries, sleeps on its own account or hides an error: it raises one of the
typed errors below and the core's fan-out decides what happens next, with the
same rules for every source.

Lifecycle, written once here::

    connector = ConfluenceConnector("wiki", settings)     # or, for a folder: IndexedConnector(FilesSource(...))
    await connector.start()          # open clients, kick off background indexing
    passages = await connector.search(SourceQuery(text="vpn setup", limit=20))
    await connector.aclose()         # release clients and background tasks

``start()`` must return quickly: a slow first sync runs in the background and
``ready`` turns true when it is done; until then ``search`` answers from what is
indexed so far. A connector is also an async context manager doing the same.

A source without a search of its own (a folder, a bucket, Notion) is a
``DocumentSource`` instead: it lists its documents with a version token and
fetches them, and the core's sync engine (``aggregator/state/sync.py``) wraps
it into the ``Connector`` above, indexing it and answering its searches.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from aggregator.state import StateBackend


def iso_utc(timestamp: float) -> str:
    """Unix time as UTC ISO 8601 to the second: how a source's times, and every time in /status, are written."""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def now_iso() -> str:
    return iso_utc(time.time())


class CircuitSettings(BaseModel):
    """When the core stops calling a failing source, and for how long (see aggregator/retrieval/breaker.py)."""

    model_config = ConfigDict(extra="forbid")

    failures: int = Field(5, ge=1, le=1000, description="Consecutive failures that open the circuit.")
    cooldown_s: float = Field(10.0, gt=0, le=3600, description="First wait before a trial call.")
    max_cooldown_s: float = Field(300.0, gt=0, le=86400, description="Cap of the doubling cool-down.")


#: Every source's settings start from these; `connectors.yaml`'s `defaults` block replaces them for the sources
#: that leave a field unset, and a source's own value wins over both (`GatewayConfig.effective`).
DEFAULT_TIMEOUT_S = 3.0
DEFAULT_RETRIES = 2
DEFAULT_CHUNK_CHARS = 1500


class ConnectorSettings(BaseModel):
    """Fields every connector accepts; each source type subclasses this.

    Unknown keys are rejected so that a typo in `connectors.yaml` is an error,
    not a silently ignored setting.
    """

    model_config = ConfigDict(extra="forbid")

    type: str
    weight: float = Field(1.0, gt=0, le=10, description="Trust in this source relative to others.")
    scores: Literal["auto", "rank", "trust", "ignore"] = Field(
        "auto",
        description="How the rerank reads this source's scores: auto (learn their scale per query), rank (use the order "
        "only), trust (already on the gateway's scale), ignore (the gateway's own relevance alone).",
    )
    timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0, le=60, description="Per-call budget; defaults.timeout_s if unset.")
    retries: int = Field(DEFAULT_RETRIES, ge=0, le=10, description="Retries of a transient failure; defaults.retries if unset.")
    chunk_chars: int = Field(DEFAULT_CHUNK_CHARS, ge=200, le=20000, description="Passage size; defaults.chunk_chars if unset.")
    circuit: CircuitSettings = Field(default_factory=CircuitSettings, description="Circuit breaker; defaults.circuit if unset.")
    semantic: bool | None = Field(
        None,
        description="The source retrieves by meaning (embeddings), so its best passages may share no word with the query: "
        "without an embedding judge the gateway keeps its own confidence. Unset: the connector's guess from its settings.",
    )


@dataclass(slots=True)
class Passage:
    """One piece of text a source returned, before the core ranks it.

    A dataclass rather than a pydantic model: indexed sources hold hundreds of
    thousands of these, and validation happens where data enters, not here.
    """

    content: str
    title: str
    document_id: str
    chunk_index: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    updated_at: str | None = None
    #: The source's own relevance on the source's own scale, as it gave it: BM25 divided by the best hit,
    #: raw unbounded scores, cosine similarities, ... (any finite float; None when it gives ranks only).
    #: Connectors pass it on unclamped; the rerank maps each source's scale onto the gateway's.
    source_score: float | None = None
    source_rank: int | None = None  # 1-based rank in the source's own answer


def record_document_id(source: str, document_id: str) -> str:
    """A record's `document_id`: `<source>:<the source's own id>`.

    Dify groups a reply's citations by `metadata.document_id`, so it must differ
    between sources (two folders each holding `README.md`, two Confluence sites
    with a page 12345) and stay the same across restarts and queries: the
    connector's name, unique in the config, in front of the source's own id does
    both, whatever else the knowledge base holds.
    """
    return f"{source}:{document_id}"


def record_metadata(passage: Passage, source: str, source_type: str) -> dict[str, Any]:
    """The metadata a record carries, as filters see it: the source's own fields plus the gateway's.

    The source's fields are kept whole; `source`, `source_type`, `title`,
    `chunk_index` and `updated_at` are added where the source did not set them.
    `document_id` is always the gateway's (`record_document_id`), also over an
    upstream's own `document_id`, from which `passage.document_id` was read.
    `title` is there because it is the first name a user filters on.
    """
    metadata = dict(passage.metadata)
    metadata.setdefault("source", source)
    metadata.setdefault("source_type", source_type)
    metadata["document_id"] = record_document_id(source, passage.document_id)
    metadata.setdefault("title", passage.title)
    metadata.setdefault("chunk_index", passage.chunk_index)
    if passage.updated_at is not None:
        metadata.setdefault("updated_at", passage.updated_at)
    return metadata


@dataclass(slots=True, frozen=True)
class SourceQuery:
    """What the core asks of a source: the user's text and how many candidates it wants.

    `metadata_condition` is Dify's condition object as the request carried it
    (validated), for sources that pass it on or translate it. `accepts` is the
    same condition compiled to a predicate over `record_metadata(...)`, for
    sources that filter locally before cutting their list at `limit`.
    """

    text: str
    limit: int
    metadata_condition: dict[str, Any] | None = None
    accepts: Callable[[dict[str, Any]], bool] | None = None


#: The task of a source call that runs under the fan-out's own timeout (set by `aggregator/retrieval/fanout.py`, in that
#: call's task). No per-read timer of an HTTP client (at most the source's `timeout_s`) could fire before that
#: timeout there, so `connectors.http` starts none for the call's requests: a timer per read and per answer is
#: a measurable share of a call's CPU. Tasks a call starts are not covered: they keep their clients' timers.
BOUNDED_CALL: ContextVar["asyncio.Task[Any] | None"] = ContextVar("bounded_call", default=None)


@dataclass(slots=True, frozen=True)
class TermStatistics:
    """How common some terms are in a source's whole collection: what a pool of candidates cannot see.

    Counts are over passages (the unit the source indexes and returns), with
    terms from the gateway's one tokenizer (`aggregator.text.tokenize`).
    """

    passages: int  # passages in the collection
    total_length: int  # terms in all of them, so the average passage length is total_length / passages
    frequencies: Mapping[str, int]  # for each term asked about, the passages that contain it


@dataclass(slots=True)
class SourceStats:
    """What an indexed source reports about its index (for /status and /readyz)."""

    documents: int = 0
    passages: int = 0
    last_refresh: str | None = None  # ISO 8601
    syncs: int = 0  # syncs ended since the index was built
    last_refresh_error: str | None = None
    last_refresh_outcome: str | None = None  # the failed sync's SourceError.outcome, e.g. "auth_failed"
    skipped: int = 0  # documents left out (too large, unreadable, outside the folder), counted not hidden
    skipped_paths: list[str] = field(default_factory=list)  # names of those left out for a reason to act on
    store_bytes: int = 0  # size of the persisted index on disk
    syncing: bool = False  # a sync is running now
    sync_done: int = 0  # documents fetched so far by the running (or last) sync
    sync_total: int = 0  # documents that sync had to fetch
    passages_per_s: float | None = None  # indexing rate of the last sync that indexed something
    syncer: bool = False  # this process is the one that syncs the source


class SourceError(Exception):
    """Base of every error a connector may raise. The message must hold no secret."""

    outcome: ClassVar[str] = "error"
    retryable: ClassVar[bool] = False


class AuthFailed(SourceError):
    """The source refused our credentials (401/403). Never retried."""

    outcome = "auth_failed"


class RateLimited(SourceError):
    """The source asked us to slow down (429). Retried only if `retry_after` fits the budget."""

    outcome = "rate_limited"
    retryable = True

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(SourceError):
    """A transient failure: connection refused or reset, 502/503/504."""

    retryable = True


class SourceTimeout(SourceError):
    """The source did not answer within its budget."""

    outcome = "timeout"
    retryable = True


class BadResponse(SourceError):
    """The source answered, but not with something we can read (wrong shape, too big, other 4xx/5xx)."""


class NotFound(BadResponse):
    """HTTP 404 for one item: a page deleted between a listing and its fetch is skipped, not an error."""


class Connector(abc.ABC):
    """A source of passages. Subclasses set `settings_model` and implement `search`."""

    settings_model: ClassVar[type[ConnectorSettings]]
    #: Names of metadata fields this source can filter on itself. The core's
    #: post-filter always runs too; pushing down only saves work.
    pushdown_fields: ClassVar[frozenset[str]] = frozenset()
    #: What `aggregator check` adds when the source answered no records: the usual reasons, for a source whose
    #: API answers an empty list where a person would expect an error.
    empty_hint: ClassVar[str | None] = None

    def __init__(self, name: str, settings: ConnectorSettings) -> None:
        self.name = name
        self.settings = settings

    @property
    def type(self) -> str:
        return self.settings.type

    @property
    def ready(self) -> bool:
        """True once the source can answer from a complete view (first sync done)."""
        return True

    @property
    def semantic(self) -> bool:
        """Whether the source retrieves by meaning: `semantic:` when set, else what its own settings say."""
        declared = self.settings.semantic
        return self.retrieves_by_meaning() if declared is None else declared

    def retrieves_by_meaning(self) -> bool:
        """The connector's guess when `semantic:` is unset; sources whose API says how they search override it."""
        return False

    def stats(self) -> SourceStats | None:
        """Index statistics for indexed sources; None for query-time sources."""
        return None

    def term_statistics(self, terms: Sequence[str]) -> TermStatistics | None:
        """Collection statistics of `terms` for sources that hold an index of their own; None otherwise.

        Called once per query on the event loop, so it must be cheap (a lookup, no I/O).
        """
        return None

    def bind_state(self, backend: "StateBackend") -> None:
        """Where a source that keeps state (an index) persists it; the gateway calls this before `start()`.
        Sources that keep nothing ignore it."""

    async def start(self) -> None:
        """Open clients and start background work. Must not block on a slow sync."""

    @abc.abstractmethod
    async def search(self, query: SourceQuery) -> list[Passage]:
        """Return up to `query.limit` passages, best first, or raise a SourceError."""

    async def aclose(self) -> None:
        """Release clients and stop background tasks. Safe to call twice."""

    async def __aenter__(self) -> "Connector":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class IndexedSettings(ConnectorSettings):
    """Fields of every source the core indexes (a `DocumentSource`)."""

    refresh_s: float = Field(300.0, ge=1, le=86400, description="Seconds between two syncs of the index.")


@dataclass(slots=True)
class Document:
    """A whole document as a source hands it over, before it is split into passages."""

    document_id: str
    title: str
    text: str
    version: str
    updated_at: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class RateLimit:
    """A request rate that belongs to a credential (Notion: about 3 a second per integration), not to one source."""

    credential: str  # every source, process and replica using it shares the rate (kept by the core only as a hash)
    per_second: float


class DocumentSource(abc.ABC):
    """A source that cannot search: it says what documents it holds and hands each one over.

    It lists its documents with a token that changes when a document does (mtime, ETag, last_edited_time) and
    fetches them; the core's sync engine (`aggregator/state/sync.py`) keeps their passages in a persistent
    index, decides when to sync, and answers searches from it. Errors are the typed ones above.
    """

    settings_model: ClassVar[type[IndexedSettings]]
    #: How many documents the default `fetch_many` fetches at once.
    fetch_concurrency: ClassVar[int] = 8
    #: Documents handed to `fetch_many` at a time (a sync commits its progress between batches).
    batch_size: ClassVar[int] = 64
    #: Settings that do not change what is indexed: editing them keeps the stored index.
    runtime_fields: ClassVar[frozenset[str]] = frozenset(
        {"weight", "timeout_s", "retries", "circuit", "refresh_s", "watch", "requests_per_second", "verify_tls"}
    )

    def __init__(self, name: str, settings: IndexedSettings) -> None:
        self.name = name
        self.settings = settings
        #: What the last listing left out (too large, outside the folder): a count, and the names worth showing.
        self.skipped: tuple[int, list[str]] = (0, [])
        #: Paces requests when `rate_limit()` names a rate: the core hands the credential's limiter to `bind_limiter`.
        self.limiter: contextlib.AbstractAsyncContextManager[Any] = contextlib.nullcontext()

    @abc.abstractmethod
    async def list_versions(self) -> dict[str, str]:
        """Every document id the source holds now, with a token that changes when the document does."""

    @abc.abstractmethod
    async def fetch(self, document_id: str) -> Document | None:
        """One document, or None if it vanished or must be skipped since listing."""

    async def list_changed(self, stored: dict[str, str]) -> dict[str, str] | None:
        """The documents that changed since `stored` (id -> version, as the store holds them) was synced, with their
        versions, when the source can tell cheaply (newest first, stopping at what is known); None when it cannot.
        Removed documents need not be reported: full listings (`list_versions`) find them."""
        return None

    async def fetch_many(self, document_ids: Sequence[str]) -> list[Document | None | BaseException]:
        """A batch of documents, `fetch_concurrency` at a time; a failure is returned in its place."""
        gate = asyncio.Semaphore(self.fetch_concurrency)

        async def one(document_id: str) -> Document | None:
            async with gate:
                return await self.fetch(document_id)

        return list(await asyncio.gather(*(one(d) for d in document_ids), return_exceptions=True))

    async def watch(self, changed: Callable[[], None]) -> None:
        """Runs while this process syncs the source, calling `changed()` when the source reports a change, so that
        the next sync starts at once rather than after `refresh_s` (a file watcher). Returns at once when it cannot."""

    def rate_limit(self) -> RateLimit | None:
        """The rate this source's requests share with others using its credential, if any (see `limiter`)."""
        return None

    def bind_limiter(self, limiter: contextlib.AbstractAsyncContextManager[Any]) -> None:
        """The core's limiter of `rate_limit()` (shared by the process, and by every replica through Redis)."""
        self.limiter = limiter

    def set_skipped(self, count: int, names: Sequence[str] = ()) -> None:
        """A listing reports what it left out (counted, and named where naming helps); /status shows it."""
        self.skipped = (count, sorted(names))

    async def aclose(self) -> None:
        """Release clients. Safe to call twice."""
