"""The steps of a retrieval over HTTP, shared by Dify's `POST /retrieval` (api.py) and MCP's `search` (mcp.py).

Authentication (the Bearer key, the ops token), reading and parsing the body into the contract's request,
the cache in front of the pipeline, and one record of the request: each written once, so both doors ask
the same way and answer the same records.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import msgspec
from fastapi import Request
from fastapi.responses import Response
from fastapi.responses import JSONResponse as StarletteJSONResponse
from pydantic import ValidationError

from aggregator.ops import explain
from aggregator.retrieval.cache import CachedAnswer, answered_by_all, retrieval_key
from aggregator.runtime.config import ApiKey, GatewayConfig
from aggregator.contract.models import RetrievalRequest
from aggregator.retrieval.pipeline import UnknownKnowledgeBase, retrieve
from aggregator.runtime.gateway import Gateway
from aggregator.runtime.service import Service

#: The request log keeps the name it has always had: users filter their logs by it.
log = logging.getLogger("aggregator.web.api")

#: A client that trickles its body in may not hold a request open longer than this.
BODY_TIMEOUT_S = 10.0
_encode = msgspec.json.Encoder().encode


def encode_json(content: Any) -> bytes:
    """Compact UTF-8 JSON, as Starlette wrote it, by msgspec in a tenth of the time. NaN and infinities (a
    source's metadata may hold them) become null; what msgspec cannot encode (a lone surrogate) is escaped."""
    try:
        return _encode(content)
    except (TypeError, ValueError, OverflowError):
        return json.dumps(content, ensure_ascii=True, separators=(",", ":"), default=str).encode()


class JSONResponse(StarletteJSONResponse):
    """Every JSON answer of the service, encoded by `encode_json`."""

    def render(self, content: Any) -> bytes:
        return encode_json(content)


def error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error_code": code, "error_msg": message}, status_code=status, headers=headers)


def find_key(config: GatewayConfig, presented: str) -> ApiKey | None:
    """The configured key matching `presented`: SHA-256 digests compared in constant time, over every key."""
    digest = hashlib.sha256(presented.encode()).digest()
    found = None
    for candidate in config.server.api_keys:
        if hmac.compare_digest(candidate.digest, digest):
            found = candidate
    return found


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        place = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".") or "body"
        message = "field required" if e["type"] == "missing" else e["msg"].removeprefix("Value error, ")
        parts.append(f"{place}: {message}")
    return "; ".join(parts)


def parse_request(raw: bytes) -> RetrievalRequest | JSONResponse:
    try:  # the usual body, read and validated in one pass (pydantic's JSON mode: the same model as below)
        return RetrievalRequest.model_validate_json(raw)
    except ValidationError:
        pass  # anything else takes the path that words its error exactly
    if not raw.strip():
        return error(400, 3001, "body: a JSON object with knowledge_id, query and retrieval_setting is required")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return error(400, 3001, "body: not valid JSON")
    if not isinstance(data, dict):
        return error(400, 3001, f"body: expected a JSON object, got {type(data).__name__}")
    try:
        return RetrievalRequest.model_validate(data)
    except ValidationError as exc:
        return error(400, 3001, describe_validation_error(exc))


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None if it is over `limit` bytes (checked as it streams in)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


#: Headers by which a proxy says whom it forwards. A request carrying any of them came through a proxy, so its
#: loopback peer says nothing about who sent it: it is not local, whichever of them the proxy chose to set.
FORWARDING_HEADERS = (
    "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip", "x-client-ip",
    "true-client-ip", "cf-connecting-ip", "fastly-client-ip", "x-cluster-client-ip", "x-original-forwarded-for",
)  # fmt: skip
#: The cookie an ops token is exchanged for on the pages, so that it never stays in a URL (history, links, logs).
OPS_COOKIE = "gateway_ops"


def is_loopback(request: Request) -> bool:
    """A caller on this host that no proxy forwarded (see FORWARDING_HEADERS)."""
    headers = request.headers
    if any(name in headers for name in FORWARDING_HEADERS):
        return False
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "testclient")


def _same(presented: str, expected: str) -> bool:
    return hmac.compare_digest(hashlib.sha256(presented.encode()).digest(), hashlib.sha256(expected.encode()).digest())


def ops_cookie_value(token: str) -> str:
    """What the ops cookie holds: derived from the token, never the token itself."""
    return hmac.new(token.encode(), b"gateway ops cookie", hashlib.sha256).hexdigest()


def ops_denied(request: Request, config: GatewayConfig) -> JSONResponse | None:
    """/status, /metrics, /explain and the page: the ops token when one is set, else loopback callers only.

    The token is taken from `Authorization: Bearer`, from the cookie the pages set, or from `?token=` (which
    the pages trade for that cookie at once, see `token_to_cookie`)."""
    token = config.server.ops_token
    if token is None:
        if is_loopback(request):
            return None
        return error(403, 1001, "ops endpoints answer loopback callers only (not through a proxy); set server.ops_token to open them to others")
    secret = token.get_secret_value()
    presented = bearer_token(request.headers.get("authorization")) or request.query_params.get("token") or ""
    if _same(presented, secret) or _same(request.cookies.get(OPS_COOKIE, ""), ops_cookie_value(secret)):
        return None
    return error(403, 1002, "a valid ops token is required (Authorization: Bearer <ops_token>, or ?token= on the pages)")


def token_to_cookie(request: Request, config: GatewayConfig) -> Response | None:
    """A page asked for with a valid `?token=`: a redirect to the same address without it, setting the ops cookie.
    The token then stays out of the address bar, of links the page makes, and of every log of the request after."""
    token = config.server.ops_token
    if token is None or "token" not in request.query_params or ops_denied(request, config) is not None:
        return None
    rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
    target = request.url.path + ("?" + urlencode(rest) if rest else "")
    response = Response(status_code=303, headers={"Location": target, "Cache-Control": "no-store"})
    response.set_cookie(
        OPS_COOKIE, ops_cookie_value(token.get_secret_value()), httponly=True, samesite="strict", path="/",
        secure=request.url.scheme == "https",
    )  # fmt: skip
    return response


def explain_scope(request: Request, config: GatewayConfig) -> list[str] | JSONResponse:
    """The knowledge bases /explain may show this caller (who already passed `ops_denied`).

    Explain shows passages, so it shows only what the caller could read anyway: with `server.ops_token`, its
    holder is an operator and sees every knowledge base; without one, being on this host is not enough, and
    the caller presents an API key (`Authorization: Bearer`) and sees the knowledge bases that key may read."""
    if config.server.ops_token is not None:
        return list(config.knowledge_bases)
    presented = bearer_token(request.headers.get("authorization"))
    if presented is None:
        return error(403, 1001, "without server.ops_token, /explain needs an API key (Authorization: Bearer <key>) and shows what it may read")
    api_key = find_key(config, presented)
    if api_key is None:
        return error(403, 1002, "the API key is not valid")
    allowed = [kb for kb in config.knowledge_bases if api_key.allows(kb)]
    return allowed or error(403, 1002, "this API key may read no knowledge base")


async def answer_retrieval(service: Service, gateway: Gateway, api_key: ApiKey, parsed: RetrievalRequest, request_id: str,
                           via: str | None = None) -> Response:
    """A validated retrieval by an authenticated key, answered through the response cache: /retrieval's path after
    its checks, and MCP's `search` (`via="mcp"` marks its log lines). 200 with the records, or 404/2001."""
    if not api_key.allows(parsed.knowledge_id):
        return error(403, 1002, f"this API key may not read knowledge base {parsed.knowledge_id!r}")

    async def respond() -> tuple[Response, CachedAnswer | None]:
        """The retrieval itself, and its answer for the response cache when it is a 200."""
        started = time.perf_counter()
        try:
            result = await retrieve(gateway, parsed)
        except UnknownKnowledgeBase:
            return error(404, 2001, f"knowledge_id: no knowledge base named {parsed.knowledge_id!r}"), None
        service.record(gateway, parsed.knowledge_id, parsed.query, result, time.perf_counter() - started, request_id, via)
        sources = result.sources_header()
        response = JSONResponse({"records": result.records}, headers={"X-Sources": sources, "X-Request-Id": request_id})
        if not service.cache.enabled:
            return response, None
        return response, CachedAnswer(bytes(response.body), sources, complete=answered_by_all(result.sources))

    # Dify's retries (and any identical retrieval within server.cache_ttl_s) are answered once: aggregator/retrieval/cache.py
    return await serve_cached(service, gateway, api_key, parsed, request_id, respond, via)


async def explain_retrieval(service: Service, gateway: Gateway, parsed: RetrievalRequest, body: dict[str, Any],
                            via: str | None = None) -> dict[str, Any] | None:
    """What /explain shows of a retrieval (every passage and its fate; `body` is the request as asked), or None for an
    unknown knowledge base. The caller has checked who may see it: /explain and MCP's `explain` tool both call this."""
    started = time.perf_counter()
    try:
        result = await retrieve(gateway, parsed, explain=True)
    except UnknownKnowledgeBase:
        return None
    elapsed = time.perf_counter() - started
    service.record(gateway, parsed.knowledge_id, parsed.query, result, elapsed, "explain-" + uuid.uuid4().hex[:8], via)
    types = {name: slot.connector.type for name, slot in gateway.slots.items()}
    return explain.explanation(result, body, elapsed * 1000, types, gateway.secrets)


async def serve_cached(service: Service, gateway: Gateway, api_key: ApiKey, request: RetrievalRequest, request_id: str,
                       respond: Callable[[], Awaitable[tuple[Response, CachedAnswer | None]]], via: str | None = None) -> Response:  # fmt: skip
    """The answer to a retrieval through the service's cache, with `X-Cache: hit|miss|coalesced` (none when it is off),
    and the cache's part of the request's record."""
    cache = service.cache
    if not cache.enabled:
        return (await respond())[0]
    started = time.perf_counter()
    setting = request.retrieval_setting
    condition = request.metadata_condition.model_dump() if request.metadata_condition else None
    key = retrieval_key(api_key.knowledge_ids, request.knowledge_id, request.query, setting.top_k, setting.score_threshold,
                        condition, gateway.config.version)  # fmt: skip
    response, answer, outcome = await cache.answer(key, respond, gateway.config.server.deadline_s)
    service.record_cached(request.knowledge_id, request_id, outcome, time.perf_counter() - started, via)
    if response is None:
        assert answer is not None
        response = Response(answer.body, media_type="application/json", headers={"X-Sources": answer.sources, "X-Request-Id": request_id})
    response.headers["X-Cache"] = outcome
    return response
