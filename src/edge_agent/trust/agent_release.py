"""The agent's own software as a signed target: its metadata and the device's checks of it.

Pure: bytes in, a verified ``AgentRelease`` or a typed error out; the clock is passed in.

Owns: the release metadata (``AgentRelease``: release number, wheel file, and compatibility:
Python version, platform, architectures, the configuration schema it needs), its canonical
JSON form, the TUF targets layout of an agent package (``make_agent_targets``) and the two
verification stages a device runs before installing one (``verify_agent_release``, then
``verify_agent_wheel`` on the wheel bytes it read, capped by the signed length). Does not own
reading the package file (``edge_agent.bundle.agent_archive``) nor installing it
(``edge_agent.selfupdate``).

Same root of trust as a model: the builder's ``targets`` keys sign what an agent release *is*.
The targets metadata lists two targets, ``edgefleet-agent/<release>/agent.json`` (custom
``edgefleet.kind = "agent"``) and ``edgefleet-agent/<release>/<wheel file>`` (custom
``kind = "agent-wheel"`` with the metadata's digest), and its version is the release number.
A model bundle is refused here (no ``agent`` target) and an agent package is refused by the
bundle verifier (no ``manifest.json`` target): one signature cannot be read as the other.

Attack -> check -> error:
    unknown / revoked / too few keys   targets threshold under the root   SignatureThresholdError
    freeze (stale package replayed)    targets expiry vs ``now``          ExpiredMetadataError
    rollback to an older agent         release vs the installed release   RollbackError
    tampered metadata or wheel         signed length and SHA-256          LengthMismatchError,
                                                                          DigestMismatchError
    metadata of another release,       identity in every target           MixAndMatchError
      a model bundle's targets
    wrong Python / platform / arch,    signed compatibility vs the host   IncompatibleTargetError
      newer config schema
    malformed metadata                 strict parse                       MetadataFormatError
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from securesystemslib.exceptions import FormatError
from securesystemslib.formats import encode_canonical
from tuf.api.metadata import Metadata, TargetFile, Targets

from edge_agent import strict_json
from edge_agent.errors import (
    DigestMismatchError,
    ExpiredMetadataError,
    IncompatibleTargetError,
    LengthMismatchError,
    MetadataFormatError,
    MixAndMatchError,
    RollbackError,
)
from edge_agent.trust.assignment import ModelAssignment
from edge_agent.trust.fields import SHA256_RE, exact_keys, int_field, str_field
from edge_agent.trust.root import TrustedRoot, parse_metadata
from edge_agent.trust.verify import CUSTOM_KEY, MAX_TARGETS_BYTES, ArtifactDigest

__all__ = [
    "AGENT_KIND",
    "AGENT_TARGET_PREFIX",
    "AGENT_UPDATE_CAPABILITY",
    "AGENT_WHEEL_KIND",
    "MAX_AGENT_METADATA_BYTES",
    "MAX_WHEEL_BYTES",
    "AgentAssignment",
    "AgentCompatibility",
    "AgentHost",
    "AgentRelease",
    "VerifiedAgentRelease",
    "check_agent_package",
    "make_agent_targets",
    "verify_agent_release",
    "verify_agent_wheel",
]

AGENT_KIND = "agent"
#: What a device lists in its reported state's ``capabilities`` when a launcher runs it and it
#: can act on an ``agent`` assignment in the desired state (older agents refuse the key).
AGENT_UPDATE_CAPABILITY = "agent-update"
AGENT_WHEEL_KIND = "agent-wheel"
AGENT_TARGET_PREFIX = "edgefleet-agent"
METADATA_TYPE = "agent-release"
SCHEMA_VERSION = 1
MAX_AGENT_METADATA_BYTES = 64 * 1024
MAX_WHEEL_BYTES = 256 * 1024 * 1024
MAX_ARCHES = 16

# A PEP 440 public version is richer; releases use the plain dotted subset (and it is what a
# directory and a log line can carry safely).
_VERSION_RE = re.compile(r"[0-9]{1,6}(?:\.[0-9]{1,6}){0,3}(?:(?:a|b|rc|\.post|\.dev)[0-9]{1,6})?")
_WHEEL_RE = re.compile(r"edgefleet-[0-9A-Za-z.]{1,40}-py3-none-any\.whl")
_PYTHON_RE = re.compile(r"3\.[0-9]{1,2}")
_PLATFORM_RE = re.compile(r"linux|darwin|any")
_ARCH_RE = re.compile(r"x86_64|aarch64|armv7l|riscv64|any")

_META_KEYS = frozenset(
    {"_type", "schema_version", "release", "version", "wheel", "wheel_sha256", "wheel_length",
     "compatibility"}
)  # fmt: skip
_COMPAT_KEYS = frozenset({"python", "platform", "arch", "min_config_schema"})
_ASSIGNMENT_KEYS = frozenset({"release", "bundle_sha256", "bundle_length", "targets_sha256"})


@dataclass(frozen=True)
class AgentHost:
    """What the device is, for the compatibility check (gathered by the caller, pure here).

    Attributes:
        python: ``major.minor`` of the interpreter the release venv will use.
        platform: ``sys.platform`` (``linux``).
        arch: ``platform.machine()`` (``x86_64``, ``aarch64``).
        config_schema: the configuration schema the device's config file is written for.
    """

    python: str
    platform: str
    arch: str
    config_schema: int


@dataclass(frozen=True)
class AgentCompatibility:
    """Where a release runs: the signed half of the wrong-target protection.

    Attributes:
        python: the ``major.minor`` Python the wheel was built and tested for (the offline
            install reuses the running release's dependencies, built for that interpreter).
        platform: ``linux`` (or ``any``).
        arch: architectures (``any`` for a pure-Python wheel over the installed dependencies).
        min_config_schema: the lowest device configuration schema it reads.

    Raises:
        MetadataFormatError: a field is invalid (on construction).
    """

    python: str
    platform: str
    arch: tuple[str, ...]
    min_config_schema: int

    def __post_init__(self) -> None:
        str_field(self.python, "compatibility.python", _PYTHON_RE)
        str_field(self.platform, "compatibility.platform", _PLATFORM_RE)
        if not isinstance(self.arch, tuple) or not 1 <= len(self.arch) <= MAX_ARCHES:
            raise MetadataFormatError(f"compatibility.arch must list 1..{MAX_ARCHES} values")
        for a in self.arch:
            str_field(a, "compatibility.arch", _ARCH_RE)
        int_field(self.min_config_schema, "compatibility.min_config_schema", minimum=1)

    def check(self, host: AgentHost) -> None:
        """Raise unless ``host`` can run the release.

        Raises:
            IncompatibleTargetError: another Python, platform or architecture, or a device
                configuration schema older than the release needs.
        """
        if host.python != self.python:
            raise IncompatibleTargetError(
                f"agent release is for Python {self.python}, device runs {host.python[:16]}"
            )
        if self.platform not in ("any", host.platform):
            raise IncompatibleTargetError(
                f"agent release is for {self.platform}, device is {host.platform[:32]}"
            )
        if "any" not in self.arch and host.arch not in self.arch:
            raise IncompatibleTargetError(
                f"agent release is for {'/'.join(self.arch)}, device is {host.arch[:32]}"
            )
        if host.config_schema < self.min_config_schema:
            raise IncompatibleTargetError(
                f"agent release needs config schema {self.min_config_schema}, "
                f"device has {host.config_schema}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "python": self.python,
            "platform": self.platform,
            "arch": list(self.arch),
            "min_config_schema": self.min_config_schema,
        }

    @classmethod
    def from_dict(cls, data: object) -> AgentCompatibility:
        d = exact_keys(data, _COMPAT_KEYS, "agent compatibility")
        arch = d["arch"]
        if not isinstance(arch, list):
            raise MetadataFormatError("compatibility.arch must be a list")
        return cls(d["python"], d["platform"], tuple(arch), d["min_config_schema"])


@dataclass(frozen=True)
class AgentRelease:
    """One release of the agent software (``agent.json`` in an agent package).

    Attributes:
        release: the monotonic release number (the targets version; rollback protection).
        version: the wheel's version string (what ``edge-agent --version`` prints).
        wheel: the wheel's file name (``edgefleet-<version>-py3-none-any.whl``).
        wheel_sha256, wheel_length: the wheel file's digest and exact length.
        compatibility: where it runs.

    Raises:
        MetadataFormatError: a field is invalid (on construction).
    """

    release: int
    version: str
    wheel: str
    wheel_sha256: str
    wheel_length: int
    compatibility: AgentCompatibility

    def __post_init__(self) -> None:
        int_field(self.release, "release", minimum=1, maximum=2**31)
        str_field(self.version, "version", _VERSION_RE)
        str_field(self.wheel, "wheel", _WHEEL_RE)
        if self.wheel != f"edgefleet-{self.version}-py3-none-any.whl":
            raise MetadataFormatError(f"wheel {self.wheel!r} is not version {self.version}")
        str_field(self.wheel_sha256, "wheel_sha256", SHA256_RE)
        int_field(self.wheel_length, "wheel_length", minimum=1, maximum=MAX_WHEEL_BYTES)
        if not isinstance(self.compatibility, AgentCompatibility):
            raise MetadataFormatError("compatibility must be an AgentCompatibility")

    @property
    def metadata_path(self) -> str:
        return f"{AGENT_TARGET_PREFIX}/{self.release}/agent.json"

    @property
    def wheel_path(self) -> str:
        return f"{AGENT_TARGET_PREFIX}/{self.release}/{self.wheel}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "_type": METADATA_TYPE,
            "schema_version": SCHEMA_VERSION,
            "release": self.release,
            "version": self.version,
            "wheel": self.wheel,
            "wheel_sha256": self.wheel_sha256,
            "wheel_length": self.wheel_length,
            "compatibility": self.compatibility.to_dict(),
        }

    def to_bytes(self) -> bytes:
        """Canonical JSON (what the targets metadata hashes)."""
        try:
            return str(encode_canonical(self.to_dict())).encode("utf-8")
        except FormatError as exc:  # pragma: no cover - every field is canonical by type
            raise MetadataFormatError(f"agent release not canonical: {exc}") from exc

    @classmethod
    def from_dict(cls, data: object) -> AgentRelease:
        """Parse strictly.

        Raises:
            MetadataFormatError: wrong ``_type`` or schema, missing, unknown or invalid fields.
        """
        d = exact_keys(data, _META_KEYS, "agent release")
        if d["_type"] != METADATA_TYPE or d["schema_version"] != SCHEMA_VERSION:
            raise MetadataFormatError(
                f"expected {METADATA_TYPE} schema {SCHEMA_VERSION}, "
                f"got {str(d['_type'])[:32]!r} schema {str(d['schema_version'])[:8]}"
            )
        return cls(
            release=d["release"],
            version=d["version"],
            wheel=d["wheel"],
            wheel_sha256=d["wheel_sha256"],
            wheel_length=d["wheel_length"],
            compatibility=AgentCompatibility.from_dict(d["compatibility"]),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> AgentRelease:
        """Parse ``agent.json`` bytes strictly (size cap, no floats, no duplicate keys).

        Raises:
            MetadataFormatError: not a valid agent release document.
        """
        doc = strict_json.loads(
            data,
            max_bytes=MAX_AGENT_METADATA_BYTES,
            what="agent release",
            error=MetadataFormatError,
            floats=False,
        )
        return cls.from_dict(doc)


@dataclass(frozen=True)
class VerifiedAgentRelease:
    """An agent release whose signatures, expiry, release number and compatibility passed."""

    release: AgentRelease
    metadata_sha256: str
    signed_by: tuple[str, ...]
    expires: datetime


@dataclass(frozen=True)
class AgentAssignment:
    """The agent release a device should run: the ``agent`` entry of a desired state.

    Signed by the fleet server's online key like a model's assignment: the exact package file
    (its length is the transfer cap) and the builder-signed targets metadata inside it. A
    device still verifies the package itself with the builder keys (``verify_agent_release``)
    and checks it is this release (``check_agent_package``); both must pass.

    Attributes:
        release: the agent release number.
        bundle_sha256, bundle_length: the ``*.efa`` file.
        targets_sha256: SHA-256 of its ``targets.json`` member.

    Raises:
        MetadataFormatError: a field is invalid (on construction).
    """

    release: int
    bundle_sha256: str
    bundle_length: int
    targets_sha256: str

    def __post_init__(self) -> None:
        int_field(self.release, "agent release", minimum=1, maximum=2**31)
        str_field(self.bundle_sha256, "agent bundle_sha256", SHA256_RE)
        int_field(self.bundle_length, "agent bundle_length", minimum=1, maximum=2 * MAX_WHEEL_BYTES)
        str_field(self.targets_sha256, "agent targets_sha256", SHA256_RE)

    def bundle(self) -> ModelAssignment:
        """The package file as an assignment: the block transfer takes it unchanged."""
        return ModelAssignment(
            version=self.release,
            channel=AGENT_KIND,
            bundle_sha256=self.bundle_sha256,
            bundle_length=self.bundle_length,
            targets_sha256=self.targets_sha256,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "release": self.release,
            "bundle_sha256": self.bundle_sha256,
            "bundle_length": self.bundle_length,
            "targets_sha256": self.targets_sha256,
        }

    @classmethod
    def from_dict(cls, data: object) -> AgentAssignment:
        """Parse strictly.

        Raises:
            MetadataFormatError: missing, unknown or invalid fields.
        """
        d = exact_keys(data, _ASSIGNMENT_KEYS, "agent assignment")
        return cls(d["release"], d["bundle_sha256"], d["bundle_length"], d["targets_sha256"])


def check_agent_package(
    assignment: AgentAssignment, targets_bytes: bytes, verified: VerifiedAgentRelease
) -> None:
    """A builder-verified package is the one the desired state names.

    Raises:
        DigestMismatchError: its ``targets.json`` is not the assigned one.
        MixAndMatchError: it is another release than assigned.
    """
    digest = hashlib.sha256(targets_bytes).hexdigest()
    if not hmac.compare_digest(digest.encode(), assignment.targets_sha256.encode()):
        raise DigestMismatchError("agent targets metadata differs from the desired state's")
    if verified.release.release != assignment.release:
        raise MixAndMatchError(
            f"assigned agent release {assignment.release}, package is {verified.release.release}"
        )


def make_agent_targets(release: AgentRelease, expires: datetime) -> Targets:
    """The unsigned targets metadata of one agent release (the builder's keys sign it)."""
    meta = release.to_bytes()
    digest = hashlib.sha256(meta).hexdigest()
    ident = {"name": AGENT_TARGET_PREFIX, "release": release.release, "version": release.version}
    targets = {
        release.metadata_path: TargetFile(
            length=len(meta),
            hashes={"sha256": digest},
            path=release.metadata_path,
            unrecognized_fields={"custom": {CUSTOM_KEY: {**ident, "kind": AGENT_KIND}}},
        ),
        release.wheel_path: TargetFile(
            length=release.wheel_length,
            hashes={"sha256": release.wheel_sha256},
            path=release.wheel_path,
            unrecognized_fields={
                "custom": {
                    CUSTOM_KEY: {**ident, "kind": AGENT_WHEEL_KIND, "metadata_sha256": digest}
                }
            },
        ),
    }
    return Targets(version=release.release, expires=expires, targets=targets)


def verify_agent_release(
    root: TrustedRoot,
    targets_bytes: bytes,
    metadata_bytes: bytes,
    *,
    now: datetime,
    installed_release: int | None,
    host: AgentHost | None,
) -> VerifiedAgentRelease:
    """Stage 1: trust ``agent.json`` (and so the wheel's signed length and digest).

    Args:
        root: the device's trusted root (already rotated to its newest version).
        targets_bytes: the package's TUF targets metadata.
        metadata_bytes: the package's ``agent.json``.
        now: reference time (timezone-aware UTC).
        installed_release: the release the device runs (``None``: the base install, whose
            release is unknown; any signed release is newer than it).
        host: the device, or ``None`` to skip compatibility on purpose (a verifier, not an
            installer).

    Raises:
        LengthMismatchError: the targets metadata is oversized, or ``agent.json`` is not the
            signed length.
        MetadataFormatError: malformed metadata, or not exactly the two agent targets.
        SignatureThresholdError: not signed by a threshold of the root's targets keys.
        ExpiredMetadataError: the root or the targets metadata has expired.
        DigestMismatchError: ``agent.json`` is not the signed bytes.
        MixAndMatchError: the targets name another release or are not an agent package.
        RollbackError: the release is not newer than ``installed_release``.
        IncompatibleTargetError: the release does not run on ``host``.
    """
    root.check_expiry(now)
    if len(targets_bytes) > MAX_TARGETS_BYTES:
        raise LengthMismatchError(f"targets metadata exceeds {MAX_TARGETS_BYTES} bytes")
    md: Metadata[Targets] = parse_metadata(targets_bytes, "targets")
    signed_by = root.verify_role("targets", md)
    targets = md.signed
    if targets.is_expired(now):
        raise ExpiredMetadataError(f"agent targets expired at {targets.expires}")
    meta_target = _metadata_target(targets)
    _check_bytes(meta_target, metadata_bytes, "agent.json")
    release = AgentRelease.from_bytes(metadata_bytes)
    meta_sha = meta_target.hashes["sha256"]
    if (
        meta_target.path != release.metadata_path
        or targets.version != release.release
        or _custom(meta_target).get("release") != release.release
    ):
        raise MixAndMatchError(
            f"agent release {release.release} was signed as {meta_target.path[:80]} "
            f"in targets v{targets.version}"
        )
    wheel_target = targets.targets.get(release.wheel_path)
    if (
        wheel_target is None
        or wheel_target.length != release.wheel_length
        or wheel_target.hashes.get("sha256") != release.wheel_sha256
        or _custom(wheel_target).get("kind") != AGENT_WHEEL_KIND
        or _custom(wheel_target).get("metadata_sha256") != meta_sha
    ):
        raise MixAndMatchError("the signed wheel target and agent.json disagree")
    if installed_release is not None and release.release <= installed_release:
        raise RollbackError(
            f"agent release {release.release} is not newer than installed {installed_release}"
        )
    if host is not None:
        release.compatibility.check(host)
    return VerifiedAgentRelease(release, meta_sha, signed_by, targets.expires)


def verify_agent_wheel(verified: VerifiedAgentRelease, digest: ArtifactDigest) -> None:
    """Stage 2: the wheel that was read is exactly the signed one.

    Raises:
        LengthMismatchError: longer or shorter than signed.
        DigestMismatchError: different bytes.
    """
    rel = verified.release
    if digest.length != rel.wheel_length:
        raise LengthMismatchError(
            f"agent wheel is {digest.length} bytes, signed {rel.wheel_length}"
        )
    if not hmac.compare_digest(digest.sha256, rel.wheel_sha256):
        raise DigestMismatchError("agent wheel SHA-256 does not match the signed release")


def _metadata_target(targets: Targets) -> TargetFile:
    metas = [t for t in targets.targets.values() if _kind(t) == AGENT_KIND]
    if len(metas) != 1 or len(targets.targets) != 2 or targets.delegations is not None:
        raise MixAndMatchError(
            "not an agent package: its targets must list one agent release and one wheel"
        )
    target = metas[0]
    if set(target.hashes) != {"sha256"}:
        raise MetadataFormatError("agent targets must carry exactly one sha256 hash")
    return target


def _kind(target: TargetFile) -> object:
    custom = target.unrecognized_fields.get("custom")
    block = custom.get(CUSTOM_KEY) if isinstance(custom, dict) else None
    return block.get("kind") if isinstance(block, dict) else None


def _custom(target: TargetFile) -> dict[str, Any]:
    custom = target.unrecognized_fields.get("custom", {})
    block = custom.get(CUSTOM_KEY) if isinstance(custom, dict) else None
    if not isinstance(block, dict):
        raise MetadataFormatError(f"target {target.path[:80]} has no {CUSTOM_KEY} block")
    return block


def _check_bytes(target: TargetFile, data: bytes, what: str) -> None:
    if len(data) != target.length:
        raise LengthMismatchError(f"{what} is {len(data)} bytes, signed {target.length}")
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), target.hashes["sha256"]):
        raise DigestMismatchError(f"{what} SHA-256 does not match the signed targets metadata")
