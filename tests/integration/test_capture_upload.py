"""Capture upload end to end: real Mosquitto (TLS, ACLs), the gateway, real agents, the server.

An operator enables upload of ``digits`` for two devices (signed ``capture-config``); the
devices answer requests and the application labels some of them; ``collect`` (signed
``capture-upload``) makes each device pack a chunk under its daily budget, the server pulls it
in blocks and checks its SHA-256, stores it as a content-addressed dataset with provenance,
exports it and registers its labelled rows as an evaluation set. The next collect acknowledges
the chunk (the device deletes it) and finds the day's budget spent. A garbled chunk and an
oversized one are refused and counted; each is acknowledged so the device moves on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from bundles import DigitsBundles
from edge_agent.config import CaptureConfig
from edge_agent.serving.service import InferenceRequest
from edge_agent.wire.topics import Topics
from fleet import Device, FleetHarness, start_device, wait_until
from fleet_server.admin.api import AdminServer, create_app
from fleet_server.admin.audit import Auditor
from fleet_server.admin.client import AdminClient
from fleet_server.admin.ops.capture import capture_routes
from fleet_server.capture.service import CaptureService
from fleet_server.capture.store import DatasetStore
from fleet_server.cli.main import cli
from fleet_server.delivery.library import BundleLibrary
from fleet_server.diagnostics.book import CommandRecord
from fleet_server.diagnostics.service import Diagnostics
from fleet_server.evalsets.store import EvalSetStore
from fleet_server.service import FleetService
from mosquitto import MOSQUITTO, fleet_broker

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

WAIT = 60.0  # generous: daemons start slowly on a loaded machine
TOKEN = "c" * 32


@pytest.fixture
def fleet(digits_bundles: DigitsBundles, tmp_path: Path) -> Iterator[FleetHarness]:
    with fleet_broker(tmp_path / "mqtt", ("dev-a", "dev-b")) as broker:
        harness = FleetHarness(broker, digits_bundles.keys, tmp_path / "fleet")
        try:
            yield harness
        finally:
            harness.close()


@pytest.fixture
def diag(
    fleet: FleetHarness, digits_bundles: DigitsBundles, tmp_path: Path
) -> Iterator[Diagnostics]:
    d = Diagnostics(
        fleet.registry,
        fleet.client,
        Topics(fleet.broker.prefix),
        [digits_bundles.keys.signer("online-1")],
        tmp_path / "diagnostics",
        clock=lambda: datetime.now(UTC),
        upload_retry_seconds=0.5,
    )
    fleet.gateway.attach_diagnostics(d)
    yield d
    d.close()


@pytest.fixture
def capture(fleet: FleetHarness, diag: Diagnostics, tmp_path: Path) -> CaptureService:
    service = CaptureService(
        fleet.registry,
        diag,
        DatasetStore(tmp_path / "datasets", fleet.registry),
        clock=lambda: datetime.now(UTC),
    )
    diag.start()
    return service


def _device(fleet: FleetHarness, device_id: str) -> Device:
    config = dataclasses.replace(
        fleet.agent_config(device_id), capture=CaptureConfig(enabled=True, sample_rate=1.0)
    )
    device = start_device(config)
    fleet.devices[device_id] = device
    return device


def _settled(diag: Diagnostics, records: tuple[CommandRecord, ...], *states: str) -> list[Any]:
    return [
        wait_until(
            lambda r=r: (got := diag.get(r.id)).state in states and got,
            WAIT,
            what=lambda r=r: f"{r.name} to {r.device_id} in {states}: {diag.get(r.id)}",
        )
        for r in records
    ]


def _acked(capture: CaptureService, device_id: str, sha256: str) -> None:
    """Wait until the server recorded the chunk it will acknowledge next (after the dataset)."""

    def acks() -> dict[str, str]:
        (policy,) = capture.status("digits")["policies"]
        return {d["device_id"]: d["ack_sha256"] for d in policy["devices"]}

    wait_until(lambda: acks().get(device_id) == sha256, WAIT, what=lambda: f"ack {acks()}")


def _traffic(device: Device, x: np.ndarray, y: np.ndarray, n: int, labelled: int) -> None:
    start = device.agent.capture.captured if device.agent.capture else 0
    for i in range(n):
        rid = f"{device.id}-{i}"
        device.agent.infer(InferenceRequest("digits", {"input": x[i : i + 1]}, request_id=rid))
    for i in range(labelled):
        device.agent.feedback("digits", None, f"{device.id}-{i}", int(y[i]), rows=False)
    ring = device.agent.capture
    assert ring is not None
    wait_until(lambda: ring.captured >= start + n + labelled, WAIT, what="records captured")


def test_capture_upload_bounded_stored_exported_and_registered(
    fleet: FleetHarness,
    diag: Diagnostics,
    capture: CaptureService,
    digits_bundles: DigitsBundles,
    tmp_path: Path,
) -> None:
    v1 = fleet.publish(digits_bundles.path(1))
    devices = {d: _device(fleet, d) for d in ("dev-a", "dev-b")}
    for d in devices:
        fleet.assign(d, {"digits": v1})
    for dev in devices.values():
        wait_until(lambda dev=dev: dev.agent.registry.get("digits") is not None, WAIT, what="v1")

    # The budget fits about a dozen records a day; the metadata (request ids) stays home.
    enabled = capture.enable(
        "digits",
        {"devices": ["dev-a", "dev-b"]},
        bytes_per_day=20_000,
        chunk_bytes=65536,
        drop=("metadata",),
    )
    assert enabled.issued.errors == {}
    _settled(diag, enabled.issued.commands, "answered")
    assert devices["dev-a"].sync.commands.capture.settings("digits") is not None

    x, y = digits_bundles.x_eval, digits_bundles.y_eval
    _traffic(devices["dev-a"], x, y, 30, labelled=12)
    _traffic(devices["dev-b"], x, y, 30, labelled=0)

    first = capture.collect("digits")
    _settled(diag, first.issued.commands, "uploaded")
    stored = wait_until(
        lambda: len(got := capture.datasets("digits")) == 2 and got, WAIT, what="datasets"
    )
    for d in stored:
        _acked(capture, d.provenance["devices"][0], d.provenance["chunk_sha256"])
    by_device = {d.provenance["devices"][0]: d for d in stored}
    a = by_device["dev-a"]
    assert 0 < a.records < 30  # bounded by the daily budget, not by what was captured
    assert a.length <= 20_000
    assert a.labelled_rows == a.records == a.provenance["labelled_records"]  # first 12 labelled
    assert a.provenance["versions"] == [1]
    assert a.provenance["dropped"] == ["metadata"]
    assert by_device["dev-b"].labelled_rows == 0
    assert a.time_from <= a.time_to
    chunk_file = Path(devices["dev-a"].config.store.state_dir) / "sync" / "capture" / "digits.npz"
    assert chunk_file.is_file()  # kept until the server acknowledges it

    # Export: one row per request row, labels the application gave, no request ids.
    exported = np.load(io.BytesIO(capture.store.export(a.sha256)), allow_pickle=False)
    assert exported["input/input"].shape == (a.rows, x.shape[1])
    np.testing.assert_array_equal(exported["input/input"], x[: a.rows].astype(np.float32))
    np.testing.assert_array_equal(exported["label"], y[: a.rows])
    assert set(exported["request_id"].tolist()) == {""}
    assert set(exported["device"].tolist()) == {"dev-a"}

    # Register the labelled rows as the model's evaluation set.
    evalsets = EvalSetStore(tmp_path / "evalsets", fleet.registry)
    registration, new = capture.register_evalset(a.sha256, evalsets, note="from cam traffic")
    assert new
    assert registration.samples == a.labelled_rows
    assert evalsets.latest("digits") == registration

    # The next collect acknowledges the chunk (deleted on the device) and meets the budget.
    second = capture.collect("digits")
    answers = _settled(diag, second.issued.commands, "refused", "answered")
    assert {r.answer["error"]["code"] for r in answers if r.state == "refused"} == {
        "command_limited"
    }
    wait_until(lambda: not chunk_file.exists(), WAIT, what="acknowledged chunk deleted")
    counts = devices["dev-a"].sync.commands.capture.counts("digits")
    assert counts["records_acknowledged"] == a.records
    assert counts["budget_deferred"] >= 1
    status = capture.status("digits")["policies"][0]
    assert {d["device_id"]: d["records"] for d in status["devices"]} == {
        "dev-a": a.records,
        "dev-b": by_device["dev-b"].records,
    }


def _plant_chunk(device: Device, data: bytes) -> None:
    """A chunk on the device's disk that is not what it packed (a damaged or hostile device)."""
    uploader = device.sync.commands.capture
    path = Path(device.config.store.state_dir) / "sync" / "capture" / "digits.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    state = uploader._state  # the test plays the damage
    upto = state["cursor"].get("digits", [-1, -1])  # covering no record
    state["pending"]["digits"] = {
        "sha256": sha, "length": len(data), "upto": upto, "records": 0, "labelled": 0,
    }  # fmt: skip


def test_garbled_and_oversized_chunks_are_refused_counted_and_dropped(
    fleet: FleetHarness, diag: Diagnostics, capture: CaptureService, digits_bundles: DigitsBundles
) -> None:
    v1 = fleet.publish(digits_bundles.path(1))
    device = _device(fleet, "dev-a")
    fleet.assign("dev-a", {"digits": v1})
    wait_until(lambda: device.agent.registry.get("digits") is not None, WAIT, what="v1")
    enabled = capture.enable("digits", {"devices": ["dev-a"]}, chunk_bytes=65536)
    _settled(diag, enabled.issued.commands, "answered")
    _traffic(device, digits_bundles.x_eval, digits_bundles.y_eval, 5, labelled=0)

    garbled = b"PK\x03\x04" + bytes(range(256)) * 40
    _plant_chunk(device, garbled)
    (cmd,) = capture.collect("digits").issued.commands
    _settled(diag, (cmd,), "uploaded")  # the blocks arrived whole: the content is what is bad
    wait_until(lambda: capture.stats().get("chunks_refused_malformed") == 1, WAIT, what="refused")
    assert capture.datasets("digits") == []
    (state,) = capture.status("digits")["policies"][0]["devices"]
    assert state["refused_chunks"] == 1
    assert state["ack_sha256"] == hashlib.sha256(garbled).hexdigest()

    # Acknowledged like any chunk: the device drops it and sends its real records; then one
    # larger than the policy allows is refused before a block is pulled.
    (cmd,) = capture.collect("digits").issued.commands
    _settled(diag, (cmd,), "uploaded")
    wait_until(lambda: len(capture.datasets("digits")) == 1, WAIT, what="the real chunk")
    (real,) = capture.datasets("digits")
    _acked(capture, "dev-a", real.provenance["chunk_sha256"])
    assert capture.datasets("digits")[0].records == 5
    (cmd,) = capture.collect("digits").issued.commands  # acknowledges it; nothing new
    (answered,) = _settled(diag, (cmd,), "answered")
    assert answered.answer["result"]["acknowledged"] == 5
    assert answered.answer["result"]["offer"] is None

    _plant_chunk(device, b"\0" * 70_000)
    (cmd,) = capture.collect("digits").issued.commands
    (answered,) = _settled(diag, (cmd,), "answered")
    assert answered.answer["result"]["offer"]["length"] == 70_000
    assert capture.stats()["chunks_refused_oversized"] == 1
    assert diag.stats()["uploads_verified"] == 2  # the oversized one was never pulled
    (cmd,) = capture.collect("digits").issued.commands
    _settled(diag, (cmd,), "answered")
    assert not (Path(device.config.store.state_dir) / "sync" / "capture" / "digits.npz").exists()


def test_the_cli_through_the_admin_api(
    fleet: FleetHarness,
    diag: Diagnostics,
    capture: CaptureService,
    digits_bundles: DigitsBundles,
    tmp_path: Path,
) -> None:
    keys = digits_bundles.keys
    service = FleetService(
        fleet.registry,
        BundleLibrary(tmp_path / "library", keys.trusted_root()),
        fleet.gateway,
        [keys.signer("online-1")],
        clock=lambda: datetime.now(UTC),
        ttl=timedelta(hours=1),
    )
    evalsets = EvalSetStore(tmp_path / "evalsets", fleet.registry)
    app = create_app(
        service,
        TOKEN,
        extra_routes=(lambda guard: capture_routes(capture, evalsets, guard),),
        auditor=Auditor(fleet.registry, lambda: datetime.now(UTC), max_body_bytes=1 << 20),
    )
    server = AdminServer(app, "127.0.0.1", 0)
    server.start()
    try:
        v1 = fleet.publish(digits_bundles.path(1))
        device = _device(fleet, "dev-a")
        fleet.assign("dev-a", {"digits": v1})
        wait_until(lambda: device.agent.registry.get("digits") is not None, WAIT, what="v1")
        url = ["--url", f"http://127.0.0.1:{server.port}", "--token", TOKEN]
        runner = CliRunner()
        enable = runner.invoke(
            cli, ["capture", "enable", "digits", "--device", "dev-a", "--sample-rate", "1", *url]
        )
        assert enable.exit_code == 0, enable.output
        assert "1 device(s)" in enable.output
        wait_until(
            lambda: device.sync.commands.capture.settings("digits") is not None, WAIT, what="on"
        )
        _traffic(device, digits_bundles.x_eval, digits_bundles.y_eval, 8, labelled=8)
        collect = runner.invoke(cli, ["capture", "collect", "digits", *url])
        assert collect.exit_code == 0, collect.output
        wait_until(lambda: capture.datasets("digits"), WAIT, what="a dataset")
        listed = runner.invoke(cli, ["datasets", "list", "--json", *url])
        (row,) = json.loads(listed.output)
        assert row["records"] == 8
        out = tmp_path / "export.npz"
        export = runner.invoke(cli, ["datasets", "export", row["sha256"], "-o", str(out), *url])
        assert export.exit_code == 0, export.output
        assert np.load(out)["label"].tolist() == digits_bundles.y_eval[:8].tolist()
        table = tmp_path / "export.parquet"
        export = runner.invoke(
            cli,
            ["datasets", "export", row["sha256"], "--format", "parquet", "-o", str(table), *url],
        )
        assert export.exit_code == 0, export.output
        labels = pq.read_table(table).column("label").to_pylist()
        assert labels == digits_bundles.y_eval[:8].tolist()
        merged = tmp_path / "digits-day.npz"
        export = runner.invoke(
            cli, ["capture", "export", "digits", "--since", "24h", "-o", str(merged), *url]
        )
        assert export.exit_code == 0, export.output
        assert np.load(merged)["label"].tolist() == np.load(out)["label"].tolist()
        empty = runner.invoke(
            cli,
            [
                "capture",
                "export",
                "digits",
                "--since",
                "0",
                "--until",
                "1000",
                "-o",
                str(merged),
                *url,
            ],
        )
        assert empty.exit_code != 0
        assert "no captured row" in str(empty.exception)
        reg = runner.invoke(cli, ["datasets", "register-evalset", row["sha256"], *url])
        assert reg.exit_code == 0, reg.output
        assert "8 samples" in reg.output
        status = runner.invoke(cli, ["capture", "status", "digits", *url])
        assert "dev-a" in status.output
        missing = runner.invoke(cli, ["datasets", "show", "f" * 64, *url])
        assert missing.exit_code != 0
        assert "404: no dataset" in str(missing.exception)
        with AdminClient(f"http://127.0.0.1:{server.port}", TOKEN) as client:
            entries = client.audit(action="POST /v1/capture/{model}/enable")
        assert [e["status"] for e in entries if e["status"] is not None] == [202]
    finally:
        server.stop()
