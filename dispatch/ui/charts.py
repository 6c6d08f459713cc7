"""The overview's charts as inline SVG, drawn on the server: no chart library, no script."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from markupsafe import Markup, escape

WIDTH, HEIGHT = 600, 160
LEFT, BOTTOM, TOP = 44, 20, 10


def _scale(top: float) -> float:
    """A round axis maximum at or above `top`."""
    if top <= 0:
        return 1.0
    step = 1.0
    while step * 10 < top:
        step *= 10
    for nice in (1, 2, 5, 10):
        if nice * step >= top:
            return nice * step
    return top


def _frame(title: str, top: float, unit: str, minutes: Sequence[datetime], body: str) -> Markup:
    plot_h = HEIGHT - BOTTOM - TOP
    first = minutes[0].strftime("%H:%M") if minutes else ""
    last = minutes[-1].strftime("%H:%M") if minutes else ""
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}" preserveAspectRatio="none">',
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/>',
        f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH}" y2="{TOP + plot_h}"/>',
        f'<text class="tick" x="{LEFT - 4}" y="{TOP + 8}" text-anchor="end">'
        f"{_number(top)}{escape(unit)}</text>",
        f'<text class="tick" x="{LEFT - 4}" y="{TOP + plot_h}" text-anchor="end">0</text>',
        f'<text class="tick" x="{LEFT}" y="{HEIGHT - 4}">{first} UTC</text>',
        f'<text class="tick" x="{WIDTH}" y="{HEIGHT - 4}" text-anchor="end">{last}</text>',
        body,
        "</svg>",
    ]
    return Markup("".join(parts))


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


def throughput(series: Sequence[Mapping[str, Any]]) -> Markup:
    """Bars per minute: completed, with the tasks that failed for good stacked on top."""
    minutes = [row["minute"] for row in series]
    top = _scale(max((row["completed"] + row["failed"] for row in series), default=0))
    plot_h = HEIGHT - BOTTOM - TOP
    slot = (WIDTH - LEFT) / max(len(series), 1)
    bars = []
    for i, row in enumerate(series):
        x = LEFT + i * slot + 1
        done_h = plot_h * row["completed"] / top
        failed_h = plot_h * row["failed"] / top
        label = f'{row["minute"]:%H:%M}: {row["completed"]} completed, {row["failed"]} failed'
        bars.append(
            f'<g><title>{escape(label)}</title>'
            f'<rect class="done" x="{x:.1f}" y="{TOP + plot_h - done_h:.1f}" '
            f'width="{slot - 2:.1f}" height="{done_h:.1f}"/>'
            f'<rect class="failed" x="{x:.1f}" y="{TOP + plot_h - done_h - failed_h:.1f}" '
            f'width="{slot - 2:.1f}" height="{failed_h:.1f}"/></g>'
        )
    return _frame("tasks ended per minute", top, "/min", minutes, "".join(bars))


def wait(series: Sequence[Mapping[str, Any]]) -> Markup:
    """Lines per minute: the median and 95th percentile of create-to-assign waits (a gap in
    a minute without assignments)."""
    minutes = [row["minute"] for row in series]
    values = [v for row in series for v in (row["wait_ms_p50"], row["wait_ms_p95"]) if v]
    top_ms = _scale(max(values, default=0) / 1000) * 1000
    plot_h = HEIGHT - BOTTOM - TOP
    slot = (WIDTH - LEFT) / max(len(series), 1)
    lines = []
    for key, css in (("wait_ms_p95", "p95"), ("wait_ms_p50", "p50")):
        segment: list[str] = []
        runs: list[list[str]] = [segment]
        for i, row in enumerate(series):
            value = row[key]
            if value is None:
                segment = []
                runs.append(segment)
                continue
            x = LEFT + i * slot + slot / 2
            y = TOP + plot_h - plot_h * value / top_ms
            segment.append(f"{x:.1f},{y:.1f}")
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                lines.append(f'<circle class="{css}" cx="{cx}" cy="{cy}" r="2"/>')
            elif run:
                lines.append(f'<polyline class="{css}" points="{" ".join(run)}"/>')
    return _frame("wait until assigned", top_ms / 1000, " s", minutes, "".join(lines))
