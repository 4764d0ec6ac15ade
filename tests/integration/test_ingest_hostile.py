"""One device's hostile telemetry never stops another's: real SQLite and real PostgreSQL.

Each case sends what an enrolled device could put on its telemetry topic. The gateway's parse
(``parse_telemetry``) and batched ingest (``IngestWorker``) run exactly as in the gateway, with
an honest device's message in the same batch transaction. Whatever the hostile entry holds, the
honest device is stored and acked, the hostile device's good entries are stored and acked, and
the bad entry is stored as a ``refused`` placeholder (so the device is acked past it and does
not resend it forever) and counted against its device. A second table bypasses the wire parser
and hands the database what it cannot store (as a future parser bug would): the batch is split
until the one refused message is found, and only that message becomes a placeholder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.wire.telemetry import Batch, Event, TelemetryReport
from fleet_server.gateway.ingest import IngestWorker
from fleet_server.gateway.ingest_parse import REFUSED_KIND, IngestItem, parse_telemetry
from fleet_server.registry.store import Registry
from fleet_server.registry.values import IngestResult, TelemetryEntry
from pg import PgCluster

Mutation = Callable[[dict[str, Any]], None]


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    if request.param == "postgresql":
        pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver) is not installed")
        cluster: PgCluster = request.getfixturevalue("pg")
        url = cluster.new_database()
    else:
        url = f"sqlite:///{tmp_path / 'registry.db'}"
    reg = Registry.open(url)
    reg.upgrade()
    for device in ("dev-a", "dev-b", "dev-c"):
        reg.enroll(device)
    yield reg
    reg.close()


class Sink:
    """Collects what the worker acknowledges and refuses."""

    def __init__(self) -> None:
        self.acks: dict[str, int] = {}
        self.refused: list[tuple[str, str, int]] = []

    def on_stored(self, result: IngestResult) -> None:
        self.acks[result.device_id] = result.acked_upto

    def on_refused(self, device_id: str, reason: str, n: int) -> None:
        self.refused.append((device_id, reason, n))


def _worker(registry: Registry, sink: Sink) -> IngestWorker:
    return IngestWorker(registry, sink.on_stored, on_refused=sink.on_refused)


def _event(device: str, seq: int) -> dict[str, Any]:
    return Event(device_id=device, seq=seq, kind="installed", at=5.0, detail="ok").to_dict()


def _report(device: str, seq: int) -> dict[str, Any]:
    r = TelemetryReport(device_id=device, seq=seq, window_start=0.0, window_end=1.0)
    return r.to_dict()


def _set(path: tuple[Any, ...], value: Any) -> Mutation:
    def mutate(d: dict[str, Any]) -> None:
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


# (name, which entry: "event" | "report", mutation). Every string field a payload carries, NUL
# and lone surrogates in each, numbers beyond what the wire allows, nesting where text belongs.
HOSTILE: list[tuple[str, str, Mutation]] = [
    ("nul_in_detail", "event", _set(("detail",), "a\x00b")),
    ("only_nul_detail", "event", _set(("detail",), "\x00")),
    ("lone_high_surrogate_detail", "event", _set(("detail",), "x\ud800y")),
    ("lone_low_surrogate_detail", "event", _set(("detail",), "\udfff")),
    ("nul_in_model", "event", _set(("model",), "m\x00")),
    ("surrogate_in_model", "event", _set(("model",), "\ud800")),
    ("nul_in_kind", "event", _set(("kind",), "installed\x00")),
    ("detail_too_long", "event", _set(("detail",), "x" * 5000)),
    ("detail_nested", "event", _set(("detail",), [[[[["deep"]]]]])),
    ("detail_object", "event", _set(("detail",), {"\x00": "\x00"})),
    ("huge_version", "event", _set(("version",), 10**19)),
    ("negative_version", "event", _set(("version",), -1)),
    ("float_version", "event", _set(("version",), 1.5)),
    ("huge_at", "event", _set(("at",), "__raw:1e400")),
    ("float_seq_neighbour", "event", _set(("at",), "__raw:1e999")),
    ("bool_at", "event", _set(("at",), True)),
    ("nul_in_agent_version", "report", _set(("agent_version",), "1.0\x00")),
    ("surrogate_in_agent_version", "report", _set(("agent_version",), "\ud83d")),
    ("nul_in_counts_key", "report", _set(("counts",), {"a\x00": 1})),
    ("surrogate_in_counts_key", "report", _set(("counts",), {"\udc00": 1})),
    ("huge_count", "report", _set(("counts",), {"ok": 10**19})),
    ("nul_model_name", "report", _set(("models",), {"m\x00": {}})),
    ("huge_rss", "report", _set(("resources", "rss_bytes"), 2**64)),
]

# Unusual but valid: stored as they are, on both backends.
VALID_EXOTIC: list[tuple[str, str, Mutation]] = [
    ("emoji_pair_detail", "event", _set(("detail",), "ok \U0001f600")),
    ("control_chars_detail", "event", _set(("detail",), "\x01\x1f\x7f tab\tnewline\n")),
    ("noncharacter_detail", "event", _set(("detail",), "\ufffe\uffff")),
    ("max_version", "event", _set(("version",), 2**53 - 1)),
    ("tiny_at", "event", _set(("at",), 5e-324)),
    ("big_at", "event", _set(("at",), 1.7e15)),
]


def _batch_bytes(device: str, entries: list[dict[str, Any]]) -> bytes:
    doc = {"schema_version": 1, "type": "batch", "device_id": device, "items": entries}
    # ensure_ascii: NUL and lone surrogates travel as \\u escapes, as a hostile device sends them
    text = json.dumps(doc)
    return re.sub(r'"__raw:([^"]*)"', r"\1", text).encode()  # numbers no encoder writes


def _parse(device: str, entries: list[dict[str, Any]]) -> IngestItem:
    item = parse_telemetry("telemetry", device, _batch_bytes(device, entries))
    assert isinstance(item, IngestItem), item
    return item


def _honest() -> IngestItem:
    batch = Batch("dev-b", (TelemetryReport("dev-b", 1, 0.0, 1.0),))
    item = parse_telemetry("telemetry", "dev-b", batch.to_bytes())
    assert isinstance(item, IngestItem)
    return item


@pytest.mark.parametrize(("name", "which", "mutate"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_a_hostile_entry_is_refused_alone_and_everyone_is_acked(
    registry: Registry, name: str, which: str, mutate: Mutation
) -> None:
    bad = _event("dev-a", 2) if which == "event" else _report("dev-a", 2)
    mutate(bad)
    item = _parse("dev-a", [_report("dev-a", 1), bad, _event("dev-a", 3)])
    sink = Sink()
    worker = _worker(registry, sink)
    assert worker.put(item)
    assert worker.put(_honest())
    worker.store([_honest(), item])  # one transaction for both devices, as the gateway does

    assert sink.acks == {"dev-a": 3, "dev-b": 1}
    rows = {r.seq: r for r in registry.telemetry(device_id="dev-a")}
    assert [rows[s].kind for s in (1, 2, 3)] == ["report", REFUSED_KIND, "event"]
    assert rows[2].payload == {"reason": "malformed", "was": which}
    assert [r.kind for r in registry.telemetry(device_id="dev-b")] == ["report"]
    assert ("dev-a", "malformed_entry", 1) in sink.refused
    stats = worker.stats()
    assert stats.isolations == 0, "the wire parser let through what the database refused"
    assert stats.db_failures == 0


@pytest.mark.parametrize(
    ("name", "which", "mutate"), VALID_EXOTIC, ids=[c[0] for c in VALID_EXOTIC]
)
def test_unusual_but_valid_entries_are_stored_as_sent(
    registry: Registry, name: str, which: str, mutate: Mutation
) -> None:
    entry = _event("dev-a", 1) if which == "event" else _report("dev-a", 1)
    mutate(entry)
    item = _parse("dev-a", [entry])
    sink = Sink()
    _worker(registry, sink).store([item])
    assert sink.acks == {"dev-a": 1}
    [row] = registry.telemetry(device_id="dev-a")
    assert row.kind == which
    assert row.payload == entry
    assert sink.refused == []


# What the database itself refuses (PostgreSQL: NUL and lone surrogates in JSONB or TEXT,
# non-finite floats), handed straight to the ingest as a parser bug would.
UNSTORABLE: list[tuple[str, TelemetryEntry]] = [
    ("nul_value", TelemetryEntry(1, "event", {"detail": "a\x00b"})),
    ("nul_key", TelemetryEntry(1, "event", {"a\x00": 1})),
    ("lone_surrogate", TelemetryEntry(1, "event", {"detail": "\ud800"})),
    ("nul_in_kind", TelemetryEntry(1, "ev\x00nt", {})),
    ("infinity", TelemetryEntry(1, "report", {"x": float("inf")})),
    ("nan", TelemetryEntry(1, "report", {"x": float("nan")})),
]


@pytest.mark.parametrize(("name", "entry"), UNSTORABLE, ids=[c[0] for c in UNSTORABLE])
def test_a_message_the_database_refuses_is_isolated_not_the_batch(
    registry: Registry, name: str, entry: TelemetryEntry
) -> None:
    good = TelemetryEntry(1, "report", {"ok": True})
    batch = [
        IngestItem("dev-a", (good,)),
        IngestItem("dev-b", (entry, TelemetryEntry(2, "report", {})), None),
        IngestItem("dev-c", (good,)),
        IngestItem("dev-a", (TelemetryEntry(2, "report", {}),)),
    ]
    sink = Sink()
    worker = _worker(registry, sink)
    worker.store(batch)

    assert sink.acks == {"dev-a": 2, "dev-b": 2, "dev-c": 1}
    assert [r.kind for r in registry.telemetry(device_id="dev-a")] == ["report", "report"]
    assert [r.kind for r in registry.telemetry(device_id="dev-c")] == ["report"]
    kinds = {r.seq: r.kind for r in registry.telemetry(device_id="dev-b")}
    stats = worker.stats()
    assert stats.db_failures == 0
    if kinds[1] == REFUSED_KIND:  # this backend refused it: isolated and counted
        assert stats.isolations >= 1
        assert ("dev-b", "unstorable", 1) in sink.refused
        was = entry.kind if entry.kind.isalnum() else "unknown"
        assert next(r.payload for r in registry.telemetry(device_id="dev-b")) == {
            "reason": "unstorable",
            "was": was,
        }
    else:  # SQLite stores JSON text: nothing to isolate
        assert registry.engine.dialect.name == "sqlite"
        assert stats.isolations == 0
    if registry.engine.dialect.name == "postgresql":
        assert kinds[1] == REFUSED_KIND, "PostgreSQL stored what it should refuse?"
    # The refused message goes as a whole (its other entry included); nothing else does.
    assert kinds[2] == (REFUSED_KIND if kinds[1] == REFUSED_KIND else "report")


WHOLE_MESSAGE = [
    (
        "integer_of_400_digits",
        b'{"schema_version":1,"type":"batch","device_id":"dev-a","items":'
        b'[{"type":"event","device_id":"dev-a","seq":1,"at":' + b"9" * 400 + b"}]}",
    ),
    ("nan_literal", b'{"schema_version":1,"type":"event","device_id":"dev-a","seq":1,"at":NaN}'),
    ("duplicate_keys", b'{"schema_version":1,"type":"event","type":"event","device_id":"dev-a"}'),
    ("deep_nesting", b"[" * 100_000 + b"]" * 100_000),
    ("seq_unreadable", _batch_bytes("dev-a", [{**_event("dev-a", 1), "seq": "1"}])),
    ("item_of_another_device", _batch_bytes("dev-a", [_event("dev-b", 1)])),
    ("not_utf8", b'{"detail":"\xff\xfe"}'),
]


@pytest.mark.parametrize(("name", "payload"), WHOLE_MESSAGE, ids=[c[0] for c in WHOLE_MESSAGE])
def test_a_message_with_an_unreadable_envelope_is_refused_whole(name: str, payload: bytes) -> None:
    """No honest agent writes these: the message is refused (not acked), never a traceback."""
    assert parse_telemetry("telemetry", "dev-a", payload) in {"malformed", "device_mismatch"}


def test_a_database_that_is_down_acks_nothing_and_stores_no_placeholder(tmp_path: Path) -> None:
    reg = Registry.open(f"sqlite:///{tmp_path / 'empty.db'}")  # no schema: every write fails
    sink = Sink()
    worker = _worker(reg, sink)
    worker.store([IngestItem("dev-a", (TelemetryEntry(1, "event", {"d": "a\x00"}),))])
    stats = worker.stats()
    assert (stats.db_failures, stats.isolations) == (1, 0)
    assert sink.acks == {}
    assert sink.refused == []
    reg.close()
