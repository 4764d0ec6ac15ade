"""Root rotation on the device: one test per attack on the chain, persistence, restart, wire.

Every chain here is produced by the real key store (``model_builder.keystore``) and walked by
the device's rule (``edge_agent.trust.apply_root_chain``) or by the store, which persists it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root

from edge_agent.common import durable
from edge_agent.errors import (
    ExpiredMetadataError,
    MetadataFormatError,
    ModelStoreError,
    RootRotationError,
    SignatureThresholdError,
)
from edge_agent.store import ModelStore
from edge_agent.trust import (
    TrustedRoot,
    apply_root_chain,
    attach_roots,
    choose_root,
    split_roots,
)
from edge_agent.trust.desired import DesiredState, verify_desired_state
from fleet_server.delivery.desired import sign_desired_state
from model_builder.keystore import KeyStore
from support import DEVICE, NOW, make_bundle, write


def _keyid(ks: KeyStore, label: str) -> str:
    return next(k.keyid for k in ks.list_keys() if k.label == label)


def _signer(ks: KeyStore, label: str) -> CryptoSigner:
    """A key of the store, retired ones included (an attacker may hold a retired key)."""
    for pem in (ks.path / "keys" / f"{label}.pem", ks.path / "keys" / "revoked" / f"{label}.pem"):
        if pem.is_file():
            return CryptoSigner(load_pem_private_key(pem.read_bytes(), None))
    raise AssertionError(f"no key {label}")


def _resign(data: bytes, ks: KeyStore, labels: list[str], **changes: object) -> bytes:
    """Root metadata ``data`` with ``changes`` to its signed part, signed only by ``labels``."""
    md = Metadata[Root].from_bytes(data)
    for name, value in changes.items():
        setattr(md.signed, name, value)
    md.signatures.clear()
    for label in labels:
        md.sign(_signer(ks, label), append=True)
    return bytes(md.to_bytes())


@pytest.fixture
def ks(tmp_path: Path) -> KeyStore:
    """Root v1 (root-1), v2 adds targets-2, v3 rotates root-1 out for root-2 (both sign v3)."""
    ks = KeyStore.init(tmp_path / "keys", now=NOW)
    ks.rotate("targets", now=NOW, add=1)
    ks.rotate("root", now=NOW, add=1, remove=[_keyid(ks, "root-1")])
    return ks


def _v1(ks: KeyStore) -> TrustedRoot:
    return TrustedRoot.from_bytes(ks.root_chain()[0])


def test_a_whole_chain_is_walked_and_already_known_versions_are_skipped(ks: KeyStore) -> None:
    chain = ks.root_chain()
    root_1 = _v1(ks).keyids("root")[0]
    root = apply_root_chain(_v1(ks), chain, now=NOW)  # v1 itself is skipped
    assert root.version == 3
    assert _keyid(ks, "root-2") in root.keyids("root")
    assert root_1 not in root.keyids("root")
    assert (ks.path / "keys" / "revoked" / "root-1.pem").is_file()  # retired by the rotation
    v3 = apply_root_chain(root, chain, now=NOW)
    assert v3 is root  # nothing new: the same object, nothing to persist


# Each attack: (chain built from the honest key store) -> the error the device must raise.
ATTACKS: dict[str, tuple[Callable[[KeyStore], list[bytes]], type[Exception], str]] = {
    "skips a version": (lambda ks: [ks.root_chain()[2]], RootRotationError, "does not follow"),
    "out of order": (
        lambda ks: [ks.root_chain()[2], ks.root_chain()[1]],
        RootRotationError,
        "does not follow",
    ),
    "repeats a version": (
        lambda ks: [ks.root_chain()[1], ks.root_chain()[1]],
        RootRotationError,
        "does not follow",
    ),
    "signed only by the new root keys": (
        lambda ks: [ks.root_chain()[1], _resign(ks.root_chain()[2], ks, ["root-2"])],
        RootRotationError,
        "current root keys",
    ),
    "signed only by the old root keys": (
        lambda ks: [ks.root_chain()[1], _resign(ks.root_chain()[2], ks, ["root-1"])],
        RootRotationError,
        "its own root keys",
    ),
    "changed after signing": (
        lambda ks: [_tamper(ks.root_chain()[1])],
        RootRotationError,
        "current root keys",
    ),
    "not root metadata": (
        lambda ks: [_targets_bytes(ks)],
        MetadataFormatError,
        "expected root",
    ),
    "not metadata at all": (lambda ks: [b"\x00garbage"], MetadataFormatError, "not JSON"),
    "deeply nested JSON": (
        lambda ks: [b"[" * 100_000 + b"]" * 100_000],
        MetadataFormatError,
        "nested deeper",
    ),
    "endless chain": (
        lambda ks: [ks.root_chain()[0]] * 65,
        MetadataFormatError,
        "at most 64",
    ),
}


def _tamper(data: bytes) -> bytes:
    doc = json.loads(data)
    doc["signed"]["expires"] = "2099-01-01T00:00:00Z"  # signatures no longer cover this
    return json.dumps(doc).encode()


def _targets_bytes(ks: KeyStore) -> bytes:
    from tuf.api.metadata import Targets

    return ks.sign_targets(Targets(version=2, expires=NOW + timedelta(days=1)))


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_root_chain_attack_is_refused_and_nothing_is_persisted(
    attack: str, ks: KeyStore, tmp_path: Path
) -> None:
    build, error, match = ATTACKS[attack]
    chain = build(ks)
    with pytest.raises(error, match=match):
        apply_root_chain(_v1(ks), chain, now=NOW)
    store = ModelStore(tmp_path / "state", _v1(ks), DEVICE, clock=lambda: NOW)
    stored = (tmp_path / "state" / "trust" / "root.json").read_bytes()
    with pytest.raises(error, match=match):
        store.update_roots(chain)
    assert store.root.version == 1
    assert (tmp_path / "state" / "trust" / "root.json").read_bytes() == stored


def test_expired_intermediate_root_is_fine_when_the_final_one_is_not(tmp_path: Path) -> None:
    ks = KeyStore.init(tmp_path / "keys", now=NOW - timedelta(days=400))
    ks.rotate("targets", now=NOW - timedelta(days=400), add=1, expires_days=30)  # v2 expired
    ks.rotate("targets", now=NOW, add=1)  # v3 valid
    assert apply_root_chain(_v1(ks), ks.root_chain(), now=NOW).version == 3


def test_an_expired_final_root_is_refused(tmp_path: Path) -> None:
    ks = KeyStore.init(tmp_path / "keys", now=NOW - timedelta(days=400))
    ks.rotate("targets", now=NOW - timedelta(days=400), add=1, expires_days=30)
    with pytest.raises(ExpiredMetadataError):
        apply_root_chain(_v1(ks), ks.root_chain(), now=NOW)


def test_a_device_keeps_a_rotation_whose_final_root_expired_and_acts_on_nothing(
    tmp_path: Path,
) -> None:
    """python-tuf semantics: the walk stands (its revocations apply), the expiry is raised."""
    ks = KeyStore.init(tmp_path / "keys", now=NOW - timedelta(days=400))
    ks.rotate(
        "targets", now=NOW - timedelta(days=400), add=1, remove=["targets-1"], expires_days=30
    )
    store = ModelStore(tmp_path / "state", _v1(ks), DEVICE, clock=lambda: NOW)
    with pytest.raises(ExpiredMetadataError):
        store.update_roots(ks.root_chain())
    assert store.root.version == 2
    again = ModelStore(tmp_path / "state", _v1(ks), DEVICE, clock=lambda: NOW)
    assert again.root.version == 2
    state = DesiredState(device_id="dev-1", version=1, expires=NOW + timedelta(hours=1))
    envelope = sign_desired_state(state, [ks.signer("online-1")])
    with pytest.raises(ExpiredMetadataError):
        verify_desired_state(again.root, envelope, now=NOW, device_id="dev-1", last_version=0)


def test_rotation_survives_a_restart_and_an_older_provisioned_root(
    ks: KeyStore, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path / "state", _v1(ks), DEVICE, clock=lambda: NOW)
    assert store.update_roots(ks.root_chain()[1:]).version == 3
    reopened = ModelStore(tmp_path / "state", _v1(ks), DEVICE, clock=lambda: NOW)
    assert reopened.root.version == 3
    assert reopened.root_warning == ""


def test_a_newer_provisioned_root_must_chain_from_the_stored_one(
    ks: KeyStore, tmp_path: Path
) -> None:
    chain = ks.root_chain()
    ModelStore(tmp_path / "state", _v1(ks), DEVICE, clock=lambda: NOW)
    # The next version, properly signed: taken at start and persisted.
    store = ModelStore(
        tmp_path / "state", TrustedRoot.from_bytes(chain[1]), DEVICE, clock=lambda: NOW
    )
    assert store.root.version == 2
    store = ModelStore(
        tmp_path / "state", TrustedRoot.from_bytes(chain[2]), DEVICE, clock=lambda: NOW
    )
    assert store.root.version == 3  # exactly next from v2: chains
    other = KeyStore.init(tmp_path / "other", now=NOW)
    for _ in range(3):
        other.rotate("targets", now=NOW, add=1)
    foreign_v4 = TrustedRoot.from_bytes(other.root_chain()[3])  # self-signed, not by our v3
    store = ModelStore(tmp_path / "state", foreign_v4, DEVICE, clock=lambda: NOW)
    assert store.root.version == 3
    assert "refused" in store.root_warning
    assert TrustedRoot.from_bytes((tmp_path / "state" / "trust" / "root.json").read_bytes()).keyids(
        "root"
    ) == store.root.keyids("root")


def test_choose_root_refuses_a_provisioned_root_that_skips_versions(ks: KeyStore) -> None:
    chain = ks.root_chain()
    choice = choose_root(_v1(ks), TrustedRoot.from_bytes(chain[2]))
    assert choice.root.version == 1
    assert not choice.persist
    assert "versions 2..2" in choice.warning


def test_a_failed_write_leaves_the_trusted_root_unchanged(
    ks: KeyStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path / "state", _v1(ks), DEVICE, clock=lambda: NOW)

    def full(path: Path, data: bytes, mode: int = 0o644) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable, "write_atomic", full)
    with pytest.raises(ModelStoreError, match="No space"):
        store.update_roots(ks.root_chain()[1:])
    assert store.root.version == 1


def test_another_process_rotation_is_picked_up(ks: KeyStore, tmp_path: Path) -> None:
    daemon = ModelStore(tmp_path / "state", _v1(ks), DEVICE, clock=lambda: NOW)
    cli = ModelStore(tmp_path / "state", _v1(ks), DEVICE, clock=lambda: NOW)
    cli.update_roots(ks.root_chain())
    assert daemon.refresh_root()
    assert daemon.root.version == 3
    assert not daemon.refresh_root()


def test_bundles_signed_by_a_rotated_out_builder_key_are_refused_after_rotation(
    tmp_path: Path,
) -> None:
    ks = KeyStore.init(tmp_path / "keys", now=NOW)
    store = ModelStore(tmp_path / "state", _v1(ks), DEVICE, clock=lambda: NOW)
    store.install(write(tmp_path, make_bundle(ks, version=1), "v1.efb"))
    # What the thief of targets-1 signs (the same bytes whether made before or after).
    forged = make_bundle(ks, version=2, key_labels=["targets-1"])
    ks.rotate("targets", now=NOW, add=1, remove=[_keyid(ks, "targets-1")])
    store.update_roots(ks.root_chain())
    with pytest.raises(SignatureThresholdError):
        store.install(write(tmp_path, forged, "forged.efb"))
    store.install(write(tmp_path, make_bundle(ks, version=2), "v2.efb"))  # targets-2 signs
    assert store.state("digits").active == 2


# ------------------------------------------------------------------------------- the wire
def _envelope(ks: KeyStore) -> bytes:
    state = DesiredState(device_id="dev-1", version=3, expires=NOW + timedelta(hours=1))
    return sign_desired_state(state, [ks.signer("online-1")])


def test_the_chain_travels_beside_the_desired_state_unchanged(ks: KeyStore) -> None:
    envelope = _envelope(ks)
    message = attach_roots(envelope, ks.root_chain()[1:])
    got_envelope, roots = split_roots(message)
    assert got_envelope == envelope
    assert [TrustedRoot.from_chain(ks.root_chain()[0], roots).version] == [3]
    assert split_roots(envelope) == (envelope, ())
    assert attach_roots(envelope, []) == envelope


@pytest.mark.parametrize(
    "message",
    [
        b'{"roots": 1, "signed": {}}',
        b'{"roots": ["text"], "signed": {}}',
        b'{"roots": [], "roots": []}',
        b'{"roots": [{"a": 1e400}]}',
        b'{"roots": [{"a": NaN}]}',
        b'{"roots": [' + b"9" * 5000 + b"]}",
        b'{"roots": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"roots": [{}], "x": "\xff"}',
        b'{"roots": [' + b"{}," * 64 + b"{}]}",
        b'{"roots": []}' + b" " * (1024 * 1024),
    ],
    ids=[
        "not a list",
        "strings",
        "duplicate key",
        "huge float",
        "NaN",
        "huge int",
        "deep nesting",
        "not utf-8",
        "too many",
        "oversized",
    ],
)
def test_hostile_messages_get_a_typed_error(message: bytes) -> None:
    with pytest.raises(MetadataFormatError):
        split_roots(message)


@pytest.fixture(scope="module")
def hypo_root(tmp_path_factory: pytest.TempPathFactory) -> TrustedRoot:
    return _v1(KeyStore.init(tmp_path_factory.mktemp("hypo") / "keys", now=NOW))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    message=st.one_of(
        st.binary(max_size=512),
        JSON_VALUES.map(lambda v: json.dumps({"roots": v, "signed": v}).encode()),
        st.lists(JSON_VALUES, max_size=3).map(lambda v: json.dumps({"roots": v}).encode()),
    )
)
def test_split_roots_and_the_rotation_rule_only_raise_typed_errors(
    hypo_root: TrustedRoot, message: bytes
) -> None:
    try:
        _envelope_bytes, roots = split_roots(message)
    except MetadataFormatError:
        return
    # Whatever gets through is judged by the rotation rule, with typed errors too.
    with contextlib.suppress(MetadataFormatError, RootRotationError, ExpiredMetadataError):
        apply_root_chain(hypo_root, roots, now=NOW)
