"""Small SVG charts of a source's last hour, drawn on the server: no script, no external asset.

One bar per minute, 3 px wide with a 1 px gap. Bytes matter (twenty sources with a full hour each
must keep the page light), so a series is not one shape per bar but one filled step outline over all
sixty minutes (`V height h1` per minute, runs of equal height merged), and a single white dashed
stroke cuts the outlines into bars. Stacked bars are painted from the top of the stack down, each
series from the baseline to its cumulative height, so the one below covers the rest of it. A
transform maps one minute to 4 px and puts y = 0 on the baseline, which keeps the numbers short.

Input is the `history` object of a source in /status.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape
from typing import Any

from aggregator.contract.outcomes import OUTCOMES

STEP = 4  # px per minute: a 3 px bar and a 1 px gap
PLOT = 44  # px of bar height at the top of the scale
BASE = 56  # y of the baseline, in px from the top
HEIGHT = BASE + 2
OUTCOME_COLOURS = {
    "ok": "#2da44e", "empty": "#a6e3b4", "timeout": "#fb8f44", "error": "#cf222e",
    "rate_limited": "#d4a72c", "auth_failed": "#8250df", "skipped": "#afb8c1",
}  # fmt: skip
P50_COLOUR = "#0969da"
P95_COLOUR = "#9ec5fe"


def _minute(at: str) -> int:
    return int(datetime.fromisoformat(at).timestamp() // 60)


def columns(history: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(column, minute) pairs: column 0 is the oldest minute of the window, the last one is now."""
    first = _minute(history["now"]) - history["window_minutes"] + 1
    placed = ((_minute(m["at"]) - first, m) for m in history["minutes"])
    return [(column, minute) for column, minute in placed if 0 <= column < history["window_minutes"]]


def nice_ceiling(value: float) -> float:
    """The smallest round number (1, 1.5, 2, 3, 4, 5, 6 or 8 times a power of ten) at least `value`: the top of a scale."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(round(step * power, 12) for step in (1, 1.5, 2, 3, 4, 5, 6, 8, 10) if step * power >= value * (1 - 1e-9))


def format_ms(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:g} s"
    return f"{ms:g} ms"


def _height(value: float, top: float) -> int:
    """Bar height in px; anything above zero gets at least one pixel, so a single failure shows."""
    return 0 if value <= 0 else max(1, round(value / top * PLOT))


def step_outline(heights: Sequence[int]) -> str:
    """Path data of the area under a step function, one unit of x per minute; '' when all is zero."""
    if not any(heights):
        return ""
    parts, level, run = ["M0 0"], 0, 0
    for height in heights:
        if height != level:
            if run:
                parts.append(f"h{run}")
            parts.append(f"V{height}")
            level, run = height, 0
        run += 1
    parts.append(f"h{run}V0z")
    return "".join(parts)


def _svg(width: int, label: str, areas: Iterable[tuple[str, str]]) -> str:
    minutes = width // STEP
    fills = "".join(f'<path fill="{colour}" d="{d}"/>' for colour, d in areas if d)
    gaps = f'<path stroke="#fff" stroke-width="{HEIGHT}" stroke-dasharray=".25 .75" d="M.75 {BASE / 2:g}H{minutes}"/>'
    return (
        f'<svg class="chart" viewBox="0 0 {width} {HEIGHT}" width="{width}" height="{HEIGHT}">'
        f'<g transform="matrix({STEP} 0 0 -1 0 {BASE})">{fills}{gaps}</g>'
        f'<path class="axis" d="M0 {BASE}.5H{width}"/><text x="0" y="9">{escape(label)}</text></svg>'
    )


def latency_chart(history: dict[str, Any]) -> str:
    """p95 (light) behind p50 (dark) per minute, on a linear scale from 0 to a round top."""
    minutes = history["window_minutes"]
    p50, p95 = [0.0] * minutes, [0.0] * minutes
    for column, minute in columns(history):
        p50[column] = minute["latency_ms"]["p50"] or 0.0
        p95[column] = minute["latency_ms"]["p95"] or 0.0
    top = nice_ceiling(max(p95))
    areas = [(P95_COLOUR, step_outline([_height(v, top) for v in p95])), (P50_COLOUR, step_outline([_height(v, top) for v in p50]))]
    return _svg(minutes * STEP, f"latency p50/p95, top {format_ms(top)}", areas)


def outcomes_chart(history: dict[str, Any]) -> str:
    """Calls per minute stacked by outcome, in the order of OUTCOMES from the baseline up."""
    minutes = history["window_minutes"]
    counts = {outcome: [0] * minutes for outcome in OUTCOMES}
    for column, minute in columns(history):
        for outcome, count in minute["calls"].items():
            if outcome in counts:
                counts[outcome][column] = count
    top = nice_ceiling(max(sum(column) for column in zip(*counts.values())))
    stacked, areas = [0] * minutes, []
    for outcome in OUTCOMES:
        if any(counts[outcome]):
            stacked = [below + _height(n, top) for below, n in zip(stacked, counts[outcome])]
            areas.append((OUTCOME_COLOURS[outcome], step_outline(stacked)))
    return _svg(minutes * STEP, f"calls by outcome, top {top:g}/min", reversed(areas))
