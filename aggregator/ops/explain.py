"""Explain one retrieval: what every source returned and what became of each passage.

The question it answers is "why did this document not show up?". It runs the
real pipeline (`retrieve(..., explain=True)`), so what it shows is what Dify
would have got, and turns the pipeline's trace into one JSON document, a page
(a plain GET form, no JavaScript, the query kept in the URL so it can be
shared) and a text report for the command line.
"""

from __future__ import annotations

import json
from html import escape
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

from aggregator.contract.outcomes import SourceResult
from aggregator.ops.health import redact
from aggregator.retrieval.pipeline import RetrievalResult, Verdict
from aggregator.ranking.rerank import Candidate

EXCERPT_CHARS = 240


def body_from_form(values: dict[str, str], default_kb: str) -> dict[str, Any]:
    """The retrieval body the page's form describes (validated by the caller like any request).

    Numbers that do not parse are passed on as text so that validation names the field.
    """

    def number(text: str, kind: type) -> Any:
        try:
            return kind(text)
        except ValueError:
            return text

    body: dict[str, Any] = {
        "knowledge_id": values.get("kb") or default_kb,
        "query": values.get("q", ""),
        "retrieval_setting": {
            "top_k": number(values.get("top_k") or "5", int),
            "score_threshold": number(values.get("threshold") or "0", float),
        },
    }
    if values.get("filter", "").strip():
        body["metadata_condition"] = json.loads(values["filter"])  # ValueError: the caller reports it
    return body


def _number(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _copy(candidate: Candidate) -> dict[str, Any]:
    passage = candidate.passage
    return {
        "source": candidate.source,
        "source_rank": passage.source_rank,
        "source_score": passage.source_score,
        "calibrated": _number(candidate.calibrated),
        "title": passage.title,
        "document_id": passage.document_id,
        "chunk_index": passage.chunk_index,
    }


def _fate(verdict: Verdict) -> str:
    if verdict.outcome == "record":
        return f"record #{verdict.position}"
    return verdict.outcome


def explanation(
    result: RetrievalResult, request: dict[str, Any], elapsed_ms: float, types: dict[str, str], secrets: Iterable[str]
) -> dict[str, Any]:
    """The trace of `result` as a JSON-ready document. `request` is the retrieval's body; `types` each source's type;
    `secrets` the config's, scrubbed from every message as in /status (the JSON, the page and the CLI all read this)."""
    secrets = list(secrets)
    trace = result.trace
    assert trace is not None, "explain needs a result from retrieve(..., explain=True)"
    returned: dict[str, list[dict[str, Any]]] = {s.name: [] for s in result.sources}
    passages = []
    for verdict in trace.verdicts:
        ranked = verdict.ranked
        winner = ranked.candidate
        fate = _fate(verdict)
        for member in ranked.members:
            entry = {**_copy(member), "fate": fate if member is winner else f"merged into {winner.source}'s copy: {fate}"}
            returned.setdefault(member.source, []).append(entry)
        passages.append({
            "position": verdict.position,
            "outcome": verdict.outcome,
            "score": verdict.score,
            "relevance": _number(ranked.relevance),
            "bm25": _number(ranked.bm25),
            "proximity": _number(ranked.proximity),
            "calibrated": _number(ranked.calibrated),
            "calibration": ranked.calibration,
            "meaning": _number(ranked.meaning),  # the embedding judge's similarity on [0, 1] (null: no judge, or it failed)
            "confidence": _number(ranked.confidence),  # a semantic source's own confidence, where it set the score
            "weight": winner.weight,
            "title": winner.passage.title,
            "document_id": winner.passage.document_id,
            "chunk_index": winner.passage.chunk_index,
            "source": winner.source,
            "also_in": ranked.also_in,
            "copies": [_copy(m) for m in ranked.members],
            "excerpt": " ".join(winner.passage.content.split())[:EXCERPT_CHARS],
        })  # fmt: skip
    for candidate in trace.removed:
        returned.setdefault(candidate.source, []).append({**_copy(candidate), "fate": "removed by metadata_condition"})
    for entries in returned.values():
        entries.sort(key=lambda e: (e["source_rank"] is None, e["source_rank"] or 0))
    return {
        "knowledge_id": request["knowledge_id"],
        "query": request["query"],
        "retrieval_setting": request.get("retrieval_setting"),
        "metadata_condition": request.get("metadata_condition"),
        "ms": round(elapsed_ms, 1),
        "sources": [_source(s, types.get(s.name, ""), returned.get(s.name, []), secrets) for s in result.sources],
        "passages": passages,
        "records": result.records,
    }


def _source(result: SourceResult, kind: str, returned: list[dict[str, Any]], secrets: list[str]) -> dict[str, Any]:
    return {
        "name": result.name,
        "type": kind,
        "outcome": result.outcome,
        "ms": round(result.elapsed_ms, 1),
        "attempts": result.attempts,
        "error": redact(result.error, secrets),
        "returned": returned,
    }


# -- the page ---------------------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem; color: #1f2328; max-width: 80rem; }
h1 { font-size: 1.4rem; margin: 0 0 .6rem; } h2 { font-size: 1.1rem; margin: 1.6rem 0 .4rem; }
form { display: flex; flex-wrap: wrap; gap: .6rem; align-items: end; background: #f6f8fa; padding: .8rem; border-radius: 6px; }
label { display: flex; flex-direction: column; font-size: .85rem; color: #57606a; }
input, select { font: inherit; padding: .3rem .4rem; }
input[name=q] { width: 28rem; } input[name=filter] { width: 22rem; } input.small { width: 5rem; }
table { border-collapse: collapse; width: 100%; margin-top: .4rem; }
th, td { text-align: left; padding: .35rem .5rem; border-bottom: 1px solid #d0d7de; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.record { background: #dafbe1; } .cut td { border-top: 3px solid #cf222e; }
.muted { color: #57606a; } .error { color: #cf222e; } small { color: #57606a; }
"""


def _fmt(value: Any) -> str:
    """A value for the page: as in the text report, escaped, with an en dash for none."""
    return "–" if value is None else escape(_plain(value))


def _form(knowledge_bases: list[str], values: dict[str, str]) -> str:
    options = "".join(
        f'<option value="{escape(kb)}"{" selected" if kb == values.get("kb") else ""}>{escape(kb)}</option>' for kb in knowledge_bases
    )
    return (
        '<form method="get" action="/explain">'
        f'<label>Knowledge base<select name="kb">{options}</select></label>'
        f'<label>Query<input name="q" value="{escape(values.get("q", ""))}" required></label>'
        f'<label>top_k<input class="small" name="top_k" value="{escape(values.get("top_k", "5"))}"></label>'
        f'<label>score_threshold<input class="small" name="threshold" value="{escape(values.get("threshold", "0"))}"></label>'
        f'<label>metadata_condition (JSON, optional)<input name="filter" value="{escape(values.get("filter", ""))}"></label>'
        '<button type="submit">Explain</button></form>'
    )


def _ranking(data: dict[str, Any]) -> str:
    rows, cut_drawn = [], False
    for p in data["passages"]:
        is_record = p["outcome"] == "record"
        classes = "record" if is_record else ""
        if not is_record and not cut_drawn and data["passages"][0]["outcome"] == "record":
            classes += " cut"
            cut_drawn = True
        copies = ", ".join(f"{escape(c['source'])} #{_fmt(c['source_rank'])}" for c in p["copies"])
        rows.append(
            f'<tr class="{classes.strip()}"><td class="num">{_fmt(p["position"])}</td><td>{escape(p["outcome"])}</td>'
            f'<td class="num">{_fmt(p["score"])}</td><td class="num">{_fmt(p["relevance"])}</td>'
            f'<td class="num">{_fmt(p["bm25"])}</td><td class="num">{_fmt(p["proximity"])}</td>'
            f'<td class="num">{_fmt(p["calibrated"])} <small>{escape(p["calibration"])}</small></td>'
            f'<td><strong>{escape(p["title"])}</strong> <small>{escape(p["document_id"])} #{p["chunk_index"]}</small>'
            f'<br><small>{escape(p["excerpt"])}</small></td><td>{copies}</td></tr>'
        )
    if not rows:
        return '<p class="muted">No passage came back.</p>'
    return (
        "<table><thead><tr><th class=num>#</th><th>Outcome</th><th class=num>Score</th><th class=num>Relevance</th>"
        "<th class=num>BM25</th><th class=num>Proximity</th><th class=num>Calibrated source score</th><th>Passage</th>"
        "<th>Returned by (rank)</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _sources(data: dict[str, Any]) -> str:
    parts = []
    for s in data["sources"]:
        head = (
            f'<h2>{escape(s["name"])} <small>{escape(s["type"])} · {escape(s["outcome"])} · {s["ms"]:.0f} ms'
            f' · {s["attempts"]} attempt(s) · {len(s["returned"])} passage(s)</small></h2>'
        )
        if s["error"]:
            head += f'<p class="error">{escape(s["error"])}</p>'
        rows = "".join(
            f'<tr><td class="num">{_fmt(e["source_rank"])}</td><td class="num">{_fmt(e["source_score"])}</td>'
            f'<td class="num">{_fmt(e["calibrated"])}</td><td>{escape(e["title"])} <small>{escape(e["document_id"])} #{e["chunk_index"]}</small></td>'
            f'<td>{escape(e["fate"])}</td></tr>'
            for e in s["returned"]
        )
        table = (
            "<table><thead><tr><th class=num>Rank at source</th><th class=num>Score at source</th><th class=num>Calibrated</th>"
            f"<th>Passage</th><th>What became of it</th></tr></thead><tbody>{rows}</tbody></table>" if rows else ""
        )
        parts.append(head + table)
    return "".join(parts)


def render_page(knowledge_bases: list[str], values: dict[str, str], data: dict[str, Any] | None, error: str | None = None) -> str:
    """The explain page: the form, and when a query was given, its sources, ranking and cut."""
    body = ""
    if error:
        body = f'<p class="error">{escape(error)}</p>'
    elif data is not None:
        setting = data.get("retrieval_setting") or {}
        json_link = "/explain?" + urlencode({**{k: v for k, v in values.items() if v}, "format": "json"})
        body = (
            f'<p class="muted">{len(data["records"])} record(s) for top_k = {_fmt(setting.get("top_k"))}, score_threshold = '
            f'{_fmt(setting.get("score_threshold"))}; {data["ms"]:.0f} ms. <a href="{escape(json_link)}">as JSON</a></p>'
            "<h2>Ranking</h2><p class=muted>Every distinct passage, best first; the records Dify gets are green, the red line is the cut "
            "(top_k or score_threshold). Relevance is the gateway's own judgement of the text (BM25 and proximity); the calibrated "
            "score is the source's opinion mapped onto the same scale.</p>" + _ranking(data) + "<h2>Sources</h2>" + _sources(data)
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Explain a query · knowledge gateway</title><style>{STYLE}</style></head><body>"
        f'<h1>Explain a query</h1><p class="muted"><a href="/">status</a></p>{_form(knowledge_bases, values)}{body}</body></html>'
    )


def render_text(data: dict[str, Any]) -> str:
    """The same for a terminal: sources, then the ranking with the cut."""
    lines = [f"query: {data['query']!r} on {data['knowledge_id']} ({data['ms']:.0f} ms)"]
    if data.get("metadata_condition"):
        lines.append(f"metadata_condition: {json.dumps(data['metadata_condition'], ensure_ascii=False)}")
    lines.append("")
    for s in data["sources"]:
        lines.append(f"{s['name']} ({s['type']}): {s['outcome']}, {s['ms']:.0f} ms, {len(s['returned'])} passage(s)" + (f": {s['error']}" if s["error"] else ""))
        for e in s["returned"]:
            lines.append(f"  #{_plain(e['source_rank']):>3}  score {_plain(e['source_score']):>8}  calibrated {_plain(e['calibrated']):>6}  {e['title'][:40]:<40}  {e['fate']}")
    lines += ["", f"{'#':>3}  {'score':>6}  {'relev.':>6}  {'bm25':>6}  {'prox.':>6}  {'calib.':>6}  {'source':<14}  title"]
    cut_drawn = False
    for p in data["passages"]:
        if p["outcome"] != "record" and not cut_drawn:
            lines.append(f"{'-' * 24} cut: {p['outcome']} {'-' * 24}")
            cut_drawn = True
        lines.append(
            f"{_plain(p['position']):>3}  {p['score']:>6.3f}  {_plain(p['relevance']):>6}  {_plain(p['bm25']):>6}  {_plain(p['proximity']):>6}  "
            f"{_plain(p['calibrated']):>6}  {p['source'][:14]:<14}  {p['title'][:50]}" + (f"  (also in {', '.join(p['also_in'])})" if p["also_in"] else "")
        )
    return "\n".join(lines)


def _plain(value: Any) -> str:
    """A value for the text report: scores to three decimals, huge raw scores in short form, '-' for none."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"
    return str(value)
