"""The server half of capture upload without a broker: the admin routes' hostile-input table,
selectors, what ``enable``/``collect`` sign and send, and hostile ``capture-upload`` answers.
A recording transport stands in for the MQTT session (the whole path over a real Mosquitto is
tests/integration/test_capture_upload.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from test_diagnostics_server import Clock, Recorder

from bundles import DigitsBundles
from edge_agent.common.mqtt_types import Message, MessageProperties
from edge_agent.trust.command import verify_command
from edge_agent.wire.ops.diagnostics import CommandAnswer, UploadOffer
from edge_agent.wire.topics import Topics
from fakes import FakeGateway
from fleet_server.admin.api import create_app
from fleet_server.admin.ops.capture import capture_routes
from fleet_server.capture.service import CaptureService, check_selector
from fleet_server.capture.store import DatasetStore
from fleet_server.delivery.library import BundleLibrary
from fleet_server.diagnostics.service import Diagnostics
from fleet_server.errors import CapturePolicyError
from fleet_server.evalsets.store import EvalSetStore
from fleet_server.registry.store import Registry
from fleet_server.service import FleetService

TOKEN = "t" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}
T = Topics()


@dataclass
class Env:
    http: TestClient
    capture: CaptureService
    diag: Diagnostics
    sent: Recorder
    bundles: DigitsBundles


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
    )
    capture = CaptureService(
        registry, diag, DatasetStore(tmp_path / "datasets", registry), clock=clock
    )
    evalsets = EvalSetStore(tmp_path / "evalsets", registry)
    app = create_app(service, TOKEN, extra_routes=(lambda g: capture_routes(capture, evalsets, g),))
    with TestClient(app) as http:
        yield Env(http, capture, diag, sent, digits_bundles)
    diag.close()
    registry.close()


def _commands(env: Env, device: str) -> list[Any]:
    root = env.bundles.keys.trusted_root()
    out = []
    for payload, _ in env.sent.on(T.device("commands", device)):
        out.append(
            verify_command(
                root,
                payload,
                now=datetime(2026, 6, 1, tzinfo=UTC),
                device_id=device,
                last_sequence=0,
            )
        )
    return out


def test_enable_signs_the_settings_for_each_device_of_the_group(env: Env) -> None:
    r = env.http.post(
        "/v1/capture/digits/enable",
        headers=AUTH,
        json={"selector": {"group": "line"}, "sample_ppm": 500_000, "drop": ["metadata"]},
    )
    assert r.status_code == 202, r.text
    assert len(r.json()["commands"]) == 2
    (cmd,) = _commands(env, "cam-1")
    assert cmd.name == "capture-config"
    assert cmd.args["sample_ppm"] == 500_000
    assert cmd.args["drop"] == ["metadata"]
    assert _commands(env, "cam-3") == []
    status = env.http.get("/v1/capture", headers=AUTH).json()
    assert status["policies"][0]["selector"] == {"group": "line"}


def test_collect_carries_the_last_chunk_digest_as_the_acknowledgement(env: Env) -> None:
    env.capture.enable("digits", {"devices": ["cam-1"]})
    (first,) = env.capture.collect("digits").issued.commands
    assert first.args["ack"] == ""
    plan = UploadOffer(10_000_000, "ab" * 32, 65536).to_dict()  # over the policy's 1 MiB
    answer = CommandAnswer(
        "cam-1",
        first.id,
        "capture-upload",
        True,
        {"offer": plan, "counts": {"not_sampled": 4, "BAD KEY": 1}},
    )
    message = Message(
        T.device("command_resp", "cam-1"),
        answer.to_bytes(),
        1,
        False,
        MessageProperties(correlation_data=first.id.encode()),
    )
    assert env.diag.on_answer("cam-1", message) is None
    assert env.capture.stats()["chunks_refused_oversized"] == 1
    (state,) = env.capture.status("digits")["policies"][0]["devices"]
    assert state["device_counts"] == {"not_sampled": 4}  # hostile keys dropped
    (second,) = env.capture.collect("digits").issued.commands
    assert second.args["ack"] == "ab" * 32  # refused, still acknowledged: the device drops it


@pytest.mark.parametrize(
    "selector",
    [
        None,
        {},
        {"group": ""},
        {"group": "a\x00b"},
        {"devices": []},
        {"devices": ["../etc"]},
        {"devices": "cam-1"},
        {"group": "line", "devices": ["cam-1"]},
        {"labels": {"site": "x"}},
    ],
)
def test_bad_selectors_are_refused(selector: object) -> None:
    with pytest.raises(CapturePolicyError):
        check_selector(selector)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/v1/capture/Bad Name/enable", {"selector": {"group": "line"}}, 400, None),
        ("POST", "/v1/capture/digits/enable", {}, 400, "bad_request"),
        ("POST", "/v1/capture/digits/enable", {"selector": {"group": "nope"}}, 400, None),
        ("POST", "/v1/capture/digits/enable", {"selector": {"group": "line"}, "x": 1}, 400, None),
        (
            "POST",
            "/v1/capture/digits/enable",
            {"selector": {"group": "line"}, "sample_ppm": 2_000_000},
            400,
            None,
        ),
        (
            "POST",
            "/v1/capture/digits/enable",
            {"selector": {"group": "line"}, "drop": ["rm -rf /"]},
            400,
            "capture_policy",
        ),
        (
            "POST",
            "/v1/capture/digits/enable",
            {"selector": {"group": "line"}, "chunk_bytes": 10},
            400,
            "capture_policy",
        ),
        ("POST", "/v1/capture/digits/collect", {}, 400, "capture_policy"),
        ("POST", "/v1/capture/digits/disable", {}, 400, "capture_policy"),
        ("GET", "/v1/datasets/" + "a" * 64, None, 404, "unknown_dataset"),
        ("GET", "/v1/datasets/xyz", None, 400, None),
        ("GET", "/v1/datasets/" + "a" * 64 + "/export?format=csv", None, 400, None),
        ("GET", "/v1/datasets/" + "a" * 64 + "/export?format=parquet", None, 404, None),
        ("POST", "/v1/datasets/" + "a" * 64 + "/evalset", {"input": 5}, 400, None),
        ("GET", "/v1/datasets?limit=0", None, 400, None),
        ("GET", "/v1/capture/digits/export", None, 409, "dataset_unusable"),  # nothing yet
        ("GET", "/v1/capture/digits/export?format=csv", None, 400, None),
        ("GET", "/v1/capture/digits/export?since=yesterday", None, 400, None),
        ("GET", "/v1/capture/digits/export?since=nan", None, 400, None),
        ("GET", "/v1/capture/digits/export?since=1e999", None, 400, None),
        ("GET", "/v1/capture/digits/export?since=20&until=10", None, 400, None),
        ("GET", "/v1/capture/digits/export?until=1000", None, 409, "dataset_unusable"),
        ("GET", "/v1/capture/digits/export?until=" + "9" * 400, None, 400, None),
        ("GET", "/v1/capture/a%00b/export", None, 400, None),
        ("GET", "/v1/capture/%3Cscript%3E/export", None, 400, None),
    ],
)
def test_hostile_admin_requests(
    env: Env, method: str, path: str, body: Any, status: int, code: str | None
) -> None:
    r = env.http.request(
        method, path, headers=AUTH, content=None if body is None else json.dumps(body)
    )
    assert r.status_code == status, r.text
    if code is not None:
        assert r.json()["code"] == code
    assert env.sent.sent == []  # nothing signed or sent on a refused request
