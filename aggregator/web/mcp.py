"""MCP at `/mcp`: the same federation for agents, over the official `mcp` SDK (streamable HTTP, stateless, JSON).

Agents and assistants (Dify's MCP tools, desktop assistants, IDE agents) reach knowledge through the Model
Context Protocol. This endpoint gives them what `/retrieval` gives Dify, and nothing more:

- the same keys and scoping: `Authorization: Bearer <key>` is checked before the SDK sees a byte (401 in the
  contract's error format, which is also a JSON-RPC error an MCP client shows), and `search` runs the route's
  own path after its checks (`api.answer_retrieval`: the key's scope, the deadline, the response cache, health,
  metrics, the log line and the span), so a knowledge base the key cannot read through /retrieval cannot be
  read here either, and the records are the very ones /retrieval would answer;
- `explain` only for a caller who may open /explain (`ops_denied`, the same check), and only over knowledge
  bases its key may read;
- stateless, with JSON answers: any replica answers any request, behind a load balancer, with no session.

A plain `tools/call` (the call agents repeat) takes the fast lane, aggregator/web/mcp_lane.py: the same handler
behind the same checks, with the SDK's own validation and framing, without the SDK's per-POST transport; the
rest goes through the SDK. MCP calls are counted apart (`gateway_mcp_calls`) and their retrievals' log lines
say `via=mcp`.
`server.mcp: false` in connectors.yaml turns the endpoint off (404), read on every request so a reload applies.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.exceptions import MCPError
from mcp.types import (
    INVALID_PARAMS,
    CallToolRequestParams,
    ListToolsResult,
    PaginatedRequestParams,
    Tool,
    ToolAnnotations,
)
from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from aggregator.web.mcp_lane import answer_plain_call, plain_call
from aggregator.web.api import (BODY_TIMEOUT_S, JSONResponse, answer_retrieval, bearer_token, describe_validation_error, explain_retrieval, find_key,
                  ops_denied, read_body)
from aggregator.runtime.config import ApiKey
from aggregator.contract.models import DEFAULT_TOP_K, MAX_QUERY_CHARS, MAX_TOP_K, MetadataCondition, RetrievalRequest
from aggregator.ops import explain
from aggregator.ops.health import redact
from aggregator.tasks import Timeout

if TYPE_CHECKING:
    from aggregator.runtime.gateway import Gateway
    from aggregator.runtime.service import Service

log = logging.getLogger("aggregator.web.mcp")
access_log = logging.getLogger("aggregator.access")

#: Where the authenticated caller travels from the HTTP request to the tool handler (the SDK hands the handler
#: the same Starlette request, so the key is checked once, before the SDK reads the body).
CALLER = "aggregator.web.mcp.caller"
#: The SDK's own body limit: above any `server.max_body_bytes`, which is checked first (the body is read here).
MAX_BODY_BYTES = 64 * 1024 * 1024
#: A passage longer than this is cut in the text a model reads (structured content keeps it whole).
PASSAGE_CHARS = 4000
_decode = msgspec.json.Decoder().decode

INSTRUCTIONS = (
    "A federated search over a company's knowledge sources (documents, wikis, other knowledge bases). "
    "Call list_knowledge_bases first to learn which knowledge bases this key may search, then search one of them. "
    "Each result names its title, source and URL or path: cite them."
)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling, checked once per HTTP request: the key, the gateway leased for the request, its id."""

    api_key: ApiKey
    gateway: "Gateway"
    request_id: str


class ToolRefused(Exception):
    """A tool call that cannot be answered as asked: the message goes back to the model (isError), not a 500."""


# -- the tools' schemas, written for a model to fill in ------------------------------------------------------

def _condition_schema() -> dict[str, Any]:
    """`metadata_condition` as the model validates it, inlined (no `$ref`: some clients and model APIs resolve
    none), with `name` as either form the gateway takes, a field name or a list of them."""
    schema = MetadataCondition.model_json_schema()
    condition = schema.pop("$defs")["Condition"]
    names = condition["properties"]["name"]
    condition["properties"]["name"] = {"anyOf": [names["items"], names], "title": names["title"],
                                       "description": "A metadata field name, or a list of them (the condition holds for any)."}  # fmt: skip
    schema["properties"]["conditions"]["items"] = condition
    return schema


def _search_schema() -> dict[str, Any]:
    condition = _condition_schema()
    condition["description"] = (
        "Optional filter on record metadata, in Dify's metadata_condition shape: "
        '{"logical_operator": "and"|"or", "conditions": [{"name": "space", "comparison_operator": "is", "value": "OPS"}]}. '
        "Names are metadata fields of the records (title, source, document_id, path, url, updated_at, or a source's own "
        "such as space or labels). Omit it to search everything."
    )
    return {
        "type": "object",
        "properties": {
            "knowledge_base": {"type": "string", "minLength": 1, "maxLength": 256,
                               "description": "The knowledge base to search: one of the names list_knowledge_bases gives."},
            "query": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS,
                      "description": "What to look for, in natural language or keywords, in any language."},
            "top_k": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_K, "default": DEFAULT_TOP_K,
                      "description": f"How many passages to return at most (default {DEFAULT_TOP_K})."},
            "score_threshold": {"type": "number", "minimum": 0, "maximum": 1, "default": 0,
                                "description": "Leave out passages scoring below this (0 to 1; scores are comparable across queries)."},
            "metadata_condition": condition,
        },
        "required": ["knowledge_base", "query"],
    }  # fmt: skip


_OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "records": {"type": "array", "items": {"type": "object", "properties": {
            "content": {"type": "string"}, "score": {"type": "number"}, "title": {"type": "string"}, "metadata": {"type": "object"},
        }, "required": ["content", "score", "title", "metadata"]}},
        "sources": {"type": "string", "description": "Each source's outcome: name=ok;name=timeout"},
    },
    "required": ["records", "sources"],
}  # fmt: skip

_READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)

SEARCH = Tool(
    name="search",
    title="Search a knowledge base",
    description=(
        "Search one knowledge base across all of its sources at once and get the best passages, best first, each with "
        "its title, source, URL or path and a relevance score in [0, 1]. Quote or cite the title and URL/path of what "
        "you use. A source that failed or timed out is named at the end; the others still answered."
    ),
    input_schema=_search_schema(),
    output_schema=_OUTPUT_SCHEMA,
    annotations=_READ_ONLY,
)
LIST_KNOWLEDGE_BASES = Tool(
    name="list_knowledge_bases",
    title="List the knowledge bases",
    description="The knowledge bases this key may search, each with a one-line description and the sources it spans.",
    input_schema={"type": "object", "properties": {}},
    output_schema={"type": "object", "properties": {"knowledge_bases": {"type": "array", "items": {"type": "object"}}},
                   "required": ["knowledge_bases"]},  # fmt: skip
    annotations=_READ_ONLY,
)
EXPLAIN = Tool(
    name="explain",
    title="Explain a search (operators)",
    description=(
        "Run a search and report what became of every passage each source returned: its scores, and why it was kept, "
        "filtered out, below the threshold or beyond top_k. For tuning a knowledge base, not for answering questions."
    ),
    input_schema=_search_schema(),
    annotations=_READ_ONLY,
)


INPUT_SCHEMAS = {tool.name: tool.input_schema for tool in (SEARCH, LIST_KNOWLEDGE_BASES, EXPLAIN)}


# -- rendering: records as text a model can cite -------------------------------------------------------------


#: Where a record can be found, first match wins: its URL, else its path (a bucket key, a file), else its document id.
_LOCATORS = (("url", "url"), ("path", "path"), ("key", "path"), ("document_id", "document"))


def _locator(metadata: Mapping[str, Any]) -> str:
    for field, label in _LOCATORS:
        value = metadata.get(field)
        if value and isinstance(value, str):
            return f"{label}: {value}"
    return ""


def render_record(position: int, record: Mapping[str, Any]) -> str:
    """One record as a citable block: `[n] title`, then source, where to find it, when, and the passage."""
    metadata = record.get("metadata") or {}
    source, locator, updated = metadata.get("source"), _locator(metadata), metadata.get("updated_at")
    about = f"score: {record.get('score', 0):.3f}"
    if source or locator:
        about = " | ".join(part for part in (f"source: {source}" if source else "", locator, about) if part)
    if updated:
        about += f" | updated: {updated}"
    content = str(record.get("content", ""))
    if len(content) > PASSAGE_CHARS:
        content = content[:PASSAGE_CHARS] + " […]"
    return f"[{position}] {record.get('title') or '(untitled)'}\n{about}\n{content}"


def text(content: str) -> dict[str, str]:
    """A text content block, in its wire form."""
    return {"type": "text", "text": content}


def tool_result(blocks: list[dict[str, str]], structured: Any = None, is_error: bool = False) -> dict[str, Any]:
    """A `CallToolResult` in its wire form. The SDK takes a handler's dict as it is and validates it once against
    the protocol version's schema, where a result model would be built, dumped, then validated again."""
    result: dict[str, Any] = {"content": blocks, "isError": is_error, "resultType": "complete"}  # 2026-07-28 wants it; earlier versions drop it
    if structured is not None:
        result["structuredContent"] = structured
    return result


def render_search(knowledge_base: str, records: list[dict[str, Any]], sources: str) -> list[dict[str, str]]:
    """One text block per record, and a closing line naming the sources that did not answer."""
    blocks = [text(render_record(i, r)) for i, r in enumerate(records, 1)]
    if not blocks:
        blocks.append(text(f"No passage of knowledge base {knowledge_base!r} matched the query."))
    failed = [part for part in sources.split(";") if part and not part.endswith(("=ok", "=empty", "=skipped"))]
    if failed:
        blocks.append(text("Some sources did not answer, so results may be incomplete: " + ", ".join(failed)))
    return blocks


# -- the endpoint -------------------------------------------------------------------------------------------


class McpEndpoint:
    """The ASGI app at /mcp: checks the key, then hands the request to the SDK's stateless JSON transport."""

    def __init__(self, service: "Service", fast_lane: bool = True) -> None:
        self.service = service
        #: A plain `tools/call` answered by the SDK's kernel without its per-POST transport (aggregator/web/mcp_lane.py).
        self.fast_lane = fast_lane
        self.lifespan_state: Any = None
        self.server: Server[Any] = Server(
            "dify-knowledge-gateway",
            version="0.1.0",
            title="Knowledge gateway",
            instructions=INSTRUCTIONS,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,  # type: ignore[arg-type]  # a dict result is the SDK's HandlerResult too
            # 2026-07-28 checks a call's Mcp-Param headers against the tool's input schema: given here, it is not
            # looked up through a whole tools/list per call (the schemas are no secret; explain's visibility is).
            get_tool_input_schema=lambda name: INPUT_SCHEMAS.get(name),
            lifespan=self._lifespan,
        )
        self.manager: StreamableHTTPSessionManager | None = None

    @asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        """For the app's lifespan: the SDK's task group for the requests in flight. A manager runs once, so each
        lifespan (tests start one app several times) has its own."""
        # Stateless and JSON: any replica answers any request, with no session to keep. No Host/Origin allow-list
        # (the SDK's DNS-rebinding guard): the service is reached by many names behind proxies, and every request
        # needs a Bearer key a rebinding page cannot have.
        manager = StreamableHTTPSessionManager(self.server, json_response=True, stateless=True, security_settings=None,
                                               max_request_body_size=MAX_BODY_BYTES)  # fmt: skip
        async with manager.run():
            self.manager = manager
            try:
                yield
            finally:
                self.manager = None

    @asynccontextmanager
    async def _lifespan(self, _: Server[Any]) -> AsyncIterator[dict[str, Any]]:
        """The SDK's default (an empty state), kept where the fast lane hands it to handlers as the SDK does."""
        self.lifespan_state = {}
        try:
            yield self.lifespan_state
        finally:
            self.lifespan_state = None

    def _refuse(self, status: int, code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        """The contract's error body, which is also a JSON-RPC error: an MCP client shows `message` to its user."""
        body = {"error_code": code, "error_msg": message, "jsonrpc": "2.0", "id": None, "error": {"code": -32001, "message": message}}
        return JSONResponse(body, status_code=status, headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = self.service
        gateway = service.gateway
        manager = self.manager
        if gateway is None or manager is None:
            await self._refuse(503, 5003, "the service is starting; try again shortly")(scope, receive, send)
            return
        if not gateway.config.server.mcp:
            await self._refuse(404, 4004, "MCP is turned off on this gateway (server.mcp: false)")(scope, receive, send)
            return
        if scope["method"] != "POST":
            # Stateless: no session to end (DELETE) and nothing to push, so no event stream to open (GET): one that
            # stayed open would hold a connection and this config version's sources for as long as it lasted.
            await self._refuse(405, 4005, "MCP here is POST only (stateless, JSON answers)", {"Allow": "POST"})(scope, receive, send)
            return
        request = Request(scope, receive)
        token = bearer_token(request.headers.get("authorization"))
        api_key = None if token is None else find_key(gateway.config, token)
        if api_key is None:
            service.metrics.observe_mcp("http", "unauthorized")
            code, message = (1001, "missing or malformed Authorization header; expected 'Bearer <API key>'") if token is None else (1002, "the API key is not valid")
            await self._refuse(401, code, message, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        # The body under /retrieval's limits (size, and time: one trickled in would hold a task and this config
        # version open), read here and replayed to the SDK, which reads with neither.
        limit = gateway.config.server.max_body_bytes
        try:
            with Timeout(BODY_TIMEOUT_S):
                raw = await read_body(request, limit)
        except TimeoutError:
            await self._refuse(408, 3003, f"body: not received within {BODY_TIMEOUT_S:.0f} s")(scope, receive, send)
            return
        if raw is None:
            await self._refuse(413, 3002, f"body: larger than {limit} bytes")(scope, receive, send)
            return
        replay: list[Message] = [{"type": "http.request", "body": raw, "more_body": False}]

        async def receive_again() -> Message:
            return replay.pop() if replay else await receive()

        request_id = request.headers.get("x-request-id") or f"mcp-{random.getrandbits(64):016x}"
        scope[CALLER] = Caller(api_key, gateway, request_id)
        with gateway.lease():  # a reload while the call runs: it finishes on this gateway, as /retrieval does
            plain = plain_call(request, raw) if self.fast_lane and len(raw) <= MAX_BODY_BYTES else None  # above: the SDK's 413
            if plain is None:
                await manager.handle_request(scope, receive_again, send)
            else:
                response = await answer_plain_call(self.server, self.call_tool, self.lifespan_state, request, *plain)
                await response(scope, receive_again, send)

    # -- handlers ---------------------------------------------------------------------------------------------

    def _caller(self, request: Any) -> Caller:
        """The caller `__call__` checked, from the HTTP request the SDK (or the fast lane) hands a handler."""
        caller = request.scope.get(CALLER) if isinstance(request, Request) else None
        if caller is None:  # every request passes __call__ first; without it, nothing is answered
            raise MCPError(-32001, "not authenticated")
        return caller

    def _may_explain(self, caller: Caller, request: Request) -> bool:
        """/explain's own check. Here the Authorization header carries the API key, so an ops token comes the way
        /explain takes it from a browser, `?token=` (in the MCP URL); loopback without an ops token set, as there."""
        headers = [(name, value) for name, value in request.scope["headers"] if name != b"authorization"]
        return ops_denied(Request({**request.scope, "headers": headers}), caller.gateway.config) is None

    async def _list_tools(self, ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams | None) -> ListToolsResult:
        caller = self._caller(ctx.request)
        self.service.metrics.observe_mcp("tools/list", "ok")
        tools = [SEARCH, LIST_KNOWLEDGE_BASES]
        if self._may_explain(caller, ctx.request):
            tools.append(EXPLAIN)
        return ListToolsResult(tools=tools)

    async def _call_tool(self, ctx: ServerRequestContext[Any, Any], params: CallToolRequestParams) -> dict[str, Any]:
        return await self.call_tool(ctx.request, params)

    async def call_tool(self, request: Request, params: CallToolRequestParams) -> dict[str, Any]:
        """A tools/call, from the SDK's kernel (`_call_tool`) or the fast lane: the tool's result, in its wire form."""
        caller = self._caller(request)
        name = params.name
        arguments = params.arguments or {}
        started = time.perf_counter()
        if name == "search":
            call = self._search(caller, request, arguments)
        elif name == "list_knowledge_bases":
            call = self._list_knowledge_bases(caller)
        elif name == "explain" and self._may_explain(caller, request):
            call = self._explain(caller, request, arguments)
        else:  # explain for a caller who may not see it is as unknown as any other name
            self.service.metrics.observe_mcp("unknown", "error")
            raise MCPError(INVALID_PARAMS, f"no tool named {name!r}; the tools are listed by tools/list")
        try:
            result = await call
        except ToolRefused as exc:
            self.service.metrics.observe_mcp(name, "refused", time.perf_counter() - started)
            return tool_result([text(str(exc))], is_error=True)
        except Exception as exc:  # a bug: /retrieval's 500/5001 words, never a traceback or the exception's text
            log.exception("MCP tool %s failed", name)
            self.service.metrics.observe_mcp(name, "error", time.perf_counter() - started)
            return tool_result([text(f"internal error ({type(exc).__name__}); see the service log")], is_error=True)
        self.service.metrics.observe_mcp(name, "ok", time.perf_counter() - started)
        return result

    def _parse(self, arguments: Mapping[str, Any]) -> tuple[RetrievalRequest, dict[str, Any]]:
        """The tool's arguments as the /retrieval body they stand for (validated by the same model), and that body."""
        top_k = arguments.get("top_k")
        if isinstance(top_k, float) and top_k.is_integer():  # some clients send every number as a float
            top_k = int(top_k)
        body = {
            "knowledge_id": arguments.get("knowledge_base"),
            "query": arguments.get("query"),
            "retrieval_setting": {"top_k": top_k, "score_threshold": arguments.get("score_threshold")},
            "metadata_condition": arguments.get("metadata_condition"),
        }
        try:
            return RetrievalRequest.model_validate(body), body
        except ValidationError as exc:
            message = describe_validation_error(exc).replace("retrieval_setting.", "").replace("knowledge_id", "knowledge_base")
            raise ToolRefused(f"invalid arguments: {message}") from None

    async def _search(self, caller: Caller, request: Request, arguments: Mapping[str, Any]) -> dict[str, Any]:
        parsed, _ = self._parse(arguments)
        service, gateway = self.service, caller.gateway
        scrub = lambda message: redact(message, gateway.secrets) or ""  # noqa: E731
        with service.tracing.retrieval(request.headers, scrub, route="/mcp") as span:
            span.set_attribute("gateway.mcp.tool", "search")
            # The route's own path after its checks: scope, deadline, cache, health, metrics, log line.
            response = await answer_retrieval(service, gateway, caller.api_key, parsed, caller.request_id, via="mcp")
            span.set_attribute("http.response.status_code", response.status_code)
        answer = _decode(bytes(response.body))
        if response.status_code != 200:  # 403/1002 or 404/2001, in /retrieval's words, naming this tool's argument
            message = answer["error_msg"].replace("knowledge_id:", "knowledge_base:", 1)
            raise ToolRefused(message + "; list_knowledge_bases names those this key may search")
        records = answer["records"]
        sources = response.headers.get("x-sources", "")
        return tool_result(render_search(parsed.knowledge_id, records, sources), {"records": records, "sources": sources})

    async def _list_knowledge_bases(self, caller: Caller) -> dict[str, Any]:
        config = caller.gateway.config
        types = {name: settings.type for name, settings in config.connectors.items()}
        found = []
        for kb_id, kb in config.knowledge_bases.items():
            if not caller.api_key.allows(kb_id):
                continue
            description = (kb.description or "").strip().splitlines()
            found.append({"knowledge_base": kb_id, "description": description[0] if description else "",
                          "sources": [{"name": name, "type": types.get(name, "")} for name in kb.connectors]})  # fmt: skip
        self._log("list_knowledge_bases", caller, {"knowledge_bases": len(found)})
        lines = []
        for kb in found:
            sources = ", ".join(f"{source['name']} ({source['type']})" for source in kb["sources"])
            lines.append(f"- {kb['knowledge_base']}: {kb['description'] or '(no description)'} (sources: {sources})")
        listing = "\n".join(lines) if lines else "This key may search no knowledge base."
        return tool_result([text(listing)], {"knowledge_bases": found})

    async def _explain(self, caller: Caller, request: Request, arguments: Mapping[str, Any]) -> dict[str, Any]:
        parsed, body = self._parse(arguments)
        if not caller.api_key.allows(parsed.knowledge_id):  # /retrieval's scope, as search has it
            raise ToolRefused(f"this API key may not read knowledge base {parsed.knowledge_id!r}")
        data = await explain_retrieval(self.service, caller.gateway, parsed, body, via="mcp")
        if data is None:
            raise ToolRefused(f"knowledge_base: no knowledge base named {parsed.knowledge_id!r}")
        return tool_result([text(explain.render_text(data))], data)

    def _log(self, tool: str, caller: Caller, extra: dict[str, Any]) -> None:
        """The log line of a tool call that is not a retrieval (those have their own, with via=mcp)."""
        if access_log.isEnabledFor(logging.INFO):
            fields = {"event": "mcp", "tool": tool, "request_id": caller.request_id, **extra}
            access_log.info("mcp tool=%s id=%s %s", tool, caller.request_id, " ".join(f"{k}={v}" for k, v in extra.items()),
                            extra={"fields": fields})  # fmt: skip
