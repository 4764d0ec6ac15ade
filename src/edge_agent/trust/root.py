"""The device's root of trust: keys, roles and thresholds, rotated only by signed new versions.

Owns: parsing root metadata (python-tuf's Metadata API), the self-signature check on the
provisioned root, the root-rotation rule (version N+1 must be signed by a threshold of version N's
root keys AND a threshold of its own; walking a whole chain and choosing between the stored and
the provisioned root is ``edge_agent.trust.rotation``), expiry checks with the clock passed in,
and threshold verification of any role's metadata. Pure: bytes in, a new ``TrustedRoot`` or an
error out.

Roles (the four TUF top-level roles, mapped onto edgefleet):
    root       offline keys that sign root versions (rotation and revocation).
    targets    the model builder's offline keys: they sign what a model *is*.
    timestamp  the fleet server's online key: signs which model a device should run (short expiry).
    snapshot   the fleet server's online key as well (reserved for fleet-wide listings).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root

from edge_agent import strict_json
from edge_agent.errors import (
    ExpiredMetadataError,
    MetadataFormatError,
    RootRotationError,
    SignatureThresholdError,
)

ROLES = ("root", "targets", "timestamp", "snapshot")
#: No root or targets document is larger (the bundle reader caps targets at the same size).
MAX_METADATA_BYTES = 1024 * 1024


def parse_metadata(data: bytes, expected_type: str) -> Metadata[Any]:
    """Parse TUF metadata bytes and check their type.

    The bytes go through ``edge_agent.strict_json`` first (size, depth, integer digits, no
    floats: canonical JSON has none, and a float that python-tuf parsed would only fail later,
    as an untyped ``SerializationError``, when the signed bytes are computed). The signed
    bytes are then computed here once, so nothing downstream can fail on them.

    Raises:
        MetadataFormatError: not TUF metadata, or of another type than ``expected_type``.
    """
    what = f"{expected_type} metadata"
    obj = strict_json.loads(
        data, max_bytes=MAX_METADATA_BYTES, what=what, error=MetadataFormatError, floats=False
    )
    try:
        md: Metadata[Any] = Metadata.from_dict(obj)
        md.signed_bytes  # noqa: B018 - canonical form must exist: signatures cover it
    # python-tuf's own deserializer catches Exception here too: from_dict on hostile input
    # raises whatever the field it trips on raises (ValueError, TypeError, KeyError,
    # AttributeError, securesystemslib's errors, SerializationError...).
    except Exception as exc:
        raise MetadataFormatError(f"cannot parse {what}: {type(exc).__name__}: {exc}") from exc
    if md.signed.type != expected_type:
        raise MetadataFormatError(f"expected {expected_type} metadata, got {md.signed.type}")
    return md


class TrustedRoot:
    """An immutable, verified root. Obtain with ``from_bytes``; rotate with ``update``."""

    __slots__ = ("_md",)

    def __init__(self, md: Metadata[Root]) -> None:
        self._md = md

    @classmethod
    def from_bytes(cls, data: bytes) -> TrustedRoot:
        """Trust a provisioned root, which must be signed by its own root threshold.

        Raises:
            MetadataFormatError: not root metadata.
            SignatureThresholdError: not signed by a threshold of its own root keys.
        """
        md: Metadata[Root] = parse_metadata(data, "root")
        try:
            md.signed.verify_delegate("root", md.signed_bytes, md.signatures)
        except UnsignedMetadataError as exc:
            raise SignatureThresholdError(f"root is not self-signed: {exc}") from exc
        return cls(md)

    @classmethod
    def from_chain(cls, initial: bytes, updates: Iterable[bytes]) -> TrustedRoot:
        """Start from the provisioned root and apply each newer root in order.

        Raises:
            MetadataFormatError, SignatureThresholdError, RootRotationError: see ``update``.
        """
        root = cls.from_bytes(initial)
        for data in updates:
            root = root.update(data)
        return root

    def update(self, data: bytes) -> TrustedRoot:
        """Verify and return the next root version.

        Expiry of intermediate roots is deliberately not checked (as in TUF): a device that was
        offline for a year must still be able to walk the chain; call ``check_expiry`` on the
        final root.

        Raises:
            MetadataFormatError: not root metadata.
            RootRotationError: the version is not exactly current + 1, or the new root is not
                signed by a threshold of the current root keys and of its own root keys.
        """
        new: Metadata[Root] = parse_metadata(data, "root")
        if new.signed.version != self.version + 1:
            raise RootRotationError(
                f"root version {new.signed.version} does not follow trusted version {self.version}"
            )
        payload = new.signed_bytes
        try:
            self._md.signed.verify_delegate("root", payload, new.signatures)
        except UnsignedMetadataError as exc:
            raise RootRotationError(f"new root not signed by the current root keys: {exc}") from exc
        try:
            new.signed.verify_delegate("root", payload, new.signatures)
        except UnsignedMetadataError as exc:
            raise RootRotationError(f"new root not signed by its own root keys: {exc}") from exc
        return TrustedRoot(new)

    @property
    def version(self) -> int:
        return int(self._md.signed.version)

    @property
    def expires(self) -> datetime:
        return self._md.signed.expires

    @property
    def signed(self) -> Root:
        return self._md.signed

    def keyids(self, role: str) -> tuple[str, ...]:
        """Key ids authorised for ``role``."""
        return tuple(self._md.signed.roles[role].keyids)

    def threshold(self, role: str) -> int:
        return int(self._md.signed.roles[role].threshold)

    def check_expiry(self, now: datetime) -> None:
        """Raise ExpiredMetadataError when the root itself has expired at ``now``.

        Raises:
            ExpiredMetadataError: the root is past its expiry.
        """
        if self._md.signed.is_expired(now):
            raise ExpiredMetadataError(f"root v{self.version} expired at {self.expires}")

    def verify_role(self, role: str, md: Metadata[Any]) -> tuple[str, ...]:
        """Check that ``md`` carries a threshold of valid signatures for ``role``.

        Returns:
            The key ids whose signatures verified.

        Raises:
            SignatureThresholdError: too few valid signatures from keys trusted for ``role``.
        """
        result = self._md.signed.get_verification_result(role, md.signed_bytes, md.signatures)
        if not result.verified:
            raise SignatureThresholdError(
                f"{role} metadata has {len(result.signed)} valid signature(s) from trusted keys; "
                f"threshold is {result.threshold}"
            )
        return tuple(sorted(result.signed))

    def to_bytes(self) -> bytes:
        """The root metadata as JSON bytes (signatures included)."""
        return bytes(self._md.to_bytes())
