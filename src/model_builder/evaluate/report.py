"""The build report as a terminal table (the same figures are stored as JSON in the bundle)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _latency(side: Mapping[str, Any], batch: int) -> Mapping[str, Any] | None:
    perf = side.get("perf")
    if not perf:
        return None
    return next((row for row in perf["latency"] if row["batch"] == batch), None)


def render_table(report: Mapping[str, Any]) -> str:
    """Float vs quantized: size, metric, agreement, batch-1 latency and batch-64 throughput."""
    f, q = report["float"], report["quantized"]
    metric = str(report.get("metric", "accuracy"))
    rows: list[tuple[str, str, str, str]] = []
    fs, qs = f["size_bytes"], q["size_bytes"]
    rows.append(("size", f"{fs / 1024:,.1f} KiB", f"{qs / 1024:,.1f} KiB", f"{qs / fs:.2f}x"))
    fv, qv = float(f["value"]), float(q["value"])
    if metric == "accuracy":
        rows.append((metric, f"{fv:.2%}", f"{qv:.2%}", f"{(qv - fv) * 100:+.2f} pt"))
    else:
        rows.append((metric, f"{fv:.4g}", f"{qv:.4g}", f"{qv - fv:+.4g}"))
    rows.append(("top-1 agreement", "", f"{float(report['agreement']):.2%}", ""))
    f1, q1 = _latency(f, 1), _latency(q, 1)
    if f1 and q1:
        rows.append(
            (
                "batch-1 latency",
                f"{f1['median_ms'] * 1000:,.0f} us",
                f"{q1['median_ms'] * 1000:,.0f} us",
                f"{q1['median_ms'] / f1['median_ms']:.2f}x",
            )
        )
    f64, q64 = _latency(f, 64), _latency(q, 64)
    if f64 and q64:
        rows.append(
            (
                "batch-64 throughput",
                f"{f64['throughput']:,.0f}/s",
                f"{q64['throughput']:,.0f}/s",
                f"{q64['throughput'] / f64['throughput']:.2f}x",
            )
        )
    head = (
        "",
        "float",
        f"{report.get('mode', 'quantized')} ({report.get('target', '')})",
        "change",
    )
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(4)]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in (head, *rows)
    ]
    gate = report["gate"]
    verdict = "PASSED" if gate["passed"] else "FAILED"
    lines.append(
        f"gate: {verdict} (drop {gate['abs_drop'] * 100:.2f} pt abs, {gate['rel_drop']:.2%} rel)"
    )
    lines.extend(f"warning: {w}" for w in gate.get("warnings", []))
    check = report.get("contract_check")
    if check:
        refused = int(check.get("refused_rows", 0))
        lines.append(
            f"contract ({check.get('source', 'given')}): "
            + (
                f"refuses {refused} of {check['rows']} evaluation rows "
                f"({refused / max(1, int(check['rows'])):.1%})"
                if refused
                else f"accepts all {check['rows']} evaluation rows"
            )
        )
    if report.get("excluded_nodes"):
        lines.append("kept in float by the rescue search: " + ", ".join(report["excluded_nodes"]))
    lines.append(f"build time: {report.get('build_seconds', 0):.1f} s")
    return "\n".join(lines)
