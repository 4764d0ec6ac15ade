"""The shadow assignment in the signed desired state (issue 12, a rollout's shadow phase).

A hostile table on the new ``shadow`` object (each refused with ``MetadataFormatError`` even
when honestly signed), the honest form verifying and round-tripping, the older form staying
byte-identical, an old device's strict parser refusing the new key (why the server sends it only
to devices listing the ``shadow`` capability), the server's ``assign_shadow`` honouring that, and
the shadow bundle going through exactly the serving bundle's checks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import Signer

from bundles import DigitsBundles
from edge_agent.errors import (
    DigestMismatchError,
    LengthMismatchError,
    MetadataFormatError,
    MixAndMatchError,
)
from edge_agent.trust import TrustedRoot
from edge_agent.trust.assignment import (
    SHADOW_CAPABILITY,
    ModelAssignment,
    ShadowAssignment,
    check_assignment,
    check_bundle_identity,
)
from edge_agent.trust.desired import DesiredState, verify_desired_state
from edge_agent.wire.reported import ModelReport, ReportedState, ShadowReport
from fakes import FakeGateway
from fleet_server.delivery.desired import make_desired_state, sign_desired_state
from fleet_server.delivery.library import BundleLibrary
from fleet_server.registry.store import Registry
from fleet_server.rollouts.shadow_evidence import shadow_capable
from fleet_server.service import FleetService
from model_builder.keystore import KeyStore
from support import NOW

DEVICE_ID = "cam-7"
SHA_A, SHA_B, SHA_C, SHA_D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    return KeyStore.init(tmp_path / "k", now=NOW)


def _root(keys: KeyStore) -> TrustedRoot:
    chain = keys.root_chain()
    return TrustedRoot.from_chain(chain[0], chain[1:])


def _shadow(**kw: Any) -> ShadowAssignment:
    fields: dict[str, Any] = {
        "version": 4,
        "channel": "stable",
        "bundle_sha256": SHA_C,
        "bundle_length": 2000,
        "targets_sha256": SHA_D,
        "fraction_ppm": 250_000,
    }
    fields.update(kw)
    return ShadowAssignment(**fields)


def _assignment(shadow: ShadowAssignment | None = None) -> ModelAssignment:
    return ModelAssignment(3, "stable", SHA_A, 1000, SHA_B, shadow=shadow)


def _state(shadow: ShadowAssignment | None = None) -> DesiredState:
    return make_desired_state(DEVICE_ID, 5, {"digits": _assignment(shadow)}, NOW)


def _verify(keys: KeyStore, data: bytes) -> DesiredState:
    return verify_desired_state(_root(keys), data, now=NOW, device_id=DEVICE_ID, last_version=4)


def _sign_raw(signed: Any, signers: Sequence[Signer]) -> bytes:
    payload = str(encode_canonical(signed)).encode()
    sigs = [s.sign(payload) for s in signers]
    return json.dumps(
        {"signed": signed, "signatures": [{"keyid": s.keyid, "sig": s.signature} for s in sigs]}
    ).encode()


def test_shadow_assignment_verifies_and_round_trips(keys: KeyStore) -> None:
    state = _state(_shadow())
    data = sign_desired_state(state, [keys.signer("online-1")])
    got = _verify(keys, data)
    assert got == state
    shadow = got.models["digits"].shadow
    assert shadow is not None
    assert (shadow.version, shadow.fraction_ppm, shadow.fraction) == (4, 250_000, 0.25)
    assert json.loads(data)["signed"]["models"]["digits"]["shadow"]["bundle_sha256"] == SHA_C
    assert DesiredState.from_dict(state.to_dict()) == state
    assert got.models["digits"].serving() == _assignment()


def test_without_a_shadow_the_document_is_the_older_form() -> None:
    d = _state().to_dict()["models"]["digits"]
    assert set(d) == {"version", "channel", "bundle_sha256", "bundle_length", "targets_sha256"}


def test_shadow_bundle_is_checked_like_a_serving_bundle() -> None:
    bundle = _shadow().bundle()
    assert bundle == ModelAssignment(4, "stable", SHA_C, 2000, SHA_D)
    check_assignment(bundle, 2000, SHA_C)
    with pytest.raises(LengthMismatchError):
        check_assignment(bundle, 2001, SHA_C)
    with pytest.raises(DigestMismatchError):
        check_assignment(bundle, 2000, SHA_A)

    class _Manifest:
        name, version, channel = "digits", 4, "stable"

    check_bundle_identity("digits", bundle, _Manifest())  # type: ignore[arg-type]
    _Manifest.version = 3
    with pytest.raises(MixAndMatchError):
        check_bundle_identity("digits", bundle, _Manifest())  # type: ignore[arg-type]


def _with_shadow(**changes: Any) -> dict[str, Any]:
    d = _state(_shadow()).to_dict()
    d["models"]["digits"]["shadow"].update(changes)
    return d


def _drop(key: str) -> dict[str, Any]:
    d = _state(_shadow()).to_dict()
    del d["models"]["digits"]["shadow"][key]
    return d


HOSTILE: dict[str, Any] = {
    "shadow-null": {
        **_state().to_dict(),
        "models": {"digits": {**_assignment().to_dict(), "shadow": None}},
    },
    "shadow-list": {
        **_state().to_dict(),
        "models": {"digits": {**_assignment().to_dict(), "shadow": []}},
    },
    "shadow-extra-key": _with_shadow(url="http://evil"),
    "shadow-missing-fraction": _drop("fraction_ppm"),
    "shadow-missing-sha": _drop("bundle_sha256"),
    "fraction-zero": _with_shadow(fraction_ppm=0),
    "fraction-over-one": _with_shadow(fraction_ppm=1_000_001),
    "fraction-negative": _with_shadow(fraction_ppm=-1),
    "fraction-string": _with_shadow(fraction_ppm="250000"),
    "fraction-bool": _with_shadow(fraction_ppm=True),
    "shadow-older-than-serving": _with_shadow(version=2),
    "shadow-same-as-serving": _with_shadow(version=3),
    "shadow-version-zero": _with_shadow(version=0),
    "shadow-sha-upper": _with_shadow(bundle_sha256="C" * 64),
    "shadow-targets-short": _with_shadow(targets_sha256="ab"),
    "shadow-length-zero": _with_shadow(bundle_length=0),
    "shadow-length-huge": _with_shadow(bundle_length=(1 << 40) + 1),
    "shadow-channel": _with_shadow(channel="Stable!"),
}


@pytest.mark.parametrize("signed", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_shadow_is_refused_even_when_signed(keys: KeyStore, signed: Any) -> None:
    online = keys.signer("online-1")
    assert _verify(keys, _sign_raw(_state(_shadow()).to_dict(), [online]))
    with pytest.raises(MetadataFormatError):
        _verify(keys, _sign_raw(signed, [online]))


def test_float_fraction_is_not_canonical(keys: KeyStore) -> None:
    signed = _with_shadow(fraction_ppm=0.25)
    raw = json.dumps({"signed": signed, "signatures": []}).encode()
    with pytest.raises(MetadataFormatError):
        _verify(keys, raw)


def test_an_old_device_refuses_the_new_key() -> None:
    """Why the server must not send it to an old device: the strict key set of the older
    parser (the five serving keys only) refuses the document as malformed."""
    old_keys = {"version", "channel", "bundle_sha256", "bundle_length", "targets_sha256"}
    d = _state(_shadow()).to_dict()["models"]["digits"]
    assert set(d) - old_keys == {"shadow"}


def test_server_sends_shadows_only_to_devices_that_advertise_them() -> None:
    new = ReportedState(DEVICE_ID, 1.0, capabilities=(SHADOW_CAPABILITY,)).to_dict()
    old = ReportedState(DEVICE_ID, 1.0).to_dict()
    assert "capabilities" not in old  # the older reported form, unchanged
    assert shadow_capable(new)
    assert not shadow_capable(old)
    assert not shadow_capable(None)
    assert not shadow_capable({"capabilities": "shadow"})
    assert ReportedState.from_dict(new).capabilities == (SHADOW_CAPABILITY,)


def test_reported_shadow_round_trips() -> None:
    report = ModelReport(active=3, shadow=ShadowReport(4, "installed"))
    state = ReportedState(DEVICE_ID, 1.0, models={"digits": report})
    assert ReportedState.from_dict(state.to_dict()).models["digits"].shadow == ShadowReport(
        4, "installed"
    )
    assert "shadow" not in ModelReport(active=3).to_dict()


# ----------------------------------------------------------------- the server's side
@pytest.fixture
def service_parts(digits_bundles: DigitsBundles, tmp_path: Path) -> Iterator[tuple[Any, Any, Any]]:
    keys = digits_bundles.keys
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    gateway = FakeGateway()
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


def test_assign_shadow_signs_it_for_capable_devices_only(
    service_parts: tuple[FleetService, FakeGateway, Registry], digits_bundles: DigitsBundles
) -> None:
    service, gateway, registry = service_parts
    root = digits_bundles.keys.trusted_root()
    v1 = service.publish_model(digits_bundles.path(1))
    v2 = service.publish_model(digits_bundles.path(2))
    service.enroll_device("cam-1")
    service.enroll_device("cam-old")
    registry.record_reported(
        "cam-1", ReportedState("cam-1", 1.0, capabilities=(SHADOW_CAPABILITY,)).to_dict()
    )
    registry.record_reported("cam-old", ReportedState("cam-old", 1.0).to_dict())
    service.assign("cam-1", "digits", 1)
    result = service.assign_shadow("cam-1", "digits", 1, 2, 100_000)
    assert result is not None
    assert result.published
    assert result.desired_version == 2
    state = verify_desired_state(
        root, gateway.published[-1][1], now=NOW, device_id="cam-1", last_version=1
    )
    a = state.models["digits"]
    assert (a.version, a.bundle_sha256) == (1, v1.sha256)
    assert a.shadow is not None
    assert (a.shadow.version, a.shadow.bundle_sha256, a.shadow.bundle_length) == (
        2,
        v2.sha256,
        v2.length,
    )
    assert a.shadow.targets_sha256 == v2.targets_sha256
    assert a.shadow.fraction_ppm == 100_000
    # the old device is never sent the new key
    published = len(gateway.published)
    assert service.assign_shadow("cam-old", "digits", 1, 2, 100_000) is None
    assert len(gateway.published) == published
    # a later serving assignment replaces the shadow (the canary serves: the shadow ends)
    service.assign("cam-1", "digits", 2)
    state = verify_desired_state(
        root, gateway.published[-1][1], now=NOW, device_id="cam-1", last_version=2
    )
    assert state.models["digits"].shadow is None
    assert state.models["digits"].version == 2
