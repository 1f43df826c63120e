"""The fast lane at /mcp: a plain `tools/call` served by the SDK's own request kernel, without its per-POST transport.

In stateless mode the SDK's streamable-HTTP transport builds, for every POST, a transport, memory streams, a
JSON-RPC dispatcher and a task group, then routes the one request through them to `ServerRunner.on_request` and
the one response back. That plumbing was about two thirds of what an MCP search cost over `/retrieval` (see
README, "MCP against /retrieval"). For the request agents send over and over, a single `tools/call`, this lane
makes the same call into the same kernel directly (`serve_one`: the SDK's params validation, middleware and
tracing span, our handler, the SDK's result validation against the protocol version), and frames the reply as
the transport does. It takes a request only when every check the transport makes before dispatch would pass;
anything else (initialize, tools/list, notifications, batches, SSE-only clients, a wrong content type, bad
JSON, a 2026-07-28 request, which the SDK serves in one exchange already) goes to the SDK unchanged.
tests/test_mcp.py holds the lane's answers to the SDK's, request by request.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import pydantic_core
from mcp.server.connection import Connection
from mcp.server.lowlevel import Server
from mcp.server.runner import serve_one
from mcp.server.streamable_http import check_accept_headers
from mcp.shared.dispatcher import CallOptions
from mcp.shared.exceptions import NoBackChannelError
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
from mcp.shared.jsonrpc_dispatcher import handler_exception_to_error_data, progress_token_from_params
from mcp.shared.message import ServerMessageMetadata
from mcp.shared.transport_context import TransportContext
from mcp.types import DEFAULT_NEGOTIATED_VERSION, ErrorData, JSONRPCError, JSONRPCRequest, JSONRPCResponse, RequestId, jsonrpc_message_adapter
from mcp.types.version import HANDSHAKE_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

#: The SDK dispatcher's logger, so a handler that raises is logged where the SDK path logs it.
dispatcher_log = logging.getLogger("mcp.shared.jsonrpc_dispatcher")

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
    if not isinstance(message, JSONRPCRequest) or message.method != "tools/call":
        return None
    return message, version if version is not None else DEFAULT_NEGOTIATED_VERSION


async def answer_plain_call(server: Server[Any], lifespan_state: Any, request: Request, message: JSONRPCRequest, version: str) -> Response:
    """Run the call through the SDK's kernel and frame the outcome as the stateless JSON transport frames it."""
    context = PlainCallContext(
        request_id=message.id,
        message_metadata=ServerMessageMetadata(request_context=request, can_send_request=False),
        progress_token=progress_token_from_params(message.params),
    )
    # A born-ready connection at the header's version, as the stateless transport makes for each POST.
    connection = Connection.from_envelope(version, None, None)
    reply: JSONRPCResponse | JSONRPCError
    try:
        result = await serve_one(server, context, message.method, message.params, connection=connection, lifespan_state=lifespan_state)
    except Exception as exc:  # the dispatcher's ladder: MCPError's own data, INVALID_PARAMS, else code 0 and the text
        error = handler_exception_to_error_data(exc)
        if error is None:
            dispatcher_log.exception("handler for %r raised", message.method)
            error = ErrorData(code=0, message=str(exc))
        reply = JSONRPCError(jsonrpc="2.0", id=message.id, error=error)
    else:
        reply = JSONRPCResponse(jsonrpc="2.0", id=message.id, result=result)
    return Response(reply.model_dump_json(by_alias=True, exclude_unset=True), headers={"Content-Type": _JSON})
