"""Properties: the wire parsers (telemetry, reported state, transfer blocks, fallback messages,
drift sketches) and the admin API's input readers let only typed errors escape.

Seeds are the committed golden telemetry files and honest messages built here; each parser gets
random bytes, hostile edits of its valid document (``hostile_json.mutated``) and byte-level
corruption. ``ContractError`` (or the module's family) is the only exception allowed out.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hostile_json import (
    byte_mutated,
    every_token_everywhere,
    hostile_value,
    mutated,
    only_typed,
    render,
)
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.drift import TierAView
from edge_agent.drift.kll import KllFeatureSketches
from edge_agent.errors import ContractError, DriftError, EdgefleetError
from edge_agent.wire.fallback import MAGIC, FallbackRequest, FallbackResponse
from edge_agent.wire.reported import ModelReport, ReportedState, TransferReport
from edge_agent.wire.telemetry import Batch, Event, StatusMessage, TelemetryAck
from edge_agent.wire.telemetry_report import TelemetryReport
from edge_agent.wire.transfer import BlockData, BlockPlan, BlockRequest
from fleet_server.admin.body import json_object, query_int, req_field
from fleet_server.admin.drift import drift_query
from fleet_server.errors import AdminInputError, FleetDriftError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "telemetry"


def _golden(name: str) -> bytes:
    return (FIXTURES / name).read_bytes().rstrip(b"\n")


REPORTED = ReportedState(
    device_id="cam-1",
    at=12.5,
    agent_version="0.1.0",
    desired_version=3,
    models={
        "digits": ModelReport(2, (2, 1), 3, "downloading", "", TransferReport(3, 2, 5, 300000)),
        "other": ModelReport(None, (), 1, "failed", "digest mismatch"),
    },
).to_bytes()

# (name, parser, seed bytes): JSON documents parsed by ``edge_agent.wire.fields.load_json``
JSON_PARSERS: list[tuple[str, Callable[[bytes], object], bytes]] = [
    ("event", Event.from_bytes, _golden("event-v1.json")),
    ("status", StatusMessage.from_bytes, _golden("status-v1.json")),
    ("batch", Batch.from_bytes, _golden("batch-v1.json")),
    ("ack", TelemetryAck.from_bytes, _golden("ack-v1.json")),
    ("report", TelemetryReport.from_bytes, _golden("report-v1.json")),
    ("reported", ReportedState.from_bytes, REPORTED),
]
_IDS = [name for name, _, _ in JSON_PARSERS]


@pytest.mark.parametrize(("name", "parse", "seed"), JSON_PARSERS, ids=_IDS)
def test_the_json_seeds_are_valid(name: str, parse: Callable[[bytes], object], seed: bytes) -> None:
    assert parse(seed)
    assert parse(render(json.loads(seed)).encode())


@pytest.mark.parametrize(("name", "parse", "seed"), JSON_PARSERS, ids=_IDS)
@given(data=st.data())
def test_json_wire_parsers(
    name: str, parse: Callable[[bytes], object], seed: bytes, data: st.DataObject
) -> None:
    payload = data.draw(
        st.one_of(mutated(json.loads(seed)), byte_mutated(seed), st.binary(max_size=256))
    )
    only_typed(parse, payload, ContractError)


@pytest.mark.parametrize(("name", "parse", "seed"), JSON_PARSERS, ids=_IDS)
def test_json_wire_parsers_every_token_at_every_field(
    name: str, parse: Callable[[bytes], object], seed: bytes
) -> None:
    for payload in every_token_everywhere(json.loads(seed)):
        only_typed(parse, payload, ContractError)


# --------------------------------------------------------------------------- transfer
PLAN = BlockPlan(200_000, "c" * 64, 65536)
BLOCK_REQUEST = BlockRequest(PLAN.transfer_id, ((0, 2),)).to_bytes()
BLOCK_DATA = BlockData(PLAN.transfer_id, 1, b"x" * 65536).to_bytes()


def _split_frame(message: bytes) -> tuple[Any, bytes]:
    n = int.from_bytes(message[:2], "big")
    return json.loads(message[2 : 2 + n]), message[2 + n :]


@st.composite
def _transfer_messages(draw: st.DrawFn, message: bytes) -> bytes:
    header, payload = _split_frame(message)
    kind = draw(st.sampled_from(["header", "bytes", "random"]))
    if kind == "header":
        raw = draw(mutated(header))[:65535]
        return len(raw).to_bytes(2, "big") + raw + payload
    if kind == "bytes":
        return draw(byte_mutated(message))
    return draw(st.binary(max_size=256))


@given(st.one_of(_transfer_messages(BLOCK_REQUEST), _transfer_messages(BLOCK_DATA)))
def test_transfer_messages(data: bytes) -> None:
    assert BlockRequest.from_bytes(BLOCK_REQUEST, PLAN)
    assert BlockData.from_bytes(BLOCK_DATA, PLAN)
    for parse in (BlockRequest.from_bytes, BlockData.from_bytes):
        only_typed(parse, data, ContractError)
        only_typed(lambda d, p=parse: p(d, PLAN), data, EdgefleetError)  # type: ignore[misc]


def test_transfer_headers_every_token_at_every_field() -> None:
    for message, parse in (
        (BLOCK_REQUEST, BlockRequest.from_bytes),
        (BLOCK_DATA, BlockData.from_bytes),
    ):
        header, payload = _split_frame(message)
        for raw in every_token_everywhere(header):
            framed = len(raw).to_bytes(2, "big") + raw + payload if len(raw) < 65536 else raw
            only_typed(parse, framed, ContractError)


# --------------------------------------------------------------------------- fallback
X = np.arange(12, dtype=np.float32).reshape(3, 4)
FALLBACK_REQUEST = FallbackRequest("m", {"a": X}, 10, device_outputs={"o": X}).to_bytes()
FALLBACK_RESPONSE = FallbackResponse("m", "1", {"o": X}, compute_ms=0.5).to_bytes()
_PREFIX = struct.Struct("<4sI")


@st.composite
def _fallback_messages(draw: st.DrawFn, message: bytes) -> bytes:
    _, n = _PREFIX.unpack_from(message)
    header = json.loads(message[_PREFIX.size : _PREFIX.size + n])
    body = message[_PREFIX.size + n :]
    kind = draw(st.sampled_from(["header", "bytes", "random"]))
    if kind == "header":
        raw = draw(mutated(header))
        return _PREFIX.pack(MAGIC, len(raw)) + raw + body
    if kind == "bytes":
        return draw(byte_mutated(message))
    return MAGIC + draw(st.binary(max_size=256))


@given(st.one_of(_fallback_messages(FALLBACK_REQUEST), _fallback_messages(FALLBACK_RESPONSE)))
def test_fallback_messages(data: bytes) -> None:
    assert FallbackRequest.from_bytes(FALLBACK_REQUEST)
    assert FallbackResponse.from_bytes(FALLBACK_RESPONSE)
    only_typed(FallbackRequest.from_bytes, data, ContractError)
    only_typed(FallbackResponse.from_bytes, data, ContractError)


def test_fallback_headers_every_token_at_every_field() -> None:
    for message in (FALLBACK_REQUEST, FALLBACK_RESPONSE):
        _, n = _PREFIX.unpack_from(message)
        header = json.loads(message[_PREFIX.size : _PREFIX.size + n])
        body = message[_PREFIX.size + n :]
        for raw in every_token_everywhere(header):
            framed = _PREFIX.pack(MAGIC, len(raw)) + raw + body
            only_typed(FallbackRequest.from_bytes, framed, ContractError)
            only_typed(FallbackResponse.from_bytes, framed, ContractError)


# ------------------------------------------------------------------------ drift sketches
def _view_bytes() -> bytes:
    report = json.loads(_golden("report-v1.json"))
    model = next(iter(report["models"].values()))
    return base64.b64decode(model["drift"][0]["view"])


def _kll_bytes() -> bytes:
    sketches = KllFeatureSketches(3)
    sketches.update(np.random.default_rng(0).normal(size=(500, 3)))
    return sketches.to_bytes()


VIEW = _view_bytes()
KLL = _kll_bytes()


@given(st.one_of(byte_mutated(VIEW), st.binary(max_size=512)))
def test_tier_a_view_bytes(data: bytes) -> None:
    assert TierAView.from_bytes(VIEW)
    only_typed(TierAView.from_bytes, data, (ContractError, DriftError))  # type: ignore[arg-type]


@given(st.one_of(byte_mutated(KLL), st.binary(max_size=512)))
def test_kll_sketch_bytes(data: bytes) -> None:
    assert KllFeatureSketches.from_bytes(KLL)
    only_typed(KllFeatureSketches.from_bytes, data, (ContractError, DriftError))  # type: ignore[arg-type]


# -------------------------------------------------------------------------- admin input
REGISTER = {"id": "cam-1", "group": "g", "tags": {"site": "a"}, "cert_serial": "01"}


@given(st.one_of(mutated(REGISTER), st.binary(max_size=256)))
def test_admin_json_bodies(data: bytes) -> None:
    def read(raw: bytes) -> object:
        body = json_object(raw)
        req_field(body, "id", str)
        req_field(body, "group", str, "default")
        req_field(body, "tags", dict, {})
        return req_field(body, "version", int, 1, lo=1)

    only_typed(read, data, AdminInputError)


@given(st.text(max_size=64) | st.sampled_from(["9" * 5000, str(2**70), "-1", "\u0661", "1e3"]))
def test_admin_query_ints(text: str) -> None:
    only_typed(lambda t: query_int({"n": t.decode()}, "n", 0), text.encode(), AdminInputError)


_DRIFT_PARAMS = ("model", "version", "by", "since", "until", "bucket", "devices", "views")


class _Clock:
    def now(self) -> datetime:
        return datetime(2026, 6, 1, tzinfo=UTC)


@given(
    st.dictionaries(
        st.sampled_from(_DRIFT_PARAMS),
        st.text(max_size=24) | st.sampled_from(["9" * 400, "1e400", "\u00b2", "24h", "tag:"]),
    )
)
def test_admin_drift_query(params: dict[str, str]) -> None:
    params.setdefault("model", "digits")
    only_typed(
        lambda _: drift_query(params, _Clock()),  # type: ignore[arg-type]
        b"",
        FleetDriftError,
    )


@given(hostile_value)
def test_admin_fields_of_any_value(value: object) -> None:
    only_typed(lambda _: req_field({"f": value}, "f", int), b"", AdminInputError)
    only_typed(lambda _: req_field({"f": value}, "f", str), b"", AdminInputError)
    only_typed(lambda _: req_field({"f": value}, "f", dict), b"", AdminInputError)
