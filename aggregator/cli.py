"""`aggregator serve | validate | query`: run the service, check a config, try a query."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence

from .config import ConfigError, load_config, resolve_config_path

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

    validate = commands.add_parser("validate", help="check a config file; exit 1 listing every error")
    _config_arg(validate)

    query = commands.add_parser("query", help="run one retrieval in-process and print the records")
    _config_arg(query)
    query.add_argument("--kb", required=True, help="knowledge base id")
    query.add_argument("--top-k", type=int, default=5)
    query.add_argument("--threshold", type=float, default=0.0)
    query.add_argument("--json", action="store_true", help="print the API's JSON answer instead of a table")
    query.add_argument("text", help="the query")
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

    from .api import create_app

    config = _load_or_report(args.config)
    if config is None:
        return 1
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(lambda: config)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return 1
    kbs = ", ".join(f"{k} ({len(v.connectors)} sources)" for k, v in config.knowledge_bases.items())
    print(f"{resolve_config_path(args.config)}: OK, version {config.version}; {len(config.connectors)} connectors; knowledge bases: {kbs}")
    return 0


def format_table(records: list[dict], sources: str) -> str:
    lines = [f"{'score':>6}  {'source':<16}  title", f"{'-' * 6}  {'-' * 16}  {'-' * 40}"]
    for record in records:
        lines.append(f"{record['score']:>6.3f}  {str(record['metadata'].get('source', '')):<16.16}  {record['title']}")
    if not records:
        lines.append("(no records)")
    lines.append(f"sources: {sources}")
    return "\n".join(lines)


async def _query(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .filters import InvalidCondition
    from .models import RetrievalRequest
    from .pipeline import UnknownKnowledgeBase, retrieve
    from .runtime import Gateway

    config = _load_or_report(args.config)
    if config is None:
        return 1
    try:
        request = RetrievalRequest.model_validate(
            {"knowledge_id": args.kb, "query": args.text, "retrieval_setting": {"top_k": args.top_k, "score_threshold": args.threshold}}
        )
    except ValidationError as exc:
        from .api import describe_validation_error

        print(f"error: {describe_validation_error(exc)}", file=sys.stderr)
        return 2
    gateway = Gateway(config)
    await gateway.start()
    try:
        for connector in gateway.connectors.values():  # an in-process query waits for indexes: there is no later
            wait = getattr(connector, "wait_ready", None)
            if wait is not None:
                await wait(timeout=120)
        result = await retrieve(gateway, request)
    except UnknownKnowledgeBase:
        print(f"error: no knowledge base named {args.kb!r}; known: {', '.join(config.knowledge_bases)}", file=sys.stderr)
        return 2
    except InvalidCondition as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        await gateway.aclose()
    if args.json:
        print(json.dumps({"records": result.records}, ensure_ascii=False, indent=2))
    else:
        print(format_table(result.records, result.sources_header()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "validate":
        return cmd_validate(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(_query(args))


if __name__ == "__main__":
    sys.exit(main())
