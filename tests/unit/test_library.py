"""fleet_server.delivery.library: only builder-signed, intact bundles are stored, byte for byte."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bundles import DigitsBundles
from edge_agent.bundle.archive import read_raw
from fleet_server.delivery.library import BundleLibrary
from fleet_server.errors import BundleRejectedError
from model_builder.keystore import KeyStore


def test_valid_bundle_is_stored_byte_exact(digits_bundles: DigitsBundles, tmp_path: Path) -> None:
    lib = BundleLibrary(tmp_path / "lib", digits_bundles.keys.trusted_root())
    src = digits_bundles.path(2)
    data = src.read_bytes()
    entry = lib.add(src)
    assert (entry.name, entry.version, entry.channel) == ("digits", 2, "stable")
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert entry.length == len(data)
    assert entry.path == tmp_path / "lib" / f"{entry.sha256}.bundle"
    assert entry.path.read_bytes() == data
    targets = read_raw(src).targets_bytes
    assert entry.targets_sha256 == hashlib.sha256(targets).hexdigest()
    assert entry.manifest["name"] == "digits"
    assert "golden" not in entry.manifest  # the registry keeps a summary only
    # ... with the output contract: the rollout runner reads the task from it (a shadow phase is
    # for classifiers; without it a rollout under `fleet-server serve` never had one)
    assert entry.manifest["outputs"]["task"] == "classification"
    assert lib.has(entry.sha256)
    # idempotent, and no staging leftovers
    assert lib.add(src) == entry
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == [
        ".staging",
        f"{entry.sha256}.bundle",
    ]
    assert list((tmp_path / "lib" / ".staging").iterdir()) == []


def _refused(lib: BundleLibrary, data: bytes, tmp_path: Path) -> BundleRejectedError:
    bad = tmp_path / "bad.efb"
    bad.write_bytes(data)
    with pytest.raises(BundleRejectedError) as info:
        lib.add(bad)
    # nothing but the (empty) staging directory was left behind
    stored = list(lib.directory.glob("*.bundle"))
    assert stored == []
    return info.value


def test_tampered_bundle_refused(digits_bundles: DigitsBundles, tmp_path: Path) -> None:
    lib = BundleLibrary(tmp_path / "lib", digits_bundles.keys.trusted_root())
    data = bytearray(digits_bundles.path(1).read_bytes())
    data[-2048] ^= 0x01  # inside the model artifact (last member, before tar padding)
    err = _refused(lib, bytes(data), tmp_path)
    assert err.reason in {"digest_mismatch", "bundle_format"}


def test_bundle_signed_by_another_builder_refused(
    digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    other_root = KeyStore.init(tmp_path / "other-keys", now=datetime.now(UTC)).trusted_root()
    lib = BundleLibrary(tmp_path / "lib", other_root)
    err = _refused(lib, digits_bundles.path(1).read_bytes(), tmp_path)
    assert err.reason == "signature_threshold"


def test_truncated_and_garbage_refused(digits_bundles: DigitsBundles, tmp_path: Path) -> None:
    lib = BundleLibrary(tmp_path / "lib", digits_bundles.keys.trusted_root())
    data = digits_bundles.path(1).read_bytes()
    assert _refused(lib, data[: len(data) // 2], tmp_path).reason in {
        "bundle_format",
        "length_mismatch",
    }
    assert _refused(lib, b"not a bundle" * 100, tmp_path).reason == "bundle_format"
    assert _refused(lib, b"", tmp_path).reason == "bundle_format"
    with pytest.raises(BundleRejectedError) as info:
        lib.add(tmp_path / "missing.efb")
    assert info.value.reason == "unreadable"


def test_size_cap(digits_bundles: DigitsBundles, tmp_path: Path) -> None:
    lib = BundleLibrary(tmp_path / "lib", digits_bundles.keys.trusted_root(), max_bytes=1024)
    with pytest.raises(BundleRejectedError) as info:
        lib.add(digits_bundles.path(1))
    assert info.value.reason == "too_large"
