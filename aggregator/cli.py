"""`aggregator serve | validate | query | explain | check | gc`: run the service, check a config, try and explain a query, try every source, tidy the state folder."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence

from aggregator.runtime.config import ConfigError, load_config, resolve_config_path
from aggregator.ops.logs import configure_logging

log = logging.getLogger("aggregator")


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="path to connectors.yaml (default: $AGGREGATOR_CONFIG, else ./connectors.yaml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aggregator", description="A federated knowledge gateway for Dify.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP service")
    _config_arg(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default=os.environ.get("AGGREGATOR_LOG_LEVEL", "info"))
    serve.add_argument("--workers", type=int, default=1, help="worker processes (they share the indexes under state_dir; one syncs each)")
    serve.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("AGGREGATOR_LOG_FORMAT", "text"))
    serve.add_argument("--header-timeout", type=float, default=10.0, help="seconds a client has to send a request's headers (10)")
    serve.add_argument("--max-connections", type=int, default=512, help="connections open at once, per worker; more are closed (512)")

    check = commands.add_parser("check", help="send a real query to every source; exit 1 if any fails")
    _config_arg(check)
    check.add_argument("--query", default="status check", help="the text sent to every source")

    validate = commands.add_parser("validate", help="check a config file; exit 1 listing every error")
    _config_arg(validate)

    gc = commands.add_parser("gc", help="delete the stored indexes of sources the config no longer names")
    _config_arg(gc)
    gc.add_argument("--dry-run", action="store_true", help="only list what would be deleted")

    query = commands.add_parser("query", help="run one retrieval in-process and print the records")
    _config_arg(query)
    query.add_argument("--kb", required=True, help="knowledge base id")
    query.add_argument("--top-k", type=int, default=5)
    query.add_argument("--threshold", type=float, default=0.0)
    query.add_argument("--json", action="store_true", help="print the API's JSON answer instead of a table")
    query.add_argument("text", help="the query")

    explain = commands.add_parser("explain", help="run one retrieval in-process and show what became of every passage")
    _config_arg(explain)
    explain.add_argument("--kb", required=True, help="knowledge base id")
    explain.add_argument("--top-k", type=int, default=5)
    explain.add_argument("--threshold", type=float, default=0.0)
    explain.add_argument("--filter", help="a metadata_condition as JSON, e.g. '{\"conditions\": [...]}'")
    explain.add_argument("--json", action="store_true", help="print the explanation as JSON (the same as GET /explain?format=json)")
    explain.add_argument("text", help="the query")
    return parser


def _load_or_report(path: str | None):  # type: ignore[no-untyped-def]
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{exc.source or resolve_config_path(path)}: {len(exc.errors)} error(s)", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from aggregator.web.api import create_app
    from aggregator.runtime.gc import settle_for_serving
    from aggregator.ops.tracing import Tracing, TracingConfigError
    from aggregator.web.protocol import BoundedHttpProtocol

    if _load_or_report(args.config) is None:
        return 1
    try:
        tracing = Tracing.from_env()
    except TracingConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    configure_logging(args.log_level, args.log_format)
    path = resolve_config_path(args.config).resolve()
    # Keep-alive longer than uvicorn's 5 s: clients (Dify, proxies) reuse connections, and a server that
    # closes an idle one just as a client reuses it turns a good request into a connection error.
    # uvicorn times out neither a request head that never completes nor the number of connections: see aggregator/web/protocol.py.
    http = functools.partial(BoundedHttpProtocol, header_timeout_s=args.header_timeout, max_connections=args.max_connections)
    common = {
        "host": args.host, "port": args.port, "log_level": args.log_level.lower(), "log_config": None, "timeout_keep_alive": 75,
        "http": http,
    }  # fmt: skip
    if args.workers <= 1:
        app = create_app(config_path=path, tracing=tracing)
        settle_for_serving()
        uvicorn.run(app, **common)  # type: ignore[arg-type]
        return 0
    tracing.shutdown()  # checked; each worker sets up its own from the same environment
    # Several processes: each loads the config from the environment; metrics are summed across them
    # through prometheus-client's multiprocess mode, which must be set up before any worker imports it.
    os.environ["AGGREGATOR_CONFIG"] = str(path)
    os.environ["AGGREGATOR_LOG_FORMAT"] = args.log_format
    os.environ["AGGREGATOR_LOG_LEVEL"] = args.log_level
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-metrics-")
    uvicorn.run("aggregator.web.asgi:create_from_env", factory=True, workers=args.workers, **common)  # type: ignore[arg-type]
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return 1
    kbs = ", ".join(f"{k} ({len(v.connectors)} sources)" for k, v in config.knowledge_bases.items())
    print(f"{resolve_config_path(args.config)}: OK, version {config.version}; {len(config.connectors)} connectors; knowledge bases: {kbs}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Stores of removed sources are kept until this runs: a source renamed or commented out by mistake keeps its index."""
    from aggregator.state.local import folder_bytes, remove_store, unused_stores

    config = _load_or_report(args.config)
    if config is None:
        return 1
    if config.server.state_url:
        return _gc_postgres(config.server.state_url, set(config.connectors), args.dry_run)
    root = config.server.state_dir
    assert root is not None  # load_config fills the default
    unused = unused_stores(root, set(config.connectors))
    if not unused:
        print(f"{root}: nothing to delete")
        return 0
    busy = 0
    for folder in unused:
        size = folder_bytes(folder) / 2**20
        if args.dry_run:
            print(f"would delete {folder} ({size:.1f} MiB)")
        elif remove_store(folder):
            print(f"deleted {folder} ({size:.1f} MiB)")
        else:
            busy += 1
            print(f"kept {folder}: a running gateway syncs it", file=sys.stderr)
    return 1 if busy else 0


def _gc_postgres(url: str, in_use: set[str], dry_run: bool) -> int:
    """`gc` for `server.state_url`: the stores of sources no longer configured, unless a replica syncs them."""
    from aggregator.state.postgres import display_url, remove_stores, unused_stores

    where = display_url(url)
    try:
        unused = unused_stores(url, in_use)
        if not unused or dry_run:
            for _, source, size in unused:
                print(f"would delete the index of {source} in {where} (about {size / 2**20:.1f} MiB)")
            if not unused:
                print(f"{where}: nothing to delete")
            return 0
        removed = remove_stores(url, [store_id for store_id, _, _ in unused])
    except Exception as exc:  # psycopg.Error and connection failures: said plainly
        print(f"error: {where}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    for (_, source, size), done in zip(unused, removed):
        if done:
            print(f"deleted the index of {source} in {where} (about {size / 2**20:.1f} MiB)")
        else:
            print(f"kept the index of {source}: a running replica syncs it", file=sys.stderr)
    return 0 if all(removed) else 1


def format_table(records: list[dict], sources: str) -> str:
    lines = [f"{'score':>6}  {'source':<16}  title", f"{'-' * 6}  {'-' * 16}  {'-' * 40}"]
    for record in records:
        lines.append(f"{record['score']:>6.3f}  {str(record['metadata'].get('source', '')):<16.16}  {record['title']}")
    if not records:
        lines.append("(no records)")
    lines.append(f"sources: {sources}")
    return "\n".join(lines)


async def _retrieve_once(args: argparse.Namespace, explain: bool):  # type: ignore[no-untyped-def]
    """One retrieval in-process for `query` and `explain`: (body, result, ms, source types), or an exit status."""
    import time

    from pydantic import ValidationError

    from aggregator.contract.models import RetrievalRequest
    from aggregator.retrieval.pipeline import UnknownKnowledgeBase, retrieve
    from aggregator.runtime.gateway import Gateway

    config = _load_or_report(args.config)
    if config is None:
        return 1
    body: dict = {"knowledge_id": args.kb, "query": args.text, "retrieval_setting": {"top_k": args.top_k, "score_threshold": args.threshold}}
    try:
        if getattr(args, "filter", None):
            body["metadata_condition"] = json.loads(args.filter)
        request = RetrievalRequest.model_validate(body)
    except ValueError as exc:
        from aggregator.web.route import describe_validation_error

        message = describe_validation_error(exc) if isinstance(exc, ValidationError) else "--filter: not valid JSON"
        print(f"error: {message}", file=sys.stderr)
        return 2
    gateway = Gateway(config)
    await gateway.start()
    try:
        await _wait_for_indexes(gateway)
        started = time.perf_counter()
        result = await retrieve(gateway, request, explain=explain)
        elapsed_ms = (time.perf_counter() - started) * 1000
    except UnknownKnowledgeBase:
        print(f"error: no knowledge base named {args.kb!r}; known: {', '.join(config.knowledge_bases)}", file=sys.stderr)
        return 2
    finally:
        await gateway.aclose()
    return body, result, elapsed_ms, {name: slot.connector.type for name, slot in gateway.slots.items()}, gateway.secrets


async def _query(args: argparse.Namespace) -> int:
    done = await _retrieve_once(args, explain=False)
    if isinstance(done, int):
        return done
    _, result, _, _, _ = done
    if args.json:
        print(json.dumps({"records": result.records}, ensure_ascii=False, indent=2))
    else:
        print(format_table(result.records, result.sources_header()))
    return 0


async def _explain(args: argparse.Namespace) -> int:
    from aggregator.ops.explain import explanation, render_text

    done = await _retrieve_once(args, explain=True)
    if isinstance(done, int):
        return done
    body, result, elapsed_ms, types, secrets = done
    data = explanation(result, body, elapsed_ms, types, secrets)
    print(json.dumps(data, ensure_ascii=False, indent=2) if args.json else render_text(data))
    return 0


async def _wait_for_indexes(gateway, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    """In-process commands have no later: wait for every index's first sync."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not gateway.ready and loop.time() < deadline:
        await asyncio.sleep(0.05)


async def _check(args: argparse.Namespace) -> int:
    from connectors.base import SourceQuery

    from aggregator.retrieval.fanout import call_source
    from aggregator.ops.health import redact
    from aggregator.runtime.gateway import Gateway

    config = _load_or_report(args.config)
    if config is None:
        return 1
    gateway = Gateway(config)
    await gateway.start()
    loop = asyncio.get_running_loop()
    rows: list[tuple[str, str, str, str, str]] = []
    firsts: list[str] = []
    hints: list[str] = []
    failed = 0
    secrets = config.secrets()
    try:
        await _wait_for_indexes(gateway)
        for model, kbs in gateway.rerank_models.models.items():  # a rerank model: one call over two made-up passages
            result = await model.probe(args.query, loop.time() + config.server.deadline_s)
            failed += result.outcome != "ok"
            rows.append((f"rerank ({model.settings.provider}: {', '.join(kbs)})", result.outcome, f"{result.elapsed_ms:.0f} ms",
                         "2" if result.outcome == "ok" else "0", redact(result.error, secrets) or ""))  # fmt: skip
        query = SourceQuery(text=args.query, limit=5)
        for name, slot in gateway.slots.items():
            result = await call_source(slot.connector, query, slot.policy, loop.time() + config.server.deadline_s)
            stats = slot.connector.stats()
            error = redact(result.error or (stats.last_refresh_error if stats else None), secrets) or ""
            if result.outcome not in ("ok", "empty"):
                state = result.outcome
            else:
                state = "sync_error" if error else "ok"
            failed += state != "ok"
            rows.append((name, state, f"{result.elapsed_ms:.0f} ms", str(len(result.passages)), error))
            if result.passages:
                firsts.append(format_first_record(slot.connector, result.passages[0], secrets))
            elif result.outcome == "empty" and slot.connector.empty_hint:
                hints.append(f"  {name}: {slot.connector.empty_hint}")
    finally:
        await gateway.aclose()
    width = max([len("source")] + [len(r[0]) for r in rows])
    print(f"{'source':<{width}}  {'state':<12}  {'time':>8}  {'results':>7}  error")
    for name, state, elapsed, count, error in rows:
        print(f"{name:<{width}}  {state:<12}  {elapsed:>8}  {count:>7}  {error}")
    if firsts:
        print("first record of each source (as the gateway maps it):")
        print("\n".join(firsts))
    if hints:
        print("sources that answered no records (try another --query; if none answers):")
        print("\n".join(hints))
    print(f"{len(rows) - failed} ok, {failed} failing")
    return 1 if failed else 0


def format_first_record(connector, passage, secrets: Sequence[str] = ()) -> str:  # type: ignore[no-untyped-def]
    """One source's first passage as the gateway will see it: title, score, text and metadata (indented).
    Each part is scrubbed of the config's secrets before it is cut short, as every output is."""
    from connectors.base import record_metadata

    from aggregator.ops.health import redact

    metadata = redact(json.dumps(record_metadata(passage, connector.name, connector.type), ensure_ascii=False, default=str), secrets, None) or ""
    text = redact(" ".join(passage.content.split()), secrets, None) or ""
    return "\n".join([
        f"  {connector.name}: {redact(repr(passage.title), secrets, None)}  source_score={passage.source_score}  source_rank={passage.source_rank}",
        f"      {text[:200] + ('…' if len(text) > 200 else '')}",
        f"      metadata: {metadata[:400] + ('…' if len(metadata) > 400 else '')}",
    ])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "validate":
        return cmd_validate(args)
    if args.command == "gc":
        return cmd_gc(args)
    configure_logging("warning")
    if args.command == "check":
        return asyncio.run(_check(args))
    if args.command == "explain":
        return asyncio.run(_explain(args))
    return asyncio.run(_query(args))


if __name__ == "__main__":
    sys.exit(main())
