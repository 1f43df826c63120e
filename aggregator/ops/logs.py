"""Logging setup: readable lines by default, JSON lines with `--log-format json` for log pipelines."""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from typing import Any

from aggregator.contract.models import RETRIEVAL_PATHS


#: Third-party loggers that write credentials at debug level (see configure_logging).
CREDENTIAL_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "httpcore", "aiohttp.client", "aiobotocore")


#: Characters that end or rewrite a line on a terminal or in a log pipeline: C0 and C1 controls, DEL, and
#: Unicode's line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """`text` on one line: control characters written as Python escapes (`\\n`, `\\x1b`), so that a file name or
    a request path holding a newline cannot forge a log line of its own."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class TextFormatter(logging.Formatter):
    """The readable line format, with the message's control characters escaped (tracebacks keep their lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a record's `fields` (from `extra=`) become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class RetrievalAccessLines(logging.Filter):
    """Drops uvicorn's access line of a retrieval that succeeded: the gateway writes its own for it, with more
    in it (request id, knowledge base, every source's outcome), and two lines per retrieval cost a log
    pipeline twice and the server CPU. Failed retrievals and every other endpoint keep uvicorn's line."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args  # uvicorn's: (client, method, path with query, HTTP version, status)
        if isinstance(args, tuple) and len(args) == 5 and args[1] == "POST" and args[2] in RETRIEVAL_PATHS:
            return not (isinstance(args[4], int) and 200 <= args[4] < 300)
        return True


class NoQueryStrings(logging.Filter):
    """Cuts the query string off uvicorn's access lines: on the ops routes it holds what no log should (`?token=`,
    and `q=` of /explain even when `server.log_queries` is off); the retrieval has none."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (args[0], args[1], args[2].partition("?")[0], args[3], args[4])
        return True


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request's full URL at INFO: noise per source call, and a URL's query string may
    # carry a credential (an `http` source's ?api_key=${KEY}). Its warnings still come through.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    # Libraries that print credentials at debug: botocore its canonical request and signed headers (S3 access
    # key id, session token), urllib3, httpcore and aiohttp's client headers and URLs. `--log-level debug` is
    # for the gateway's own lines; these stay at info or above whatever it says.
    for name in CREDENTIAL_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
    uvicorn_access = logging.getLogger("uvicorn.access")
    for kind in (RetrievalAccessLines, NoQueryStrings):
        if not any(isinstance(f, kind) for f in uvicorn_access.filters):
            uvicorn_access.addFilter(kind())
