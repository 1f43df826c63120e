"""The status page for people: server-rendered HTML, no scripts, refreshing itself every few seconds.

Under each source's row, its last hour: two small SVG charts (`charts`) and its recent errors.
"""

from __future__ import annotations

import re
from html import escape
from typing import Any

from aggregator.ops.charts import OUTCOME_COLOURS, P50_COLOUR, P95_COLOUR, latency_chart, outcomes_chart
from aggregator.contract.outcomes import FAILURES

REFRESH_S = 5
COLOURS = {
    "ok": "#1a7f37", "degraded": "#9a6700", "down": "#cf222e", "circuit_open": "#cf222e",
    "auth_failed": "#8250df", "disabled": "#6e7781",
}  # fmt: skip

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem; color: #1f2328; }
h1 { font-size: 1.4rem; margin: 0 0 .3rem; }
.meta { color: #57606a; margin-bottom: 1rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .45rem .6rem; border-bottom: 1px solid #d0d7de; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
.state { display: inline-block; padding: .1rem .5rem; border-radius: 1rem; color: #fff; font-weight: 600; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.error { color: #cf222e; max-width: 40rem; word-break: break-word; }
.banner { background: #ffebe9; border: 1px solid #cf222e; padding: .6rem .8rem; margin-bottom: 1rem; border-radius: 6px; }
tr[data-source] td { border-bottom: none; padding-bottom: .1rem; }
tr[data-source] td[rowspan] { border-bottom: 1px solid #d0d7de; }
.hist td { padding-top: 0; }
.hist div { display: flex; gap: 1.2rem; }
.chart text { font: 10px system-ui, sans-serif; fill: #57606a; }
.chart .axis { stroke: #d0d7de; }
.errors { margin: 0; padding: 0; list-style: none; max-height: 9.5em; overflow-y: auto; font-size: 12px; color: #1f2328; }
.errors b { color: #cf222e; }
.errors time, .quiet { color: #57606a; font-variant-numeric: tabular-nums; }
.legend { color: #57606a; font-size: 12px; margin-bottom: .6rem; }
.legend i { display: inline-block; width: .7rem; height: .7rem; margin: 0 .25rem 0 .7rem; vertical-align: -1px; }
"""
#: On the page (not in /status), an error message is cut after this many characters.
MESSAGE_CHARS = 120
OUTCOME_LABELS = {"rate_limited": "rate limited", "auth_failed": "auth failed"}


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    return ""


def _index_cell(index: dict[str, Any]) -> str:
    """Documents and passages, size on disk, the last sync or the one running, and who syncs."""
    lines = [f"{index['documents']} docs, {index['passages']} passages, {_size(index.get('store_bytes') or 0)} on disk"]
    progress = index.get("sync_progress") or {}
    if index.get("syncing"):
        rate = f", {index['passages_per_s']:.0f} passages/s" if index.get("passages_per_s") else ""
        lines.append(f"syncing: {progress.get('done', 0)} of {progress.get('total', 0)} documents{rate}")
    else:
        lines.append(f"last sync {index['last_refresh'] or 'not yet'}")
    lines.append("this worker syncs it" if index.get("syncer") else "synced by another worker")
    if index.get("skipped"):
        names = index.get("skipped_paths") or []
        shown = ", ".join(names[:5]) + (" …" if len(names) > 5 else "")
        lines.append(f"{index['skipped']} skipped" + (f" ({shown})" if shown else ""))
    return escape(lines[0]) + "".join(f"<br><small>{escape(line)}</small>" for line in lines[1:])


def _replicas(source: dict[str, Any]) -> str:
    """Every replica's state of this source (with Redis): `replica-0 ok · replica-1 degraded (syncs)`."""
    views = source.get("replicas") or []
    if len(views) < 2:
        return ""
    parts = [f"{escape(v['replica'])} {escape(v['state'])}" + (" (syncs)" if v.get("syncer") else "") for v in views]
    return "<br><small>" + " · ".join(parts) + "</small>"


def _shared(status: dict[str, Any]) -> tuple[str, str]:
    """The meta line's part about replicas and shared state, and a banner while a shared store is unreachable."""
    shared = status.get("shared_state") or {}
    index, redis = shared.get("index") or {}, shared.get("redis")
    parts = []
    if status.get("replicas") and redis is not None:
        parts.append(f"replica {status.get('replica')} of {len(status['replicas'])}")
    if index.get("kind") == "postgresql":
        parts.append(f"index in PostgreSQL ({'reachable' if index.get('reachable') else 'unreachable'})")
    if redis is not None:
        parts.append(f"Redis {redis['state']}")
    problems = []
    if index.get("kind") == "postgresql" and not index.get("reachable"):
        problems.append(f"PostgreSQL ({index.get('url')}) is unreachable: indexed sources answer nothing until it is back. {index.get('error') or ''}")
    if redis is not None and redis["state"] != "connected":
        problems.append(f"Redis ({redis.get('url')}) is unreachable since {redis.get('since')}: breakers, health, rate limits and the "
                        f"cache are per process until it is back. {redis.get('error') or ''}")  # fmt: skip
    banner = "".join(f'<div class="banner">{escape(problem)}</div>' for problem in problems)
    return ("".join(f" · {escape(part)}" for part in parts)), banner


def _row(source: dict[str, Any]) -> str:
    state = source["state"]
    colour = COLOURS.get(state, "#6e7781")
    calls = source["calls"]
    failed = sum(calls[k] for k in FAILURES)
    index = source.get("index")
    index_text = "–" if index is None else _index_cell(index)
    history = source.get("history")
    error_text = _errors(history["errors"], history["now"]) if history else ""
    if index and index.get("last_refresh_error"):
        error_text += f"<small>sync:</small> {escape(index['last_refresh_error'])}"
    name = escape(source["name"])
    return (
        f'<tr data-source="{name}"><td><strong>{name}</strong></td>'
        f"<td>{escape(source['type'])}</td>"
        f'<td><span class="state" style="background:{colour}">{escape(state)}</span>{_replicas(source)}</td>'
        f'<td class="num">{_ms(source["latency_ms"]["p50"])} / {_ms(source["latency_ms"]["p95"])}</td>'
        f'<td class="num">{calls["ok"] + calls["empty"]} ok, {failed} failed, {calls["skipped"]} skipped</td>'
        f"<td>{index_text}</td>"
        f'<td class="error" rowspan="2">{error_text}</td></tr>\n'
        f'<tr class="hist" data-history="{name}"><td colspan="6">{_charts(history)}</td></tr>'
    )


def _charts(history: dict[str, Any] | None) -> str:
    if not history:
        return ""
    if not history["minutes"]:
        return f'<span class="quiet">no calls in the last {history["window_minutes"]} minutes</span>'
    return f"<div>{latency_chart(history)}{outcomes_chart(history)}</div>"


def _clock(at: str, now: str) -> str:
    """HH:MM:SS for today's times (UTC, like the header says), with the date for older ones."""
    return at[11:19] if at[:10] == now[:10] else f"{at[5:10]} {at[11:16]}"


def _errors(errors: list[dict[str, Any]], now: str) -> str:
    """Newest first; a run of the same error (numbers aside) is one line with its count and first time."""
    runs: list[list[dict[str, Any]]] = []
    for error in errors:
        key = (error["outcome"], re.sub(r"\d+", "#", error["message"]))
        if runs and (runs[-1][0]["outcome"], re.sub(r"\d+", "#", runs[-1][0]["message"])) == key:
            runs[-1].append(error)
        else:
            runs.append([error])
    if not runs:
        return ""
    items = []
    for run in runs:
        newest, oldest = run[0], run[-1]
        message = newest["message"]
        if len(message) > MESSAGE_CHARS:
            message = message[: MESSAGE_CHARS - 1] + "…"
        count = "" if len(run) == 1 else f" ×{len(run)} since {_clock(oldest['at'], now)}"
        outcome = OUTCOME_LABELS.get(newest["outcome"], newest["outcome"])
        items.append(f"<li><time>{_clock(newest['at'], now)}</time> <b>{escape(outcome)}</b>{count} {escape(message)}")
    return f'<ul class="errors">{"".join(items)}</ul>'


def _legend() -> str:
    swatches = "".join(
        f'<i style="background:{colour}"></i>{OUTCOME_LABELS.get(outcome, outcome)}' for outcome, colour in OUTCOME_COLOURS.items()
    )
    return (
        f'<div class="legend">Last hour, one bar per minute, now at the right (times UTC). Latency:'
        f'<i style="background:{P50_COLOUR}"></i>p50<i style="background:{P95_COLOUR}"></i>p95 · Calls:{swatches}</div>'
    )


def render(status: dict[str, Any]) -> str:
    reload = status.get("last_reload")
    banner = ""
    if reload and reload["result"] == "error":
        banner = (
            f'<div class="banner"><strong>The last edit of connectors.yaml was rejected</strong> ({escape(reload["at"])}); '
            f"version {escape(status.get('config_version') or '?')} keeps serving.<br>{escape(reload['error'] or '')}</div>"
        )
    shared_text, shared_banner = _shared(status)
    banner += shared_banner
    rows = "\n".join(_row(source) for source in status["sources"]) or '<tr><td colspan="7">No sources configured.</td></tr>'
    ready = "ready" if status.get("ready") else "starting (indexes syncing)"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Knowledge gateway status</title><style>{STYLE}</style></head>
<body>
<h1>Knowledge gateway</h1>
<div class="meta">{escape(ready)} · config version {escape(status.get("config_version") or "?")} · up {status.get("uptime_s", 0):.0f} s{shared_text} · refreshes every {REFRESH_S} s · <a href="/explain">explain a query</a></div>
{banner}
{_legend()}
<table>
<thead><tr><th>Source</th><th>Type</th><th>State</th><th class="num">Latency p50 / p95 (ms)</th><th class="num">Calls</th><th>Index</th><th>Recent errors (UTC)</th></tr></thead>
<tbody>
{rows}
</tbody></table>
</body></html>
"""
