"""A third party verifies a bundle without edgefleet: python-tuf's Metadata API, or openssl.

These follow docs/security.md step by step, so the documented procedures stay true.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata

from model_builder.keystore import KeyStore
from support import NOW, make_bundle, write


@pytest.fixture
def signed(tmp_path: Path) -> tuple[KeyStore, Path]:
    store = KeyStore.init(tmp_path / "keys", now=NOW)
    return store, write(tmp_path, make_bundle(store), "digits-1.efb")


def _extract(bundle: Path, dest: Path) -> None:
    with tarfile.open(bundle) as tar:
        tar.extractall(dest, filter="data")


def test_python_tuf_metadata_api_verifies_a_bundle(
    signed: tuple[KeyStore, Path], tmp_path: Path
) -> None:
    store, bundle = signed
    out = tmp_path / "x"
    _extract(bundle, out)
    root = Metadata.from_bytes(store.root_bytes())
    targets = Metadata.from_file(str(out / "targets.json"))
    root.signed.verify_delegate("targets", targets.signed_bytes, targets.signatures)
    assert not targets.signed.is_expired(NOW)
    for path, target in targets.signed.targets.items():
        target.verify_length_and_hashes((out / Path(path).name).read_bytes())

    # and the same procedure catches a tampered signature
    targets.signatures[next(iter(targets.signatures))].signature = "00" * 64
    with pytest.raises(UnsignedMetadataError):
        root.signed.verify_delegate("targets", targets.signed_bytes, targets.signatures)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_openssl_verifies_the_ed25519_signature(
    signed: tuple[KeyStore, Path], tmp_path: Path
) -> None:
    store, bundle = signed
    out = tmp_path / "x"
    _extract(bundle, out)
    doc = json.loads((out / "targets.json").read_text())
    root = json.loads(store.root_bytes())
    # 1. the signed bytes are canonical JSON of "signed" (no floats, plain ASCII strings)
    (out / "signed.bin").write_bytes(
        json.dumps(doc["signed"], sort_keys=True, separators=(",", ":")).encode()
    )
    sig = doc["signatures"][0]
    (out / "sig.bin").write_bytes(bytes.fromhex(sig["sig"]))
    # 2. the key comes from the root you trust, as an Ed25519 SubjectPublicKeyInfo
    raw = bytes.fromhex(root["signed"]["keys"][sig["keyid"]]["keyval"]["public"])
    (out / "key.der").write_bytes(bytes.fromhex("302a300506032b6570032100") + raw)
    cmd = [
        "openssl",
        "pkeyutl",
        "-verify",
        "-pubin",
        "-keyform",
        "DER",
        "-inkey",
        str(out / "key.der"),
        "-rawin",
        "-in",
        str(out / "signed.bin"),
        "-sigfile",
        str(out / "sig.bin"),
    ]
    ok = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr + ok.stdout
    # 3. the members' digests equal the signed ones
    for path, target in doc["signed"]["targets"].items():
        data = (out / Path(path).name).read_bytes()
        assert len(data) == target["length"]
        assert hashlib.sha256(data).hexdigest() == target["hashes"]["sha256"]
    # a flipped byte in the signed document fails openssl too
    (out / "signed.bin").write_bytes(
        (out / "signed.bin").read_bytes().replace(b"stable", b"stablE")
    )
    bad = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert bad.returncode != 0
