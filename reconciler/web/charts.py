"""Inline SVG charts for the status page: pure functions from points to markup (no script, no external
asset; a ``viewBox`` so they scale to a phone's width). Every text from outside is escaped."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape

WIDTH = 640
HEIGHT = 220
MARGIN_LEFT = 64
MARGIN_RIGHT = 12
MARGIN_TOP = 12
MARGIN_BOTTOM = 28
PALETTE = ("#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#4d7c0f", "#be185d")


@dataclass(frozen=True)
class Series:
    """One named line (or set of marks): ``(time, value)`` pairs, oldest first."""

    name: str
    points: Sequence[tuple[datetime, float]]


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10 ** (len(str(int(value))) - 1) if value >= 1 else 1.0
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return value


def chart(
    series: Sequence[Series],
    *,
    start: datetime,
    end: datetime,
    label: str,
    value_text: Callable[[float], str],
    lines: bool,
) -> str:
    """An SVG of ``series`` over ``[start, end]``: lines (``lines``) or dots, a y axis with three
    labels, dates on the x axis, a legend; ``label`` is its accessible name."""
    if end <= start:
        end = start + timedelta(days=1)
    top = _nice_max(max((v for s in series for _, v in s.points), default=0.0))
    plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    span = (end - start).total_seconds()

    def x(when: datetime) -> float:
        return MARGIN_LEFT + plot_w * max(0.0, min(1.0, (when - start).total_seconds() / span))

    def y(value: float) -> float:
        return MARGIN_TOP + plot_h * (1 - max(0.0, value) / top)

    out = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(label)}"'
        ' xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(label)}</title>",
    ]
    for fraction in (0.0, 0.5, 1.0):
        gy = y(top * fraction)
        out.append(
            f'<line x1="{MARGIN_LEFT}" y1="{gy:.1f}" x2="{WIDTH - MARGIN_RIGHT}" y2="{gy:.1f}" class="grid"/>'
            f'<text x="{MARGIN_LEFT - 6}" y="{gy + 4:.1f}" text-anchor="end" class="axis">'
            f"{escape(value_text(top * fraction))}</text>"
        )
    stamp = "%b %d" if end - start > timedelta(days=2) else "%b %d %H:%M"
    for fraction in (0.0, 0.5, 1.0):
        when = start + (end - start) * fraction
        anchor = ("start", "middle", "end")[int(fraction * 2)]
        out.append(
            f'<text x="{x(when):.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}" class="axis">'
            f"{when.strftime(stamp)}</text>"
        )
    for number, one in enumerate(series):
        color = PALETTE[number % len(PALETTE)]
        coords = [(x(t), y(v)) for t, v in one.points]
        if lines and len(coords) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in coords)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        for (px, py), (when, value) in zip(coords, one.points, strict=True):
            out.append(
                f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{color}">'
                f"<title>{escape(one.name)} {when:%Y-%m-%d %H:%M}Z: {escape(value_text(value))}</title>"
                "</circle>"
            )
    out.append("</svg>")
    if not any(s.points for s in series):
        return f'<p class="muted">No data for “{escape(label)}” yet.</p>'
    legend = "".join(
        f'<span class="key"><span class="swatch" style="background:{PALETTE[n % len(PALETTE)]}"></span>'
        f"{escape(s.name)}</span>"
        for n, s in enumerate(series)
    )
    return "".join(out) + f'<div class="legend">{legend}</div>'
