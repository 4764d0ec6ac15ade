"""The server half of remote diagnostics without a broker: admin routes, hostile answers and
upload blocks, the pending bound, expiry. A recording transport stands in for the MQTT session
(the whole path over a real Mosquitto is tests/integration/test_diagnostics.py)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from bundles import DigitsBundles
from edge_agent.common.mqtt_types import Message, MessageProperties
from edge_agent.trust.command import verify_command
from edge_agent.wire.ops.diagnostics import CommandAnswer, UploadOffer
from edge_agent.wire.topics import Topics
from edge_agent.wire.transfer import BlockData, BlockRequest
from fakes import FakeGateway
from fleet_server.admin.api import create_app
from fleet_server.admin.ops.diagnostics import diagnostics_routes
from fleet_server.delivery.library import BundleLibrary
from fleet_server.diagnostics.service import Diagnostics
from fleet_server.registry.store import Registry
from fleet_server.service import FleetService

TOKEN = "t" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}
T = Topics()


@dataclass
class Handle:
    mid: int = 1

    def is_published(self) -> bool:
        return True


@dataclass
class Recorder:
    """Records what the server publishes (the part of ``Transport`` Diagnostics uses)."""

    sent: list[tuple[str, bytes, MessageProperties | None]] = field(default_factory=list)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: MessageProperties | None = None,
    ) -> Handle:
        self.sent.append((topic, payload, properties))
        return Handle()

    def on(self, topic: str) -> list[tuple[bytes, MessageProperties | None]]:
        return [(p, props) for t, p, props in self.sent if t == topic]


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 6, 1, tzinfo=UTC)
        self.mono = 1000.0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Env:
    http: TestClient
    diag: Diagnostics
    sent: Recorder
    clock: Clock
    registry: Registry
    bundles: DigitsBundles
    directory: Path


@pytest.fixture
def env(digits_bundles: DigitsBundles, tmp_path: Path) -> Iterator[Env]:
    keys = digits_bundles.keys
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    for device, group in (("cam-1", "line"), ("cam-2", "line"), ("cam-3", "other")):
        registry.enroll(device, group=group)
    service = FleetService(
        registry,
        BundleLibrary(tmp_path / "bundles", keys.trusted_root()),
        FakeGateway(),
        [keys.signer("online-1")],
        clock=lambda: datetime.now(UTC),
        ttl=timedelta(hours=1),
    )
    sent, clock = Recorder(), Clock()
    diag = Diagnostics(
        registry,
        sent,  # type: ignore[arg-type]  # the publish half of Transport
        T,
        [keys.signer("online-1")],
        tmp_path / "diag",
        clock=clock,
        monotonic=lambda: clock.mono,
        max_pending=3,
        upload_retry_seconds=2.0,
        upload_deadline_seconds=60.0,
    )
    app = create_app(service, TOKEN, extra_routes=(lambda g: diagnostics_routes(diag, g),))
    with TestClient(app) as http:
        yield Env(http, diag, sent, clock, registry, digits_bundles, tmp_path / "diag")
    diag.close()
    registry.close()


def _answer(
    env: Env, device: str, command_id: str, answer: CommandAnswer, corr: str | None = None
) -> str | None:
    message = Message(
        T.device("command_resp", device),
        answer.to_bytes(),
        1,
        False,
        MessageProperties(correlation_data=(corr or command_id).encode()),
    )
    return env.diag.on_answer(device, message)


def test_a_command_is_signed_for_its_device_and_its_answer_recorded(env: Env) -> None:
    r = env.http.post("/v1/devices/cam-1/commands", json={"name": "ping"}, headers=AUTH)
    assert r.status_code == 202, r.text
    (record,) = r.json()["commands"]
    assert record["state"] == "pending"
    ((payload, props),) = env.sent.on(T.device("commands", "cam-1"))
    assert props is not None
    assert props.correlation_data == record["id"].encode()
    assert props.response_topic == T.device("command_resp", "cam-1")
    assert props.message_expiry == 3600
    root = env.bundles.keys.trusted_root()
    command = verify_command(root, payload, now=env.clock.now, device_id="cam-1", last_sequence=0)
    assert command.command_id == record["id"]

    answer = CommandAnswer("cam-1", record["id"], "ping", True, {"agent_version": "<b>x</b>"})
    assert _answer(env, "cam-1", record["id"], answer) is None
    got = env.http.get(f"/v1/commands/{record['id']}", headers=AUTH).json()
    assert got["state"] == "answered"
    assert got["answer"]["result"]["agent_version"] == "<b>x</b>"  # data, as the device sent it
    listed = env.http.get("/v1/devices/cam-1/commands", headers=AUTH).json()["commands"]
    assert [c["id"] for c in listed] == [record["id"]]
    assert env.diag.stats()["answered_ping"] == 1


def test_a_group_command_is_one_command_per_device(env: Env) -> None:
    r = env.http.post("/v1/groups/line/commands", json={"name": "ping"}, headers=AUTH)
    assert r.status_code == 202
    devices = sorted(c["device_id"] for c in r.json()["commands"])
    assert devices == ["cam-1", "cam-2"]
    assert env.sent.on(T.device("commands", "cam-3")) == []
    assert (
        env.http.post("/v1/groups/none/commands", json={"name": "ping"}, headers=AUTH).status_code
        == 404
    )


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/devices/cam-1/commands", {"name": "shell"}, 400, "command_unknown"),
        (
            "/v1/devices/cam-1/commands",
            {"name": "logs", "args": {"max_lines": 0}},
            400,
            "command_arguments",
        ),
        ("/v1/devices/cam-1/commands", {"name": "health-check"}, 400, "command_arguments"),
        ("/v1/devices/cam-1/commands", {"name": "ping", "ttl_seconds": 10**9}, 400, None),
        ("/v1/devices/cam-1/commands", {"name": "ping", "x": 1}, 400, None),
        ("/v1/devices/cam-1/commands", {"name": "ping", "args": [1]}, 400, None),
        ("/v1/devices/nobody/commands", {"name": "ping"}, 404, None),
        ("/v1/devices/BAD!/commands", {"name": "ping"}, 400, None),
    ],
)
def test_requests_a_device_would_refuse_are_refused_before_signing(
    env: Env, path: str, body: dict[str, Any], status: int, code: str | None
) -> None:
    r = env.http.post(path, json=body, headers=AUTH)
    assert r.status_code == status, r.text
    if code is not None:
        assert r.json()["code"] == code
    assert env.sent.sent == []


def test_pending_commands_per_device_are_bounded_and_expire(env: Env) -> None:
    for _ in range(3):
        assert (
            env.http.post(
                "/v1/devices/cam-1/commands", json={"name": "ping", "ttl_seconds": 60}, headers=AUTH
            ).status_code
            == 202
        )
    r = env.http.post("/v1/devices/cam-1/commands", json={"name": "ping"}, headers=AUTH)
    assert r.status_code == 429
    assert r.json()["code"] == "command_queue_full"
    env.clock.now += timedelta(seconds=61)
    env.diag.tick()
    states = {
        c["state"]
        for c in env.http.get("/v1/devices/cam-1/commands", headers=AUTH).json()["commands"]
    }
    assert states == {"expired"}
    assert (
        env.http.post("/v1/devices/cam-1/commands", json={"name": "ping"}, headers=AUTH).status_code
        == 202
    )


def test_hostile_answers_are_dropped_and_counted(env: Env) -> None:
    (record,) = env.diag.issue("ping", {}, device_id="cam-1").commands
    ok = CommandAnswer("cam-1", record.id, "ping", True, {})
    # Another device answering cam-1's command (its own topic, cam-1's correlation data).
    assert (
        _answer(env, "cam-2", record.id, CommandAnswer("cam-2", record.id, "ping", True, {}))
        == "answer_unknown"
    )
    assert _answer(env, "cam-1", record.id, ok, corr="0" * 32) == "answer_unknown"
    assert _answer(env, "cam-1", record.id, ok, corr="not hex") == "answer_uncorrelated"
    bad = Message(
        T.device("command_resp", "cam-1"),
        b"{garbage",
        1,
        False,
        MessageProperties(correlation_data=record.id.encode()),
    )
    assert env.diag.on_answer("cam-1", bad) == "answer_malformed"
    assert env.diag.get(record.id).state == "pending"
    assert _answer(env, "cam-1", record.id, ok) is None
    assert env.diag.get(record.id).state == "answered"


def _bundle_offer(env: Env, data: bytes) -> tuple[str, UploadOffer]:
    (record,) = env.diag.issue("support-bundle", {}, device_id="cam-1").commands
    offer = UploadOffer(len(data), hashlib.sha256(data).hexdigest(), 64 * 1024)
    answer = CommandAnswer("cam-1", record.id, "support-bundle", True, offer.to_dict())
    assert _answer(env, "cam-1", record.id, answer) is None
    return record.id, offer


def _block(device: str, payload: bytes) -> Message:
    return Message(T.device("upload_data", device), payload, 1, False)


def test_a_support_bundle_is_pulled_checked_and_verified(env: Env) -> None:
    data = bytes(range(256)) * 1000  # 256,000 bytes: 4 blocks
    command_id, offer = _bundle_offer(env, data)
    plan = offer.plan
    ((req, _),) = env.sent.on(T.device("upload_req", "cam-1"))
    assert BlockRequest.from_bytes(req, plan).blocks(plan) == [0, 1, 2, 3]
    # Hostile blocks first: another device, another transfer, wrong length, beyond the end.
    env.diag.on_upload_block(
        "cam-2", _block("cam-2", BlockData(plan.transfer_id, 0, data[:65536]).to_bytes())
    )
    env.diag.on_upload_block(
        "cam-1", _block("cam-1", BlockData("0" * 32, 0, data[:65536]).to_bytes())
    )
    env.diag.on_upload_block(
        "cam-1", _block("cam-1", BlockData(plan.transfer_id, 0, data[:100]).to_bytes())
    )
    env.diag.on_upload_block(
        "cam-1", _block("cam-1", BlockData(plan.transfer_id, 9, data[:100]).to_bytes())
    )
    env.diag.on_upload_block("cam-1", _block("cam-1", b"\x00\x05junk"))
    counts = env.diag.stats()
    assert counts["upload_unknown_transfer"] == 2
    assert counts["upload_bad_blocks"] == 2
    assert counts["upload_malformed"] == 1
    assert env.diag.get(command_id).state == "uploading"
    for i in range(plan.n_blocks):
        start, stop = plan.block_range(i)
        env.diag.on_upload_block(
            "cam-1", _block("cam-1", BlockData(plan.transfer_id, i, data[start:stop]).to_bytes())
        )
    assert env.diag.get(command_id).state == "uploaded"
    r = env.http.get(f"/v1/devices/cam-1/support-bundles/{command_id}", headers=AUTH)
    assert r.status_code == 200
    assert r.content == data
    assert (
        env.http.get(f"/v1/devices/cam-2/support-bundles/{command_id}", headers=AUTH).status_code
        == 404
    )
    # Archives older than the retention are deleted by the hourly sweep.
    old = (env.clock.now - timedelta(days=31)).timestamp()
    os.utime(env.diag.bundle_path("cam-1", command_id), (old, old))
    env.diag.tick()
    assert env.diag.stats()["bundles_pruned"] == 1
    r = env.http.get(f"/v1/devices/cam-1/support-bundles/{command_id}", headers=AUTH)
    assert r.status_code == 409


def test_a_bundle_that_does_not_match_its_digest_is_not_kept(env: Env) -> None:
    data = b"a" * 70_000
    command_id, offer = _bundle_offer(env, data)
    plan = offer.plan
    lie = b"b" * 70_000  # right lengths, other bytes
    for i in range(plan.n_blocks):
        start, stop = plan.block_range(i)
        env.diag.on_upload_block(
            "cam-1", _block("cam-1", BlockData(plan.transfer_id, i, lie[start:stop]).to_bytes())
        )
    record = env.diag.get(command_id)
    assert record.state == "upload_failed"
    assert "SHA-256" in record.upload["error"]  # type: ignore[index]
    r = env.http.get(f"/v1/devices/cam-1/support-bundles/{command_id}", headers=AUTH)
    assert r.status_code == 409


def test_a_stalled_upload_is_asked_again_then_fails_at_its_deadline(env: Env) -> None:
    data = b"c" * 200_000
    command_id, _offer = _bundle_offer(env, data)
    topic = T.device("upload_req", "cam-1")
    assert len(env.sent.on(topic)) == 1
    env.clock.mono += 2.5
    env.diag.tick()
    assert len(env.sent.on(topic)) == 2  # asked again after the silence
    env.clock.mono += 60
    env.diag.tick()
    assert env.diag.get(command_id).state == "upload_failed"
    assert not any(
        (env.diag_dir if hasattr(env, "diag_dir") else Path("/nonexistent")).glob("*.part")
    )
