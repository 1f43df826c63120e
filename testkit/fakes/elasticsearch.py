"""A fake Elasticsearch 8/9 or OpenSearch 2 cluster that answers `POST /<index>/_search` with the documented shapes.

It understands what the connector sends: a `bool` query with one `multi_match`
(`fields` with `^boost`, `operator`), filters made of term / terms / prefix /
wildcard / range / exists / nested `bool` (`must_not`, `should`), `size` and
`from`, `_source.includes`, and a unified highlight (sentences grouped up to
`fragment_size`, `number_of_fragments`, `no_match_size`, plain tags). Scores
are unnormalised sums (often above 1), as a real `_score` is. It refuses the
other flavor's highlight offset key with the 400 a real cluster gives, and
records every request body so tests can look at what was pushed down.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

_WORD = re.compile(r"\w+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _error(status: int, kind: str, reason: str, **extra: Any) -> JSONResponse:
    cause = {"type": kind, "reason": reason, **extra}
    return JSONResponse({"error": {"root_cause": [cause], **cause}, "status": status}, status_code=status)


def _value(doc: dict[str, Any], path: str) -> Any:
    value: Any = doc
    for part in path.removesuffix(".keyword").split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _values(doc: dict[str, Any], path: str) -> list[Any]:
    value = _value(doc, path)
    return [] if value is None else value if isinstance(value, list) else [value]


def _wildcard_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out, i = out + re.escape(pattern[i + 1]), i + 2
            continue
        out += ".*" if ch == "*" else "." if ch == "?" else re.escape(ch)
        i += 1
    return re.compile(out + r"\Z")


def _comparable(a: Any, b: Any) -> bool:
    numbers = (int, float)
    return (isinstance(a, numbers) and isinstance(b, numbers)) or (isinstance(a, str) and isinstance(b, str))


def _matches(doc: dict[str, Any], clause: dict[str, Any]) -> bool:
    [(kind, spec)] = clause.items()
    if kind == "bool":
        return (all(_matches(doc, c) for c in spec.get("filter", []) + spec.get("must", []))
                and not any(_matches(doc, c) for c in spec.get("must_not", []))
                and (not spec.get("should") or any(_matches(doc, c) for c in spec["should"])))  # fmt: skip
    if kind == "exists":
        return bool(_values(doc, spec["field"]))
    [(path, arg)] = spec.items()
    values = _values(doc, path)
    if kind == "term":
        return any(str(v) == str(arg) or v == arg for v in values)
    if kind == "terms":
        return any(str(v) in {str(a) for a in arg} for v in values)
    if kind == "prefix":
        return any(str(v).startswith(arg["value"]) for v in values)
    if kind == "wildcard":
        return any(_wildcard_regex(arg["value"]).match(str(v)) for v in values)
    if kind == "range":
        ops = {"gt": lambda a, b: a > b, "gte": lambda a, b: a >= b, "lt": lambda a, b: a < b, "lte": lambda a, b: a <= b}
        return any(all(_comparable(v, bound) and ops[op](v, bound) for op, bound in arg.items()) for v in values)
    raise ValueError(f"the fake does not know the {kind} query")


def _expensive(clauses: list[dict[str, Any]]) -> str | None:
    """The first wildcard or prefix query among `clauses` (nested bools included), as a cluster would refuse it."""
    for clause in clauses:
        [(kind, spec)] = clause.items()
        if kind in ("wildcard", "prefix"):
            return kind
        if kind == "bool":
            found = _expensive([c for part in ("filter", "must", "must_not", "should") for c in spec.get(part, [])])
            if found:
                return found
    return None


def _highlight(text: str, terms: set[str], size: int, count: int, no_match: int) -> list[str]:
    """Groups of whole sentences up to `size` characters around the sentences that match, best first."""
    sentences = _SENTENCE.split(text)
    hits = [i for i, s in enumerate(sentences) if terms & {w.lower() for w in _WORD.findall(s)}]
    fragments: list[tuple[int, str]] = []
    used: set[int] = set()
    for i in hits:
        if i in used:
            continue
        group, j = sentences[i], i + 1
        used.add(i)
        while j < len(sentences) and len(group) + 1 + len(sentences[j]) <= size:
            group, j = group + " " + sentences[j], j + 1
            used.add(j - 1)
        score = sum(1 for w in _WORD.findall(group) if w.lower() in terms)
        fragments.append((score, group[: max(size, 1)]))
    if not fragments:
        return [text[:no_match]] if no_match and text else []
    return [f for _, f in sorted(fragments, key=lambda x: -x[0])[:count]]


@dataclass
class FakeCluster:
    index: str = "docs"
    flavor: str = "elasticsearch"
    api_key: str | None = None  # the encoded key the cluster accepts
    basic: tuple[str, str] | None = None
    docs: dict[str, dict[str, Any]] = field(default_factory=dict)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    rate_limit_next: int = 0
    retry_after: str = "1"
    malformed: bool = False
    expensive_queries: bool = True  # search.allow_expensive_queries; false refuses wildcard and prefix queries

    def add(self, doc_id: str, **source: Any) -> None:
        self.docs[doc_id] = source

    def authorized(self, header: str) -> bool:
        import base64

        if self.api_key is None and self.basic is None:
            return True
        if self.api_key is not None and header == f"ApiKey {self.api_key}":
            return True
        if self.basic is not None and header == "Basic " + base64.b64encode(":".join(self.basic).encode()).decode():
            return True
        return False


def app(state: FakeCluster) -> FastAPI:
    api = FastAPI()

    @api.post("/{index}/_search")
    async def search(request: Request, index: str) -> Response:
        header = request.headers.get("authorization", "")
        state.auth_headers.append(header)
        if not state.authorized(header):
            return _error(401, "security_exception", "unable to authenticate user for REST request [/_search]",
                          header={"WWW-Authenticate": ['ApiKey', 'Basic realm="security"']})  # fmt: skip
        if state.rate_limit_next > 0:
            state.rate_limit_next -= 1
            response = _error(429, "es_rejected_execution_exception", "rejected execution of coordinating operation")
            response.headers["Retry-After"] = state.retry_after
            return response
        if not any(fnmatch.fnmatch(state.index, pattern) for pattern in index.split(",")):
            return _error(404, "index_not_found_exception", f"no such index [{index}]", index=index)
        body = await request.json()
        state.bodies.append(body)
        if state.malformed:
            return JSONResponse({"took": 1, "hits": "not a list"})
        highlight = body.get("highlight") or {}
        wrong_key = "max_analyzer_offset" if state.flavor == "elasticsearch" else "max_analyzed_offset"
        if wrong_key in highlight:
            return _error(400, "x_content_parse_exception", f"[highlight] unknown field [{wrong_key}]")

        boolean = body["query"]["bool"]
        if not state.expensive_queries and (kind := _expensive(boolean.get("filter", []))):
            return _error(400, "illegal_argument_exception",
                          f"[{kind}] queries cannot be executed when 'search.allow_expensive_queries' is set to false.")  # fmt: skip
        [must] = boolean["must"]
        match = must["multi_match"]
        terms = {w.lower() for w in _WORD.findall(match["query"])}
        fields = [(f.split("^")[0], float(f.split("^")[1]) if "^" in f else 1.0) for f in match["fields"]]
        scored: list[tuple[float, str]] = []
        for doc_id, doc in state.docs.items():
            if not all(_matches(doc, clause) for clause in boolean.get("filter", [])):
                continue
            per_field = []
            for name, boost in fields:
                words = [w.lower() for v in _values(doc, name) for w in _WORD.findall(str(v))]
                found = {t for t in terms if t in words}
                if match.get("operator") == "and" and found != terms:
                    found = set()
                per_field.append(boost * sum(1.0 + 0.5 * words.count(t) for t in found))
            score = max(per_field) if match.get("type", "best_fields") == "best_fields" else sum(per_field)
            if score > 0:
                scored.append((score, doc_id))
        scored.sort(key=lambda x: (-x[0], x[1]))
        start, size = body.get("from", 0), body.get("size", 10)
        includes = (body.get("_source") or {}).get("includes") if body.get("_source") is not False else []
        hits = []
        for score, doc_id in scored[start : start + size]:
            doc = state.docs[doc_id]
            hit: dict[str, Any] = {"_index": state.index, "_id": doc_id, "_score": score}
            if includes is None:
                hit["_source"] = doc
            elif includes:
                hit["_source"] = {k: v for k, v in doc.items() if any(k == i or i.startswith(k + ".") for i in includes)}
            if highlight:
                out = {}
                for name, spec in highlight["fields"].items():
                    text = " ".join(str(v) for v in _values(doc, name))
                    fragments = _highlight(text, terms, spec["fragment_size"], spec["number_of_fragments"], spec.get("no_match_size", 0))
                    if fragments:
                        out[name] = fragments
                hit["highlight"] = out
            hits.append(hit)
        top = hits[0]["_score"] if hits else None
        return JSONResponse({
            "took": 3, "timed_out": False, "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
            "hits": {"max_score": top, "hits": hits},
        })  # fmt: skip

    return api
