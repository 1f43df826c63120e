"""The HTTP face: Dify's `POST /retrieval`, health probes, and the contract's error format.

Order of checks for a retrieval, as DESIGN section 1 requires: the
Authorization header first (403 before a byte of the body is read), then the
body (400/3001 naming the field), then the key's scope (403/1002), then the
knowledge base (404/2001). Anything unexpected is a 500/5001 with no
traceback in the answer; a source's failure is never an error of the request.
"""

from __future__ import annotations

import gzip
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError
from starlette.types import Message, Receive, Scope, Send

from aggregator.ops import explain, statuspage
from aggregator.ops.health import redact
from aggregator.ops.tracing import Tracing
from aggregator.runtime.config import GatewayConfig
from aggregator.contract.models import RETRIEVAL_PATHS, ErrorBody, RetrievalRequest, RetrievalResponse
from aggregator.runtime.gateway import Gateway
from aggregator.runtime.service import Service
from aggregator.tasks import Timeout

from aggregator.web.mcp import McpEndpoint
from aggregator.web import route
from aggregator.web.route import (JSONResponse, answer_retrieval, bearer_token, describe_validation_error, error, explain_retrieval,
                                  explain_scope, find_key, ops_denied, parse_request, read_body, token_to_cookie)

log = logging.getLogger("aggregator.web.api")

#: Where MCP is served (aggregator/web/mcp.py); a client configured with a trailing slash posts to the second.
MCP_PATHS = frozenset({"/mcp", "/mcp/"})


class GatewayApp(FastAPI):
    """FastAPI, with Dify's `POST /retrieval` taken straight to its handler.

    It is the one hot route, and it reads its request by hand: FastAPI's middleware stack around it (error,
    body-limit, exception and exit-stack middlewares, the router) cost about 90 us a request and did nothing
    for it. Everything else, including other methods on that path, takes the usual way.
    """

    retrieval: Callable[[Scope, Receive, Send], Awaitable[None]] | None = None
    #: MCP at /mcp (aggregator/web/mcp.py), served directly too: the SDK's transport reads its own request.
    mcp: Callable[[Scope, Receive, Send], Awaitable[None]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self.retrieval is not None and scope["method"] == "POST" and scope["path"] in RETRIEVAL_PATHS:
                await self.retrieval(scope, receive, send)
                return
            if self.mcp is not None and scope["path"] in MCP_PATHS:
                await self.mcp(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(load: Callable[[], GatewayConfig] | None = None, config_path: Path | None = None, tracing: Tracing | None = None) -> FastAPI:
    """The ASGI app. With `config_path` the file is loaded and watched for edits; `load` gives a fixed config.
    `tracing` defaults to what the OTEL_* environment variables ask for (see aggregator/ops/tracing.py)."""
    if config_path is not None:
        service = Service.from_path(config_path, tracing)
    elif load is not None:
        service = Service(load, tracing=tracing)
    else:
        raise ValueError("create_app needs a config loader or a config path")

    mcp = McpEndpoint(service)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            async with mcp.run():
                yield
        finally:
            await service.aclose()

    # The API's documents are served below, behind ops access like /status: Dify needs none of them.
    app = GatewayApp(title="Dify knowledge gateway", version="0.1.0", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown paths and methods answer in the contract's format too (error_code 4000 + the status's last digits)."""
        code = 4000 + exc.status_code % 100 if 400 <= exc.status_code < 500 else 5000 + exc.status_code % 100
        return error(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error(500, 5001, f"internal error ({type(exc).__name__}); see the service log")

    async def answer(request: Request, gateway: Gateway) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            return error(403, 1001, "missing or malformed Authorization header; expected 'Bearer <API key>'")
        api_key = find_key(gateway.config, token)
        if api_key is None:
            return error(403, 1002, "the API key is not valid")
        limit = gateway.config.server.max_body_bytes
        try:
            with Timeout(route.BODY_TIMEOUT_S):  # asyncio.timeout's contract, cheaper (aggregator/tasks.py)
                raw = await read_body(request, limit)
        except TimeoutError:
            return error(408, 3003, f"body: not received within {route.BODY_TIMEOUT_S:.0f} s")
        if raw is None:
            return error(413, 3002, f"body: larger than {limit} bytes")
        parsed = parse_request(raw)
        if isinstance(parsed, JSONResponse):
            return parsed
        request_id = request.headers.get("x-request-id") or f"{random.getrandbits(64):016x}"  # for logs, not a secret
        return await answer_retrieval(service, gateway, api_key, parsed, request_id)

    async def retrieval(request: Request) -> Response:
        started = time.perf_counter()
        gateway = service.gateway
        if gateway is None:
            return error(503, 5003, "the service is starting; try again shortly")
        with gateway.lease(), service.tracing.retrieval(request.headers, lambda message: redact(message, gateway.secrets) or "") as span:
            response = await answer(request, gateway)
            span.set_attribute("http.response.status_code", response.status_code)
        service.metrics.observe_request(response.status_code, time.perf_counter() - started)
        return response

    request_schema = RetrievalRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    nested = request_schema.pop("$defs", {})
    openapi: dict[str, Any] = {
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RetrievalRequest"}}}},
        "responses": {
            "200": {"description": "Records, best first", "content": {"application/json": {"schema": RetrievalResponse.model_json_schema()}}},
            **{str(code): {"description": what, "content": {"application/json": {"schema": ErrorBody.model_json_schema()}}}
               for code, what in ((400, "Bad body (3001)"), (403, "Missing or refused key (1001, 1002)"),
                                  (404, "Unknown knowledge base (2001)"), (408, "Body too slow (3003)"), (413, "Body too large (3002)"))},
        },
    }  # fmt: skip

    def document() -> dict[str, Any]:
        """FastAPI's schema, plus the request models the route reads by hand (auth comes before parsing)."""
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=[documented, *app.routes])
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(nested)
            schemas["RetrievalRequest"] = request_schema
            spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            spec["paths"]["/retrieval"]["post"]["security"] = [{"bearer": []}]
            app.openapi_schema = spec
        return app.openapi_schema

    async def serve_retrieval(scope: Scope, receive: Receive, send: Send) -> None:
        """The route's ASGI app, answering a bug with 500/5001 as the error middleware would (it is logged)."""
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            response = await retrieval(Request(scope, receive))
            await response(scope, receive, sending)
        except Exception as exc:
            if started:
                raise
            await (await unexpected(Request(scope, receive), exc))(scope, receive, send)

    app.retrieval = serve_retrieval
    app.mcp = mcp
    app.openapi = document  # type: ignore[method-assign]
    # The retrieval reads its request by hand (the key before the body): GatewayApp serves it directly, and these
    # plain Starlette routes catch what reaches the router (under a root path); a FastAPI route documents it.
    documented = APIRoute("/retrieval", retrieval, methods=["POST"], openapi_extra=openapi, summary="Dify External Knowledge API retrieval")
    app.router.add_route("/retrieval", retrieval, methods=["POST"], include_in_schema=False)
    # Dify appends "/retrieval" to the endpoint as text: an endpoint saved with a trailing slash posts here.
    app.router.add_route("//retrieval", retrieval, methods=["POST"], include_in_schema=False)

    def docs_denied(request: Request) -> Response | None:
        """/openapi.json, /docs and /redoc: ops access, as /status (they name no knowledge base, but Dify needs none)."""
        if service.gateway is None:
            return error(503, 5003, "the service is starting; try again shortly")
        return ops_denied(request, service.gateway.config) or token_to_cookie(request, service.gateway.config)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_document(request: Request) -> Response:
        return docs_denied(request) or JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> Response:
        return docs_denied(request) or get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> Response:
        return docs_denied(request) or get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        gateway = service.gateway
        # A public probe: it says how many sources are still syncing, not which (names are for /status).
        waiting = 0 if gateway is None else sum(not s.connector.ready for s in gateway.slots.values())
        if gateway is None or waiting:
            return JSONResponse({"status": "starting", "sources_syncing": waiting}, status_code=503)
        return JSONResponse({"status": "ready", "config_version": gateway.config.version})

    @app.get("/status")
    async def status(request: Request) -> JSONResponse:
        if service.gateway is not None and (denied := ops_denied(request, service.gateway.config)):
            return denied
        return JSONResponse(service.status())

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if service.gateway is not None and (denied := ops_denied(request, service.gateway.config)):
            return denied
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/explain", response_model=None)
    async def explain_page(request: Request) -> Response:
        """One query over one knowledge base, with what became of every passage (ops access, like /status)."""
        gateway = service.gateway
        if gateway is None:
            return error(503, 5003, "the service is starting; try again shortly")
        if denied := ops_denied(request, gateway.config):
            return denied
        params = request.query_params
        as_json = params.get("format") == "json"
        if not as_json and (moved := token_to_cookie(request, gateway.config)):
            return moved
        kbs = explain_scope(request, gateway.config)
        if isinstance(kbs, JSONResponse):
            return kbs
        values = {k: params.get(k, "") for k in ("kb", "q", "top_k", "threshold", "filter")}
        values["kb"] = values["kb"] or kbs[0]

        def failed(status: int, code: int, message: str) -> Response:
            if as_json:
                return error(status, code, message)
            return HTMLResponse(explain.render_page(kbs, values, None, message), status_code=status)

        if values["kb"] not in kbs and gateway.config.server.ops_token is None:  # as /retrieval: known or not, 403
            return failed(403, 1002, f"this API key may not read knowledge base {values['kb']!r}")

        if not values["q"].strip():
            return failed(400, 3001, "q: a query is required") if as_json else HTMLResponse(explain.render_page(kbs, values, None))
        try:
            body = explain.body_from_form(values, kbs[0])
        except ValueError:
            return failed(400, 3001, "filter: not valid JSON")
        try:
            parsed = RetrievalRequest.model_validate(body)
        except ValidationError as exc:
            return failed(400, 3001, describe_validation_error(exc))
        with gateway.lease():
            data = await explain_retrieval(service, gateway, parsed, body)
        if data is None:
            return failed(404, 2001, f"knowledge_id: no knowledge base named {parsed.knowledge_id!r}")
        if as_json:
            return JSONResponse(data)
        return HTMLResponse(explain.render_page(kbs, values, data))

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request) -> Response:
        if service.gateway is not None and (denied := ops_denied(request, service.gateway.config)):
            return denied
        if service.gateway is not None and (moved := token_to_cookie(request, service.gateway.config)):
            return moved
        html = statuspage.render(service.status()).encode()
        if "gzip" in request.headers.get("accept-encoding", "") and len(html) > 1024:
            # Twenty sources with a full hour of charts and errors are 80 to 130 KB of text; it refreshes every 5 s.
            return Response(gzip.compress(html, 6), media_type="text/html; charset=utf-8", headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
        return HTMLResponse(html)

    return app


