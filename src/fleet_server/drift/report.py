"""Fleet drift charts: a self-contained HTML page (inline SVG) and a dependency-free PNG.

Both take the admin API's ``GET /v1/drift?views=1`` body (``FleetDriftResult.to_dict(
include_views=True)``) and one feature of one tensor, and draw, per cohort, the feature's
merged bucket shares (``[underflow, bin 0, ..., overflow]``, NaN excluded) against the
baseline's. The HTML adds the bucket edges, each cohort's scores and thresholds, and a table of
every drifted feature with the cohorts and devices it drifted in. The PNG is bars only (no
text: there is no font without a plotting library; matplotlib is deliberately not a
dependency), written with ``zlib``; use the HTML for labels.

Pure: dicts in, ``str``/``bytes`` out; the CLI writes the files.
"""

from __future__ import annotations

import html
import itertools
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_agent.drift import TierAView
from edge_agent.errors import ContractError
from fleet_server.errors import FleetDriftError

__all__ = ["ChartPanel", "chart_panels", "render_html", "render_png"]

_BASE_COLOUR = (160, 160, 160)
_COHORT_COLOUR = (31, 119, 180)
_DRIFT_COLOUR = (214, 39, 40)


@dataclass(frozen=True)
class ChartPanel:
    """One cohort's bars for one feature: shares per bucket, window and baseline."""

    cohort: str
    bucket: float | None
    shares: tuple[float, ...]
    baseline: tuple[float, ...]
    labels: tuple[str, ...]
    scores: Mapping[str, Any]


def _shares(view: TierAView, j: int) -> tuple[float, ...]:
    used = len(view.edges.edges[j]) - 1  # real bins; unused columns are always zero
    row = np.concatenate([view.counts[j, : used + 1], view.counts[j, -1:]]).astype(np.float64)
    total = row.sum()
    return tuple((row / total).tolist()) if total else tuple(0.0 for _ in row)


def _labels(view: TierAView, j: int) -> tuple[str, ...]:
    e = view.edges.edges[j]
    return (f"< {e[0]:.4g}", *(f"[{a:.4g}, {b:.4g})" for a, b in itertools.pairwise(e)),
            f"> {e[-1]:.4g}")  # fmt: skip


def chart_panels(
    report: Mapping[str, Any], feature: int, tensor: str | None = None
) -> list[ChartPanel]:
    """Panels for ``feature`` of ``tensor`` (default: the first tensor with views), per cohort.

    Raises:
        FleetDriftError: the report has no views (ask with ``views=1``), no such tensor or
            feature, or a malformed view.
    """
    cohorts = [c for c in report.get("cohorts", ()) if "view" in c]
    if not cohorts or "baselines" not in report:
        raise FleetDriftError("the drift report has no views to chart (query it with views)")
    tensor = tensor or cohorts[0]["tensor"]
    cohorts = [c for c in cohorts if c["tensor"] == tensor]
    if not cohorts:
        raise FleetDriftError(f"the drift report has no tensor {tensor!r}")
    try:
        bases = {
            (b["model"], b["version"], b["tensor"], b["role"]): TierAView.from_dict(b["view"])
            for b in report["baselines"]
        }
        panels = []
        for c in cohorts:
            view = TierAView.from_dict(c["view"])
            base = bases[(c["model"], c["version"], c["tensor"], c["role"])]
            if not 0 <= feature < view.n_features:
                raise FleetDriftError(f"{tensor} has features 0..{view.n_features - 1}")
            panels.append(ChartPanel(
                f"{c['cohort']} (v{c['version']})", c.get("bucket"), _shares(view, feature),
                _shares(base, feature), _labels(base, feature), c["features"][feature],
            ))  # fmt: skip
    except (ContractError, KeyError, TypeError, IndexError) as exc:
        raise FleetDriftError(f"malformed drift report: {exc}") from exc
    return panels


def _svg(panel: ChartPanel, width: int = 640, height: int = 180) -> str:
    k = len(panel.shares)
    top = max(max(panel.shares, default=0.0), max(panel.baseline, default=0.0), 1e-9)
    slot = (width - 40) / k
    bar = slot * 0.4
    colour = _DRIFT_COLOUR if panel.scores.get("drifted") else _COHORT_COLOUR
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 20}">']
    for i, (w, b, label) in enumerate(zip(panel.shares, panel.baseline, panel.labels, strict=True)):
        x = 30 + i * slot
        for dx, value, fill, who in ((0.0, b, _BASE_COLOUR, "baseline"), (bar, w, colour, "fleet")):
            h = value / top * (height - 10)
            parts.append(
                f'<rect x="{x + dx:.1f}" y="{height - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="rgb{fill}"><title>{html.escape(label)} {who}: {value:.3%}</title></rect>'
            )
        parts.append(f'<text x="{x:.1f}" y="{height + 14}" font-size="9">{i}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else html.escape(str(v)))


def _table(rows: Sequence[Sequence[Any]], head: Sequence[str]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def render_html(report: Mapping[str, Any], feature: int, tensor: str | None = None) -> str:
    """A self-contained HTML page (no scripts, no external resources).

    Raises:
        FleetDriftError: as ``chart_panels``.
    """
    panels = chart_panels(report, feature, tensor)
    tensor = tensor or report["cohorts"][0]["tensor"]
    score_keys = ("psi", "psi_threshold", "ks", "ks_threshold", "mean_shift",
                  "mean_shift_threshold", "n", "drifted")  # fmt: skip
    sections = []
    for p in panels:
        title = html.escape(p.cohort) + ("" if p.bucket is None else f" @ {p.bucket:.0f}")
        legend = " · ".join(f"{i}: {html.escape(lbl)}" for i, lbl in enumerate(p.labels))
        sections.append(
            f"<h3>{title}</h3>{_svg(p)}<p class='legend'>{legend}</p>"
            + _table([[p.scores.get(k) for k in score_keys]], score_keys)
        )
    drifted = [
        (
            d["model"],
            d["version"],
            d["role"],
            d["tensor"],
            d["feature"],
            d["bucket"],
            ", ".join(d["cohorts"]) or "-",
            ", ".join(d["devices"][:20]) or "-",
        )
        for d in report.get("drifted", ())
    ]
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>fleet drift</title><style>"
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}.legend{font-size:10px}"
        "</style></head><body>"
        f"<h1>Fleet drift: {html.escape(tensor)} feature {feature}</h1>"
        f"<p>cohorts by {html.escape(str(report.get('by', 'fleet')))}; grey = baseline, "
        "blue = merged fleet windows, red = drifted; bars are bucket shares "
        "(underflow, bins, overflow).</p>"
        + "".join(sections)
        + "<h2>Drifted features</h2>"
        + _table(
            drifted,
            (
                "model",
                "version",
                "role",
                "tensor",
                "feature",
                "bucket",
                "cohorts",
                "devices (first 20)",
            ),
        )
        + f"<p>skipped windows: {html.escape(str(report.get('skipped', {})))}</p>"
        + "</body></html>"
    )


def _png(pixels: np.ndarray[Any, np.dtype[np.uint8]]) -> bytes:
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def render_png(report: Mapping[str, Any], feature: int, tensor: str | None = None) -> bytes:
    """A PNG bar chart, one 640x120 panel per cohort (grey baseline, blue/red fleet bars).

    Raises:
        FleetDriftError: as ``chart_panels``.
    """
    panels = chart_panels(report, feature, tensor)
    width, ph = 640, 120
    img = np.full((ph * len(panels), width, 3), 255, dtype=np.uint8)
    for n, p in enumerate(panels):
        y0 = n * ph
        img[y0 + ph - 1, :, :] = 200  # panel separator
        top = max(max(p.shares, default=0.0), max(p.baseline, default=0.0), 1e-9)
        slot = (width - 20) // len(p.shares)
        bar = max(1, int(slot * 0.4))
        colour = _DRIFT_COLOUR if p.scores.get("drifted") else _COHORT_COLOUR
        for i, (w, b) in enumerate(zip(p.shares, p.baseline, strict=True)):
            x = 10 + i * slot
            for dx, value, fill in ((0, b, _BASE_COLOUR), (bar, w, colour)):
                h = round(value / top * (ph - 12))
                if h:
                    img[y0 + ph - 2 - h : y0 + ph - 2, x + dx : x + dx + bar] = fill
    return _png(img)
