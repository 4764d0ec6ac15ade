"""Turning service values into what the console's pages show: pure functions, no I/O.

Owns: the per-window telemetry series of one device (requests, p99 latency, rejects and the
fallback rate per model, from its cumulative report counters), its events and drift alerts,
flat key/value rows of nested documents (a manifest's provenance and quantization report, a
reported state), the gate history of a rollout from its decision log, the fallback summary of
recent reports and events, and the rollout policy form's fields with ``RolloutPolicy``'s
defaults. Device-supplied values pass through as data (strings cut to a bound); escaping is
the templates' (autoescape) and ``fleet_server.console.charts``'.

Does not own: reading (the pages call the service objects) nor drawing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Final

from fleet_server.console.charts import Series
from fleet_server.errors import RolloutPolicyError
from fleet_server.registry.values import StoredTelemetry
from fleet_server.rollouts.policy import RolloutPolicy, Thresholds

__all__ = [
    "MAX_TEXT",
    "PolicyField",
    "TelemetrySeries",
    "clip",
    "device_series",
    "events_of",
    "fallback_summary",
    "flat_rows",
    "gate_history",
    "policy_fields",
    "policy_from_form",
]

#: Device-supplied text is cut to this many characters wherever a page shows it.
MAX_TEXT: Final = 200
_MAX_ROWS: Final = 200


def clip(value: Any, limit: int = MAX_TEXT) -> str:
    """``value`` as text of at most ``limit`` characters (an ellipsis marks a cut)."""
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _counts(m: Any) -> dict[str, float]:
    if not isinstance(m, Mapping):
        return {}
    return {str(k): f for k, v in m.items() if (f := _num(v)) is not None}


@dataclass(frozen=True)
class TelemetrySeries:
    """One device's recent telemetry per model, as chart series (per report window)."""

    requests: tuple[Series, ...]
    latency: tuple[Series, ...]
    rejects: tuple[Series, ...]
    fallback: tuple[Series, ...]


def device_series(reports: Iterable[StoredTelemetry]) -> TelemetrySeries:
    """Per model: requests, rejected requests and the cloud-fallback share of each report
    window (differences of the cumulative counters; a restart of the agent starts again from
    its own counts) and the p99 latency the report states, at the window's end.

    ``reports`` are the device's stored reports, oldest first; malformed parts are skipped.
    """
    last: dict[str, tuple[float, float, float, float]] = {}  # model -> started, total, rej, cloud
    req: dict[str, list[tuple[float, float]]] = {}
    lat: dict[str, list[tuple[float, float]]] = {}
    rej: dict[str, list[tuple[float, float]]] = {}
    fb: dict[str, list[tuple[float, float]]] = {}
    for row in reports:
        p = row.payload
        at = _num(p.get("window_end"))
        started = _num(p.get("started_at")) or 0.0
        models = p.get("models")
        if at is None or not isinstance(models, Mapping):
            continue
        for name, m in list(models.items())[:32]:
            if not isinstance(m, Mapping):
                continue
            key = clip(name, 64)
            outcomes, sources = _counts(m.get("outcomes")), _counts(m.get("sources"))
            total, rejected = sum(outcomes.values()), outcomes.get("rejected", 0.0)
            cloud = sources.get("cloud", 0.0)
            prev = last.get(key)
            if prev is not None and prev[0] == started and total >= prev[1]:
                d_total, d_rej, d_cloud = total - prev[1], rejected - prev[2], cloud - prev[3]
            else:
                d_total, d_rej, d_cloud = total, rejected, cloud
            last[key] = (started, total, rejected, cloud)
            req.setdefault(key, []).append((at, d_total))
            rej.setdefault(key, []).append((at, max(0.0, d_rej)))
            if d_total > 0:
                fb.setdefault(key, []).append((at, max(0.0, d_cloud) / d_total))
            quantiles = m.get("latency_ms")
            p99 = _num(quantiles.get("p99")) if isinstance(quantiles, Mapping) else None
            if p99 is not None:
                lat.setdefault(key, []).append((at, p99))

    def series(d: Mapping[str, list[tuple[float, float]]]) -> tuple[Series, ...]:
        return tuple(Series(k, tuple(v)) for k, v in sorted(d.items()))

    return TelemetrySeries(series(req), series(lat), series(rej), series(fb))


def events_of(rows: Iterable[StoredTelemetry]) -> list[dict[str, Any]]:
    """The events among ``rows``, newest first, with their fields clipped."""
    out = []
    for row in rows:
        if row.kind != "event":
            continue
        p = row.payload
        out.append(
            {
                "at": _num(p.get("at")),
                "received_at": row.received_at,
                "device_id": clip(row.device_id, 128),
                "kind": clip(p.get("kind", ""), 64),
                "model": None if p.get("model") is None else clip(p.get("model"), 128),
                "version": p.get("version") if _num(p.get("version")) is not None else None,
                "detail": clip(p.get("detail", "") or "", 1024),
            }
        )
    return out[::-1]


def flat_rows(doc: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """A nested JSON document as ``(dotted.key, value)`` rows (bounded in depth and count)."""
    rows: list[tuple[str, str]] = []
    if isinstance(doc, Mapping) and depth < 5:
        for k, v in list(doc.items())[:_MAX_ROWS]:
            rows += flat_rows(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)
    elif isinstance(doc, list | tuple) and depth < 5 and doc and isinstance(doc[0], Mapping):
        for i, v in enumerate(doc[:20]):
            rows += flat_rows(v, f"{prefix}[{i}]", depth + 1)
    else:
        text = (
            ", ".join(clip(x, 40) for x in doc[:32])
            if isinstance(doc, list | tuple)
            else ("" if doc is None else str(doc))
        )
        rows.append((clip(prefix, 120), clip(text)))
    return rows[:_MAX_ROWS]


def gate_history(events: Sequence[Mapping[str, Any]]) -> dict[str, tuple[Series, Series]]:
    """Per gate, its measured values and thresholds over the decision log's ``gates``.

    ``events`` are the rollout's events (``{"at", "kind", "detail"}``) oldest first; a
    decision's detail lists the gates it measured.
    """
    measured: dict[str, list[tuple[float, float]]] = {}
    limit: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        gates = e.get("detail", {}).get("gates")
        try:
            at = datetime.fromisoformat(str(e.get("at"))).timestamp()
        except ValueError:
            continue
        for g in gates if isinstance(gates, list) else []:
            if not isinstance(g, Mapping):
                continue
            name = clip(g.get("name", "?"), 64)
            m, t = _num(g.get("measured")), _num(g.get("threshold"))
            if m is not None:
                measured.setdefault(name, []).append((at, m))
            if t is not None:
                limit.setdefault(name, []).append((at, t))
    return {
        name: (
            Series("measured", tuple(measured.get(name, ()))),
            Series("threshold", tuple(limit.get(name, ())), dashed=True),
        )
        for name in sorted(set(measured) | set(limit))
    }


def fallback_summary(rows: Iterable[StoredTelemetry]) -> dict[str, Any]:
    """From recent stored telemetry: per model the cloud share of requests over each device's
    latest report (cumulative since its agent started), and per device the last circuit
    breaker event (``open`` or ``closed``) with its detail."""
    latest: dict[str, Mapping[str, Any]] = {}
    breakers: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.kind == "report":
            latest[row.device_id] = row.payload
        elif row.kind == "event" and str(row.payload.get("kind", "")).startswith(
            "fallback_breaker_"
        ):
            breakers[row.device_id] = {
                "device_id": clip(row.device_id, 128),
                "state": str(row.payload["kind"]).removeprefix("fallback_breaker_"),
                "model": clip(row.payload.get("model") or "", 128),
                "detail": clip(row.payload.get("detail") or ""),
                "at": row.received_at,
            }
    models: dict[str, list[float]] = {}
    for payload in latest.values():
        table = payload.get("models")
        for name, m in table.items() if isinstance(table, Mapping) else ():
            if not isinstance(m, Mapping):
                continue
            sources = _counts(m.get("sources"))
            entry = models.setdefault(clip(name, 64), [0.0, 0.0, 0.0])
            entry[0] += sources.get("cloud", 0.0)
            entry[1] += sum(sources.values())
            entry[2] += 1
    rates = [
        {"model": k, "cloud": v[0], "total": v[1], "devices": int(v[2]),
         "rate": (v[0] / v[1]) if v[1] else None}
        for k, v in sorted(models.items())
    ]  # fmt: skip
    return {
        "models": rates,
        "breakers": sorted(breakers.values(), key=lambda b: (b["state"] != "open", b["device_id"])),
        "devices": len(latest),
    }


@dataclass(frozen=True)
class PolicyField:
    """One input of the rollout policy form: its name (``thresholds.x`` for a threshold), the
    default shown, and its kind (``number``, ``int``, ``bool``, ``choice``, ``steps``)."""

    name: str
    default: str
    kind: str
    nullable: bool = False

    @property
    def label(self) -> str:
        """The name the form shows (a threshold without its ``thresholds.`` prefix)."""
        return self.name.removeprefix("thresholds.")

    @property
    def hint(self) -> str:
        """What leaving the field empty does."""
        if self.name == "canary_count":
            return "empty: canary_fraction decides"
        return "empty: off" if self.nullable else ""


_KINDS: Final = {
    "canary_fraction": "number",
    "canary_count": "int",
    "steps": "steps",
    "exponential": "number",
    "dwell_seconds": "number",
    "min_devices": "int",
    "min_requests": "int",
    "approval": "bool",
    "on_breach": "choice",
    "rollback_on_abort": "bool",
    "quarantine_after": "int",
    "z": "number",
    "shadow_fraction": "number",
    "shadow_dwell_seconds": "number",
}
_NULLABLE: Final = frozenset({"canary_count", "exponential", "shadow_fraction"})


def _shown(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "on" if v else ""
    if isinstance(v, tuple | list):
        return ", ".join(f"{x:g}" for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def policy_fields() -> list[PolicyField]:
    """The policy form's fields with ``RolloutPolicy()``'s defaults (an empty nullable field
    turns that option or gate off)."""
    d = RolloutPolicy()
    out = [
        PolicyField(name, _shown(getattr(d, name)), kind, name in _NULLABLE)
        for name, kind in _KINDS.items()
    ]
    for f in fields(Thresholds):
        v = getattr(d.thresholds, f.name)
        kind = "int" if f.metadata.get("check") == "count" else "number"
        out.append(PolicyField(f"thresholds.{f.name}", _shown(v), kind, "None" in str(f.type)))
    return out


def _parse(field: PolicyField, raw: str) -> Any:
    """One form value as the policy's JSON value. Raises: RolloutPolicyError."""
    if field.kind == "bool":
        return raw == "on"
    if field.kind == "choice":
        return raw
    try:
        if field.kind == "steps":
            return [float(x) for x in raw.replace(" ", "").split(",") if x]
        if field.kind == "int":
            return int(raw)
        value = float(raw)
    except ValueError:
        raise RolloutPolicyError(f"{field.name} must be a number, got {clip(raw, 40)!r}") from None
    if not math.isfinite(value):
        raise RolloutPolicyError(f"{field.name} must be a finite number")
    return value


def policy_from_form(form: Mapping[str, str]) -> dict[str, Any]:
    """The policy JSON (``RolloutPolicy.from_dict``'s input) a submitted form describes.

    A field left at its default is still sent (the form shows every default); an empty
    nullable field is ``null`` (that option or gate off); an empty other field is left out
    (the default applies). A checkbox that is absent is false.

    Raises:
        RolloutPolicyError: a value is not a number (the message names the field).
    """
    policy: dict[str, Any] = {}
    thresholds: dict[str, Any] = {}
    for f in policy_fields():
        raw = form.get(f.name, "").strip()[:64]
        if f.kind != "bool" and raw == "":
            if not f.nullable:
                continue
            value: Any = None
        else:
            value = _parse(f, raw)
        if f.name.startswith("thresholds."):
            thresholds[f.name.removeprefix("thresholds.")] = value
        else:
            policy[f.name] = value
    policy["thresholds"] = thresholds
    return policy
