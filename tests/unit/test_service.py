"""fleet_server.service over a real SQLite registry and a fake gateway."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bundles import DigitsBundles
from edge_agent.bundle.archive import read_raw
from edge_agent.errors import SignatureThresholdError
from edge_agent.trust.assignment import check_targets_digest
from edge_agent.trust.desired import verify_desired_state
from edge_agent.wire.telemetry import StatusMessage
from fakes import FakeGateway
from fleet_server.delivery.library import BundleLibrary
from fleet_server.errors import (
    BundleRejectedError,
    DeviceRevokedError,
    ModelNotPublishedError,
    UnknownDeviceError,
    UnknownGroupError,
)
from fleet_server.registry.store import Registry
from fleet_server.service import FleetService

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def parts(
    digits_bundles: DigitsBundles, tmp_path: Path
) -> Iterator[tuple[FleetService, FakeGateway, Registry]]:
    keys = digits_bundles.keys
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    gateway = FakeGateway(messages={"telemetry": 3})
    service = FleetService(
        registry,
        BundleLibrary(tmp_path / "bundles", keys.trusted_root()),
        gateway,
        [keys.signer("online-1")],
        clock=lambda: NOW,
        ttl=timedelta(hours=1),
    )
    yield service, gateway, registry
    registry.close()


def test_publish_and_list(
    parts: tuple[FleetService, FakeGateway, Registry], digits_bundles: DigitsBundles
) -> None:
    service, _, _ = parts
    record = service.publish_model(digits_bundles.path(1))
    data = digits_bundles.path(1).read_bytes()
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    assert record.length == len(data)
    service.publish_model_bytes(digits_bundles.path(2).read_bytes())
    assert [(m.name, m.version) for m in service.list_models()] == [("digits", 1), ("digits", 2)]
    with pytest.raises(BundleRejectedError):
        service.publish_model_bytes(data[:-4096])
    assert len(service.list_models()) == 2


def test_assign_device_signs_verifiable_document(
    parts: tuple[FleetService, FakeGateway, Registry], digits_bundles: DigitsBundles
) -> None:
    service, gateway, _ = parts
    root = digits_bundles.keys.trusted_root()
    record = service.publish_model(digits_bundles.path(1))
    service.enroll_device("cam-1", group="lobby")
    [result] = service.assign("cam-1", "digits", 1)
    assert result.published
    assert result.desired_version == 1
    [(device, doc)] = gateway.published
    assert device == "cam-1"
    state = verify_desired_state(root, doc, now=NOW, device_id="cam-1", last_version=0)
    a = state.models["digits"]
    assert (a.version, a.channel, a.bundle_sha256, a.bundle_length) == (
        1,
        record.channel,
        record.sha256,
        record.length,
    )
    check_targets_digest(a, read_raw(digits_bundles.path(1)).targets_bytes)
    assert state.expires == NOW + timedelta(hours=1)
    # another device cannot use it, and it is not valid after its expiry
    with pytest.raises(Exception, match="addressed to"):
        verify_desired_state(root, doc, now=NOW, device_id="cam-2", last_version=0)
    with pytest.raises(Exception, match="expired"):
        verify_desired_state(
            root, doc, now=NOW + timedelta(hours=2), device_id="cam-1", last_version=0
        )


def test_second_assign_keeps_other_models_and_bumps_version(
    parts: tuple[FleetService, FakeGateway, Registry],
    digits_bundles: DigitsBundles,
    tmp_path: Path,
) -> None:
    service, gateway, registry = parts
    root = digits_bundles.keys.trusted_root()
    service.publish_model(digits_bundles.path(1))
    service.publish_model(digits_bundles.path(2))
    service.enroll_device("cam-1")
    # a document naming another model, stored as if assigned earlier
    registry.publish_bundle(
        "other", 7, channel="stable", sha256="a" * 64, length=10, targets_sha256="b" * 64
    )
    (tmp_path / "bundles" / f"{'a' * 64}.bundle").write_bytes(b"x" * 10)
    service.assign("cam-1", "other", 7)
    service.assign("cam-1", "digits", 1)
    service.assign("cam-1", "digits", 2)
    docs = [doc for _, doc in gateway.published]
    states = [
        verify_desired_state(root, d, now=NOW, device_id="cam-1", last_version=i)
        for i, d in enumerate(docs)
    ]
    assert [s.version for s in states] == [1, 2, 3]
    assert {n: a.version for n, a in states[-1].models.items()} == {"digits": 2, "other": 7}
    assert set(states[1].models) == {"digits", "other"}
    # the device would refuse a replay of the older document
    with pytest.raises(Exception, match="not newer"):
        verify_desired_state(root, docs[1], now=NOW, device_id="cam-1", last_version=3)
    view = service.device("cam-1")
    assert view.desired is not None
    assert view.desired.version == 3


def test_assign_group_skips_revoked_and_reports_publish_failures(
    parts: tuple[FleetService, FakeGateway, Registry], digits_bundles: DigitsBundles
) -> None:
    service, gateway, _ = parts
    root = digits_bundles.keys.trusted_root()
    service.publish_model(digits_bundles.path(1))
    for d in ("cam-1", "cam-2", "cam-3"):
        service.enroll_device(d, group="lobby")
    service.enroll_device("cam-9", group="yard")
    service.revoke_device("cam-3")
    results = service.assign("lobby", "digits", 1, group=True)
    assert [(r.device_id, r.published) for r in results] == [("cam-1", True), ("cam-2", True)]
    for device, doc in gateway.published:
        verify_desired_state(root, doc, now=NOW, device_id=device, last_version=0)
    gateway.fail = True
    [r] = service.assign("yard", "digits", 1, group=True)
    assert (r.device_id, r.published, r.desired_version) == ("cam-9", False, 1)
    assert r.error is not None
    assert "broker down" in r.error
    assert service.device("cam-9").desired is not None  # stored even though not delivered


def test_assign_errors(
    parts: tuple[FleetService, FakeGateway, Registry], digits_bundles: DigitsBundles
) -> None:
    service, _, _ = parts
    service.publish_model(digits_bundles.path(1))
    service.enroll_device("cam-1")
    with pytest.raises(ModelNotPublishedError):
        service.assign("cam-1", "digits", 9)
    with pytest.raises(UnknownDeviceError):
        service.assign("cam-404", "digits", 1)
    with pytest.raises(UnknownGroupError):
        service.assign("nobody", "digits", 1, group=True)
    service.revoke_device("cam-1")
    with pytest.raises(DeviceRevokedError):
        service.assign("cam-1", "digits", 1)


def test_wrong_signer_gives_documents_devices_refuse(
    digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    keys = digits_bundles.keys
    registry = Registry.open(f"sqlite:///{tmp_path / 'r.db'}")
    registry.upgrade()
    gateway = FakeGateway()
    service = FleetService(
        registry,
        BundleLibrary(tmp_path / "b", keys.trusted_root()),
        gateway,
        [keys.signer("targets-1")],  # a builder key is not an online key
        clock=lambda: NOW,
        ttl=timedelta(hours=1),
    )
    service.publish_model(digits_bundles.path(1))
    service.enroll_device("cam-1")
    service.assign("cam-1", "digits", 1)
    with pytest.raises(SignatureThresholdError):
        verify_desired_state(
            keys.trusted_root(), gateway.published[0][1], now=NOW, device_id="cam-1", last_version=0
        )
    registry.close()


def test_waves_devices_telemetry_status(
    parts: tuple[FleetService, FakeGateway, Registry], digits_bundles: DigitsBundles
) -> None:
    service, gateway, _ = parts
    record = service.publish_model(digits_bundles.path(1))
    assert service.start_wave(record.sha256) == "wave-1"
    with pytest.raises(ModelNotPublishedError):
        service.start_wave("f" * 64)
    service.enroll_device("cam-1", tags={"site": "a"})
    service.enroll_device("cam-2")
    gateway.status["cam-1"] = StatusMessage("cam-1", "online", NOW.timestamp())
    gateway.status["cam-2"] = StatusMessage("cam-2", "offline", NOW.timestamp())
    views = service.devices()
    assert [(v.record.id, v.online.state if v.online else None) for v in views] == [
        ("cam-1", "online"),
        ("cam-2", "offline"),
    ]
    detail = service.device("cam-1")
    assert detail.seq is not None
    assert detail.seq.acked_upto == 0
    assert service.telemetry() == []
    st = service.status()
    assert (st.devices, st.active, st.online, st.bundles) == (2, 2, 1, 1)
    assert st.gateway == {"desired_published": 0, "messages_telemetry": 3}
