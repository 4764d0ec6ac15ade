"""Bundle files: writing them, and reading them with every read capped by signed lengths.

A bundle (``*.efb``) is an uncompressed POSIX tar with exactly three regular members, in order:

    targets.json    TUF targets metadata signed by the builder's key(s)
    manifest.json   the canonical manifest (its SHA-256 and length are signed in targets.json)
    model.onnx | model.tflite

Standard tools can unpack it (``tar xf``) for third-party verification. Reading never extracts
to disk by member name, never follows links, refuses extra or out-of-order members, and checks
each member's declared size against its cap before reading a byte of it: the artifact's cap is
the signed length from the verified manifest (endless-data protection).

After the artifact exactly what a tar writer puts there must follow: the two 512-byte
end-of-archive blocks and the zero padding to the next 10240-byte record (what ``bundle_bytes``,
Python's ``tarfile`` and GNU or BSD tar with their default blocking factor write). A non-zero
byte, a byte beyond that (appended data, a second archive) or a shorter tail (a cut file) is
refused: a bundle is exactly one archive with one byte layout, so nothing rides along unsigned
after it and one bundle never has two digests. Error messages never name the file's path (a
server's staging path is nobody's business).

Owns: the file layout and the I/O. Does not own: the verification decisions
(``edge_agent.trust``).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from edge_agent.common import durable
from edge_agent.contract.manifest import MAX_MANIFEST_BYTES, BundleManifest, DeviceProfile
from edge_agent.errors import BundleFormatError, LengthMismatchError
from edge_agent.trust import (
    ArtifactDigest,
    TrustedRoot,
    VerifiedManifest,
    verify_artifact,
    verify_signed_manifest,
    verify_targets,
)
from edge_agent.trust.verify import MAX_TARGETS_BYTES

TARGETS_MEMBER = "targets.json"
ARTIFACT_MEMBERS = ("model.onnx", "model.tflite")
_BLOCK = 512
# What ``tarfile`` (and GNU tar's default blocking factor) pads an archive to: after the last
# member come two zero blocks, then zeros up to the next multiple of this.
_RECORD = 20 * _BLOCK
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
    durable.write_atomic(Path(path), data)


def read_raw(
    path: Path, *, with_artifact: bool = False, max_artifact_bytes: int = 4 * 1024**3
) -> RawBundle:
    """Read targets and manifest (capped), and the artifact's name and size, without verifying.

    With ``with_artifact`` the artifact bytes are read too (capped by ``max_artifact_bytes``);
    use this only for tooling that re-signs or inspects, never to install.

    Raises:
        BundleFormatError: not a bundle, truncated, or members missing / out of order / oversized,
            or (with ``with_artifact``) data after the end of the archive.
        LengthMismatchError: a member is larger than its cap.
    """
    with _UstarReader(path) as tar:
        targets = tar.read(tar.next(TARGETS_MEMBER), MAX_TARGETS_BYTES)
        manifest = tar.read(tar.next(MANIFEST_MEMBER), MAX_MANIFEST_BYTES)
        art = tar.next(None)
        data = None
        if with_artifact:
            data = tar.read(art, max_artifact_bytes)
            tar.expect_end()
        return RawBundle(targets, manifest, art.name, art.size, data)


def read_bundle(
    path: Path,
    root: TrustedRoot,
    *,
    now: datetime,
    installed_version: int | None,
    device: DeviceProfile | None,
    installed_manifest_sha256: str | None = None,
    expected_name: str | None = None,
    expected_channel: str | None = None,
) -> LoadedBundle:
    """Read and fully verify a bundle file (arguments as ``edge_agent.trust.verify_manifest``).

    Reads are ordered so that nothing is read beyond what is already trusted: the targets
    metadata (capped at 1 MiB) is verified first; the manifest is then read only up to the
    signed manifest length; the artifact only up to the signed artifact length.

    Raises:
        BundleFormatError: the file is not a well-formed bundle, or has data after its archive.
        BundleVerificationError: any verification failure (see ``edge_agent.trust.verify``).
    """
    with _UstarReader(path) as tar:
        targets = tar.read(tar.next(TARGETS_MEMBER), MAX_TARGETS_BYTES)
        vt = verify_targets(root, targets, now=now)
        member = tar.next(MANIFEST_MEMBER)
        if member.size != vt.manifest_length:
            raise LengthMismatchError(
                f"manifest member is {member.size} bytes, signed {vt.manifest_length}"
            )
        manifest_bytes = tar.read(member, vt.manifest_length)
        verified = verify_signed_manifest(
            vt,
            manifest_bytes,
            installed_version=installed_version,
            device=device,
            installed_manifest_sha256=installed_manifest_sha256,
            expected_name=expected_name,
            expected_channel=expected_channel,
        )
        art_ref = verified.manifest.artifact
        member = tar.next(art_ref.path)
        if member.size > art_ref.length:
            raise LengthMismatchError(
                f"artifact member is {member.size} bytes, longer than its signed length "
                f"{art_ref.length}"
            )
        artifact = tar.read(member, art_ref.length)
        tar.expect_end()
    verify_artifact(verified, ArtifactDigest.of(artifact))
    return LoadedBundle(verified, targets, manifest_bytes, artifact)


@dataclass(frozen=True)
class _Member:
    name: str
    size: int


class _UstarReader:
    """A strict reader of plain USTAR archives, written for untrusted input.

    Python's ``tarfile`` reads PAX and GNU long-name headers into memory before a caller can
    cap anything; bundles never need them. This reader accepts only 512-byte USTAR headers of
    regular files with valid checksums, names of at most 100 bytes, sizes in octal, and reads a
    member's data only after its size has been checked against the caller's cap.
    """

    def __init__(self, path: Path) -> None:
        try:
            self._fh = Path(path).open("rb")  # noqa: SIM115 - closed by __exit__
        except FileNotFoundError as exc:
            raise BundleFormatError(f"no bundle file named {Path(path).name!r}") from exc
        except OSError as exc:
            raise BundleFormatError(
                f"cannot open bundle {Path(path).name!r}: {exc.strerror or 'I/O error'}"
            ) from exc
        self._pending = 0  # unread data + padding of the current member

    def __enter__(self) -> _UstarReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def _header(self) -> bytes | None:
        if self._pending:
            self._fh.seek(self._pending, 1)
            self._pending = 0
        block = self._fh.read(_BLOCK)
        if len(block) < _BLOCK:
            raise BundleFormatError("bundle is truncated (incomplete tar header)")
        if block == b"\0" * _BLOCK:
            return None
        return block

    def next(self, expected: str | None) -> _Member:
        """The next member's header; it must be a regular file named ``expected``.

        Raises:
            BundleFormatError: end of archive, bad header, not a regular file, wrong name.
        """
        block = self._header()
        what = expected or "model.*"
        if block is None:
            raise BundleFormatError(f"bundle ends before member {what}")
        try:
            checksum = int(block[148:156].rstrip(b" \0").decode("ascii") or "-1", 8)
        except ValueError:
            checksum = -1
        if checksum != sum(block[:148]) + 8 * 32 + sum(block[156:]):
            raise BundleFormatError("bundle is not a tar archive (bad header checksum)")
        if block[257:262] != b"ustar":
            raise BundleFormatError("bundle members must use plain USTAR headers")
        name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = block[345:500].split(b"\0", 1)[0]
        if block[156:157] not in (b"0", b"\0") or prefix:
            raise BundleFormatError(f"bundle member {name[:64]!r} is not a regular file")
        try:
            size = int(block[124:136].rstrip(b" \0").decode("ascii") or "0", 8)
        except ValueError as exc:
            raise BundleFormatError(f"bundle member {name[:64]!r} has a bad size") from exc
        if expected is not None and name != expected:
            raise BundleFormatError(f"expected member {expected!r}, found {name[:64]!r}")
        if expected is None and name not in ARTIFACT_MEMBERS:
            raise BundleFormatError(f"unexpected bundle member {name[:64]!r}")
        self._pending = size + (-size % _BLOCK)
        return _Member(name, size)

    def read(self, member: _Member, cap: int) -> bytes:
        """The member's data, refused before reading when it is larger than ``cap``.

        Raises:
            LengthMismatchError: larger than ``cap``.
            BundleFormatError: the file ends inside the member.
        """
        if member.size > cap:
            raise LengthMismatchError(f"member {member.name} is {member.size} bytes, cap is {cap}")
        data = self._fh.read(member.size)
        if len(data) != member.size:
            raise BundleFormatError(f"member {member.name} is truncated")
        self._pending -= member.size
        return data

    def expect_end(self) -> None:
        """Exactly what a tar writer puts after the last member must follow (module doc).

        Raises:
            BundleFormatError: another member, non-zero bytes, more or fewer zero bytes than
                the end-of-archive blocks and the record padding.
        """
        if self._pending:
            self._fh.seek(self._pending, 1)
            self._pending = 0
        end = self._fh.tell()
        allowed = end + 2 * _BLOCK
        allowed += -allowed % _RECORD
        allowed -= end
        tail = self._fh.read(allowed + 1)
        if tail[:_BLOCK].strip(b"\0"):
            raise BundleFormatError("bundle has data after the artifact (member or appended bytes)")
        if tail.strip(b"\0") or len(tail) > allowed:
            raise BundleFormatError("bundle has bytes after the end of its archive")
        if len(tail) < allowed:
            raise BundleFormatError("bundle is truncated (its end-of-archive blocks are cut)")


#: The strict USTAR reader, for the other signed archives of the same shape (agent packages:
#: ``edge_agent.bundle.agent_archive``).
UstarReader = _UstarReader


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
