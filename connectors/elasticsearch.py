"""`elasticsearch`: an existing Elasticsearch or OpenSearch index, searched with the engine's own BM25.

Follows the Search API as documented for Elasticsearch 8.x and 9.x
(`POST /<index>/_search`: `query`, `size`, `_source`, `highlight`,
`track_total_hits`, `timeout`; answer `hits.hits[]` with `_index`, `_id`,
`_score`, `_source`, `highlight`; errors `{"error": {"type", "reason",
"root_cause"}, "status"}`) and by OpenSearch 2.x (2.2 or later), which shares
those shapes. The two differ where `flavor` says:

- auth: Elasticsearch takes an API key (`Authorization: ApiKey <encoded>`) or
  basic auth; OpenSearch 2 has no API keys, only basic auth (or none);
- the highlighter's bound on analysed text is `max_analyzed_offset` in
  Elasticsearch and `max_analyzer_offset` in OpenSearch.

Each query is one `multi_match` over `fields` (`best_fields` by default).
Long documents are not downloaded whole: the `content_field` comes back as the
highlighter's best fragments around the matches (`fragment_chars` each, at
most `fragments`, best first, `no_match_size` for hits that matched only
elsewhere), and each fragment is a passage. `source_score` is the raw
`_score`, exactly as the engine gave it.

`metadata_condition` is pushed down as a `bool` filter for the names listed in
`filter_fields` (each mapped to a keyword, numeric or date field): `is`/`in`
as term(s), `start with` as prefix, `contains`/`end with` as wildcard,
`not empty` as exists, numbers and dates as range, negations as `must_not`.
What has no safe translation (`empty`, names not listed) is left to the
gateway's own post-filter, by the rules of `connectors/_conditions.py`.
"""

from __future__ import annotations

import base64
import logging
import re
from datetime import datetime, timezone
from typing import Any, Literal
from urllib.parse import quote

import httpx
from pydantic import Field, SecretStr, field_validator, model_validator

from aggregator.contract.conditions import NEGATIONS, as_instant, as_number, as_text, listed
from aggregator.text.chunking import split_passages

from connectors._conditions import push_down
from connectors._remote import GATEWAY_FIELDS, Call, RemoteConnector, dig, iso_time, public_url, raw_score, upstream_metadata
from connectors.base import BadResponse, ConnectorSettings, Passage, SourceQuery
from connectors.http import DEFAULT_MAX_RESPONSE_BYTES, BaseUrl

log = logging.getLogger(__name__)

MATCH_TYPES = Literal["best_fields", "most_fields", "cross_fields", "phrase", "phrase_prefix", "bool_prefix"]
#: Record fields a filter may name besides `metadata_fields`.
RECORD_FIELDS = frozenset({"title", "url", "updated_at"})
#: Characters analysed per field for highlighting, just under both engines' index default (1,000,000).
HIGHLIGHT_MAX_OFFSET = 999_999
#: Placeholders of `url_template`: `{_id}`, `{_index}` or a `_source` field.
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_RANGE_KEYS = {">": "gt", "<": "lt", "≥": "gte", "≤": "lte"}
#: Bounds of what is pushed down; a condition over them is left to the gateway's own filter. A value longer than
#: a keyword a cluster indexes by default (`ignore_above` 256 in dynamic mappings, Lucene's 32 KB term limit) can
#: match nothing there anyway, and a cluster refuses `terms` lists over `index.max_terms_count` (65,536).
MAX_PUSHED_CHARS = 1024
MAX_PUSHED_TERMS = 1024
#: Queries a cluster with `search.allow_expensive_queries: false` refuses: `contains`, `end with`, `start with`.
EXPENSIVE = frozenset({"wildcard", "prefix"})


class ElasticsearchSettings(ConnectorSettings):
    type: Literal["elasticsearch"] = "elasticsearch"
    url: BaseUrl = Field(description="The cluster, e.g. https://es.internal:9200; credentials go in api_key or username/password.")
    index: str = Field(min_length=1, description="Index, alias, comma-separated list or pattern.")
    flavor: Literal["elasticsearch", "opensearch"] = "elasticsearch"
    fields: list[str] = Field(default_factory=list, description="multi_match fields (boosts allowed: title^2); default title and content.")
    match_type: MATCH_TYPES = "best_fields"
    operator: Literal["or", "and"] = "or"
    minimum_should_match: str | None = None
    content_field: str = "content"
    title_field: str | None = "title"
    url_field: str | None = None
    url_template: str | None = Field(None, description="e.g. https://wiki.example.com/pages/{_id}")
    updated_field: str | None = None
    metadata_fields: list[str] = Field(default_factory=list, description="_source fields copied into each record's metadata.")
    filter_fields: dict[str, str] = Field(default_factory=dict, description="metadata name -> keyword/numeric/date field, for pushdown.")
    highlight: bool = Field(True, description="Fragments around the matches; false returns the whole field, split into passages.")
    fragments: int = Field(3, ge=1, le=20)
    fragment_chars: int | None = Field(None, ge=50, le=20000, description="Defaults to chunk_chars.")
    max_results: int = Field(50, ge=1, le=1000, description="Hits asked per query, at most.")
    api_key: SecretStr | None = Field(None, description="Elasticsearch only: the encoded API key, or id:api_key.")
    username: str | None = None
    password: SecretStr | None = None
    verify_tls: bool | str = Field(True, description="False, or a CA bundle path for a private CA.")
    max_response_bytes: int = Field(DEFAULT_MAX_RESPONSE_BYTES, ge=1024)

    @property
    def match_fields(self) -> list[str]:
        """`fields` when given, else the title and content fields."""
        if self.fields:
            return self.fields
        return [f for f in (self.title_field, self.content_field) if f]

    @property
    def fragment_size(self) -> int:
        """`fragment_chars` when set, else the passage size (`chunk_chars`, after `defaults` filled it in)."""
        return self.fragment_chars if self.fragment_chars is not None else self.chunk_chars

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, value: str) -> str:
        if httpx.URL(value).userinfo:
            raise ValueError("put credentials in api_key or username/password, not in the URL")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ElasticsearchSettings":
        if self.api_key is not None and self.flavor == "opensearch":
            raise ValueError("OpenSearch 2 has no API keys: use username and password")
        if self.api_key is not None and self.username is not None:
            raise ValueError("give api_key or username/password, not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.url_field and self.url_template:
            raise ValueError("give url_field or url_template, not both")
        reserved = sorted(set(self.filter_fields) & (GATEWAY_FIELDS - RECORD_FIELDS))
        if reserved:
            raise ValueError(f"filter_fields names {reserved} are set by the gateway itself and cannot be pushed down")
        unknown = sorted(set(self.filter_fields) - set(self.metadata_fields) - RECORD_FIELDS)
        if unknown:
            raise ValueError(f"filter_fields names {unknown} are not in metadata_fields (nor title, url, updated_at)")
        return self


def _encoded_api_key(value: str) -> str:
    """Elasticsearch wants base64(id:api_key); accept that, or the id:api_key pair as the API shows it."""
    return base64.b64encode(value.encode()).decode() if ":" in value else value


def source_value(source: Any, path: str) -> Any:
    """A `_source` field by dotted path: a flat key, or nested objects (lists of objects give lists)."""
    if not isinstance(source, dict):
        return None
    if path in source:
        return source[path]
    head, _, rest = path.partition(".")
    if not rest or head not in source:
        return None
    inner = source[head]
    if isinstance(inner, list):
        found = [v for v in (source_value(item, rest) for item in inner) if v is not None]
        return found or None
    return source_value(inner, rest)


def _first_text(value: Any) -> str | None:
    if isinstance(value, list):
        value = next((v for v in value if v is not None), None)
    return None if value is None or isinstance(value, (dict, list)) else as_text(value)


def _wildcard(text: str) -> str:
    return re.sub(r"([\\*?])", r"\\\1", text)


def _bounded(texts: list[str]) -> list[str] | None:
    """`texts` if a cluster takes them as a `terms` list (see MAX_PUSHED_TERMS, MAX_PUSHED_CHARS), else None."""
    if len(texts) > MAX_PUSHED_TERMS or any(len(t) > MAX_PUSHED_CHARS for t in texts):
        return None
    return texts


def _positive_query(field: str, operator: str, value: Any) -> dict[str, Any] | None:
    """The query DSL for one positive operator on a keyword, numeric or date field; None when it has none, or
    when the value is over the bounds above (the gateway's post-filter then does the work)."""
    if operator == "not empty":
        return {"exists": {"field": field}}
    if operator == "in" or (operator == "is" and isinstance(value, list)):
        items = listed(value) if operator == "in" else [as_text(v) for v in value if v is not None]
        terms = _bounded(items)
        return None if terms is None else {"terms": {field: terms}}
    if operator == "is":
        text = as_text(value)
        return {"term": {field: text}} if len(text) <= MAX_PUSHED_CHARS else None
    if isinstance(value, list) or (isinstance(value, str) and len(value) > MAX_PUSHED_CHARS):
        return None
    if operator == "start with":
        return {"prefix": {field: {"value": as_text(value)}}}
    if operator in ("contains", "end with"):
        pattern = _wildcard(as_text(value))
        return {"wildcard": {field: {"value": f"*{pattern}*" if operator == "contains" else f"*{pattern}"}}}
    if operator in ("=", *_RANGE_KEYS):
        number = as_number(value)
        if number is None:
            return None
        return {"term": {field: number}} if operator == "=" else {"range": {field: {_RANGE_KEYS[operator]: number}}}
    if operator in ("before", "after"):
        instant = as_instant(value)
        if instant is None:
            return None
        moment = datetime.fromtimestamp(instant, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {"range": {field: {"lt" if operator == "before" else "gt": moment}}}
    return None


def filter_clause(
    filter_fields: dict[str, str], name: str, operator: str, value: Any, expensive: bool = True
) -> dict[str, Any] | None:
    """One condition as a filter clause; negations become `must_not`, which a missing field passes, as in the gateway.

    `empty` is not translated: the gateway counts "" as empty, `must_not exists` does not. With `expensive`
    false, neither are the queries in EXPENSIVE (for a cluster that refuses them).
    """
    field = filter_fields.get(name)
    if field is None or operator == "empty":
        return None
    query = _positive_query(field, NEGATIONS.get(operator, operator), value)
    if query is None or (not expensive and next(iter(query)) in EXPENSIVE):
        return None
    return {"bool": {"must_not": [query]}} if operator in NEGATIONS else query


def describe_error(status: int, envelope: Any, what: str) -> str | None:
    """`{"error": {"type", "reason"}, "status"}`: the engine's own words (older answers carry a string)."""
    if not isinstance(envelope, dict):
        return None
    error = envelope.get("error")
    if isinstance(error, str):
        return error
    if not isinstance(error, dict):
        return None
    causes = error.get("root_cause") if isinstance(error.get("root_cause"), list) else []
    cause = causes[0] if causes and isinstance(causes[0], dict) else error
    reason = cause.get("reason") or error.get("reason")
    kind = cause.get("type") or error.get("type")
    return ": ".join(str(p) for p in (kind, reason) if p) or None


class ElasticsearchConnector(RemoteConnector):
    describe_error = staticmethod(describe_error)
    settings_model = ElasticsearchSettings
    settings: ElasticsearchSettings

    #: False once the cluster refused a wildcard or prefix query (`search.allow_expensive_queries: false`).
    expensive_queries = True

    @property
    def pushdown_fields(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset(self.settings.filter_fields)

    def client_options(self) -> dict[str, Any]:
        s = self.settings
        headers = {"Accept": "application/json"}
        auth: tuple[str, str] | None = None
        if s.api_key is not None:
            headers["Authorization"] = f"ApiKey {_encoded_api_key(s.api_key.get_secret_value())}"
        elif s.username is not None and s.password is not None:
            auth = (s.username, s.password.get_secret_value())
        return {"base_url": s.url, "headers": headers, "auth": auth, "verify": s.verify_tls}

    def _source_fields(self) -> list[str]:
        s = self.settings
        wanted = [s.title_field, s.url_field, s.updated_field, *s.metadata_fields]
        if s.url_template:
            wanted += [p for p in _PLACEHOLDER.findall(s.url_template) if p not in ("_id", "_index")]
        if not s.highlight:
            wanted.append(s.content_field)
        return list(dict.fromkeys(f for f in wanted if f))

    def request_body(self, query: SourceQuery) -> dict[str, Any]:
        s = self.settings
        match: dict[str, Any] = {"query": query.text, "fields": s.match_fields, "type": s.match_type}
        if s.match_type not in ("phrase", "phrase_prefix"):
            match["operator"] = s.operator
        if s.minimum_should_match:
            match["minimum_should_match"] = s.minimum_should_match
        boolean: dict[str, Any] = {"must": [{"multi_match": match}]}
        expensive = self.expensive_queries
        pushed = push_down(query.metadata_condition, lambda n, o, v: filter_clause(s.filter_fields, n, o, v, expensive))
        if pushed is not None:
            boolean["filter"] = pushed.clauses if pushed.logical_operator == "and" else [
                {"bool": {"should": pushed.clauses, "minimum_should_match": 1}}
            ]  # fmt: skip
        source = self._source_fields()
        body: dict[str, Any] = {
            "query": {"bool": boolean},
            "size": min(query.limit, s.max_results),
            "_source": {"includes": source} if source else False,
            "track_total_hits": False,
            # stop in time to answer with what was found, rather than be cut off by our own timeout
            "timeout": f"{int(s.timeout_s * 800)}ms",
        }
        if s.highlight:
            size = s.fragment_size
            offset_key = "max_analyzed_offset" if s.flavor == "elasticsearch" else "max_analyzer_offset"
            body["highlight"] = {
                "fields": {s.content_field: {
                    "type": "unified", "fragment_size": size, "number_of_fragments": s.fragments,
                    "no_match_size": size, "order": "score",
                }},
                "pre_tags": [""], "post_tags": [""], "encoder": "default", offset_key: HIGHLIGHT_MAX_OFFSET,
            }  # fmt: skip
        return body

    def _url(self, hit: dict[str, Any], source: Any) -> str | None:
        s = self.settings
        if s.url_field:
            return _first_text(source_value(source, s.url_field))
        if not s.url_template:
            return None
        missing = False

        def fill(match: re.Match[str]) -> str:
            nonlocal missing
            name = match.group(1)
            value = hit.get(name) if name in ("_id", "_index") else _first_text(source_value(source, name))
            if value is None:
                missing = True
                return ""
            return quote(str(value), safe="/")

        url = _PLACEHOLDER.sub(fill, s.url_template)
        return None if missing else url

    def _texts(self, hit: dict[str, Any], source: Any) -> list[str]:
        s = self.settings
        if s.highlight:
            fragments = dig(hit, "highlight", s.content_field)
            if isinstance(fragments, list):
                return [f.strip() for f in fragments if isinstance(f, str) and f.strip()]
        value = source_value(source, s.content_field)
        text = "\n\n".join(str(v) for v in value if v is not None) if isinstance(value, list) else as_text(value) if value is not None else ""
        return split_passages(text, s.chunk_chars) if text.strip() else []

    def parse(self, data: Any, what: str) -> list[Passage]:
        hits = dig(data, "hits", "hits")
        if not isinstance(hits, list):
            raise BadResponse(f"{what}: answer has no hits.hits list")
        s = self.settings
        passages: list[Passage] = []
        for rank, hit in enumerate(hits, start=1):
            if not isinstance(hit, dict) or hit.get("_id") is None:
                continue
            source = hit.get("_source") or {}
            texts = self._texts(hit, source)
            if not texts:
                continue
            document_id = str(hit["_id"])
            fields = {name: value for name in s.metadata_fields if (value := source_value(source, name)) is not None}
            metadata = {**upstream_metadata(fields, "es"), "index": hit.get("_index")}
            url = self._url(hit, source)
            if url:
                metadata["url"] = url
            title = _first_text(source_value(source, s.title_field)) if s.title_field else None
            updated = iso_time(source_value(source, s.updated_field)) if s.updated_field else None
            score = raw_score(hit.get("_score"))
            for index, text in enumerate(texts):
                passages.append(Passage(
                    content=text, title=title or document_id, document_id=document_id, chunk_index=index,
                    metadata=metadata, updated_at=updated, source_score=score, source_rank=rank,
                ))  # fmt: skip
        return passages

    async def search(self, query: SourceQuery) -> list[Passage]:
        """A cluster that refuses expensive queries answers 400 to a pushed-down wildcard or prefix: the same query
        is asked again without them (the gateway filters those conditions itself), and from then on for good."""
        try:
            return await super().search(query)
        except BadResponse as exc:
            if not self.expensive_queries or "allow_expensive_queries" not in str(exc):
                raise
        self.expensive_queries = False
        log.warning("source %s: the cluster refuses expensive queries; wildcard and prefix conditions are filtered by the gateway", self.name)
        return await super().search(query)

    def call(self, query: SourceQuery) -> Call:
        path = f"/{quote(self.settings.index, safe=',*:')}/_search"
        return Call("POST", path, f"{self.settings.flavor} {public_url(self.settings.url + path)}", {"json": self.request_body(query)})
