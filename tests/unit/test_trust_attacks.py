"""One test per attack the bundle trust model promises to stop.

Every test first shows the honest bundle passing (so the failure is caused by the attack, not by
the setup) and then the attacked one failing with the specific typed error.
"""

from __future__ import annotations

import io
import json
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from edge_agent.bundle import read_bundle
from edge_agent.contract import DeviceProfile
from edge_agent.errors import (
    BundleFormatError,
    DigestMismatchError,
    ExpiredMetadataError,
    IncompatibleTargetError,
    LengthMismatchError,
    MixAndMatchError,
    RollbackError,
    RootRotationError,
    SignatureThresholdError,
)
from edge_agent.trust import TrustedRoot, verify_bundle
from model_builder.keystore import KeyStore
from model_builder.package import package_bundle
from support import DEVICE, NOW, make_bundle, make_manifest, members, repack, write


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore.init(tmp_path / "keys", now=NOW)


def _root(store: KeyStore) -> TrustedRoot:
    chain = store.root_chain()  # what a device walks: v1 as provisioned, then each rotation
    return TrustedRoot.from_chain(chain[0], chain[1:])


def _verify(store: KeyStore, bundle: bytes, **kw: object) -> object:
    parts = list(members(bundle).values())
    kw.setdefault("now", NOW)
    kw.setdefault("device", DEVICE)
    kw.setdefault("installed_version", None)
    return verify_bundle(_root(store), parts[0], parts[1], parts[2], **kw)  # type: ignore[arg-type]


def test_honest_bundle_verifies_from_file(store: KeyStore, tmp_path: Path) -> None:
    loaded = read_bundle(
        write(tmp_path, make_bundle(store)),
        _root(store),
        now=NOW,
        installed_version=None,
        device=DEVICE,
    )
    assert loaded.manifest.name == "digits"
    assert loaded.artifact == b"model-bytes-v1" * 10


def test_tampered_artifact_is_rejected(store: KeyStore, tmp_path: Path) -> None:
    parts = members(make_bundle(store))
    art = bytearray(parts["model.onnx"])
    art[3] ^= 0x01  # same length, one bit flipped
    parts["model.onnx"] = bytes(art)
    with pytest.raises(DigestMismatchError):
        read_bundle(
            write(tmp_path, repack(parts)),
            _root(store),
            now=NOW,
            installed_version=None,
            device=DEVICE,
        )


def test_tampered_manifest_is_rejected(store: KeyStore, tmp_path: Path) -> None:
    parts = members(make_bundle(store))
    manifest = json.loads(parts["manifest.json"])
    manifest["inputs"]["tensors"][0]["nan_policy"] = "allow"  # weaken the input contract
    parts["manifest.json"] = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises((DigestMismatchError, LengthMismatchError)):
        read_bundle(
            write(tmp_path, repack(parts)),
            _root(store),
            now=NOW,
            installed_version=None,
            device=DEVICE,
        )


def test_tampered_manifest_same_length_is_rejected(store: KeyStore) -> None:
    parts = members(make_bundle(store))
    parts["manifest.json"] = parts["manifest.json"].replace(b'"reject"', b'"rejecT"')
    with pytest.raises(DigestMismatchError):
        _verify(store, repack(parts))


def test_unknown_key_is_rejected(store: KeyStore) -> None:
    bundle = make_bundle(store)
    parts = members(bundle)
    md = Metadata.from_bytes(parts["targets.json"])
    md.signatures.clear()
    md.sign(CryptoSigner.generate_ed25519())  # a key the root has never seen
    parts["targets.json"] = md.to_bytes()
    _verify(store, bundle)  # control: the builder-signed original passes
    with pytest.raises(SignatureThresholdError):
        _verify(store, repack(parts))


def test_fewer_signatures_than_threshold_is_rejected(tmp_path: Path) -> None:
    store = KeyStore.init(tmp_path / "k2", now=NOW, targets_keys=2, targets_threshold=2)
    both = make_bundle(store)
    _verify(store, both)  # control: two of two signatures pass
    one = make_bundle(store, key_labels=["targets-1"])
    with pytest.raises(SignatureThresholdError):
        _verify(store, one)


def test_duplicate_signature_from_one_key_does_not_count_twice(tmp_path: Path) -> None:
    store = KeyStore.init(tmp_path / "k2", now=NOW, targets_keys=2, targets_threshold=2)
    parts = members(make_bundle(store, key_labels=["targets-1"]))
    md = Metadata.from_bytes(parts["targets.json"])
    md.sign(store.signer("targets-1"), append=True)
    parts["targets.json"] = md.to_bytes()
    with pytest.raises(SignatureThresholdError):
        _verify(store, repack(parts))


def test_expired_targets_metadata_is_rejected(store: KeyStore) -> None:
    bundle = make_bundle(store, expires_days=30)
    _verify(store, bundle, now=NOW + timedelta(days=29))
    with pytest.raises(ExpiredMetadataError):
        _verify(store, bundle, now=NOW + timedelta(days=31))


def test_expired_root_is_rejected(tmp_path: Path) -> None:
    store = KeyStore.init(tmp_path / "k", now=NOW, expires_days=10)
    bundle = make_bundle(store, expires_days=365)
    _verify(store, bundle, now=NOW + timedelta(days=9))
    with pytest.raises(ExpiredMetadataError):
        _verify(store, bundle, now=NOW + timedelta(days=11))


def test_rollback_to_older_version_is_rejected(store: KeyStore) -> None:
    v2 = make_bundle(store, version=2)
    _verify(store, v2, installed_version=2)  # reinstalling the same version is fine
    _verify(store, v2, installed_version=1)
    with pytest.raises(RollbackError):
        _verify(store, v2, installed_version=3)


def test_same_version_with_other_content_is_rejected(store: KeyStore) -> None:
    a = make_bundle(store, b"first build" * 5, version=4)
    b = make_bundle(store, b"second build" * 5, version=4)
    first = _verify(store, a)
    with pytest.raises(RollbackError):
        _verify(
            store,
            b,
            installed_version=4,
            installed_manifest_sha256=first.manifest_sha256,  # type: ignore[attr-defined]
        )


def test_artifact_paired_with_another_models_manifest_is_rejected(store: KeyStore) -> None:
    a = members(make_bundle(store, b"model A weights" * 8, name="alpha"))
    b = members(make_bundle(store, b"model B weights" * 8, name="beta"))
    mixed = {
        "targets.json": a["targets.json"],
        "manifest.json": a["manifest.json"],
        "model.onnx": b["model.onnx"],
    }
    with pytest.raises((DigestMismatchError, LengthMismatchError)):
        _verify(store, repack(mixed))


def test_manifest_paired_with_another_models_targets_is_rejected(store: KeyStore) -> None:
    a = members(make_bundle(store, b"model A weights" * 8, name="alpha"))
    b = members(make_bundle(store, b"model B weights" * 8, name="beta"))
    mixed = {
        "targets.json": a["targets.json"],
        "manifest.json": b["manifest.json"],
        "model.onnx": b["model.onnx"],
    }
    with pytest.raises((DigestMismatchError, LengthMismatchError)):
        _verify(store, repack(mixed))


def test_targets_signing_another_identity_is_mix_and_match(store: KeyStore) -> None:
    """A builder-signed targets file whose custom identity was swapped is refused."""
    artifact = b"weights" * 20
    manifest = make_manifest(artifact, name="alpha", version=3)
    parts = members(package_bundle(manifest, artifact, store, now=NOW))
    md = Metadata.from_bytes(parts["targets.json"])
    for target in md.signed.targets.values():
        target.unrecognized_fields["custom"]["edgefleet"]["channel"] = "beta"
    md.signatures.clear()
    md.sign(store.signer("targets-1"))  # even re-signed by the real key, the pieces disagree
    parts["targets.json"] = md.to_bytes()
    with pytest.raises(MixAndMatchError):
        _verify(store, repack(parts))


def test_artifact_longer_than_signed_length_is_rejected_before_reading(
    store: KeyStore, tmp_path: Path
) -> None:
    parts = members(make_bundle(store))
    parts["model.onnx"] += b"\0" * (8 * 1024 * 1024)  # endless data
    with pytest.raises(LengthMismatchError, match="longer than its signed length"):
        read_bundle(
            write(tmp_path, repack(parts)),
            _root(store),
            now=NOW,
            installed_version=None,
            device=DEVICE,
        )


def test_artifact_longer_than_signed_length_in_memory(store: KeyStore) -> None:
    parts = members(make_bundle(store))
    parts["model.onnx"] += b"extra"
    with pytest.raises(LengthMismatchError):
        _verify(store, repack(parts))


def test_revoked_key_is_rejected_after_root_rotation(store: KeyStore) -> None:
    old_key = store.list_keys()[[k.label for k in store.list_keys()].index("targets-1")].keyid
    old_bundle = make_bundle(store, key_labels=["targets-1"])
    _verify(store, old_bundle)  # control: accepted under root v1
    store.rotate("targets", now=NOW, add=1)  # v2 adds targets-2
    store.revoke(old_key, now=NOW)  # v3 removes targets-1
    root = _root(store)
    assert root.version == 3
    assert old_key not in root.keyids("targets")
    with pytest.raises(SignatureThresholdError):
        _verify(store, old_bundle)
    _verify(store, make_bundle(store))  # signed by the new key: accepted


def test_rotated_out_key_is_rejected(store: KeyStore) -> None:
    old_key = next(k.keyid for k in store.list_keys() if k.label == "targets-1")
    signed_by_old = make_bundle(store)
    store.rotate("targets", now=NOW, add=1, remove=[old_key])
    with pytest.raises(SignatureThresholdError):
        _verify(store, signed_by_old)


def test_incompatible_architecture_is_rejected(store: KeyStore) -> None:
    bundle = make_bundle(store, arch=("aarch64",))
    _verify(store, bundle, device=DeviceProfile("arm64", {"onnxruntime": "1.20.0"}))
    with pytest.raises(IncompatibleTargetError, match="aarch64"):
        _verify(store, bundle, device=DEVICE)


def test_incompatible_runtime_version_is_rejected(store: KeyStore) -> None:
    bundle = make_bundle(store, min_runtime_version="1.19")
    _verify(store, bundle, device=DeviceProfile("x86_64", {"onnxruntime": "1.19.2"}))
    with pytest.raises(IncompatibleTargetError, match=r">= 1\.19"):
        _verify(store, bundle, device=DeviceProfile("x86_64", {"onnxruntime": "1.18.1"}))
    with pytest.raises(IncompatibleTargetError, match="not installed"):
        _verify(store, bundle, device=DeviceProfile("x86_64", {"litert": "2.0"}))


def test_root_rotation_needs_old_and_new_thresholds(tmp_path: Path) -> None:
    store = KeyStore.init(tmp_path / "k", now=NOW)
    store.rotate("root", now=NOW, add=1, threshold=2)
    chain = store.root_chain()
    v1 = TrustedRoot.from_bytes(chain[0])
    assert v1.update(chain[1]).threshold("root") == 2
    # A v2 signed only by a brand-new key (not v1's root key) must be refused.
    md = Metadata.from_bytes(chain[1])
    md.signatures.clear()
    md.sign(store.signer("root-2"))
    with pytest.raises(RootRotationError, match="current root keys"):
        v1.update(md.to_bytes())
    # Signed by the old key only: the new root's own threshold of 2 is not met.
    md.signatures.clear()
    md.sign(store.signer("root-1"))
    with pytest.raises(RootRotationError, match="its own root keys"):
        v1.update(md.to_bytes())


def test_root_version_cannot_skip_or_replay(tmp_path: Path) -> None:
    store = KeyStore.init(tmp_path / "k", now=NOW)
    store.rotate("targets", now=NOW, add=1)
    store.rotate("targets", now=NOW, add=1)
    chain = store.root_chain()
    v1 = TrustedRoot.from_bytes(chain[0])
    with pytest.raises(RootRotationError):
        v1.update(chain[2])  # skips v2
    with pytest.raises(RootRotationError):
        v1.update(chain[0])  # replays v1


def test_truncated_bundle_is_a_format_error(store: KeyStore, tmp_path: Path) -> None:
    data = make_bundle(store)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        art = tar.getmember("model.onnx")
        manifest = tar.getmember("manifest.json")
    # Inside the first header, the targets data, the manifest, and the artifact's last bytes.
    cuts = (10, 600, manifest.offset_data + manifest.size // 2, art.offset_data + art.size - 5)
    for cut in cuts:
        with pytest.raises((BundleFormatError, LengthMismatchError, DigestMismatchError)):
            read_bundle(
                write(tmp_path, data[:cut], f"cut{cut}.efb"),
                _root(store),
                now=NOW,
                installed_version=None,
                device=DEVICE,
            )


def test_extra_member_is_a_format_error(store: KeyStore, tmp_path: Path) -> None:
    parts = members(make_bundle(store))
    parts["evil.sh"] = b"#!/bin/sh\n"
    with pytest.raises(BundleFormatError):
        read_bundle(
            write(tmp_path, repack(parts)),
            _root(store),
            now=NOW,
            installed_version=None,
            device=DEVICE,
        )
