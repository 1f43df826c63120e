"""The fast lane at /mcp: a plain `tools/call` answered without the SDK's per-POST transport, as the SDK answers it.

In stateless mode the SDK's streamable-HTTP transport builds, for every POST, a transport, memory streams, a
JSON-RPC dispatcher and a task group, then routes the one request through them to its request kernel
(`ServerRunner`: a connection, a session, a context, the middleware chain) and the one response back. With
instant sources that was a third of an MCP search's time (README, "MCP against /retrieval"). For the request
agents send over and over, a single `tools/call`, this lane does what the kernel does for it with the SDK's own
pieces: the per-version params check (`validate_client_request`), `CallToolRequestParams`, the tool handler,
the per-version result sieve (`serialize_server_result`), the dispatcher's error ladder, and the transport's
framing. While the kernel has more to do (a middleware other than its tracing span, that span with a tracer
provider installed, a cache hint), the lane hands the call to the kernel itself (`serve_one`).

It takes a request only when every check the transport makes before dispatch would pass; anything else
(initialize, tools/list, notifications, batches, SSE-only clients, a wrong content type, bad JSON, a 2026-07-28
request, which the SDK serves in one exchange already) goes to the SDK unchanged. tests/test_mcp.py holds the
lane's answers to the SDK's, request by request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import msgspec
import pydantic_core
from mcp.server.connection import Connection
from mcp.server.lowlevel import Server
from mcp.server._otel import OpenTelemetryMiddleware
from mcp.server.runner import serve_one
from mcp.server.streamable_http import check_accept_headers
from mcp.shared.dispatcher import CallOptions
from mcp.shared.exceptions import MCPError, NoBackChannelError
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
from mcp.shared.jsonrpc_dispatcher import handler_exception_to_error_data, progress_token_from_params
from mcp.shared.message import ServerMessageMetadata
from mcp.shared.transport_context import TransportContext
from mcp.types import (DEFAULT_NEGOTIATED_VERSION, INTERNAL_ERROR, METHOD_NOT_FOUND, CallToolRequestParams, ErrorData, JSONRPCError,
                       JSONRPCRequest, RequestId, jsonrpc_message_adapter)
from mcp.types import methods as spec_methods
from mcp.types.version import HANDSHAKE_PROTOCOL_VERSIONS
from opentelemetry import trace
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

#: The SDK's loggers, so what the kernel and the dispatcher log is logged where the SDK path logs it.
dispatcher_log = logging.getLogger("mcp.shared.jsonrpc_dispatcher")
runner_log = logging.getLogger("mcp.server.runner")
#: The tool handler, called with the HTTP request (it carries the caller) and the validated params.
CallTool = Callable[[Request, CallToolRequestParams], Awaitable[dict[str, Any]]]
_METHOD = "tools/call"
_encode = msgspec.json.Encoder().encode

_VERSION_HEADER = MCP_PROTOCOL_VERSION_HEADER.encode("ascii")
_JSON = "application/json"
#: What the stateless transport hands each request: no back-channel (no session for a reply to land in).
_TRANSPORT = TransportContext(kind="streamable-http", can_send_request=False)


@dataclass
class PlainCallContext:
    """The `DispatchContext` of one plain call: as the JSON-response transport behaves, a notification or progress
    report tied to the request has no wire (the body carries the response only), and a request to the client
    cannot be sent (no back-channel)."""

    request_id: RequestId
    message_metadata: ServerMessageMetadata
    progress_token: Any = None
    transport: TransportContext = _TRANSPORT
    cancel_requested: anyio.Event = field(default_factory=anyio.Event)
    can_send_request: bool = False

    async def send_raw_request(self, method: str, params: Mapping[str, Any] | None, opts: CallOptions | None = None) -> dict[str, Any]:
        raise NoBackChannelError(method)

    async def notify(self, method: str, params: Mapping[str, Any] | None, opts: CallOptions | None = None) -> None:
        return None

    async def progress(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        return None


def plain_call(request: Request, raw: bytes) -> tuple[JSONRPCRequest, str] | None:
    """The request and its protocol version when this POST is one `tools/call` the legacy transport would dispatch
    (each check below is one it makes, in its order, with its parsers); None to leave it to the SDK."""
    version = next((value.decode("latin-1") for name, value in request.scope["headers"] if name == _VERSION_HEADER), None)
    if version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS:
        return None  # a 2026-07-28 request, or a version to refuse: the SDK's other entry
    content_type = request.headers.get("content-type")
    if content_type is None or not content_type.lower().startswith(_JSON):
        return None
    if not any(part.strip() == _JSON for part in content_type.split(";")[0].split(",")):
        return None
    if not check_accept_headers(request)[0]:
        return None
    try:
        message = jsonrpc_message_adapter.validate_python(pydantic_core.from_json(raw), by_name=False)
    except (ValueError, ValidationError):  # pydantic's ValidationError is a ValueError; named for the reader
        return None
    if not isinstance(message, JSONRPCRequest) or message.method != _METHOD:
        return None
    return message, version if version is not None else DEFAULT_NEGOTIATED_VERSION


def kernel_adds_nothing(server: Server[Any]) -> bool:
    """Whether the SDK's kernel would do nothing for a tools/call beyond what `call_directly` does: its only
    middleware is its tracing span and no tracer provider is installed (the span is then a no-op; this service
    traces with its own provider, aggregator/ops/tracing.py), and no cache hint is set for tools/call."""
    return (
        all(type(middleware) is OpenTelemetryMiddleware for middleware in server.middleware)
        and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        and _METHOD not in server.cache_hints
    )


async def call_directly(server: Server[Any], call_tool: CallTool, request: Request, params: Mapping[str, Any] | None, version: str) -> dict[str, Any]:
    """What the kernel does for a tools/call on a born-ready connection, step for step (`ServerRunner._on_request`):
    the per-version params check, the handler's params model, the handler, the per-version result sieve."""
    try:
        spec_methods.validate_client_request(_METHOD, version, params)
    except KeyError:
        raise MCPError(code=METHOD_NOT_FOUND, message="Method not found", data=_METHOD) from None
    entry = server.get_request_handler(_METHOD)
    if entry is None:
        raise MCPError(code=METHOD_NOT_FOUND, message="Method not found", data=_METHOD)
    result = await call_tool(request, entry.params_type.model_validate({} if params is None else params, by_name=False))
    try:
        return spec_methods.serialize_server_result(_METHOD, version, dict(result))
    except ValidationError:
        runner_log.exception("handler for %r returned an invalid result", _METHOD)
        raise MCPError(code=INTERNAL_ERROR, message="Handler returned an invalid result") from None


async def answer_plain_call(server: Server[Any], call_tool: CallTool, lifespan_state: Any, request: Request, message: JSONRPCRequest,
                            version: str) -> Response:
    """Answer the call as the stateless JSON transport would: a JSON-RPC response, or the dispatcher's error."""
    reply: JSONRPCError | None = None
    try:
        if kernel_adds_nothing(server):
            result = await call_directly(server, call_tool, request, message.params, version)
        else:
            result = await _through_the_kernel(server, lifespan_state, request, message, version)
    except Exception as exc:  # the dispatcher's ladder: MCPError's own data, INVALID_PARAMS, else code 0 and the text
        error = handler_exception_to_error_data(exc)
        if error is None:
            dispatcher_log.exception("handler for %r raised", message.method)
            error = ErrorData(code=0, message=str(exc))
        reply = JSONRPCError(jsonrpc="2.0", id=message.id, error=error)
    # The result is already the sieve's JSON-mode dump: framed as JSONRPCResponse would frame it, without a
    # model built and validated around it only to be dumped again.
    body = _encode({"jsonrpc": "2.0", "id": message.id, "result": result}) if reply is None else reply.model_dump_json(by_alias=True, exclude_unset=True)
    return Response(body, headers={"Content-Type": _JSON})


async def _through_the_kernel(server: Server[Any], lifespan_state: Any, request: Request, message: JSONRPCRequest, version: str) -> dict[str, Any]:
    """The SDK's kernel itself (middleware, context and all), on the connection the stateless transport makes."""
    context = PlainCallContext(
        request_id=message.id,
        message_metadata=ServerMessageMetadata(request_context=request, can_send_request=False),
        progress_token=progress_token_from_params(message.params),
    )
    connection = Connection.from_envelope(version, None, None)
    return await serve_one(server, context, message.method, message.params, connection=connection, lifespan_state=lifespan_state)
