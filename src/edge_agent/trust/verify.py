"""Bundle verification: bytes in, verdict out, clock passed in.

Owns: the layout of a bundle's targets metadata (which TUF target paths a bundle signs and what
their custom fields hold), and the two verification stages every installer runs:

1. ``verify_manifest``: before reading the (possibly large) artifact, check that the targets
   metadata is signed by a threshold of the builder keys the root trusts, has not expired, names
   exactly one model whose manifest bytes match the signed length and SHA-256, is not older than
   what is installed, and fits this device. The verified manifest then supplies the signed artifact
   length that caps how much the caller reads.
2. ``verify_artifact``: the artifact's length and SHA-256 equal the signed ones.

Does not own: reading files (``edge_agent.bundle``) or keeping the installed-version record.

Attack -> check that stops it:
    tampered artifact      artifact SHA-256 vs signed           DigestMismatchError
    tampered manifest      manifest SHA-256 vs signed           DigestMismatchError
    unknown / revoked key  signature threshold under the root   SignatureThresholdError
    too few signatures     signature threshold                  SignatureThresholdError
    expired metadata       expiry vs the reference time         ExpiredMetadataError
    rollback               version vs the installed version     RollbackError
    mix-and-match          every piece hashed under one target  MixAndMatchError / Digest...
    endless data           signed length caps every read        LengthMismatchError
    wrong target           signed compatibility vs the device   IncompatibleTargetError
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tuf.api.metadata import Metadata, TargetFile, Targets

from edge_agent.contract.manifest import BundleManifest, DeviceProfile
from edge_agent.errors import (
    ContractError,
    DigestMismatchError,
    ExpiredMetadataError,
    LengthMismatchError,
    MetadataFormatError,
    MixAndMatchError,
    RollbackError,
)
from edge_agent.trust.root import TrustedRoot, parse_metadata

CUSTOM_KEY = "edgefleet"
MAX_TARGETS_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ArtifactDigest:
    """Length and SHA-256 of bytes that were read (possibly streamed) by the caller."""

    length: int
    sha256: str

    @classmethod
    def of(cls, data: bytes) -> ArtifactDigest:
        return cls(len(data), hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class VerifiedManifest:
    """A manifest whose signatures, expiry, version and compatibility checks all passed."""

    manifest: BundleManifest
    manifest_sha256: str
    signed_by: tuple[str, ...]
    expires: datetime

    @property
    def artifact_length(self) -> int:
        """The signed artifact length: read no more than this."""
        return self.manifest.artifact.length


def manifest_target_path(name: str, version: int) -> str:
    return f"{name}/{version}/manifest.json"


def artifact_target_path(name: str, version: int, fmt: str) -> str:
    return f"{name}/{version}/model.{fmt}"


def make_targets(manifest: BundleManifest, manifest_bytes: bytes, expires: datetime) -> Targets:
    """The unsigned targets metadata for one bundle (the builder signs it).

    Both the manifest and the artifact are listed as TUF targets so that a third party can check
    either file with any TUF implementation; the ``custom`` block repeats the bundle identity so
    the pieces cannot be recombined.
    """
    ident = {"name": manifest.name, "version": manifest.version, "channel": manifest.channel}
    art = manifest.artifact
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    targets = {
        manifest_target_path(manifest.name, manifest.version): TargetFile(
            length=len(manifest_bytes),
            hashes={"sha256": digest},
            path=manifest_target_path(manifest.name, manifest.version),
            unrecognized_fields={"custom": {CUSTOM_KEY: {**ident, "kind": "manifest"}}},
        ),
        artifact_target_path(manifest.name, manifest.version, art.format): TargetFile(
            length=art.length,
            hashes={"sha256": art.sha256},
            path=artifact_target_path(manifest.name, manifest.version, art.format),
            unrecognized_fields={
                "custom": {CUSTOM_KEY: {**ident, "kind": "artifact", "manifest_sha256": digest}}
            },
        ),
    }
    return Targets(version=manifest.version, expires=expires, targets=targets)


@dataclass(frozen=True)
class VerifiedTargets:
    """Targets metadata whose signatures, expiry and shape were checked (stage 1a).

    ``manifest_length`` caps how much of the manifest the caller may read.
    """

    targets: Targets
    manifest_target: TargetFile
    signed_by: tuple[str, ...]

    @property
    def manifest_length(self) -> int:
        return int(self.manifest_target.length)


def verify_targets(root: TrustedRoot, targets_bytes: bytes, *, now: datetime) -> VerifiedTargets:
    """Stage 1a: the builder-signed targets metadata, before reading the manifest.

    Raises:
        ExpiredMetadataError: the root or the targets metadata has expired.
        LengthMismatchError: the targets metadata is larger than ``MAX_TARGETS_BYTES``.
        MetadataFormatError: malformed, or not exactly one manifest and one artifact target.
        SignatureThresholdError: not signed by a threshold of the root's targets keys.
    """
    root.check_expiry(now)
    if len(targets_bytes) > MAX_TARGETS_BYTES:
        raise LengthMismatchError(f"targets metadata exceeds {MAX_TARGETS_BYTES} bytes")
    md: Metadata[Targets] = parse_metadata(targets_bytes, "targets")
    signed_by = root.verify_role("targets", md)
    if md.signed.is_expired(now):
        raise ExpiredMetadataError(f"targets metadata expired at {md.signed.expires}")
    return VerifiedTargets(md.signed, _single_manifest_target(md.signed), signed_by)


def verify_manifest(
    root: TrustedRoot,
    targets_bytes: bytes,
    manifest_bytes: bytes,
    *,
    now: datetime,
    installed_version: int | None,
    device: DeviceProfile | None,
    installed_manifest_sha256: str | None = None,
    expected_name: str | None = None,
    expected_channel: str | None = None,
) -> VerifiedManifest:
    """Stage 1: trust the manifest (and so the artifact's signed length and digest).

    Args:
        root: the device's trusted root (already rotated to its newest version).
        targets_bytes: the bundle's TUF targets metadata.
        manifest_bytes: the bundle's manifest bytes.
        now: reference time for expiry checks (timezone-aware UTC).
        installed_version: version of this model name already installed, or ``None`` when
            nothing is (required: a caller must decide, not forget, the rollback check).
        device: the device's profile, or ``None`` to skip the compatibility check on purpose
            (a third party verifying, not a device installing).
        installed_manifest_sha256: manifest digest of the installed version; re-installing the
            same version is allowed only with the identical manifest.
        expected_name: the model the caller asked for (e.g. from signed desired state).
        expected_channel: the channel the caller asked for.

    Raises:
        everything ``verify_targets`` raises, and
        LengthMismatchError, DigestMismatchError: the manifest bytes are not the signed ones.
        MixAndMatchError: manifest identity differs from the signed target identity, or from
            the expected name/channel.
        RollbackError: older than the installed version, or the same version with other content.
        IncompatibleTargetError: the bundle is not for this device.
    """
    return verify_signed_manifest(
        verify_targets(root, targets_bytes, now=now),
        manifest_bytes,
        installed_version=installed_version,
        device=device,
        installed_manifest_sha256=installed_manifest_sha256,
        expected_name=expected_name,
        expected_channel=expected_channel,
    )


def verify_signed_manifest(
    vt: VerifiedTargets,
    manifest_bytes: bytes,
    *,
    installed_version: int | None,
    device: DeviceProfile | None,
    installed_manifest_sha256: str | None = None,
    expected_name: str | None = None,
    expected_channel: str | None = None,
) -> VerifiedManifest:
    """Stage 1b: the manifest against already verified targets. Raises as ``verify_manifest``."""
    targets, manifest_target = vt.targets, vt.manifest_target
    _check_bytes(manifest_target, manifest_bytes, "manifest")
    try:
        manifest = BundleManifest.from_bytes(manifest_bytes)
    except ContractError as exc:
        raise MetadataFormatError(f"signed manifest is not a valid manifest: {exc}") from exc

    ident = _custom(manifest_target)
    if (
        (ident.get("name"), ident.get("version"), ident.get("channel"))
        != (manifest.name, manifest.version, manifest.channel)
        or manifest_target.path != manifest.target_path
        or targets.version != manifest.version
    ):
        raise MixAndMatchError(
            f"manifest {manifest.name} v{manifest.version} ({manifest.channel}) was signed as "
            f"{manifest_target.path} in targets v{targets.version}"
        )
    if expected_name is not None and manifest.name != expected_name:
        raise MixAndMatchError(f"expected model {expected_name!r}, bundle is {manifest.name!r}")
    if expected_channel is not None and manifest.channel != expected_channel:
        raise MixAndMatchError(
            f"expected channel {expected_channel!r}, bundle is {manifest.channel!r}"
        )
    _check_artifact_target(targets, manifest, manifest_target.hashes["sha256"])

    manifest_sha256 = manifest_target.hashes["sha256"]
    if installed_version is not None:
        if manifest.version < installed_version:
            raise RollbackError(
                f"{manifest.name} v{manifest.version} is older than installed v{installed_version}"
            )
        if (
            manifest.version == installed_version
            and installed_manifest_sha256 is not None
            and not hmac.compare_digest(installed_manifest_sha256, manifest_sha256)
        ):
            raise RollbackError(
                f"{manifest.name} v{manifest.version} is already installed with other content"
            )
    if device is not None:
        manifest.compatibility.check(device)
    return VerifiedManifest(manifest, manifest_sha256, vt.signed_by, targets.expires)


def verify_artifact(verified: VerifiedManifest, digest: ArtifactDigest) -> None:
    """Stage 2: the artifact that was read is exactly the signed one.

    Raises:
        LengthMismatchError: longer (endless data) or shorter (truncated) than signed.
        DigestMismatchError: different bytes (tampered, or another model's artifact).
    """
    art = verified.manifest.artifact
    if digest.length != art.length:
        kind = "longer" if digest.length > art.length else "shorter"
        raise LengthMismatchError(
            f"artifact is {kind} than signed: {digest.length} bytes, signed {art.length}"
        )
    if not hmac.compare_digest(digest.sha256, art.sha256):
        raise DigestMismatchError("artifact SHA-256 does not match the signed manifest")


def verify_bundle(
    root: TrustedRoot,
    targets_bytes: bytes,
    manifest_bytes: bytes,
    artifact: bytes,
    *,
    now: datetime,
    installed_version: int | None,
    device: DeviceProfile | None,
    installed_manifest_sha256: str | None = None,
    expected_name: str | None = None,
    expected_channel: str | None = None,
) -> VerifiedManifest:
    """Both stages on in-memory bytes. Raises everything the two stages raise."""
    verified = verify_manifest(
        root,
        targets_bytes,
        manifest_bytes,
        now=now,
        installed_version=installed_version,
        installed_manifest_sha256=installed_manifest_sha256,
        device=device,
        expected_name=expected_name,
        expected_channel=expected_channel,
    )
    verify_artifact(verified, ArtifactDigest.of(artifact))
    return verified


def _single_manifest_target(targets: Targets) -> TargetFile:
    manifests = [t for p, t in targets.targets.items() if p.endswith("/manifest.json")]
    if len(manifests) != 1 or len(targets.targets) != 2 or targets.delegations is not None:
        raise MetadataFormatError(
            "bundle targets must list exactly one manifest and one artifact, with no delegations"
        )
    target = manifests[0]
    if set(target.hashes) != {"sha256"}:
        raise MetadataFormatError("bundle targets must carry exactly one sha256 hash")
    return target


def _check_artifact_target(targets: Targets, manifest: BundleManifest, manifest_sha: str) -> None:
    art = manifest.artifact
    path = artifact_target_path(manifest.name, manifest.version, art.format)
    target = targets.targets.get(path)
    if target is None:
        raise MixAndMatchError(f"targets do not list the manifest's artifact {path}")
    custom = _custom(target)
    if (
        target.length != art.length
        or target.hashes.get("sha256") != art.sha256
        or custom.get("manifest_sha256") != manifest_sha
    ):
        raise MixAndMatchError("the signed artifact target and the manifest disagree")


def _check_bytes(target: TargetFile, data: bytes, what: str) -> None:
    if len(data) != target.length:
        raise LengthMismatchError(f"{what} is {len(data)} bytes, signed {target.length}")
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), target.hashes["sha256"]):
        raise DigestMismatchError(f"{what} SHA-256 does not match the signed targets metadata")


def _custom(target: TargetFile) -> dict[str, Any]:
    custom = target.unrecognized_fields.get("custom", {})
    block = custom.get(CUSTOM_KEY) if isinstance(custom, dict) else None
    if not isinstance(block, dict):
        raise MetadataFormatError(f"target {target.path} has no {CUSTOM_KEY} block")
    return block
