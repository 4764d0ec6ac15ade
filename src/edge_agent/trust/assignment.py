"""One model's assignment in a desired-state document, and the checks of a bundle against it.

Owns ``ModelAssignment`` (the exact bundle file, by length and SHA-256, and the builder-signed
targets metadata it must carry, for one model) and ``ShadowAssignment`` (a newer bundle the
device installs without serving it and runs beside the live model on ``fraction_ppm`` of the
requests; its version must be newer than the serving one), their strict dict forms,
``SHADOW_CAPABILITY`` (what a device reports to be sent shadows), and the device's checks of a
downloaded bundle against its assignment (workflow steps 2 and 3 of
``edge_agent.trust.desired``): ``check_assignment`` (exact length and SHA-256),
``check_targets_digest`` (its ``targets.json``) and ``check_bundle_identity`` (the verified
manifest is the model, version and channel assigned).

Does not own the signed document, its envelope and its verification
(``edge_agent.trust.desired``) nor the builder-key verification of the bundle itself
(``edge_agent.trust.verify``). A shadow bundle is checked exactly like a serving one
(``ShadowAssignment.bundle()``).

Pure: values in, values out or a typed error.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, replace
from typing import Any

from edge_agent.contract.manifest import BundleManifest
from edge_agent.errors import (
    DigestMismatchError,
    LengthMismatchError,
    MetadataFormatError,
    MixAndMatchError,
)
from edge_agent.ids import NAME_PATTERN
from edge_agent.trust.fields import SHA256_RE, exact_keys, int_field, str_field

__all__ = [
    "MAX_BUNDLE_LENGTH",
    "PPM",
    "SHADOW_CAPABILITY",
    "ModelAssignment",
    "ShadowAssignment",
    "check_assignment",
    "check_bundle_identity",
    "check_targets_digest",
]

MAX_BUNDLE_LENGTH = 1 << 40
#: What a device lists in its reported state's ``capabilities`` to be sent shadow assignments.
SHADOW_CAPABILITY = "shadow"
#: ``fraction_ppm`` of a shadow: parts per million of requests sampled (1..1,000,000).
PPM = 1_000_000
NAME_RE = NAME_PATTERN

_ASSIGNMENT_KEYS = frozenset(
    {"version", "channel", "bundle_sha256", "bundle_length", "targets_sha256"}
)
_SHADOW_KEYS = _ASSIGNMENT_KEYS | {"fraction_ppm"}


@dataclass(frozen=True)
class ShadowAssignment:
    """A bundle a device installs without serving it and runs as a shadow (a rollout's phase).

    Attributes:
        version, channel, bundle_sha256, bundle_length, targets_sha256: as in
            ``ModelAssignment``: the exact bundle file and the targets metadata inside it.
        fraction_ppm: share of served requests replayed on the shadow, parts per million.

    Raises:
        MetadataFormatError: a field is out of range or badly formed (on construction).
    """

    version: int
    channel: str
    bundle_sha256: str
    bundle_length: int
    targets_sha256: str
    fraction_ppm: int

    def __post_init__(self) -> None:
        int_field(self.version, "shadow version", minimum=1)
        str_field(self.channel, "shadow channel", NAME_RE)
        str_field(self.bundle_sha256, "shadow bundle_sha256", SHA256_RE)
        int_field(self.bundle_length, "shadow bundle_length", minimum=1, maximum=MAX_BUNDLE_LENGTH)
        str_field(self.targets_sha256, "shadow targets_sha256", SHA256_RE)
        int_field(self.fraction_ppm, "shadow fraction_ppm", minimum=1, maximum=PPM)

    @property
    def fraction(self) -> float:
        """``fraction_ppm`` as a share in (0, 1]."""
        return self.fraction_ppm / PPM

    def bundle(self) -> ModelAssignment:
        """The shadow bundle as an assignment: every bundle check takes it unchanged."""
        return ModelAssignment(
            version=self.version,
            channel=self.channel,
            bundle_sha256=self.bundle_sha256,
            bundle_length=self.bundle_length,
            targets_sha256=self.targets_sha256,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.bundle().to_dict(), "fraction_ppm": self.fraction_ppm}

    @classmethod
    def from_dict(cls, data: object) -> ShadowAssignment:
        """Parse strictly: exactly the known fields, each of the right type.

        Raises:
            MetadataFormatError: missing, unknown or invalid fields.
        """
        d = exact_keys(data, _SHADOW_KEYS, "shadow assignment")
        return cls(
            version=d["version"],
            channel=d["channel"],
            bundle_sha256=d["bundle_sha256"],
            bundle_length=d["bundle_length"],
            targets_sha256=d["targets_sha256"],
            fraction_ppm=d["fraction_ppm"],
        )


@dataclass(frozen=True)
class ModelAssignment:
    """One model a device should run: the exact bundle file and the targets metadata inside it.

    Attributes:
        version: the model version (equals the builder's targets version).
        channel: the release channel the bundle was built for.
        bundle_sha256: SHA-256 (lowercase hex) of the whole bundle file.
        bundle_length: exact bundle size in bytes; the transfer cap (read no more than this).
        targets_sha256: SHA-256 of the builder-signed ``targets.json`` the bundle must carry.
        shadow: a newer bundle to install without serving and run as a shadow (None: none).

    Raises:
        MetadataFormatError: a field is out of range or badly formed, or the shadow is not
            newer than the serving version (on construction).
    """

    version: int
    channel: str
    bundle_sha256: str
    bundle_length: int
    targets_sha256: str
    shadow: ShadowAssignment | None = None

    def __post_init__(self) -> None:
        int_field(self.version, "model version", minimum=1)
        str_field(self.channel, "channel", NAME_RE)
        str_field(self.bundle_sha256, "bundle_sha256", SHA256_RE)
        int_field(self.bundle_length, "bundle_length", minimum=1, maximum=MAX_BUNDLE_LENGTH)
        str_field(self.targets_sha256, "targets_sha256", SHA256_RE)
        if self.shadow is not None:
            if not isinstance(self.shadow, ShadowAssignment):
                raise MetadataFormatError("shadow must be a ShadowAssignment")
            if self.shadow.version <= self.version:
                raise MetadataFormatError(
                    f"shadow v{self.shadow.version} is not newer than serving v{self.version}"
                )

    def serving(self) -> ModelAssignment:
        """This assignment without its shadow (the serving bundle alone)."""
        return replace(self, shadow=None) if self.shadow is not None else self

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "channel": self.channel,
            "bundle_sha256": self.bundle_sha256,
            "bundle_length": self.bundle_length,
            "targets_sha256": self.targets_sha256,
        }
        if self.shadow is not None:  # absent, not null: the older form stays byte-identical
            out["shadow"] = self.shadow.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: object) -> ModelAssignment:
        """Parse strictly: exactly the known fields, each of the right type.

        Raises:
            MetadataFormatError: missing, unknown or invalid fields.
        """
        has_shadow = isinstance(data, dict) and "shadow" in data
        keys = _ASSIGNMENT_KEYS | {"shadow"} if has_shadow else _ASSIGNMENT_KEYS
        d = exact_keys(data, keys, "model assignment")
        return cls(
            version=d["version"],
            channel=d["channel"],
            bundle_sha256=d["bundle_sha256"],
            bundle_length=d["bundle_length"],
            targets_sha256=d["targets_sha256"],
            shadow=ShadowAssignment.from_dict(d["shadow"]) if has_shadow else None,
        )


def check_assignment(
    assignment: ModelAssignment, bundle_bytes_length: int, bundle_sha256: str
) -> None:
    """Check a downloaded bundle file against its signed assignment.

    This only proves the file is the one the online key named. The bundle must then be verified
    with the builder keys as usual (``verify_bundle``); both checks must pass.

    Raises:
        LengthMismatchError: the file is not exactly ``assignment.bundle_length`` bytes.
        DigestMismatchError: its SHA-256 differs from ``assignment.bundle_sha256``.
    """
    if bundle_bytes_length != assignment.bundle_length:
        raise LengthMismatchError(
            f"bundle is {bundle_bytes_length} bytes, desired state signs {assignment.bundle_length}"
        )
    if not hmac.compare_digest(bundle_sha256.lower().encode(), assignment.bundle_sha256.encode()):
        raise DigestMismatchError("bundle SHA-256 differs from the desired state's")


def check_targets_digest(assignment: ModelAssignment, targets_bytes: bytes) -> None:
    """Check that the bundle's ``targets.json`` member is the one the assignment names.

    Raises:
        DigestMismatchError: its SHA-256 differs from ``assignment.targets_sha256``.
    """
    digest = hashlib.sha256(targets_bytes).hexdigest()
    if not hmac.compare_digest(digest.encode(), assignment.targets_sha256.encode()):
        raise DigestMismatchError("targets metadata differs from the desired state's")


def check_bundle_identity(name: str, assignment: ModelAssignment, manifest: BundleManifest) -> None:
    """Check that a builder-verified manifest is the model, version and channel assigned.

    Raises:
        MixAndMatchError: the bundle is another model, version or channel than assigned.
    """
    got = (manifest.name, manifest.version, manifest.channel)
    want = (name, assignment.version, assignment.channel)
    if got != want:
        raise MixAndMatchError(f"assigned {want}, bundle is {got}")
