"""Server-rendered inline SVG charts for the console: time series and bucket bars.

Every chart is a ``markupsafe.Markup`` string built here with each label, name and title
escaped (``markupsafe.escape``), so device-supplied text (a model name, a cohort, a feature's
bucket label) can never close the SVG or open a script. Numbers are formatted, never echoed.
No script, no inline style: colours are SVG presentation attributes and classes from the
console's stylesheet, which the Content-Security-Policy allows.

The fleet drift bars reuse ``fleet_server.drift.report.chart_panels`` (the panels of the HTML
report ``fleet-server drift report`` writes) and add axes, tick labels and a legend.

Owns: drawing. Does not own: the data (``fleet_server.console.shaping``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from markupsafe import Markup, escape

from fleet_server.drift.report import ChartPanel

__all__ = ["Series", "bars_svg", "series_svg"]

#: Line colours, in order (colour-blind safe: Okabe-Ito).
PALETTE: Final = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9")
_W, _H = 640, 200
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 12, 12, 40


@dataclass(frozen=True)
class Series:
    """One line: ``points`` are ``(unix_seconds, value)``; ``dashed`` for a threshold."""

    name: str
    points: tuple[tuple[float, float], ...]
    dashed: bool = False


def _head(title: str) -> Markup:
    return Markup(
        '<svg class="chart" viewBox="0 0 {w} {h}" role="img" aria-label="{t}"><title>{t}</title>'
    ).format(w=_W, h=_H, t=escape(title))


def _nice_max(v: float) -> float:
    if v <= 0 or not math.isfinite(v):
        return 1.0
    mag = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * mag:
            return float(m * mag)
    return float(10 * mag)


def _num(v: float, unit: str) -> str:
    if unit == "%":
        return f"{v * 100:.3g}%"
    return f"{v:.4g}{unit}"


def _clock(t: float, span: float) -> str:
    when = datetime.fromtimestamp(t, UTC)
    return when.strftime("%H:%M:%S" if span < 600 else ("%H:%M" if span < 86400 else "%m-%d %H:%M"))


def series_svg(series: Sequence[Series], *, title: str, unit: str = "") -> Markup:
    """A time-series chart with a time axis, a value axis from 0, tick labels and a legend.

    ``unit`` ``"%"`` shows fractions as percentages. An empty chart says "no data".
    """
    pts = [p for s in series for p in s.points if math.isfinite(p[1])]
    head = _head(title)
    if not pts:
        return head + Markup(
            '<text x="{x}" y="{y}" class="muted" text-anchor="middle">no data</text></svg>'
        ).format(x=_W // 2, y=_H // 2)
    t0, t1 = min(p[0] for p in pts), max(p[0] for p in pts)
    span = max(t1 - t0, 1.0)
    top = _nice_max(max(p[1] for p in pts))
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x(t: float) -> float:
        return _LEFT + (t - t0) / span * pw

    def y(v: float) -> float:
        return _TOP + ph - max(0.0, v) / top * ph

    parts = [head]
    for i in range(5):  # value grid and ticks
        v = top * i / 4
        parts.append(
            Markup(
                '<line class="grid" x1="{a}" x2="{b}" y1="{y:.1f}" y2="{y:.1f}"/>'
                '<text class="tick" x="{tx}" y="{ty:.1f}" text-anchor="end">{v}</text>'
            ).format(a=_LEFT, b=_W - _RIGHT, y=y(v), tx=_LEFT - 4, ty=y(v) + 3, v=_num(v, unit))
        )
    for i in range(4):  # time ticks; the outer ones inside the chart
        t = t0 + span * i / 3
        anchor = ("start", "middle", "middle", "end")[i]
        parts.append(
            Markup('<text class="tick" x="{x:.1f}" y="{y}" text-anchor="{a}">{t}</text>').format(
                x=x(t), y=_TOP + ph + 14, a=anchor, t=_clock(t, span)
            )
        )
    parts.append(
        Markup('<line class="axis" x1="{l}" x2="{l}" y1="{t}" y2="{b}"/>').format(
            l=_LEFT, t=_TOP, b=_TOP + ph
        )
        + Markup('<line class="axis" x1="{l}" x2="{r}" y1="{b}" y2="{b}"/>').format(
            l=_LEFT, r=_W - _RIGHT, b=_TOP + ph
        )
    )
    lx = _LEFT
    for n, s in enumerate(series):
        colour = PALETTE[n % len(PALETTE)]
        good = [p for p in s.points if math.isfinite(p[1])]
        dash = Markup(' stroke-dasharray="5 4"') if s.dashed else Markup("")
        if len(good) == 1:
            parts.append(
                Markup('<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{c}"/>').format(
                    x=x(good[0][0]), y=y(good[0][1]), c=colour
                )
            )
        elif good:
            path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in good)
            parts.append(
                Markup(
                    '<polyline fill="none" stroke="{c}" stroke-width="2"{d} points="{p}"/>'
                ).format(c=colour, d=dash, p=path)
            )
        name = escape(s.name[:60])
        parts.append(
            Markup(
                '<rect x="{x}" y="{y}" width="10" height="10" fill="{c}"/>'
                '<text class="legend" x="{tx}" y="{ty}">{n}</text>'
            ).format(x=lx, y=_H - 14, c=colour, tx=lx + 14, ty=_H - 5, n=name)
        )
        lx += 24 + 7 * min(len(s.name), 60)
    parts.append(Markup("</svg>"))
    return Markup("").join(parts)


def bars_svg(panel: ChartPanel, *, title: str) -> Markup:
    """One drift panel: per bucket, the baseline share (grey) beside the fleet's (blue, red
    when the feature drifted), a share axis, bucket numbers under the bars and each bucket's
    edges in a tooltip."""
    k = max(len(panel.shares), 1)
    top = _nice_max(max(*panel.shares, *panel.baseline, 1e-9))
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    slot = pw / k
    bar = slot * 0.4
    fleet = "bar-drift" if panel.scores.get("drifted") else "bar-fleet"
    parts = [_head(title)]
    for i in range(5):
        v = top * i / 4
        yy = _TOP + ph - v / top * ph
        parts.append(
            Markup(
                '<line class="grid" x1="{a}" x2="{b}" y1="{y:.1f}" y2="{y:.1f}"/>'
                '<text class="tick" x="{tx}" y="{ty:.1f}" text-anchor="end">{v}</text>'
            ).format(a=_LEFT, b=_W - _RIGHT, y=yy, tx=_LEFT - 4, ty=yy + 3, v=_num(v, "%"))
        )
    for i, (w, b, edge) in enumerate(zip(panel.shares, panel.baseline, panel.labels, strict=True)):
        x0 = _LEFT + i * slot + slot * 0.1
        for dx, value, cls, who in ((0.0, b, "bar-base", "baseline"), (bar, w, fleet, "fleet")):
            h = value / top * ph
            parts.append(
                Markup(
                    '<rect class="{c}" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}">'
                    "<title>{e} {who}: {v}</title></rect>"
                ).format(
                    c=cls,
                    x=x0 + dx,
                    y=_TOP + ph - h,
                    w=bar,
                    h=h,
                    e=escape(edge),
                    who=who,
                    v=_num(value, "%"),
                )
            )
        parts.append(
            Markup('<text class="tick" x="{x:.1f}" y="{y}" text-anchor="middle">{i}</text>').format(
                x=x0 + bar, y=_TOP + ph + 14, i=i
            )
        )
    parts.append(
        Markup(
            '<text class="tick" x="{x}" y="{y}" text-anchor="middle">bucket (underflow, bins, '
            "overflow)</text>"
            '<rect class="bar-base" x="{l}" y="{ly}" width="10" height="10"/>'
            '<text class="legend" x="{l2}" y="{ty}">baseline</text>'
            '<rect class="{f}" x="{l3}" y="{ly}" width="10" height="10"/>'
            '<text class="legend" x="{l4}" y="{ty}">fleet</text></svg>'
        ).format(
            x=_LEFT + pw // 2,
            y=_TOP + ph + 28,
            l=_LEFT,
            ly=_H - 12,
            l2=_LEFT + 14,
            ty=_H - 3,
            f=fleet,
            l3=_LEFT + 80,
            l4=_LEFT + 94,
        )
    )
    return Markup("").join(parts)
