"""The bundle library: builder-verified bundle files, stored by digest for the gateway to serve.

``BundleLibrary.add(path)`` takes a bundle an operator (or the admin API) offers, copies its
bytes into a staging file inside the library, verifies *that copy* with the builder root exactly
as a third party would (signatures, expiry, signed lengths and digests; no device compatibility
or rollback checks: those are each device's), and only then renames it to
``<directory>/<sha256>.bundle``. What is stored is therefore byte-for-byte what was verified.

Owns: the files and the verification call. Does not own: the registry rows (the service passes
the returned ``LibraryEntry`` to ``Registry.publish_bundle``) or MQTT delivery (the gateway).
Agent packages (the agent's own software, ``*.efa``) are verified with the same root and
stored the same way (``add_agent_bytes``), so the block transfer serves them unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from edge_agent.bundle.agent_archive import read_agent_package
from edge_agent.bundle.archive import read_bundle
from edge_agent.common.durable import fsync_dir, write_atomic
from edge_agent.errors import BundleFormatError, BundleVerificationError, ContractError
from edge_agent.trust import TrustedRoot
from fleet_server.errors import BundleRejectedError, LibraryError

__all__ = [
    "BUNDLE_SUFFIX",
    "DEFAULT_MAX_BUNDLE_BYTES",
    "AgentLibraryEntry",
    "BundleLibrary",
    "LibraryEntry",
]

log = logging.getLogger(__name__)
BUNDLE_SUFFIX = ".bundle"
DEFAULT_MAX_BUNDLE_BYTES = 1024 * 1024 * 1024
_STAGING = ".staging"
# Manifest fields kept in the registry; baselines and golden samples stay in the bundle file.
# "outputs": the rollout runner reads the task (a shadow phase is for classifiers only).
_SUMMARY_KEYS = (
    "name",
    "version",
    "channel",
    "artifact",
    "outputs",
    "compatibility",
    "provenance",
    "report",
)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class LibraryEntry:
    """A verified, stored bundle: the values ``Registry.publish_bundle`` takes, and its file."""

    name: str
    version: int
    channel: str
    sha256: str
    length: int
    targets_sha256: str
    manifest: Mapping[str, Any]
    path: Path


@dataclass(frozen=True)
class AgentLibraryEntry:
    """A verified, stored agent package: what the registry records of it."""

    release: int
    version: str
    python: str
    sha256: str
    length: int
    targets_sha256: str


_E = TypeVar("_E", LibraryEntry, AgentLibraryEntry)


class BundleLibrary:
    """A directory of verified bundle files named ``<sha256>.bundle``."""

    def __init__(
        self,
        directory: Path,
        root: TrustedRoot,
        *,
        clock: Callable[[], datetime] = _utcnow,
        max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
    ) -> None:
        """Use ``directory`` (created on first ``add``) and trust bundles ``root`` vouches for."""
        self._dir = Path(directory)
        self._root = root
        self._clock = clock
        self._max_bytes = max_bytes

    def use_root(self, root: TrustedRoot) -> None:
        """Verify bundles added from now on with ``root`` (after a root rotation)."""
        self._root = root

    @property
    def directory(self) -> Path:
        """Where bundle files live (the gateway's ``bundles_dir``)."""
        return self._dir

    def path_of(self, sha256: str) -> Path:
        """The file a bundle with this digest is (or would be) stored at."""
        return self._dir / f"{sha256}{BUNDLE_SUFFIX}"

    def has(self, sha256: str) -> bool:
        """True when the bundle file with this digest is stored."""
        return self.path_of(sha256).is_file()

    def add(self, path: Path) -> LibraryEntry:
        """Verify the bundle at ``path`` and store it (idempotent for the same bytes).

        Raises:
            BundleRejectedError: unreadable, larger than the cap, not a bundle, or not trusted
                by the builder root (unsigned, tampered, expired...); ``reason`` says which.
            LibraryError: the library directory cannot be written.
        """
        try:
            size = Path(path).stat().st_size
            if size > self._max_bytes:
                raise BundleRejectedError(
                    f"bundle is {size} bytes, the limit is {self._max_bytes}", reason="too_large"
                )
            data = Path(path).read_bytes()
        except OSError as exc:
            raise BundleRejectedError(f"cannot read {path}: {exc}", reason="unreadable") from exc
        return self.add_bytes(data)

    def add_bytes(self, data: bytes) -> LibraryEntry:
        """Verify bundle bytes (e.g. an upload) and store them (idempotent for the same bytes).

        Raises:
            BundleRejectedError: too large, not a bundle, or not trusted by the builder root.
            LibraryError: the library directory cannot be written.
        """
        return self._store(data, self._verify)

    def add_agent_bytes(self, data: bytes) -> AgentLibraryEntry:
        """Verify agent package bytes (``*.efa``) and store them beside the bundles.

        Verified as a third party would (builder signatures, expiry, signed lengths and
        digests; no compatibility or rollback check: those are each device's). Stored as
        ``<sha256>.bundle`` so the block transfer serves it like a model bundle.

        Raises:
            BundleRejectedError: too large, not an agent package, or not trusted.
            LibraryError: the library directory cannot be written.
        """
        return self._store(data, self._verify_agent)

    def _store(self, data: bytes, verify: Callable[[Path, bytes, str], _E]) -> _E:
        if len(data) > self._max_bytes:
            raise BundleRejectedError(
                f"bundle is {len(data)} bytes, the limit is {self._max_bytes}", reason="too_large"
            )
        if not data:
            raise BundleRejectedError("bundle is empty", reason="bundle_format")
        sha256 = hashlib.sha256(data).hexdigest()
        staging = self._dir / _STAGING / f"{sha256}.{secrets.token_hex(4)}.efb"
        # Messages name no path: they reach API clients (the log has the details).
        try:
            staging.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(staging, data)
        except OSError as exc:
            log.error("cannot write %s: %s", staging, exc)
            raise LibraryError(f"cannot write to the bundle library: {_reason(exc)}") from exc
        try:
            entry = verify(staging, data, sha256)
            staging.replace(self.path_of(sha256))
            fsync_dir(self._dir)
        except OSError as exc:
            log.error("cannot store %s: %s", self.path_of(sha256), exc)
            raise LibraryError(f"cannot store bundle {sha256}: {_reason(exc)}") from exc
        finally:
            staging.unlink(missing_ok=True)
        return entry

    def _verify(self, staged: Path, data: bytes, sha256: str) -> LibraryEntry:
        try:
            loaded = read_bundle(
                staged, self._root, now=self._clock(), installed_version=None, device=None
            )
        except BundleVerificationError as exc:
            raise BundleRejectedError(
                f"bundle is not trusted by the builder root: {exc}", reason=exc.code
            ) from exc
        except (BundleFormatError, ContractError) as exc:
            raise BundleRejectedError(f"not a readable bundle: {exc}", reason=exc.code) from exc
        manifest = loaded.manifest
        full = manifest.to_dict()
        return LibraryEntry(
            name=manifest.name,
            version=manifest.version,
            channel=manifest.channel,
            sha256=sha256,
            length=len(data),
            targets_sha256=hashlib.sha256(loaded.targets_bytes).hexdigest(),
            manifest={k: full[k] for k in _SUMMARY_KEYS if k in full},
            path=self.path_of(sha256),
        )

    def _verify_agent(self, staged: Path, data: bytes, sha256: str) -> AgentLibraryEntry:
        try:
            loaded = read_agent_package(
                staged, self._root, now=self._clock(), installed_release=None, host=None
            )
        except BundleVerificationError as exc:
            raise BundleRejectedError(
                f"agent package is not trusted by the builder root: {exc}", reason=exc.code
            ) from exc
        except (BundleFormatError, ContractError) as exc:
            raise BundleRejectedError(
                f"not a readable agent package: {exc}", reason=exc.code
            ) from exc
        rel = loaded.verified.release
        return AgentLibraryEntry(
            release=rel.release,
            version=rel.version,
            python=rel.compatibility.python,
            sha256=sha256,
            length=len(data),
            targets_sha256=hashlib.sha256(loaded.targets_bytes).hexdigest(),
        )


def _reason(exc: OSError) -> str:
    """An OS error without the file names it carries."""
    return exc.strerror or type(exc).__name__
