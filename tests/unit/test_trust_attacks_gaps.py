"""Checks the first attack suite left unguarded, found by mutating each protection away."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Delegations, Metadata, TargetFile, Targets

from edge_agent.bundle import read_bundle, read_raw
from edge_agent.contract import DeviceProfile
from edge_agent.errors import (
    BundleFormatError,
    IncompatibleTargetError,
    LengthMismatchError,
    MetadataFormatError,
    MixAndMatchError,
    RollbackError,
    SignatureThresholdError,
)
from edge_agent.trust import TrustedRoot, verify_bundle
from model_builder.keystore import KeyStore
from support import DEVICE, NOW, make_bundle, members, repack, write


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore.init(tmp_path / "keys", now=NOW)


def _root(store: KeyStore) -> TrustedRoot:
    chain = store.root_chain()
    return TrustedRoot.from_chain(chain[0], chain[1:])


def _verify(store: KeyStore, bundle: bytes, **kw: object) -> object:
    parts = list(members(bundle).values())
    kw.setdefault("now", NOW)
    kw.setdefault("device", DEVICE)
    kw.setdefault("installed_version", None)
    return verify_bundle(_root(store), parts[0], parts[1], parts[2], **kw)  # type: ignore[arg-type]


# --- root of trust ------------------------------------------------------------------------------


def test_provisioned_root_must_be_self_signed(store: KeyStore) -> None:
    TrustedRoot.from_bytes(store.root_bytes())  # control: the key store's root is self-signed
    md = Metadata.from_bytes(store.root_bytes())
    md.signatures.clear()
    md.sign(CryptoSigner.generate_ed25519())  # a forged root: signed by a key it does not list
    with pytest.raises(SignatureThresholdError, match="not self-signed"):
        TrustedRoot.from_bytes(md.to_bytes())
    md.signatures.clear()  # and with no signature at all
    with pytest.raises(SignatureThresholdError, match="not self-signed"):
        TrustedRoot.from_bytes(md.to_bytes())


def test_metadata_of_another_role_is_refused(store: KeyStore) -> None:
    """Type confusion: signed targets offered as a root, or a root offered as targets."""
    bundle = make_bundle(store)
    parts = members(bundle)
    with pytest.raises(MetadataFormatError, match="expected root"):
        TrustedRoot.from_bytes(parts["targets.json"])
    with pytest.raises(MetadataFormatError, match="expected root"):
        _root(store).update(parts["targets.json"])
    _verify(store, bundle)  # control
    parts["targets.json"] = store.root_bytes()
    with pytest.raises(MetadataFormatError, match="expected targets"):
        _verify(store, repack(parts))


# --- size caps (endless data before the signature check) ------------------------------------------


def test_oversized_targets_metadata_is_refused_before_parsing(store: KeyStore) -> None:
    parts = members(make_bundle(store))
    # Whitespace keeps the JSON and its (canonical-form) signature valid: only the cap stops it.
    parts["targets.json"] += b" " * (1024 * 1024)
    with pytest.raises(LengthMismatchError, match="targets metadata exceeds"):
        _verify(store, repack(parts))


def _bundle_with_lying_header(parts: dict[str, bytes], name: str, declared: int) -> bytes:
    """A tar whose member ``name`` declares ``declared`` bytes but carries only its real bytes."""
    out = b""
    for member, data in parts.items():
        info = tarfile.TarInfo(member)
        info.size = declared if member == name else len(data)
        out += info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)
        if member == name:
            return out  # the rest would start `declared` bytes later: never reached
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("member", "declared"),
    [("targets.json", 2 * 1024 * 1024), ("manifest.json", 64 * 1024 * 1024)],
)
def test_member_over_its_cap_is_refused_before_reading(
    store: KeyStore, tmp_path: Path, member: str, declared: int
) -> None:
    parts = members(make_bundle(store))
    bundle = _bundle_with_lying_header(parts, member, declared)
    # Refused from the header alone (the targets by their cap, the manifest by its signed
    # length); reading either would hit end-of-file, a BundleFormatError.
    with pytest.raises(LengthMismatchError, match=f"{declared} bytes, (cap is|signed)"):
        read_bundle(
            write(tmp_path, bundle), _root(store), now=NOW, installed_version=None, device=DEVICE
        )


# --- signed lengths are exact -------------------------------------------------------------------


def test_manifest_longer_than_signed_length_is_a_length_error(store: KeyStore) -> None:
    parts = members(make_bundle(store))
    parts["manifest.json"] += b"\n"  # the same JSON document, one byte longer
    with pytest.raises(LengthMismatchError, match="manifest is"):
        _verify(store, repack(parts))


def test_truncated_artifact_is_a_length_error(store: KeyStore) -> None:
    parts = members(make_bundle(store))
    parts["model.onnx"] = parts["model.onnx"][:-1]
    with pytest.raises(LengthMismatchError, match="shorter"):
        _verify(store, repack(parts))


# --- signed-but-inconsistent targets (split view between TUF tools and the device) ---------------

_M = "alpha/3/manifest.json"
_A = "alpha/3/model.onnx"


def _resigned(store: KeyStore, edit: Callable[[Targets], None]) -> bytes:
    """The alpha v3 bundle with its targets edited and re-signed by the real builder key."""
    parts = members(make_bundle(store, b"weights" * 20, name="alpha", version=3))
    md = Metadata.from_bytes(parts["targets.json"])
    edit(md.signed)
    md.signatures.clear()
    md.sign(store.signer("targets-1"))
    parts["targets.json"] = md.to_bytes()
    return repack(parts)


def _move(t: Targets, old: str, new: str) -> None:
    target = t.targets.pop(old)
    target.path = new
    t.targets[new] = target


def _set_version(t: Targets) -> None:
    t.version = 4


def _extra_target(t: Targets) -> None:
    t.targets["alpha/3/extra.bin"] = TargetFile(1, {"sha256": "0" * 64}, "alpha/3/extra.bin")


def _delegate(t: Targets) -> None:
    t.delegations = Delegations(keys={}, roles={})


def _extra_hash(t: Targets) -> None:
    t.targets[_M].hashes["sha512"] = hashlib.sha512(b"x").hexdigest()


def _no_sha256(t: Targets) -> None:
    t.targets[_M].hashes = {"sha512": hashlib.sha512(b"x").hexdigest()}


def _artifact_length(t: Targets) -> None:
    t.targets[_A].length += 1


def _artifact_hash(t: Targets) -> None:
    t.targets[_A].hashes["sha256"] = "0" * 64


def _artifact_manifest_binding(t: Targets) -> None:
    t.targets[_A].unrecognized_fields["custom"]["edgefleet"]["manifest_sha256"] = "0" * 64


SPLIT_VIEW = [
    ("extra_target", _extra_target, MetadataFormatError),
    ("delegations", _delegate, MetadataFormatError),
    ("extra_hash_algorithm", _extra_hash, MetadataFormatError),
    ("no_sha256", _no_sha256, MetadataFormatError),
    ("manifest_path", lambda t: _move(t, _M, "beta/3/manifest.json"), MixAndMatchError),
    ("targets_version", _set_version, MixAndMatchError),
    ("artifact_missing", lambda t: _move(t, _A, "alpha/3/model.tflite"), MixAndMatchError),
    ("artifact_length", _artifact_length, MixAndMatchError),
    ("artifact_sha256", _artifact_hash, MixAndMatchError),
    ("artifact_manifest_sha256", _artifact_manifest_binding, MixAndMatchError),
]


@pytest.mark.parametrize(
    ("edit", "error"), [c[1:] for c in SPLIT_VIEW], ids=[c[0] for c in SPLIT_VIEW]
)
def test_signed_targets_that_disagree_with_the_bundle_are_refused(
    store: KeyStore, edit: Callable[[Targets], None], error: type[Exception]
) -> None:
    _verify(store, _resigned(store, lambda t: None))  # control: re-signing alone is harmless
    with pytest.raises(error):
        _verify(store, _resigned(store, edit))


# --- the bundle file layout -----------------------------------------------------------------------


def test_members_must_carry_the_signed_names_in_order(store: KeyStore, tmp_path: Path) -> None:
    parts = members(make_bundle(store))
    renamed = {
        "targets.json": parts["targets.json"],
        "manifest.json": parts["manifest.json"],
        "model.tflite": parts["model.onnx"],  # right bytes, not the member the manifest names
    }
    with pytest.raises(BundleFormatError, match=r"expected member 'model\.onnx'"):
        read_bundle(
            write(tmp_path, repack(renamed), "r.efb"),
            _root(store),
            now=NOW,
            installed_version=None,
            device=DEVICE,
        )
    swapped = {
        "manifest.json": parts["manifest.json"],
        "targets.json": parts["targets.json"],
        "model.onnx": parts["model.onnx"],
    }
    with pytest.raises(BundleFormatError, match=r"expected member 'targets\.json'"):
        read_bundle(
            write(tmp_path, repack(swapped), "s.efb"),
            _root(store),
            now=NOW,
            installed_version=None,
            device=DEVICE,
        )


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE])
def test_non_regular_member_is_a_format_error(store: KeyStore, tmp_path: Path, kind: bytes) -> None:
    parts = members(make_bundle(store))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("targets.json", "manifest.json"):
            info = tarfile.TarInfo(name)
            info.size = len(parts[name])
            tar.addfile(info, io.BytesIO(parts[name]))
        link = tarfile.TarInfo("model.onnx")
        link.type = kind
        link.linkname = "manifest.json"
        tar.addfile(link)
    with pytest.raises(BundleFormatError, match="not a regular file"):
        read_bundle(
            write(tmp_path, buf.getvalue()),
            _root(store),
            now=NOW,
            installed_version=None,
            device=DEVICE,
        )


def test_read_raw_refuses_an_unexpected_artifact_member(store: KeyStore, tmp_path: Path) -> None:
    parts = members(make_bundle(store))
    read_raw(write(tmp_path, repack(parts), "ok.efb"))  # control
    parts["evil.sh"] = parts.pop("model.onnx")
    with pytest.raises(BundleFormatError, match=r"unexpected bundle member 'evil\.sh'"):
        read_raw(write(tmp_path, repack(parts)))


def test_reading_a_file_enforces_compatibility_and_rollback(
    store: KeyStore, tmp_path: Path
) -> None:
    """read_bundle (what the device CLI calls) must pass its device and installed state on."""
    path = write(tmp_path, make_bundle(store, version=4, arch=("aarch64",)))
    arm = DeviceProfile("aarch64", {"onnxruntime": "1.20.0"})
    root = _root(store)
    ok = read_bundle(path, root, now=NOW, device=arm, installed_version=4)
    sha = ok.verified.manifest_sha256
    read_bundle(path, root, now=NOW, device=arm, installed_version=4, installed_manifest_sha256=sha)
    with pytest.raises(IncompatibleTargetError, match="aarch64"):
        read_bundle(path, root, now=NOW, installed_version=None, device=DEVICE)
    with pytest.raises(RollbackError, match="older"):
        read_bundle(path, root, now=NOW, device=arm, installed_version=5)
    with pytest.raises(RollbackError, match="other content"):
        read_bundle(
            path, root, now=NOW, device=arm, installed_version=4, installed_manifest_sha256="0" * 64
        )


def test_expected_model_and_channel_are_enforced(store: KeyStore) -> None:
    bundle = make_bundle(store, name="alpha", channel="beta")
    _verify(store, bundle, expected_name="alpha", expected_channel="beta")  # control
    with pytest.raises(MixAndMatchError, match="expected model 'digits'"):
        _verify(store, bundle, expected_name="digits")
    with pytest.raises(MixAndMatchError, match="expected channel 'stable'"):
        _verify(store, bundle, expected_channel="stable")


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_extended_tar_headers_are_refused_before_they_are_read(
    store: KeyStore, tmp_path: Path, fmt: int
) -> None:
    """PAX and GNU long-name headers let a file carry unbounded metadata: not in a bundle."""
    parts = members(make_bundle(store))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        long_name = "x" * 5000  # forces a PAX record or a GNU long-name block
        for name, data in [(long_name, b"junk"), *parts.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(BundleFormatError):
        read_bundle(
            write(tmp_path, buf.getvalue()),
            _root(store),
            now=NOW,
            installed_version=None,
            device=DEVICE,
        )


def test_gnu_tar_written_bundle_is_accepted(store: KeyStore, tmp_path: Path) -> None:
    """A bundle re-packed with the system's tar (GNU magic) still reads: plain headers only."""
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.skip("no tar")
    src = tmp_path / "src"
    src.mkdir()
    for name, data in members(make_bundle(store)).items():
        (src / name).write_bytes(data)
    out = tmp_path / "repacked.efb"
    subprocess.run(
        [
            "tar",
            "--format=gnu",
            "-cf",
            str(out),
            "-C",
            str(src),
            "targets.json",
            "manifest.json",
            "model.onnx",
        ],
        check=True,
    )
    read_bundle(out, _root(store), now=NOW, installed_version=None, device=DEVICE)
