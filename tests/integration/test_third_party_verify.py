"""A third party verifies a bundle without edgefleet: python-tuf's Metadata API, or openssl.

These follow docs/security.md step by step, so the documented procedures stay true; the
python-tuf block of the page is run as written, on a ``tarfile`` without extraction filters (as on
Debian 12's Python 3.11.2: ``filter=`` and ``tarfile.data_filter`` arrived in 3.11.4).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from tuf.api.exceptions import LengthOrHashMismatchError, UnsignedMetadataError
from tuf.api.metadata import Metadata

from model_builder.keystore import KeyStore
from support import NOW, make_bundle, members, repack, write

DOC = Path(__file__).parents[2] / "docs" / "security.md"


@pytest.fixture
def signed(tmp_path: Path) -> tuple[KeyStore, Path]:
    store = KeyStore.init(tmp_path / "keys", now=NOW)
    return store, write(tmp_path, make_bundle(store), "digits-1.efb")


def _extract(bundle: Path, dest: Path) -> None:
    """Write the bundle's regular members under ``dest`` by their base name (no archive paths)."""
    dest.mkdir()
    with tarfile.open(bundle) as tar:
        for member in tar:
            fh = tar.extractfile(member) if member.isfile() else None
            if fh is not None:
                (dest / Path(member.name).name).write_bytes(fh.read())


@pytest.fixture
def tarfile_of_python_3_11_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tarfile`` as Python < 3.11.4 has it: no extraction filters, no ``filter=`` argument."""
    for name in ("data_filter", "tar_filter", "fully_trusted_filter", "FilterError"):
        monkeypatch.delattr(tarfile, name, raising=False)
    for method in ("extractall", "extract"):
        original = getattr(tarfile.TarFile, method)

        def no_filter(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            if "filter" in kwargs:
                raise TypeError("got an unexpected keyword argument 'filter'")
            return _original(*args, **kwargs)

        monkeypatch.setattr(tarfile.TarFile, method, no_filter)


def _doc_recipe(heading: str, lang: str) -> str:
    text = DOC.read_text()
    section = text[text.index(heading) :]
    found = re.search(rf"```{lang}\n(.*?)```", section, re.DOTALL)
    assert found, f"docs/security.md lost its {heading} recipe"
    return found.group(1)


def _doc_python_recipe() -> str:
    return _doc_recipe("**With python-tuf**", "python")


def test_the_documented_python_tuf_recipe_runs_on_python_3_11_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tarfile_of_python_3_11_2: None
) -> None:
    now = datetime.now(UTC)  # the recipe checks expiry against the real clock
    store = KeyStore.init(tmp_path / "keys", now=now)
    bundle = make_bundle(store, now=now)
    (tmp_path / "root.json").write_bytes(store.root_bytes())
    (tmp_path / "digits-1.efb").write_bytes(bundle)
    monkeypatch.chdir(tmp_path)
    recipe = _doc_python_recipe()
    exec(compile(recipe, str(DOC), "exec"), {})

    # the same recipe refuses a bundle whose artifact was swapped after signing
    parts = members(bundle)
    artifact = next(name for name in parts if name not in ("targets.json", "manifest.json"))
    parts[artifact] = parts[artifact][::-1]
    (tmp_path / "digits-1.efb").write_bytes(repack(parts))
    with pytest.raises(LengthOrHashMismatchError):
        exec(compile(recipe, str(DOC), "exec"), {})


def test_the_python_3_11_2_simulation_refuses_extraction_filters(
    signed: tuple[KeyStore, Path], tmp_path: Path, tarfile_of_python_3_11_2: None
) -> None:
    """The fixture really is a Python without filters (else the recipe test proves nothing)."""
    assert not hasattr(tarfile, "data_filter")
    with tarfile.open(signed[1]) as tar, pytest.raises(TypeError, match="filter"):
        tar.extractall(tmp_path / "x", filter="data")
    assert len(members(signed[1].read_bytes())) == 3


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


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_the_documented_openssl_recipe_runs_as_written(tmp_path: Path) -> None:
    store = KeyStore.init(tmp_path / "keys", now=NOW)
    bundle = make_bundle(store)
    (tmp_path / "root.json").write_bytes(store.root_bytes())
    (tmp_path / "digits-1.efb").write_bytes(bundle)
    recipe = _doc_recipe("**With openssl**", "sh")

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", recipe],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )

    ok = run()
    assert ok.returncode == 0, ok.stderr
    assert "Signature Verified Successfully" in ok.stdout
    # a bundle whose signed document was altered after signing fails the same commands
    parts = members(bundle)
    parts["targets.json"] = parts["targets.json"].replace(b'"stable"', b'"stablE"')
    (tmp_path / "digits-1.efb").write_bytes(repack(parts))
    bad = run()
    assert bad.returncode != 0
    assert "Signature Verified Successfully" not in bad.stdout
