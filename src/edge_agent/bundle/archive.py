"""Bundle files: writing them, and reading them with every read capped by signed lengths.

A bundle (``*.efb``) is an uncompressed POSIX tar with exactly three regular members, in order:

    targets.json    TUF targets metadata signed by the builder's key(s)
    manifest.json   the canonical manifest (its SHA-256 and length are signed in targets.json)
    model.onnx | model.tflite

Standard tools can unpack it (``tar xf``) for third-party verification. Reading never extracts
to disk by member name, never follows links, refuses extra or out-of-order members, and checks
each member's declared size against its cap before reading a byte of it: the artifact's cap is
the signed length from the verified manifest (endless-data protection).

Owns: the file layout and the I/O. Does not own: the verification decisions
(``edge_agent.trust``).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

from edge_agent.contract.manifest import BundleManifest, DeviceProfile
from edge_agent.errors import BundleFormatError, LengthMismatchError
from edge_agent.trust import (
    ArtifactDigest,
    TrustedRoot,
    VerifiedManifest,
    verify_artifact,
    verify_manifest,
)
from edge_agent.trust.verify import MAX_MANIFEST_BYTES, MAX_TARGETS_BYTES

TARGETS_MEMBER = "targets.json"
MANIFEST_MEMBER = "manifest.json"
BUNDLE_SUFFIX = ".efb"
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class LoadedBundle:
    """A verified bundle held in memory."""

    verified: VerifiedManifest
    targets_bytes: bytes
    manifest_bytes: bytes
    artifact: bytes

    @property
    def manifest(self) -> BundleManifest:
        return self.verified.manifest


@dataclass(frozen=True)
class RawBundle:
    """A bundle's members, read with size caps but NOT verified (for ``inspect``)."""

    targets_bytes: bytes
    manifest_bytes: bytes
    artifact_name: str
    artifact_length: int
    artifact: bytes | None = None


def bundle_bytes(
    targets_bytes: bytes, manifest_bytes: bytes, artifact: bytes, artifact_format: str
) -> bytes:
    """Serialise a bundle to bytes (deterministic: fixed mtime, owner and mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (
            (TARGETS_MEMBER, targets_bytes),
            (MANIFEST_MEMBER, manifest_bytes),
            (f"model.{artifact_format}", artifact),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_bundle(path: Path, data: bytes) -> None:
    """Write bundle bytes atomically: temp file in the same directory, fsync, rename.

    Raises:
        OSError: the file system refused (disk full, permissions); no partial file remains.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_raw(
    path: Path, *, with_artifact: bool = False, max_artifact_bytes: int = 4 * 1024**3
) -> RawBundle:
    """Read targets and manifest (capped), and the artifact's name and size, without verifying.

    With ``with_artifact`` the artifact bytes are read too (capped by ``max_artifact_bytes``);
    use this only for tooling that re-signs or inspects, never to install.

    Raises:
        BundleFormatError: not a bundle, truncated, or members missing / out of order / oversized.
    """
    with _open_tar(path) as tar:
        targets = _read_member(tar, _next_member(tar, TARGETS_MEMBER), MAX_TARGETS_BYTES)
        manifest = _read_member(tar, _next_member(tar, MANIFEST_MEMBER), MAX_MANIFEST_BYTES)
        art = _next_member(tar, None)
        data = _read_member(tar, art, max_artifact_bytes) if with_artifact else None
        return RawBundle(targets, manifest, art.name, art.size, data)


def read_bundle(
    path: Path,
    root: TrustedRoot,
    *,
    now: datetime,
    installed_version: int | None = None,
    installed_manifest_sha256: str | None = None,
    device: DeviceProfile | None = None,
) -> LoadedBundle:
    """Read and fully verify a bundle file.

    The artifact is read only after the manifest is verified, and never beyond its signed length.

    Raises:
        BundleFormatError: the file is not a well-formed bundle.
        BundleVerificationError: any verification failure (see ``edge_agent.trust.verify``).
    """
    with _open_tar(path) as tar:
        targets = _read_member(tar, _next_member(tar, TARGETS_MEMBER), MAX_TARGETS_BYTES)
        manifest_bytes = _read_member(tar, _next_member(tar, MANIFEST_MEMBER), MAX_MANIFEST_BYTES)
        verified = verify_manifest(
            root,
            targets,
            manifest_bytes,
            now=now,
            installed_version=installed_version,
            installed_manifest_sha256=installed_manifest_sha256,
            device=device,
        )
        art_ref = verified.manifest.artifact
        member = _next_member(tar, art_ref.path)
        if member.size > art_ref.length:
            raise LengthMismatchError(
                f"artifact member is {member.size} bytes, longer than its signed length "
                f"{art_ref.length}"
            )
        artifact = _read_member(tar, member, art_ref.length)
        if tar.next() is not None:
            raise BundleFormatError("bundle has members after the artifact")
    verify_artifact(verified, ArtifactDigest.of(artifact))
    return LoadedBundle(verified, targets, manifest_bytes, artifact)


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(Path(path), mode="r:")
    except FileNotFoundError as exc:
        raise BundleFormatError(f"no bundle at {path}") from exc
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleFormatError(f"{path} is not a bundle (uncompressed tar): {exc}") from exc


def _next_member(tar: tarfile.TarFile, expected: str | None) -> tarfile.TarInfo:
    try:
        member = tar.next()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleFormatError(f"bundle is truncated or corrupt: {exc}") from exc
    if member is None:
        raise BundleFormatError(f"bundle ends before member {expected or 'model.*'}")
    if not member.isreg():
        raise BundleFormatError(f"bundle member {member.name!r} is not a regular file")
    if expected is not None and member.name != expected:
        raise BundleFormatError(f"expected member {expected!r}, found {member.name!r}")
    if expected is None and member.name not in ("model.onnx", "model.tflite"):
        raise BundleFormatError(f"unexpected bundle member {member.name!r}")
    return member


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, cap: int) -> bytes:
    if member.size > cap:
        raise LengthMismatchError(f"member {member.name} is {member.size} bytes, cap is {cap}")
    fh: IO[bytes] | None = tar.extractfile(member)
    if fh is None:  # pragma: no cover - regular files always have a file object
        raise BundleFormatError(f"cannot read member {member.name}")
    hasher_input = io.BytesIO()
    remaining = member.size
    try:
        while remaining > 0:
            chunk = fh.read(min(_CHUNK, remaining))
            if not chunk:
                raise BundleFormatError(f"member {member.name} is truncated")
            hasher_input.write(chunk)
            remaining -= len(chunk)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleFormatError(f"member {member.name} is truncated or corrupt: {exc}") from exc
    return hasher_input.getvalue()


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
