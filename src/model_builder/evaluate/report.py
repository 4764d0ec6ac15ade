"""The build report as a terminal table (the same figures are stored as JSON in the bundle).

Owns the text only: float vs quantized, the gate, the contract check and, when the build was
compared with a champion (``--compare-to``), a short champion vs challenger table with the
classes that regressed and what they are now predicted as. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model_builder.evaluate.compare import comparison_figures

#: Classes shown under the comparison (those with the largest recall drop first).
_SHOWN_CLASSES = 5


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
    if report.get("comparison"):
        lines.extend(render_comparison(report["comparison"]))
    if report.get("excluded_nodes"):
        lines.append("kept in float by the rescue search: " + ", ".join(report["excluded_nodes"]))
    lines.append(f"build time: {report.get('build_seconds', 0):.1f} s")
    return "\n".join(lines)


def render_comparison(section: Mapping[str, Any]) -> list[str]:
    """Champion vs challenger: accuracy of both, the change and McNemar's z, the classes whose
    recall dropped beyond the limit (each with the classes it now flips to), and the verdict."""
    c = comparison_figures(section)
    who = section.get("champion_bundle") or {}
    limits = section.get("limits") or {}
    a, b = c.champion.accuracy(), c.challenger.accuracy()
    lines = [
        f"compared with {who.get('name')} v{who.get('version')} "
        f"(bundle sha256 {str(who.get('sha256', ''))[:12]}) on {c.n} labelled samples"
    ]
    rows: list[tuple[str, str, str, str, str]] = [("", "champion", "challenger", "change", "")]
    if a is not None and b is not None:
        rows.append(("accuracy", f"{a:.2%}", f"{b:.2%}", f"{(b - a) * 100:+.2f} pt", ""))
    z = float(section.get("mcnemar_z", 0.0))
    rows.append(
        (
            "McNemar",
            f"{c.champion_only} only",
            f"{c.challenger_only} only",
            f"z={z:.1f}",
            "(right by one model only)",
        )
    )
    max_drop = float(limits.get("max_recall_drop", 0.0))
    dropped = sorted(
        (d, k) for k, d in enumerate(c.recall_deltas()) if d is not None and -d > max_drop
    )
    for d, k in dropped[:_SHOWN_CLASSES]:
        ra, rb = c.champion.recall(k), c.challenger.recall(k)
        into = [
            f"{p} ({n})" for t, p, n in c.challenger.flips(top=c.champion.n_classes**2) if t == k
        ][:3]
        rows.append(
            (
                f"class {k} recall",
                f"{ra or 0:.2%}",
                f"{rb or 0:.2%}",
                f"{d * 100:+.2f} pt",
                "now predicted as " + ", ".join(into) if into else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        cells = [r[0].ljust(widths[0]), *(r[i].rjust(widths[i]) for i in (1, 2, 3))]
        lines.append("  ".join([*cells, r[4]]).rstrip())
    verdict = section.get("verdict") or {}
    allowed = section.get("allowed_regression")
    state = "REGRESSED" if verdict.get("regressed") else "no regression"
    if verdict.get("regressed") and allowed:
        state += f" (allowed: {allowed})"
    lines.append(
        f"comparison: {state} (limits: accuracy -{float(limits.get('max_accuracy_drop', 0)):.1%}"
        f", class recall -{max_drop:.1%}, z > {float(limits.get('z', 0)):.2f})"
    )
    lines.extend(f"regression: {r}" for r in verdict.get("reasons", []))
    lines.extend(f"note: {n}" for n in verdict.get("notes", []))
    return lines
