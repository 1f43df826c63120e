"""The embedding judge: the meaning of a query and of each passage, from a model the user already runs.

One judge per distinct `embeddings:` block (the server's, or a knowledge base's own). A retrieval asks it
twice: the query's vector while the sources are being asked (`start`), then the vectors of the passages
they returned (`judge`), every one of which seen before comes from a cache keyed by the model and the
text's hash, bounded in memory and kept in the state folder across restarts. Both calls run within the
request's deadline and the judge's `timeout_s`; when the model is slow, down, refusing or rate limited the
retrieval is ranked by words alone, as without a judge, and the judge's outcome is reported like a
source's (`embeddings=timeout` in X-Sources, /status, metrics, the log line, explain).

Similarities are cosines, mapped onto [0, 1] by the model's own range (`similarity: [low, high]`): a
cosine at `low` or under is no evidence of meaning, one at `high` or over a certain match. Models differ
(all-MiniLM-L6-v2 or OpenAI's text-embedding-3 give unrelated text 0.0 to 0.2; WordLlama gives most of
Cranfield 0.5 to 0.8), so the range is a setting; WordLlama's default was measured on Cranfield.

Providers:
- `openai`: any OpenAI-compatible `POST {url}/embeddings` (OpenAI, Azure OpenAI, Xinference, Ollama,
  vLLM, text-embeddings-inference, LocalAI, Jina), through the gateway's one HTTP client factory;
- `local`: a static model in the gateway's own process (WordLlama, whose weights ship in its wheel),
  an optional extra: `pip install "dify-knowledge-gateway[local-embeddings]"`.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from yarl import URL

from connectors.base import BadResponse, CircuitSettings, RateLimited, SourceError
from connectors.http import BaseUrl, HttpClient, clip, make_client, request_json

from aggregator.retrieval.breaker import CircuitBreaker
from aggregator.retrieval.fanout import SourcePolicy, pause_before_retry
from aggregator.ranking.rerank import DEFAULT_FUSION
from aggregator.tasks import Timeout

log = logging.getLogger(__name__)

#: The judge's name where outcomes are shown (X-Sources, /status, metrics, the log line).
NAME = "embeddings"
LOCAL_EXTRA = 'pip install "dify-knowledge-gateway[local-embeddings]"'
LOCAL_MODELS = ("wordllama",)
#: Each provider's default range, tuned on Cranfield (bench.quality --sweep): WordLlama's in process, and for an
#: endpoint all-MiniLM-L6-v2's, a transformer whose unrelated texts score 0.0 to 0.2 as most served models' do
#: (OpenAI's text-embedding-3, bge, e5); measure yours with explain.
DEFAULT_SIMILARITY: dict[str, tuple[float, float]] = {"local": (0.7, 1.0), "openai": (0.4, 0.9)}
_QUERIES_CACHED = 1024


class EmbeddingSettings(BaseModel):
    """`server.embeddings` (or a knowledge base's `embeddings`): which model judges meaning, and how."""

    model_config = ConfigDict(extra="forbid")

    provider: Literal["openai", "local"]
    url: BaseUrl | None = Field(None, description="openai: the API base, e.g. http://xinference:9997/v1 (POST {url}/embeddings).")
    model: str = Field("wordllama", min_length=1, description="The model name the endpoint serves; local: wordllama.")
    api_key: SecretStr | None = Field(None, description="openai: sent as a Bearer token.")
    dimensions: int | None = Field(None, ge=1, le=65536, description="openai: asked of models that can shorten their vectors.")
    batch_size: int = Field(64, ge=1, le=2048, description="Texts per embeddings call.")
    timeout_s: float = Field(2.0, gt=0, le=60, description="Budget of the judge within a retrieval (never past the deadline).")
    retries: int = Field(0, ge=0, le=5, description="Retries of a transient failure (connection, 5xx, 429), within the budget.")
    weight: float = Field(0.5, ge=0, le=1, description="Weight of meaning: relevance = 1 − (1 − words)·(1 − weight·meaning).")
    combine: Literal["or", "mix"] = Field(
        "or", description="or: relevant by words or by meaning (the default, measured); mix: (1 − weight)·words + weight·meaning, "
        "for a model trusted over words (a high weight lets it put a paraphrase above a passage that only shares words)."
    )
    similarity: tuple[float, float] | None = Field(
        None, description="[low, high]: cosines mapped onto 0 and 1; default local [0.7, 1.0], openai [0.4, 0.9] (both measured)."
    )
    cache_passages: int = Field(50_000, ge=0, le=5_000_000, description="Passage vectors kept (in memory and in the state folder).")
    query_prefix: str = Field("", description="Text put before every query (models like e5 or bge want an instruction).")
    passage_prefix: str = Field("", description="Text put before every passage.")
    verify_tls: bool | str = True
    circuit: CircuitSettings = Field(default_factory=CircuitSettings)

    @model_validator(mode="after")
    def _complete(self) -> "EmbeddingSettings":
        if self.provider == "openai" and self.url is None:
            raise ValueError("provider openai needs url: the API base, e.g. https://api.openai.com/v1")
        if self.provider == "local" and self.model not in LOCAL_MODELS:
            raise ValueError(f"provider local knows the models {', '.join(LOCAL_MODELS)}")
        if self.similarity is None:
            self.similarity = DEFAULT_SIMILARITY[self.provider]
        low, high = self.similarity
        if not -1.0 <= low < high <= 1.0:
            raise ValueError("similarity is [low, high] with -1 <= low < high <= 1")
        return self

    def identity(self) -> str:
        """What the vectors depend on: the same identity, the same vectors (the cache's key and file name)."""
        parts = (self.provider, self.url or "", self.model, str(self.dimensions or ""), self.passage_prefix)
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


class VectorCache:
    """Unit vectors by text in one matrix, bounded, saved to and loaded from one npz file.

    Stored under a stable key (the text's BLAKE2b), found by a process-local one: Python's own 64-bit hash
    of the text, which the string keeps once computed and the term cache reads too (two texts of a cache of
    50,000 share one with a chance of about 1e-10). A passage seen before costs one lookup, not a hash of its
    bytes (the BLAKE2b of 60 passages of 800 characters took 60 us a retrieval). The vectors are rows of
    one matrix, so a retrieval gathers its pool's rows in one step instead of stacking arrays; when it is
    full, the row to reuse is chosen by the clock rule (a row used since the hand last passed gets a second
    chance), which needs no reordering on every hit.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 0)
        self._matrix: np.ndarray | None = None  # capacity × dimension, made at the first vector
        self._used = np.zeros(self.capacity, dtype=bool)  # the clock's reference bits
        self._hand = 0
        self._size = 0  # rows filled so far (all of them, once the cache is full)
        self._keys: list[bytes] = []  # stable key of each row
        self._rows: dict[bytes, int] = {}  # stable key -> row
        self._local_of: list[int | None] = []  # process-local key of each row, once met
        self._local: dict[int, int] = {}  # process-local key (the text's hash) -> row
        self.dirty = False

    def __len__(self) -> int:
        return self._size

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def rows(self, texts: Sequence[str]) -> list[int]:
        """The row of each text's vector, −1 where it is not cached; the rows found are marked used."""
        get = self._local.get
        rows = [get(hash(t), -1) for t in texts]
        if -1 not in rows:  # the usual case: every passage seen before
            self._used[rows] = True
            return rows
        if self._rows:  # met first in this process: by its stable key (vectors loaded from disk)
            for i, row in enumerate(rows):
                if row < 0:
                    found = self._rows.get(self.key(texts[i]))
                    if found is not None:
                        rows[i] = found
                        self._remember(texts[i], found)
        found_rows = [r for r in rows if r >= 0]
        if found_rows:
            self._used[found_rows] = True
        return rows

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        """The vectors of `rows` (all of them cached), copied: later additions cannot change them."""
        assert self._matrix is not None
        return self._matrix[rows]

    def get(self, key: bytes) -> np.ndarray | None:
        row = self._rows.get(key)
        if row is None:
            return None
        self._used[row] = True
        return self.vectors([row])[0]

    def add(self, text: str, vector: np.ndarray) -> None:
        row = self.put(self.key(text), vector)
        if row is not None:
            self._remember(text, row)

    def _remember(self, text: str, row: int) -> None:
        local = hash(text)
        self._local[local] = row
        self._local_of[row] = local

    def put(self, key: bytes, vector: np.ndarray) -> int | None:
        """Store `vector` under `key`; its row (None when the cache holds nothing)."""
        if self.capacity <= 0:
            return None
        if self._matrix is None:
            self._matrix = np.zeros((self.capacity, len(vector)), dtype=np.float32)
        elif len(vector) != self._matrix.shape[1]:
            raise BadResponse(f"{NAME}: vectors of different lengths (was the model changed?)")
        row = self._rows.get(key)
        if row is None:
            row = self._free_row()
            self._rows[key] = row
            self._keys[row] = key
        self._matrix[row] = vector
        self._used[row] = True
        self.dirty = True
        return row

    def _free_row(self) -> int:
        if self._size < self.capacity:
            self._size += 1
            self._keys.append(b"")
            self._local_of.append(None)
            return self._size - 1
        while True:  # the clock: the first row not used since the hand last passed it
            unused = np.flatnonzero(~self._used[self._hand :])
            if unused.size == 0:
                self._used[self._hand :] = False
                self._hand = 0
                continue
            row = self._hand + int(unused[0])
            self._used[self._hand : row] = False
            self._hand = (row + 1) % self.capacity
            break
        del self._rows[self._keys[row]]
        local = self._local_of[row]
        if local is not None:
            del self._local[local]
            self._local_of[row] = None
        return row

    def dump(self) -> bytes:
        keys = np.frombuffer(b"".join(self._keys), dtype=np.uint8).reshape(-1, 16)
        matrix = self._matrix[: self._size] if self._matrix is not None else np.zeros((0, 0), np.float32)
        out = io.BytesIO()
        np.savez(out, keys=keys, vectors=matrix.astype(np.float32))
        return out.getvalue()

    def load(self, data: bytes) -> int:
        with np.load(io.BytesIO(data), allow_pickle=False) as stored:
            keys, vectors = stored["keys"], stored["vectors"]
        if keys.ndim != 2 or keys.shape[1] != 16 or len(keys) != len(vectors):
            raise ValueError("not a vector cache")
        if self.capacity:
            for key, vector in zip(keys[-self.capacity :], vectors[-self.capacity :]):
                self.put(key.tobytes(), vector)
            self._used[:] = False  # nothing used yet in this process
        self.dirty = False
        return len(self)


def _unit(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.where(norms > 0, norms, 1.0)).astype(np.float32)


class Provider:
    """Turns texts into vectors (any length, any scale: the judge normalises them)."""

    async def embed(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release clients."""


def _describe(status: int, envelope: Any, what: str) -> str | None:
    """OpenAI's `{"error": {"message", "type", "code"}}` (and the plain `{"detail"}` / `{"message"}` of others)."""
    error = envelope.get("error") if isinstance(envelope, dict) else None
    if isinstance(error, dict):
        return clip(str(error.get("message") or error.get("code") or "")) or None
    if isinstance(error, str):
        return clip(error)
    for key in ("detail", "message"):
        if isinstance(envelope, dict) and isinstance(envelope.get(key), str):
            return clip(envelope[key])
    return None


class OpenAIProvider(Provider):
    """`POST {url}/embeddings` with `{"model", "input": [...], "encoding_format": "float", "dimensions"?}`."""

    def __init__(self, settings: EmbeddingSettings) -> None:
        assert settings.url is not None
        self.settings = settings
        url = settings.url
        self.url = url if url.endswith("/embeddings") else f"{url}/embeddings"
        headers = {"Authorization": f"Bearer {settings.api_key.get_secret_value()}"} if settings.api_key else {}
        self.client: HttpClient = make_client(headers=headers, timeout_s=settings.timeout_s, verify=settings.verify_tls)
        self.what = f"POST {self.url.split('?')[0]}"

    async def embed(self, texts: list[str]) -> np.ndarray:
        body: dict[str, Any] = {"model": self.settings.model, "input": texts, "encoding_format": "float"}
        if self.settings.dimensions:
            body["dimensions"] = self.settings.dimensions
        data = await request_json(self.client, "POST", self.url, self.what, describe_error=_describe, json=body)
        rows = data.get("data") if isinstance(data, dict) else None
        if not isinstance(rows, list) or len(rows) != len(texts):
            raise BadResponse(f"{self.what}: expected 'data' with {len(texts)} embeddings")
        try:
            ordered = sorted(rows, key=lambda r: int(r.get("index", 0)))
            matrix = np.asarray([r["embedding"] for r in ordered], dtype=np.float32)
        except (TypeError, ValueError, KeyError, AttributeError):
            raise BadResponse(f"{self.what}: an embedding is not a list of numbers") from None
        if matrix.ndim != 2 or not np.isfinite(matrix).all():
            raise BadResponse(f"{self.what}: embeddings of unequal length or not finite")
        return matrix

    async def aclose(self) -> None:
        await self.client.aclose()


class LocalProvider(Provider):
    """WordLlama in this process: a static model (a table of token vectors, averaged), microseconds a text."""

    _models: dict[str, Any] = {}

    def __init__(self, settings: EmbeddingSettings) -> None:
        self.settings = settings
        self.model = self.load(settings.model)

    @classmethod
    def load(cls, name: str) -> Any:
        """Loaded once per process. WordLlama 0.4 looks for its tokenizer in `wordllama/tokenizer/` while its
        wheel ships `wordllama/tokenizers/`: pointing its cache at the package finds both files, no download."""
        if name not in cls._models:
            try:
                import wordllama
            except ImportError:
                raise RuntimeError(f"embeddings provider local needs the local-embeddings extra: {LOCAL_EXTRA}") from None
            package = Path(wordllama.__file__).parent
            cls._models[name] = wordllama.WordLlama.load(cache_dir=package, disable_download=True)
        return cls._models[name]

    async def embed(self, texts: list[str]) -> np.ndarray:
        if len(texts) <= 16:  # a query, or a few new passages: less than a thread hop costs
            return self.model.embed(texts, norm=False)
        return await asyncio.to_thread(self.model.embed, texts, norm=False)


def make_provider(settings: EmbeddingSettings) -> Provider:
    return OpenAIProvider(settings) if settings.provider == "openai" else LocalProvider(settings)


class Judgement:
    """What the judge made of one retrieval: each text's meaning on [0, 1] (None when it failed), and its outcome."""

    __slots__ = ("meaning", "outcome", "elapsed_ms", "error", "embedded")

    def __init__(self, meaning: dict[str, float] | None, outcome: str, elapsed_ms: float, error: str | None = None, embedded: int = 0) -> None:
        self.meaning, self.outcome, self.elapsed_ms, self.error, self.embedded = meaning, outcome, elapsed_ms, error, embedded


class Judge:
    """One model's judge: its provider, vector cache and circuit breaker, shared by the requests that use it."""

    def __init__(self, settings: EmbeddingSettings, provider: Provider | None = None) -> None:
        self.settings = settings
        self.provider = provider or make_provider(settings)
        self.cache = VectorCache(settings.cache_passages)
        self.queries: OrderedDict[str, np.ndarray] = OrderedDict()
        self.breaker = CircuitBreaker(settings.circuit)
        low, high = settings.similarity or DEFAULT_SIMILARITY[settings.provider]
        self._low, self._span = low, high - low
        #: The fusion's constants with this judge's share of meaning.
        self.fusion = replace(DEFAULT_FUSION, meaning=settings.weight, combine=settings.combine)

    # -- one retrieval -----------------------------------------------------------------------------------

    def start(self, query: str, deadline: float) -> "asyncio.Task[np.ndarray] | np.ndarray | None":
        """The query's vector: from the cache, or a task started now to run beside the sources' calls
        (None when the circuit is open)."""
        if not self.breaker.allow():
            return None
        found = self.queries.get(query)
        if found is not None:
            self.queries.move_to_end(query)
            return found
        return asyncio.get_running_loop().create_task(self._query_vector(query, deadline))

    async def _query_vector(self, query: str, deadline: float) -> np.ndarray:
        vector = _unit(await self._embed([self.settings.query_prefix + query], deadline))[0]
        self._remember_query(query, vector)
        return vector

    def _remember_query(self, query: str, vector: np.ndarray) -> None:
        self.queries[query] = vector
        if len(self.queries) > _QUERIES_CACHED:
            self.queries.popitem(last=False)

    async def judge(
        self, started: "asyncio.Task[np.ndarray] | np.ndarray | None", texts: Sequence[str], deadline: float, query: str | None = None
    ) -> Judgement:
        """Each distinct text's meaning on [0, 1], or the outcome that says why there is none. Never raises.

        With `query` (the text `start` was given): when the sources answered before the query's own call did
        and passages need embedding, that call is dropped and the query goes in the passages' batch, so a
        retrieval waits for one embedding call, not two in a row."""
        begun = time.perf_counter()
        if started is None:
            wait = self.breaker.seconds_until_trial() or 0.0
            return Judgement(None, "skipped", 0.0, f"circuit open; next trial in {wait:.0f} s")
        if isinstance(started, np.ndarray):  # the query seen before: with every passage seen too, no wait at all
            rows = self.cache.rows(texts)
            if -1 not in rows:
                meaning = np.clip((self.cache.vectors(rows) @ started - self._low) / self._span, 0.0, 1.0).tolist()
                self.breaker.record_success()
                return Judgement(dict(zip(texts, meaning)), "ok", _ms(begun))
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        embedded = 0
        try:
            with Timeout(max(0.0, min(self.settings.timeout_s, deadline - loop.time())), task):
                distinct = list(dict.fromkeys(texts))
                rows = self.cache.rows(distinct)
                missing = [i for i, r in enumerate(rows) if r < 0]
                # Gathered now: the passages added below may take the rows of ones not used lately.
                cached = self.cache.vectors([r for r in rows if r >= 0]) if len(missing) < len(rows) else None
                # The query's own call still out when the passages' batch has room for it: one call, not two in a row.
                together = (0 < len(missing) < self.settings.batch_size and query is not None
                            and isinstance(started, asyncio.Task) and not started.done())  # fmt: skip
                if together:
                    drop(started)
                else:
                    vector = started if isinstance(started, np.ndarray) else await started
                if missing:
                    embedded = len(missing)
                    prefix = self.settings.passage_prefix
                    batch = [prefix + distinct[i] for i in missing]
                    new = _unit(await self._embed([self.settings.query_prefix + query, *batch] if together else batch, deadline))  # type: ignore[operator]
                    if together:
                        vector, new = new[0], new[1:]
                        self._remember_query(query, vector)  # type: ignore[arg-type]
                    for i, vector_i in zip(missing, new):
                        self.cache.add(distinct[i], vector_i)
            try:
                if not missing:
                    cosines = cached @ vector  # type: ignore[operator]
                else:
                    cosines = np.empty(len(distinct), dtype=np.float32)
                    cosines[missing] = new @ vector  # type: ignore[operator]
                    if cached is not None:
                        cosines[[i for i, r in enumerate(rows) if r >= 0]] = cached @ vector
            except ValueError:
                raise BadResponse(f"{NAME}: vectors of different lengths (was the model changed?)") from None
            meaning = np.clip((cosines - self._low) / self._span, 0.0, 1.0).tolist()
            self.breaker.record_success()
            return Judgement(dict(zip(distinct, meaning)), "ok", _ms(begun), None, embedded)
        except asyncio.CancelledError:
            drop(started)
            raise
        except TimeoutError:
            drop(started)
            self.breaker.record_failure()
            return Judgement(None, "timeout", _ms(begun), f"no answer within {self.settings.timeout_s:.2f} s or the deadline", embedded)
        except SourceError as exc:
            drop(started)
            self.breaker.record_failure()
            return Judgement(None, exc.outcome, _ms(begun), str(exc), embedded)
        except Exception as exc:  # a provider's bug (or the local model's): the retrieval goes on by words
            drop(started)
            self.breaker.record_failure()
            log.exception("the embedding judge failed")
            return Judgement(None, "error", _ms(begun), f"internal error: {type(exc).__name__}", embedded)

    async def _embed(self, texts: list[str], deadline: float) -> np.ndarray:
        """All `texts`, in batches sent at once; transient failures retried with the fan-out's backoff."""
        policy = SourcePolicy(self.settings.timeout_s, self.settings.retries)
        size = self.settings.batch_size
        batches = [texts[i : i + size] for i in range(0, len(texts), size)]
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            calls = [asyncio.ensure_future(self.provider.embed(b)) for b in batches] if len(batches) > 1 else []
            try:
                if not calls:  # one batch (a query, a few new passages): no task of its own
                    return await self.provider.embed(batches[0])
                return np.concatenate(await asyncio.gather(*calls))
            except BaseException as exc:
                for call in calls:  # one batch failed (or time is up): the others are not waited for
                    call.cancel()
                if not isinstance(exc, SourceError):
                    raise
                if not exc.retryable or attempt > policy.retries:
                    raise
                pause = pause_before_retry(exc, attempt, policy)
                if isinstance(exc, RateLimited) and exc.retry_after is None:
                    pause = max(pause, 0.05)
                if loop.time() + pause >= deadline - 0.05:
                    raise
                await asyncio.sleep(pause)

    # -- state ---------------------------------------------------------------------------------------------

    def cache_path(self, state_dir: Path) -> Path:
        return Path(state_dir) / f"embeddings-{self.settings.identity()}.npz"

    def load(self, state_dir: Path | None) -> None:
        if state_dir is None:
            return
        path = self.cache_path(state_dir)
        if not path.exists():
            return
        try:
            count = self.cache.load(path.read_bytes())
            log.info("%s: %d passage vectors of %s loaded", path, count, self.settings.model)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("%s: passage vectors not loaded (%s); they are embedded again when met", path, exc)

    def save(self, state_dir: Path | None) -> None:
        if state_dir is None or not self.cache.dirty:
            return
        path = self.cache_path(state_dir)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            partial = path.with_name(f".{path.name}.{os.getpid()}")
            partial.write_bytes(self.cache.dump())
            os.replace(partial, path)
            self.cache.dirty = False
        except OSError as exc:
            log.warning("%s: passage vectors not saved (%s)", path, exc)

    def describe(self) -> dict[str, Any]:
        s = self.settings
        url = str(URL(s.url).with_user(None)) if s.url else None  # no credentials written into it
        return {"provider": s.provider, "model": s.model, "url": url, "cached_passages": len(self.cache), "weight": s.weight,
                "similarity": list(s.similarity or ()), "circuit": self.breaker.state}  # fmt: skip

    async def aclose(self) -> None:
        await self.provider.aclose()


def drop(started: "asyncio.Task[np.ndarray] | np.ndarray | None") -> None:
    """A query vector no longer wanted: its task cancelled, or its failure read (no warning at exit)."""
    if isinstance(started, asyncio.Task) and not started.done():
        started.cancel()
    elif isinstance(started, asyncio.Task) and not started.cancelled():
        started.exception()  # retrieved: no "exception was never retrieved" at exit


def _ms(begun: float) -> float:
    return (time.perf_counter() - begun) * 1000.0

