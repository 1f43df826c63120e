"""An optional second stage: a rerank model the user already runs reorders the top of the fused ranking.

Not to be confused with `rerank.py`, the gateway's own lexical fusion: this module asks an outside
cross-encoder (Cohere, Jina, Xinference, vLLM or text-embeddings-inference, each in its documented shape)
to judge the `top_n` best fused passages against the query.

The score a judged passage carries is the model's relevance (or, with `weight` < 1, a blend with the
fusion's score). Rerank models are trained to give a calibrated probability that a passage answers the
query, on the same [0, 1] scale for every query and every source, which is what Dify's threshold needs;
raw logits (`scores: logit`) are put on that scale with the logistic function. Passages beyond `top_n`
(or that the model did not score) follow in the fusion's order, their scores capped at the lowest judged
score so that the answer stays sorted and a passage the model never saw cannot outrank one it judged.

A failing model never fails the request: an error, a 429, a timeout, a malformed answer or an open circuit
leave the fusion's order and scores as they were, and the outcome is reported as a pseudo-source named
`rerank` (X-Sources, /status, metrics, the log line, explain), like a source's.

Request-path code, self-contained: it depends on the HTTP client and error types of `connectors`, on the
fan-out's retry policy and outcome record, and on the tracing wrapper of a source call, so that it moves
with them (to `retrieval/`) in a re-layout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from connectors.base import BadResponse, CircuitSettings, Passage, SourceError, SourceTimeout
from connectors.http import BaseUrl, HttpClient, clip, make_client, request_json

from aggregator.retrieval.breaker import CircuitBreaker
from aggregator.retrieval.fanout import SourcePolicy, pause_before_retry
from aggregator.contract.outcomes import SourceResult, traced, traced_skip
from aggregator.ranking.rerank import Candidate, Ranked

log = logging.getLogger(__name__)

#: The pseudo-source the stage reports as (X-Sources `rerank=ok`, /status, metrics, logs, explain).
STAGE_NAME = "rerank"
#: Its type in /status and the status page.
STAGE_TYPE = "rerank-model"

Provider = Literal["cohere", "jina", "xinference", "vllm", "tei"]
PROVIDERS: tuple[str, ...] = ("cohere", "jina", "xinference", "vllm", "tei")
#: Hosted APIs have a default base URL; self-hosted servers must be named.
DEFAULT_URLS = {"cohere": "https://api.cohere.com", "jina": "https://api.jina.ai"}
#: Appended to a base URL that does not already name the endpoint (see `RerankSettings.endpoint`).
DEFAULT_PATHS = {"cohere": "/v2/rerank", "jina": "/v1/rerank", "xinference": "/v1/rerank", "vllm": "/v1/rerank", "tei": "/rerank"}
_VERSION_SUFFIX = re.compile(r"/v\d+$")
#: An answer much larger than the scores of a few hundred passages is not a rerank answer.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024


class RerankSettings(BaseModel):
    """`server.rerank` (and, merged over it, a knowledge base's `rerank`): which model, and how it is used."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="false: no rerank model (e.g. for one knowledge base under a server-wide one).")
    provider: Provider | None = Field(None, description="The API's shape: cohere, jina, xinference, vllm or tei.")
    url: BaseUrl | None = Field(None, description="Base URL (the provider's path is appended) or the full rerank endpoint.")
    model: str | None = Field(None, min_length=1, description="The model's name or uid (not used by tei, which serves one).")
    api_key: SecretStr | None = Field(None, description="Sent as `Authorization: Bearer`; required by Cohere and Jina.")
    top_n: int = Field(20, ge=1, le=1000, description="How many of the best fused passages the model judges.")
    timeout_s: float = Field(1.0, gt=0, le=30, description="Budget of the model's call; reserved out of server.deadline_s.")
    retries: int = Field(0, ge=0, le=3, description="Retries of a transient failure, only when they fit in the time left.")
    max_chars: int = Field(4000, ge=100, le=100_000, description="Characters of each passage sent (the model truncates further).")
    scores: Literal["probability", "logit"] = Field(
        "probability", description="The model's scores: probabilities in [0, 1] (the usual), or raw logits (mapped by the logistic function)."
    )
    weight: float = Field(1.0, ge=0, le=1, description="Share of the model's score in a judged passage's score; the rest is the fusion's.")
    verify_tls: bool | str = Field(True, description="false, or the path of a CA bundle for a private CA.")
    circuit: CircuitSettings = Field(default_factory=CircuitSettings)

    @model_validator(mode="after")
    def _complete(self) -> "RerankSettings":
        if not self.enabled:
            return self
        if self.provider is None:
            raise ValueError(f"provider: field required ({', '.join(PROVIDERS)})")
        if self.url is None and self.provider not in DEFAULT_URLS:
            raise ValueError(f"url: field required for provider {self.provider} (the server's base URL, e.g. http://host:port)")
        if self.model is None and self.provider != "tei":
            raise ValueError(f"model: field required for provider {self.provider} (the rerank model's name or uid)")
        if self.api_key is None and self.provider in DEFAULT_URLS and self.url is None:
            raise ValueError(f"api_key: field required for the hosted {self.provider} API")
        return self

    def endpoint(self) -> str:
        """The URL posted to: `url` as given when it already ends in `/rerank`; `…/v1` + `/rerank`; else the
        provider's documented path (so a base URL copied from Dify's model settings works either way)."""
        assert self.provider is not None
        base = (self.url or DEFAULT_URLS[self.provider]).rstrip("/")
        path = urlsplit(base).path.rstrip("/")
        if path.endswith("/rerank"):
            return base
        if _VERSION_SUFFIX.search(path):
            return base + "/rerank"
        return base + DEFAULT_PATHS[self.provider]


class RerankOverride(RerankSettings):
    """A knowledge base's `rerank:`: the fields it sets replace the server's (as a connector's replace `defaults`)."""

    @model_validator(mode="after")
    def _complete(self) -> "RerankOverride":  # checked once merged over server.rerank (`effective_settings`)
        return self


def effective_settings(server: RerankSettings | None, override: RerankOverride | None) -> RerankSettings | None:
    """A knowledge base's model: the server's, with the knowledge base's own fields over it; None for none.
    A knowledge base that names another provider or URL does not inherit the server's `api_key`.

    Raises pydantic's ValidationError when the merge is incomplete (the config loader places the errors).
    """
    if override is None:
        settings = server
    else:
        merged = {} if server is None else {k: getattr(server, k) for k in server.model_fields_set}
        own = {k: getattr(override, k) for k in override.model_fields_set}
        if any(k in own and own[k] != merged.get(k) for k in ("provider", "url")):
            merged.pop("api_key", None)  # the server's key is never sent to another server
        merged.update(own)
        settings = RerankSettings.model_validate(merged)
    return settings if settings is not None and settings.enabled else None


# -- the providers' shapes -----------------------------------------------------------------------------


def request_body(settings: RerankSettings, query: str, documents: list[str]) -> dict[str, Any]:
    """What one call sends, as each provider documents it."""
    if settings.provider == "tei":  # POST /rerank {query, texts}: truncate, or TEI refuses a passage over the model's length
        return {"query": query, "texts": documents, "raw_scores": settings.scores == "logit", "truncate": True}
    body: dict[str, Any] = {"model": settings.model, "query": query, "documents": documents, "top_n": len(documents)}
    if settings.provider == "jina":
        body["return_documents"] = False  # Jina's default sends every text back
    return body


def parse_scores(data: Any, count: int, provider: str, what: str) -> dict[int, float]:
    """The model's score per index of the documents sent; BadResponse for any other shape.

    Cohere, Jina, Xinference and vLLM: `{"results": [{"index", "relevance_score"}, …]}`;
    TEI: `[{"index", "score"}, …]`. An index out of range, twice, or a score that is not a finite number
    makes the whole answer unusable: the fusion's order stands rather than a guess.
    """
    if provider == "tei":
        items, key = data, "score"
        if not isinstance(items, list):
            raise BadResponse(f"{what}: answer is not a list of {{index, score}}")
    else:
        items, key = data.get("results") if isinstance(data, dict) else None, "relevance_score"
        if not isinstance(items, list):
            raise BadResponse(f"{what}: answer has no 'results' list")
    scores: dict[int, float] = {}
    for item in items:
        index = item.get("index") if isinstance(item, dict) else None
        score = item.get(key) if isinstance(item, dict) else None
        if type(index) is not int or not 0 <= index < count or index in scores:
            raise BadResponse(f"{what}: a result's index is missing, out of range or repeated ({clip(repr(index), 40)})")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise BadResponse(f"{what}: result {index} has no finite {key}")
        scores[index] = float(score)
    return scores


def describe_error(status: int, body: Any, what: str) -> str | None:
    """The server's own words from its error envelope: Cohere `message`, Jina / Xinference `detail`,
    vLLM `error.message` or `message`, TEI `error`."""
    if not isinstance(body, dict):
        return None
    for key in ("message", "detail", "error"):
        value = body.get(key)
        if isinstance(value, dict):
            value = value.get("message")
        if isinstance(value, (str, list)) and value:
            return str(value)
    return None


# -- the stage ---------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Reranked(Ranked):
    """A passage after the model's stage: `score` is the record's score, `fused` what the fusion gave it."""

    model_score: float | None = None  # the model's relevance on [0, 1]; None: not judged
    fused: float = 0.0


def _reranked(ranked: Ranked, score: float, model_score: float | None) -> Reranked:
    fields = {f.name: getattr(ranked, f.name) for f in dataclasses.fields(Ranked)}
    return Reranked(**{**fields, "score": score}, model_score=model_score, fused=ranked.score)


def stage_detail(ranked: Ranked) -> dict[str, float | None]:
    """For a record's `score_detail`: the model's score and the fusion's, when the stage ran."""
    if not isinstance(ranked, Reranked):
        return {}
    return {"rerank": None if ranked.model_score is None else round(ranked.model_score, 6), "fused": round(ranked.fused, 6)}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class RerankModel:
    """One configured model: its client, its circuit breaker, and the call with its fallback."""

    def __init__(self, settings: RerankSettings) -> None:
        self.settings = settings
        self.breaker = CircuitBreaker(settings.circuit)
        self.policy = SourcePolicy(timeout_s=settings.timeout_s, retries=settings.retries)
        self._client: HttpClient | None = None
        self._warned_scale = False
        url = urlsplit(settings.endpoint())
        #: The client's base is the server (so nothing takes its key elsewhere); each call posts to the endpoint's path.
        self._origin, self._path = f"{url.scheme}://{url.netloc}", url.path + (f"?{url.query}" if url.query else "")
        self._what = f"POST {url.scheme}://{url.hostname}{f':{url.port}' if url.port else ''}{url.path}"  # no user info, no query

    @property
    def reserve_s(self) -> float:
        """Time kept out of the sources' share of the deadline for this stage: none while its circuit is open
        and no trial is due (the stage will be skipped; a trial that falls due meanwhile gets what time is left)."""
        if self.breaker.state == "open" and (self.breaker.seconds_until_trial() or 0.0) > 0.0:
            return 0.0
        return self.settings.timeout_s

    def client(self) -> HttpClient:
        if self._client is None:
            key = self.settings.api_key
            headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {}
            self._client = make_client(
                self._origin, headers=headers, timeout_s=self.settings.timeout_s, verify=self.settings.verify_tls, max_connections=32
            )
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def score(self, query: str, documents: list[str]) -> dict[int, float]:
        """The model's relevance (on [0, 1]) per index of `documents`. Raises SourceError."""
        body = request_body(self.settings, query, [text[: self.settings.max_chars] for text in documents])
        data = await request_json(
            self.client(), "POST", self._path, self._what, MAX_RESPONSE_BYTES, describe_error=describe_error, json=body
        )
        assert self.settings.provider is not None
        raw = parse_scores(data, len(documents), self.settings.provider, self._what)
        if self.settings.scores == "logit":
            return {i: _sigmoid(s) for i, s in raw.items()}
        if not self._warned_scale and any(not 0.0 <= s <= 1.0 for s in raw.values()):
            self._warned_scale = True
            log.warning("%s: scores outside [0, 1] (e.g. %.3g); they are clipped: set rerank.scores: logit if this model gives logits",
                        self._what, next(s for s in raw.values() if not 0.0 <= s <= 1.0))  # fmt: skip
        return {i: min(1.0, max(0.0, s)) for i, s in raw.items()}

    async def reorder(self, query: str, ranking: Iterable[Ranked], deadline: float) -> tuple[Iterator[Ranked], SourceResult]:
        """The ranking with its top `top_n` reordered by the model, and the stage's outcome; the ranking unchanged
        (the fusion's order and scores) when the model fails, is skipped or there is no time left before `deadline`."""
        started = time.perf_counter()
        passages = iter(ranking)
        head = list(islice(passages, self.settings.top_n))
        if not head:
            return passages, SourceResult(STAGE_NAME, "empty")
        if not self.breaker.allow():
            wait = self.breaker.seconds_until_trial() or 0.0
            skipped = SourceResult(STAGE_NAME, "skipped", error=f"circuit open; next trial in {wait:.0f} s")
            traced_skip(STAGE_NAME, STAGE_TYPE, skipped)
            return _chain(head, passages), skipped
        scores: dict[int, float] = {}

        async def judge() -> SourceResult:
            found, attempts = await self._call(query, [r.candidate.passage.content for r in head], deadline)
            if isinstance(found, SourceError):
                return SourceResult(STAGE_NAME, found.outcome, [], _ms(started), str(found), attempts)
            scores.update(found)
            return SourceResult(STAGE_NAME, "ok", [], _ms(started), None, attempts)

        result = await traced(STAGE_NAME, STAGE_TYPE, judge())  # a span of its own, like a source's call
        self.breaker.report(result.outcome == "ok")
        return (self._apply(head, scores, passages) if result.outcome == "ok" else _chain(head, passages)), result

    async def probe(self, query: str, deadline: float) -> SourceResult:
        """One call over two made-up passages, as `aggregator check` tries each model: the outcome, nothing kept."""
        texts = [query, "An unrelated passage about the weather."]
        ranking = [Ranked(Candidate(Passage(t, "probe", f"probe-{i}"), STAGE_NAME, STAGE_TYPE, 1.0), 0.0, 0.0, 0.0) for i, t in enumerate(texts)]
        _, result = await self.reorder(query, ranking, deadline)
        return result

    async def _call(self, query: str, documents: list[str], deadline: float) -> tuple[dict[int, float] | SourceError, int]:
        """The scores, or the error that ended the call, and the attempts made: the fan-out's policy, each attempt
        within `timeout_s` and the deadline, transient failures retried only while the pause fits before it."""
        loop = asyncio.get_running_loop()
        attempts = 0
        try:
            while True:
                attempts += 1
                budget = min(self.policy.timeout_s, deadline - loop.time())
                try:
                    if budget <= 0:
                        raise SourceTimeout("no time left in the request's deadline")
                    try:
                        async with asyncio.timeout(budget):
                            return await self.score(query, documents), attempts
                    except TimeoutError:
                        raise SourceTimeout(f"{self._what}: no answer within {budget:.2f} s") from None
                except SourceError as exc:
                    if not exc.retryable or attempts > self.policy.retries:
                        return exc, attempts
                    pause = pause_before_retry(exc, attempts, self.policy)
                    if loop.time() + pause >= deadline - 0.05:  # no sleep that would reach the deadline
                        return exc, attempts
                    await asyncio.sleep(pause)
        except asyncio.CancelledError:
            self.breaker.release()
            raise
        except Exception as exc:  # a bug here must not cost the request its answer
            log.exception("the rerank model's stage raised an unexpected error")
            return BadResponse(f"internal error: {type(exc).__name__}"), attempts

    def _apply(self, head: list[Ranked], scores: Mapping[int, float], rest: Iterator[Ranked]) -> Iterator[Ranked]:
        weight = self.settings.weight
        judged = [
            (i, _reranked(r, weight * scores[i] + (1.0 - weight) * r.score, scores[i])) for i, r in enumerate(head) if i in scores
        ]
        judged.sort(key=lambda pair: (-pair[1].score, pair[0]))  # ties: the fusion's order
        floor = judged[-1][1].score if judged else 1.0
        unjudged = [_reranked(r, min(r.score, floor), None) for i, r in enumerate(head) if i not in scores]
        return _chain([r for _, r in judged] + unjudged, (_reranked(r, min(r.score, floor), None) for r in rest))


def _chain(head: list[Ranked], rest: Iterator[Ranked]) -> Iterator[Ranked]:
    yield from head
    yield from rest


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


class RerankModels:
    """The models of one config version, per knowledge base (knowledge bases with the same settings share one)."""

    def __init__(self, by_knowledge_base: Mapping[str, RerankSettings | None]) -> None:
        self._models: list[RerankModel] = []
        self._by_kb: dict[str, RerankModel] = {}
        for kb_id, settings in by_knowledge_base.items():
            if settings is None:
                continue
            model = next((m for m in self._models if m.settings == settings), None)
            if model is None:
                model = RerankModel(settings)
                self._models.append(model)
            self._by_kb[kb_id] = model

    def get(self, knowledge_id: str) -> RerankModel | None:
        return self._by_kb.get(knowledge_id)

    @property
    def models(self) -> dict[RerankModel, list[str]]:
        """Each distinct model and the knowledge bases that use it."""
        return {model: [kb for kb, m in self._by_kb.items() if m is model] for model in self._models}

    @property
    def stages(self) -> dict[str, str]:
        """The pseudo-sources these models report as (name -> type), for /status: none when no model is set."""
        return {STAGE_NAME: STAGE_TYPE} if self._models else {}

    async def aclose(self) -> None:
        await asyncio.gather(*(model.aclose() for model in self._models), return_exceptions=True)
