"""Telemetry payloads: schema validity, strict parsing, round trips, golden bytes, the builder."""

from __future__ import annotations

import copy
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from referencing import Registry, Resource

from edge_agent.drift import DriftMonitor, MonitorPolicy, TierASketch, build_baseline, fit_edges
from edge_agent.errors import ContractError
from edge_agent.wire.telemetry import (
    LATENCY_BUCKETS_MS,
    MAX_PAYLOAD_BYTES,
    Batch,
    DriftSummary,
    Event,
    ModelStats,
    Resources,
    ShadowStats,
    StatusMessage,
    TelemetryAck,
    TelemetryReport,
    decode_message,
    event_from_registry,
    latency_histogram,
    report_from_status,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "telemetry"


def _schema(name: str) -> dict[str, Any]:
    text = resources.files("edge_agent").joinpath(f"schemas/{name}.schema.json").read_text()
    return dict(json.loads(text))


REPORT_SCHEMA = _schema("telemetry-report")
EVENT_SCHEMA = _schema("event")
STATUS_SCHEMA = _schema("status")
REGISTRY: Registry[Any] = Registry().with_resources(
    (s["$id"], Resource.from_contents(s)) for s in (REPORT_SCHEMA, EVENT_SCHEMA, STATUS_SCHEMA)
)


def validate(instance: Any, schema: dict[str, Any]) -> None:
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    cls(schema, registry=REGISTRY).validate(instance)


def validate_ack(instance: Any) -> None:
    validate(instance, {"$ref": REPORT_SCHEMA["$id"] + "#/$defs/ack"})


def tier_a_bytes() -> bytes:
    x = np.arange(40, dtype=np.float64).reshape(20, 2)
    sketch = TierASketch.zero(fit_edges(x, n_bins=4))
    sketch.update(np.vstack([x, [[np.nan, 100.0]]]))
    return sketch.view().to_bytes()


def make_report(seq: int = 7) -> TelemetryReport:
    """A fixed, fully populated report (also the golden file's content)."""
    window = DriftSummary(
        tensor="image",
        role="input",
        start=100.0,
        end=160.0,
        reason="time",
        rows=21,
        view=tier_a_bytes(),
        alert=True,
        drifted=(1,),
        max_psi=0.31,
        max_js=0.05,
        max_ks=None,
    )
    model = ModelStats(
        version=3,
        on_probation=True,
        outcomes={"ok": 120, "error": 1, "rejected": 2},
        sources={"device": 118, "cloud": 2},
        latency_buckets=(5, 40, 60, 10, 3, 1, 1, 0, 0, 0, 0, 1),
        latency_ms={"p50": 1.8, "p90": 4.2, "p99": 31.0},
        rejects_by_reason={"nan": 2},
        dropped_rows_by_reason={"out_of_range": 4},
        drift=(window,),
        shadow=ShadowStats(
            counts={"offered": 50, "compared": 40, "agree_rows": 39, "disagree_rows": 1},
            agreement=0.975,
            live_p50_ms=1.5,
            live_p99_ms=9.0,
        ),
        ab={"a": 60, "b": 63},
    )
    return TelemetryReport(
        device_id="dev-1",
        seq=seq,
        window_start=1_795_000_000.0,
        window_end=1_795_000_060.0,
        started_at=1_794_990_000.0,
        agent_version="0.1.0",
        models={"digits": model},
        counts={"device": 118, "cloud": 2, "rejected": 2, "errors": 1},
        resources=Resources(rss_bytes=52_428_800, cpu_seconds=12.5, model_memory_bytes=1_000_000),
        telemetry_dropped={"report": 3},
        drift_blocks_dropped=0,
    )


def make_event(seq: int = 8) -> Event:
    return Event(
        device_id="dev-1",
        seq=seq,
        kind="installed",
        at=1_795_000_061.5,
        model="digits",
        version=3,
        detail="sha256 ok",
    )


def make_status() -> StatusMessage:
    return StatusMessage(
        device_id="dev-1", state="offline", at=1_795_000_000.0, reason="connection_lost"
    )


def make_batch() -> Batch:
    return Batch(device_id="dev-1", items=(make_report(7), make_event(8), make_report(10)))


# ----------------------------------------------------------------------- schemas
def test_schemas_are_valid_draft_2020_12() -> None:
    for schema in (REPORT_SCHEMA, EVENT_SCHEMA, STATUS_SCHEMA):
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize(
    ("obj", "schema"),
    [
        (make_report(), REPORT_SCHEMA),
        (TelemetryReport("d", 0, 1.0, 1.0, resources=Resources()), REPORT_SCHEMA),
        (make_batch(), REPORT_SCHEMA),
        (make_event(), EVENT_SCHEMA),
        (Event("d", 0, "drift_alert", 0.0), EVENT_SCHEMA),
        (make_status(), STATUS_SCHEMA),
        (StatusMessage("d", "online", 5.0), STATUS_SCHEMA),
    ],
)
def test_to_dict_validates_against_schema(obj: Any, schema: dict[str, Any]) -> None:
    validate(obj.to_dict(), schema)
    validate(json.loads(obj.to_bytes()), schema)


def test_ack_validates() -> None:
    validate_ack(TelemetryAck("dev-1", 41).to_dict())
    with pytest.raises(jsonschema.ValidationError):
        validate_ack({**TelemetryAck("dev-1", 41).to_dict(), "upto_seq": -1})


# ------------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    "obj",
    [make_report(), make_event(), make_status(), make_batch(), TelemetryAck("dev-1", 9)],
    ids=["report", "event", "status", "batch", "ack"],
)
def test_round_trip(obj: Any) -> None:
    cls = type(obj)
    assert cls.from_dict(obj.to_dict()) == obj
    data = obj.to_bytes()
    assert cls.from_bytes(data) == obj
    assert cls.from_bytes(data).to_bytes() == data
    assert decode_message(data) == obj


def test_to_bytes_is_canonical() -> None:
    data = make_report().to_bytes()
    assert data == json.dumps(
        json.loads(data), sort_keys=True, separators=(",", ":"), allow_nan=False
    ).encode("ascii")
    assert b" " not in data


def test_drift_view_travels_intact() -> None:
    report = TelemetryReport.from_bytes(make_report().to_bytes())
    view = report.models["digits"].drift[0].tier_a_view()
    assert view.to_bytes() == tier_a_bytes()
    assert int(view.nan.sum()) == 1


def test_unknown_keys_are_ignored_for_forward_compatibility() -> None:
    d = make_report().to_dict()
    d["new_optional_field"] = {"anything": 1}
    d["models"]["digits"]["new_model_field"] = [1, 2]
    assert TelemetryReport.from_dict(d) == make_report()
    validate(d, REPORT_SCHEMA)


# ----------------------------------------------------------------------- golden
@pytest.mark.parametrize(
    ("name", "obj"),
    [
        ("report-v1.json", make_report()),
        ("event-v1.json", make_event()),
        ("status-v1.json", make_status()),
        ("batch-v1.json", make_batch()),
        ("ack-v1.json", TelemetryAck("dev-1", 9)),
    ],
)
def test_golden_files(name: str, obj: Any) -> None:
    """Committed bytes: never regenerate; a failure here is a wire-format change."""
    golden = (FIXTURES / name).read_bytes().rstrip(b"\n")
    assert type(obj).from_bytes(golden) == obj
    assert obj.to_bytes() == golden


# ------------------------------------------------------------- malformed payloads
def _set(path: tuple[Any, ...], value: Any) -> Any:
    def edit(d: dict[str, Any]) -> dict[str, Any]:
        d = copy.deepcopy(d)
        target: Any = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return d

    return edit


def _drop(path: tuple[Any, ...]) -> Any:
    def edit(d: dict[str, Any]) -> dict[str, Any]:
        d = copy.deepcopy(d)
        target: Any = d
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return d

    return edit


M = ("models", "digits")
W = (*M, "drift", 0)
REPORT_CASES = [
    ("schema_version_2", _set(("schema_version",), 2)),
    ("schema_version_str", _set(("schema_version",), "1")),
    ("schema_version_bool", _set(("schema_version",), True)),
    ("no_schema_version", _drop(("schema_version",))),
    ("wrong_type", _set(("type",), "event")),
    ("no_device", _drop(("device_id",))),
    ("bad_device", _set(("device_id",), "Dev/1")),
    ("seq_negative", _set(("seq",), -1)),
    ("seq_float", _set(("seq",), 7.0)),
    ("seq_bool", _set(("seq",), True)),
    ("seq_huge", _set(("seq",), 2**60)),
    ("seq_str", _set(("seq",), "7")),
    ("no_seq", _drop(("seq",))),
    ("window_reversed", _set(("window_end",), 1.0)),
    ("window_str", _set(("window_start",), "now")),
    ("no_models", _drop(("models",))),
    ("models_list", _set(("models",), [])),
    ("model_name", _set(("models",), {"bad name!": {}})),
    ("no_version", _drop((*M, "version"))),
    ("version_negative", _set((*M, "version"), -3)),
    ("buckets_short", _set((*M, "latency_buckets"), [0] * 3)),
    ("bucket_negative", _set((*M, "latency_buckets"), [-1] + [0] * 11)),
    ("outcome_float", _set((*M, "outcomes", "ok"), 1.5)),
    ("outcome_key", _set((*M, "outcomes"), {"": 1})),
    ("rejects_list", _set((*M, "rejects_by_reason"), [1])),
    ("probation_int", _set((*M, "on_probation"), 1)),
    ("latency_negative", _set((*M, "latency_ms", "p50"), -1.0)),
    ("shadow_str", _set((*M, "shadow"), "x")),
    ("shadow_agreement_str", _set((*M, "shadow", "agreement"), "high")),
    ("window_role", _set((*W, "role"), "hidden")),
    ("window_b64", _set((*W, "view"), "not base64!")),
    ("window_view_garbage", _set((*W, "view"), "AAAA")),
    ("window_alert_str", _set((*W, "alert"), "yes")),
    ("window_no_rows", _drop((*W, "rows"))),
    ("no_resources", _drop(("resources",))),
    ("rss_negative", _set(("resources", "rss_bytes"), -1)),
    ("cpu_str", _set(("resources", "cpu_seconds"), "1s")),
    ("no_dropped", _drop(("telemetry_dropped",))),
    ("dropped_negative", _set(("telemetry_dropped", "report"), -3)),
]


@pytest.mark.parametrize(("name", "edit"), REPORT_CASES, ids=[c[0] for c in REPORT_CASES])
def test_malformed_reports_raise(name: str, edit: Any) -> None:
    bad = edit(make_report().to_dict())
    with pytest.raises(ContractError):
        TelemetryReport.from_dict(bad)
    # JSON Schema counts 7.0 as an integer; base64 content, window order and
    # the model-name rule on keys are checked by code only.
    code_only = ("seq_float", "window_b64", "window_view_garbage", "window_reversed")
    if name not in (*code_only, "model_name"):
        # The schema catches the same problems.
        with pytest.raises(jsonschema.ValidationError):
            validate(bad, REPORT_SCHEMA)


EVENT_CASES = [
    ("kind_unknown", _set(("kind",), "exploded")),
    ("kind_missing", _drop(("kind",))),
    ("at_missing", _drop(("at",))),
    ("at_negative", _set(("at",), -1)),
    ("version_str", _set(("version",), "3")),
    ("model_int", _set(("model",), 3)),
    ("detail_long", _set(("detail",), "x" * 2000)),
    ("schema_version", _set(("schema_version",), 99)),
    ("type", _set(("type",), "report")),
]


@pytest.mark.parametrize(("name", "edit"), EVENT_CASES, ids=[c[0] for c in EVENT_CASES])
def test_malformed_events_raise(name: str, edit: Any) -> None:
    bad = edit(make_event().to_dict())
    with pytest.raises(ContractError):
        Event.from_dict(bad)
    with pytest.raises(jsonschema.ValidationError):
        validate(bad, EVENT_SCHEMA)


STATUS_CASES = [
    ("state", _set(("state",), "sleeping")),
    ("reason", _set(("reason",), "cosmic_ray")),
    ("at", _drop(("at",))),
    ("device", _set(("device_id",), "")),
]


@pytest.mark.parametrize(("name", "edit"), STATUS_CASES, ids=[c[0] for c in STATUS_CASES])
def test_malformed_status_raise(name: str, edit: Any) -> None:
    bad = edit(make_status().to_dict())
    with pytest.raises(ContractError):
        StatusMessage.from_dict(bad)
    with pytest.raises(jsonschema.ValidationError):
        validate(bad, STATUS_SCHEMA)


BATCH_CASES = [
    ("empty", _set(("items",), [])),
    ("not_list", _set(("items",), {})),
    ("item_type", _set(("items", 1, "type"), "status")),
    ("other_device", _set(("items", 1, "device_id"), "dev-2")),
    ("seq_order", _set(("items", 1, "seq"), 7)),
    ("bad_item", _set(("items", 0, "seq"), -1)),
    (
        "too_many",
        lambda d: {**d, "items": [{**d["items"][1], "seq": i} for i in range(300)]},
    ),
]


@pytest.mark.parametrize(("name", "edit"), BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
def test_malformed_batches_raise(name: str, edit: Any) -> None:
    with pytest.raises(ContractError):
        Batch.from_dict(edit(make_batch().to_dict()))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b"{",
        b"null",
        b'{"schema_version": 1}',
        b'{"schema_version": 1, "type": "mystery"}',
        # Duplicate keys: a second "seq" must not silently win.
        b'{"type": "ack", "schema_version": 1, "device_id": "a", "upto_seq": 1, "upto_seq": 2}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_garbage_bytes_raise(data: bytes) -> None:
    with pytest.raises(ContractError):
        decode_message(data)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(constant: str) -> None:
    text = (
        make_report().to_bytes().decode().replace('"cpu_seconds":12.5', f'"cpu_seconds":{constant}')
    )
    assert constant in text
    with pytest.raises(ContractError):
        TelemetryReport.from_bytes(text.encode())
    with pytest.raises(ContractError):
        TelemetryReport("dev-1", 1, 0.0, 1.0, resources=Resources(cpu_seconds=math.nan)).to_bytes()


def test_oversized_payload_is_refused_before_parsing() -> None:
    # Valid JSON, but larger than the cap: refused without being parsed.
    padding = {**make_event().to_dict(), "pad": "x" * MAX_PAYLOAD_BYTES}
    data = json.dumps(padding).encode()
    with pytest.raises(ContractError, match="exceeds"):
        Event.from_bytes(data)
    with pytest.raises(ContractError, match="exceeds"):
        decode_message(make_report().to_bytes(), max_bytes=100)
    with pytest.raises(ContractError, match="exceeds"):
        StatusMessage.from_bytes(b" " * 5000)
    with pytest.raises(ContractError):
        TelemetryReport.from_bytes("not bytes")  # type: ignore[arg-type]


def test_batch_constructor_checks() -> None:
    with pytest.raises(ContractError):
        Batch("dev-1", ())
    with pytest.raises(ContractError):
        Batch("dev-1", (make_event(8), make_report(7)))
    with pytest.raises(ContractError):
        Batch("dev-2", (make_event(8),))
    full = Batch("dev-1", tuple(make_event(i) for i in range(256)))
    assert Batch.from_bytes(full.to_bytes()) == full


# ----------------------------------------------------------------------- builders
def test_latency_histogram_edges() -> None:
    h = latency_histogram([0.0, 1.0, 1.0001, 5000.0, 5000.1, math.nan, 3.0])
    assert len(h) == len(LATENCY_BUCKETS_MS) + 1
    assert h[0] == 2  # <= 1 ms (inclusive)
    assert h[1] == 1  # (1, 2]
    assert h[2] == 1  # (2, 5]
    assert h[-2] == 1  # (1000, 5000]
    assert h[-1] == 1  # > 5000
    assert sum(h) == 6  # NaN ignored


def test_event_from_registry() -> None:
    entry = {"model": "digits", "version": 2, "event": "rollback", "detail": "boom", "at": 5.0}
    ev = event_from_registry("dev-1", 3, entry)
    assert ev is not None
    assert ev.kind == "rolled_back"
    assert (ev.model, ev.version, ev.seq) == ("digits", 2, 3)
    assert event_from_registry("dev-1", 3, {**entry, "event": "something_internal"}) is None


@pytest.fixture(scope="module")
def drift_windows() -> list[Any]:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(600, 3)).astype(np.float32)
    baseline = build_baseline({"x": ref}, {"y": ref[:, :1]}, n_bins=5)
    mon = DriftMonitor(baseline, MonitorPolicy(max_values=100, min_values=10))
    shifted = rng.normal(loc=2.0, size=(100, 3)).astype(np.float32)
    return list(mon.observe("x", shifted, now=10.0))


def test_report_from_status(drift_windows: list[Any]) -> None:
    assert drift_windows, "the monitor must close a window for this test to mean anything"
    status = {
        "version": "0.1.0",
        "uptime_s": 100.0,
        "ready": True,
        "models": {
            "digits": {
                "version": 3,
                "on_probation": False,
                "memory_bytes": 10,
                "requests": 100,
                "rows": 400,
                "errors": 2,
                "rejects_by_reason": {"nan": 3, "shape": 1},
                "dropped_rows_by_reason": {"inf": 5},
                "latency": {"p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": float("nan")},
                "drift": {},
                "kll": None,
                "shadow": {"offered": 4, "compared": 2, "agreement": None, "live_p50_ms": 1.2},
                "ab": {"a": 50, "b": 50},
            },
            "not a label!": {"version": 1},
        },
        "counts": {"device": 90, "cloud": 10, "bogus": "x"},
        "memory_used_bytes": 1234,
        "drift_blocks_dropped": 1,
        "fallback": None,
    }
    windows = [("digits", 3, w) for w in drift_windows] + [("gone", 1, drift_windows[0])]
    r = report_from_status(
        "dev-1",
        5,
        status,
        windows,
        now=1000.0,
        window_start=940.0,
        telemetry_dropped={"report": 2},
    )
    validate(r.to_dict(), REPORT_SCHEMA)
    assert (r.seq, r.window_start, r.window_end, r.started_at) == (5, 940.0, 1000.0, 900.0)
    assert set(r.models) == {"digits"}
    m = r.models["digits"]
    assert m.outcomes == {"ok": 94, "error": 2, "rejected": 4}
    assert m.latency_ms == {"p50": 1.0, "p90": 2.0}  # NaN left out, not shipped
    assert m.ab == {"a": 50, "b": 50}
    assert m.shadow is not None
    assert m.shadow.counts == {"offered": 4, "compared": 2}
    assert len(m.drift) == len(drift_windows)
    w = m.drift[0]
    assert w.tier_a_view() == drift_windows[0].view
    assert w.alert == drift_windows[0].verdict.alert
    assert r.counts == {"device": 90, "cloud": 10}
    assert r.resources.model_memory_bytes == 1234
    assert r.telemetry_dropped == {"report": 2}
    assert r.drift_blocks_dropped == 1
    assert TelemetryReport.from_bytes(r.to_bytes()) == r


def test_report_from_minimal_status() -> None:
    r = report_from_status("dev-1", 0, {}, [], now=50.0)
    assert r.models == {}
    assert (r.window_start, r.window_end) == (50.0, 50.0)
    validate(r.to_dict(), REPORT_SCHEMA)
    junk = {"models": {"m": {"version": "x", "requests": None, "latency": 3, "shadow": 1}}}
    junk_report = report_from_status("dev-1", 1, {**junk, "uptime_s": "long"}, [], now=50.0)
    assert junk_report.models["m"].version == 0
    with pytest.raises(ContractError):
        report_from_status("Not/Valid", 0, {}, [], now=50.0)
    with pytest.raises(ContractError):
        report_from_status("dev-1", -1, {}, [], now=50.0)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type": [], "schema_version": 1}',
        b'{"type": {}, "schema_version": 1}',
        b'{"type": "ack", "schema_version": 1, "device_id": "d", "upto_seq": ' + b"9" * 5000 + b"}",
    ],
    ids=["type-list", "type-object", "5000-digit-int"],
)
def test_hostile_payloads_raise_contract_error_only(payload: bytes) -> None:
    from edge_agent.wire.telemetry import decode_message

    with pytest.raises(ContractError):
        decode_message(payload)
