"""The HTTP face: Dify's `POST /retrieval`, health probes, and the contract's error format.

Order of checks for a retrieval, as DESIGN section 1 requires: the
Authorization header first (403 before a byte of the body is read), then the
body (400/3001 naming the field), then the key's scope (403/1002), then the
knowledge base (404/2001). Anything unexpected is a 500/5001 with no
traceback in the answer; a source's failure is never an error of the request.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from .config import DEV_API_KEY, ApiKey, GatewayConfig
from .filters import InvalidCondition
from .health import HealthRecorder
from .models import RetrievalRequest
from .pipeline import UnknownKnowledgeBase, retrieve
from .runtime import Gateway

log = logging.getLogger("aggregator.access")

MAX_BODY_BYTES = 1024 * 1024


def error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error_code": code, "error_msg": message}, status_code=status, headers=headers)


def find_key(config: GatewayConfig, presented: str) -> ApiKey | None:
    """The configured key equal to `presented`, compared in constant time over every key."""
    found = None
    for candidate in config.server.api_keys:
        if hmac.compare_digest(candidate.key.get_secret_value().encode(), presented.encode()):
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
        message = "field required" if e["type"] == "missing" else e["msg"]
        parts.append(f"{place}: {message}")
    return "; ".join(parts)


def parse_request(raw: bytes) -> RetrievalRequest | JSONResponse:
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


class Service:
    """What the routes need: the current gateway and the health recorder."""

    def __init__(self, load: Callable[[], GatewayConfig]) -> None:
        self._load = load
        self.gateway: Gateway | None = None
        self.health = HealthRecorder()

    async def start(self) -> None:
        self.gateway = Gateway(self._load())
        if self.gateway.uses_dev_key():
            logging.getLogger("aggregator").warning(
                "an API key is the development default %r: set AGGREGATOR_API_KEY before exposing this service", DEV_API_KEY
            )
        await self.gateway.start()

    async def aclose(self) -> None:
        if self.gateway is not None:
            await self.gateway.aclose()


def create_app(load: Callable[[], GatewayConfig]) -> FastAPI:
    """The ASGI app. `load` returns the config; it runs at startup (errors there stop the server)."""
    service = Service(load)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.aclose()

    app = FastAPI(title="Dify knowledge gateway", version="0.1.0", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error(500, 5001, f"internal error ({type(exc).__name__}); see the service log")

    async def retrieval(request: Request) -> JSONResponse:
        started = time.perf_counter()
        gateway = service.gateway
        if gateway is None:
            return error(503, 5003, "the service is starting; try again shortly")
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            return error(403, 1001, "missing or malformed Authorization header; expected 'Bearer <API key>'")
        api_key = find_key(gateway.config, token)
        if api_key is None:
            return error(403, 1002, "the API key is not valid")
        raw = await read_body(request, MAX_BODY_BYTES)
        if raw is None:
            return error(413, 3002, f"body: larger than {MAX_BODY_BYTES} bytes")
        parsed = parse_request(raw)
        if isinstance(parsed, JSONResponse):
            return parsed
        if not api_key.allows(parsed.knowledge_id):
            return error(403, 1002, f"this API key may not read knowledge base {parsed.knowledge_id!r}")
        try:
            result = await retrieve(gateway, parsed)
        except UnknownKnowledgeBase:
            return error(404, 2001, f"knowledge_id: no knowledge base named {parsed.knowledge_id!r}")
        except InvalidCondition as exc:
            return error(400, 3001, str(exc))
        types = {name: c.type for name, c in gateway.connectors.items()}
        service.health.record(result.sources, types)
        elapsed = (time.perf_counter() - started) * 1000
        log.info(
            "retrieval id=%s kb=%s records=%d ms=%.1f sources=%s",
            request.headers.get("x-request-id") or uuid.uuid4().hex[:12], parsed.knowledge_id,
            len(result.records), elapsed, " ".join(f"{s.name}:{s.outcome}:{s.elapsed_ms:.0f}ms" for s in result.sources),
        )  # fmt: skip
        return JSONResponse({"records": result.records}, headers={"X-Sources": result.sources_header()})

    openapi: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": RetrievalRequest.model_json_schema(ref_template="#/components/schemas/{model}")}},
        }
    }
    app.add_api_route("/retrieval", retrieval, methods=["POST"], openapi_extra=openapi, summary="Dify External Knowledge API retrieval")
    # Dify appends "/retrieval" to the endpoint as text: an endpoint saved with a trailing slash posts here.
    app.add_api_route("//retrieval", retrieval, methods=["POST"], include_in_schema=False)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        gateway = service.gateway
        waiting = [] if gateway is None else [n for n, c in gateway.connectors.items() if not c.ready]
        if gateway is None or waiting:
            return JSONResponse({"status": "starting", "waiting_for": waiting}, status_code=503)
        return JSONResponse({"status": "ready", "config_version": gateway.config.version})

    return app
