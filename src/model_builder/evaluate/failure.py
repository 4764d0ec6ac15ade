"""The build report of a model that failed the accuracy gate, and the diagnosis. Pure.

Owns: turning what the gate and the rescue search recorded (``AccuracyGateError.report``) into the
same report shape a passing build writes (``mode``, ``target``, ``metric``, ``float``,
``quantized``, ``agreement``, ``gate``, ``rescue``, ``calibration``, ``contract_check``), with
``diagnosis``: the likely causes, most specific first, each with what to try. Does not own:
writing files or printing (``build_cli``), or the gate itself (``gate``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Below this share of the float metric the quantized model has lost most of what it knew: a
# systematic cause (ranges, normalisation), not rounding noise.
_COLLAPSE_SHARE = 0.5


def failure_report(
    gate: Mapping[str, Any],
    *,
    mode: str,
    target: str,
    fmt: str,
    policy: Mapping[str, float],
    contract_check: Mapping[str, Any] | None,
    seconds: float,
) -> dict[str, Any]:
    """The full report of a failed build from ``AccuracyGateError.report``.

    ``quantized`` holds the plain quantized model's figures; ``rescue.best`` the best trial of
    the rescue search when it ran.
    """
    initial: Mapping[str, Any] = gate.get("initial") or {}
    float_m: Mapping[str, Any] = gate.get("float") or {}
    trials = [*gate.get("single_trials", []), *gate.get("greedy_trials", [])]
    rescue = None
    if "single_trials" in gate:
        best = max(trials, key=lambda t: float(t["value"]), default=None)
        rescue = {
            "max_exclusions": gate.get("max_exclusions"),
            "single_trials": list(gate.get("single_trials", [])),
            "greedy_trials": list(gate.get("greedy_trials", [])),
            "best": best,
        }
    report: dict[str, Any] = {
        "mode": mode,
        "target": target,
        "format": fmt,
        "metric": float_m.get("metric", "accuracy"),
        "float": {"value": initial.get("float_value", float_m.get("value"))},
        "quantized": {"value": initial.get("quant_value")},
        "agreement": initial.get("agreement"),
        "gate": {
            "passed": False,
            "abs_drop": initial.get("abs_drop"),
            "rel_drop": initial.get("rel_drop"),
            "warnings": list(initial.get("warnings", [])),
            "reasons": list(initial.get("reasons", [])),
            "policy": dict(policy),
        },
        "excluded_nodes": [],
        "rescue": rescue,
        "calibration": dict(gate.get("calibration") or {}),
        "contract_check": dict(contract_check) if contract_check is not None else None,
        "eval_samples": float_m.get("samples"),
        "build_seconds": round(seconds, 3),
    }
    report["diagnosis"] = diagnose(report)
    return report


def diagnose(report: Mapping[str, Any]) -> list[str]:
    """Likely causes of a gate failure, most specific first, each naming what to try. Pure."""
    out: list[str] = []
    for name, stats in (report.get("calibration") or {}).items():
        if stats.get("looks_unnormalised"):
            out.append(
                f"calibration input {name!r} looks un-normalised after preprocessing "
                f"(99% of |x| <= {stats.get('p99_abs', 0):.3g}, mean {stats.get('mean', 0):.3g}):"
                " a missing normalisation step in the contract's preprocessing is the usual "
                "culprit"
            )
    f_value, q_value = report["float"].get("value"), report["quantized"].get("value")
    numbers = isinstance(f_value, float | int) and isinstance(q_value, float | int)
    if numbers and f_value > 0 and q_value < _COLLAPSE_SHARE * f_value:
        out.append(
            f"the quantized model kept {q_value / f_value:.0%} of the float "
            f"{report.get('metric', 'metric')} ({f_value:.4f} -> {q_value:.4f}): int8 "
            "ranges are likely stretched by a few extreme weights or activations (outliers);"
            " keep those layers in float (the rescue search) or use --mode dynamic"
        )
    out.extend(_rescue_advice(report))
    check = report.get("contract_check") or {}
    if check.get("refused_rows"):
        out.append(
            f"the contract refuses {check['refused_rows']} of {check['rows']} evaluation rows: "
            "the calibration data may not cover what the model sees; calibrate on data drawn "
            "like the evaluation set"
        )
    if not out:
        out.append(
            "no single cause stands out: try more (and more varied) calibration samples, "
            "--mode dynamic, or a looser gate (--max-abs-drop/--max-rel-drop) if the drop is "
            "acceptable"
        )
    return out


def _rescue_advice(report: Mapping[str, Any]) -> list[str]:
    if report.get("format") == "tflite":
        return [
            "TFLite has no per-node rescue search here: try --mode dynamic (int8 weights, "
            "float activations)"
        ]
    rescue = report.get("rescue")
    if rescue is None:
        return [
            "the rescue search did not run (--no-rescue): rerun without it to search for "
            "nodes to keep in float"
        ]
    best = rescue.get("best")
    if not best:
        return ["the model has no quantizable node the rescue search could keep in float"]
    tried = len(rescue.get("single_trials", [])) + len(rescue.get("greedy_trials", []))
    return [
        f"the rescue search tried {tried} exclusion sets (at most {rescue.get('max_exclusions')}"
        f" nodes in float); the best kept {_names(best.get('excluded', []))} in float and scored "
        f"{float(best['value']):.4f}: raise --max-exclusions, or try --mode dynamic"
    ]


def _names(names: Sequence[str]) -> str:
    shown = list(names)[:4]
    more = f" and {len(names) - 4} more" if len(names) > 4 else ""
    return "[" + ", ".join(shown) + "]" + more


def render_failure(report: Mapping[str, Any]) -> str:
    """The failed build as a few terminal lines: figures, reasons, diagnosis."""
    metric = str(report.get("metric", "accuracy"))
    f_value, q_value = report["float"].get("value"), report["quantized"].get("value")
    lines = [f"gate: FAILED ({report.get('mode')} {report.get('target')})"]
    if f_value is not None and q_value is not None:
        lines.append(f"{metric}: float {f_value:.4f}, quantized {q_value:.4f}")
    if report.get("agreement") is not None:
        lines.append(f"top-1 agreement: {float(report['agreement']):.2%}")
    lines.extend(f"reason: {r}" for r in report["gate"].get("reasons", []))
    for name, stats in (report.get("calibration") or {}).items():
        lines.append(
            f"calibration {name}: min {stats.get('min', 0):.3g} max {stats.get('max', 0):.3g} "
            f"mean {stats.get('mean', 0):.3g} std {stats.get('std', 0):.3g}"
            + (" (looks un-normalised)" if stats.get("looks_unnormalised") else "")
        )
    lines.extend(f"diagnosis: {d}" for d in report.get("diagnosis", []))
    return "\n".join(lines)
