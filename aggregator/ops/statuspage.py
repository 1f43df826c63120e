"""The status page for people: server-rendered HTML, no scripts, refreshing itself every few seconds."""

from __future__ import annotations

from html import escape
from typing import Any

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
"""


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


def _row(source: dict[str, Any]) -> str:
    state = source["state"]
    colour = COLOURS.get(state, "#6e7781")
    calls = source["calls"]
    failed = sum(calls[k] for k in ("timeout", "error", "rate_limited", "auth_failed"))
    index = source.get("index")
    index_text = "–" if index is None else _index_cell(index)
    error = source.get("last_error")
    error_text = "" if error is None else f"<small>{escape(error['at'] or '')}</small><br>{escape(error['message'] or '')}"
    if index and index.get("last_refresh_error"):
        error_text += f"<br><small>sync:</small> {escape(index['last_refresh_error'])}"
    return (
        f'<tr data-source="{escape(source["name"])}"><td><strong>{escape(source["name"])}</strong></td>'
        f"<td>{escape(source['type'])}</td>"
        f'<td><span class="state" style="background:{colour}">{escape(state)}</span></td>'
        f'<td class="num">{_ms(source["latency_ms"]["p50"])} / {_ms(source["latency_ms"]["p95"])}</td>'
        f'<td class="num">{calls["ok"] + calls["empty"]} ok, {failed} failed, {calls["skipped"]} skipped</td>'
        f"<td>{index_text}</td>"
        f'<td class="error">{error_text}</td></tr>'
    )


def render(status: dict[str, Any]) -> str:
    reload = status.get("last_reload")
    banner = ""
    if reload and reload["result"] == "error":
        banner = (
            f'<div class="banner"><strong>The last edit of connectors.yaml was rejected</strong> ({escape(reload["at"])}); '
            f"version {escape(status.get('config_version') or '?')} keeps serving.<br>{escape(reload['error'] or '')}</div>"
        )
    rows = "\n".join(_row(source) for source in status["sources"]) or '<tr><td colspan="7">No sources configured.</td></tr>'
    ready = "ready" if status.get("ready") else "starting (indexes syncing)"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Knowledge gateway status</title><style>{STYLE}</style></head>
<body>
<h1>Knowledge gateway</h1>
<div class="meta">{escape(ready)} · config version {escape(status.get("config_version") or "?")} · up {status.get("uptime_s", 0):.0f} s · refreshes every {REFRESH_S} s</div>
{banner}
<table>
<thead><tr><th>Source</th><th>Type</th><th>State</th><th class="num">Latency p50 / p95 (ms)</th><th class="num">Calls</th><th>Index</th><th>Last error</th></tr></thead>
<tbody>
{rows}
</tbody></table>
</body></html>
"""
