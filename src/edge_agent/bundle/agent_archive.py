"""Agent package files (``*.efa``): writing them, and reading them with signed-length caps.

An agent package is an uncompressed POSIX tar with exactly three regular members, in order:

    targets.json    TUF targets metadata signed by the builder's key(s) (the same root of trust
                    as model bundles; layout in ``edge_agent.trust.agent_release``)
    agent.json      the release metadata (release number, wheel, compatibility)
    agent.whl       the edgefleet wheel (its file name, length and SHA-256 are in agent.json)

It is read with the bundle reader's rules (``edge_agent.bundle.archive.UstarReader``): plain
USTAR headers only, members in order, each size checked against its cap before a byte is read
(the wheel's cap is the signed length), nothing after the end of the archive.

Owns: the file layout and the I/O. Does not own: the verification decisions
(``edge_agent.trust.agent_release``) nor installing (``edge_agent.selfupdate``).
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from edge_agent.bundle.archive import TARGETS_MEMBER, UstarReader
from edge_agent.trust import ArtifactDigest, TrustedRoot
from edge_agent.trust.agent_release import (
    MAX_AGENT_METADATA_BYTES,
    AgentHost,
    VerifiedAgentRelease,
    verify_agent_release,
    verify_agent_wheel,
)
from edge_agent.trust.verify import MAX_TARGETS_BYTES

__all__ = [
    "AGENT_PACKAGE_SUFFIX",
    "METADATA_MEMBER",
    "WHEEL_MEMBER",
    "LoadedAgentPackage",
    "agent_package_bytes",
    "read_agent_package",
]

AGENT_PACKAGE_SUFFIX = ".efa"
METADATA_MEMBER = "agent.json"
WHEEL_MEMBER = "agent.whl"


@dataclass(frozen=True)
class LoadedAgentPackage:
    """A verified agent package held in memory (the wheel is a few hundred KiB)."""

    verified: VerifiedAgentRelease
    targets_bytes: bytes
    metadata_bytes: bytes
    wheel: bytes


def agent_package_bytes(targets_bytes: bytes, metadata_bytes: bytes, wheel: bytes) -> bytes:
    """Serialise an agent package (deterministic: fixed mtime, owner and mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in (
            (TARGETS_MEMBER, targets_bytes),
            (METADATA_MEMBER, metadata_bytes),
            (WHEEL_MEMBER, wheel),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_agent_package(
    path: Path,
    root: TrustedRoot,
    *,
    now: datetime,
    installed_release: int | None,
    host: AgentHost | None,
) -> LoadedAgentPackage:
    """Read and verify an agent package: metadata first, then the wheel capped by its length.

    Raises:
        BundleFormatError: not an agent package (members, order, truncation, trailing bytes).
        LengthMismatchError: a member larger than its cap (the wheel's is the signed length).
        BundleVerificationError: every refusal of ``verify_agent_release`` and
            ``verify_agent_wheel`` (signatures, expiry, rollback, digests, compatibility).
    """
    with UstarReader(path) as tar:
        targets = tar.read(tar.next(TARGETS_MEMBER), MAX_TARGETS_BYTES)
        metadata = tar.read(tar.next(METADATA_MEMBER), MAX_AGENT_METADATA_BYTES)
        verified = verify_agent_release(
            root, targets, metadata, now=now, installed_release=installed_release, host=host
        )
        wheel = tar.read(tar.next(WHEEL_MEMBER), verified.release.wheel_length)
        tar.expect_end()
    verify_agent_wheel(verified, ArtifactDigest.of(wheel))
    return LoadedAgentPackage(verified, targets, metadata, wheel)
