"""Root rotation on a device: walking a chain of new root versions, and carrying it on the wire.

Pure: bytes in, a ``TrustedRoot`` (or a decision) or a typed error out; the clock is passed in.

Owns:
    * ``walk_root_chain`` / ``apply_root_chain``: the device's rotation rule, shaped like
      python-tuf's ``TrustedMetadataSet.update_root``. Versions the device already trusts are
      skipped; every newer one must be exactly the next version and is verified by a
      threshold of the *current* root's keys and then by a threshold of its *own* root keys
      (``TrustedRoot.update``). Intermediate versions may have expired (a device offline for
      a year must still walk the chain); the final one must not (``apply_root_chain``).
    * ``choose_root``: what the device trusts at start, given the root it stored and the root
      file it was provisioned with (a newer provisioned root must chain from the stored one:
      a version number alone proves nothing).
    * ``attach_roots`` / ``split_roots``: the chain travels next to the desired state in the
      same MQTT message (``"roots"``: a list of root metadata objects beside the signed
      envelope). Roots are self-authenticating, so the online key's signature does not cover
      them, and a message with a chain the device refuses still carries a desired state that
      is judged on its own.

Does not persist anything (``edge_agent.store`` writes the accepted root atomically) or talk MQTT
(``edge_agent.sync.desired_intake`` does).

Attack -> check -> error:
    a root that skips a version          version == current + 1         RootRotationError
    a root signed only by the new keys   threshold of current root keys RootRotationError
    a root not signed by its own keys    threshold of its own root keys RootRotationError
    an expired final root (freeze)       expiry of the last root        ExpiredMetadataError
    malformed chain / message            strict parse, bounded sizes    MetadataFormatError
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from securesystemslib.exceptions import FormatError
from securesystemslib.formats import encode_canonical

from edge_agent import strict_json
from edge_agent.errors import BundleVerificationError, MetadataFormatError, RootRotationError
from edge_agent.trust.root import TrustedRoot, parse_metadata

__all__ = [
    "MAX_CHAIN_LENGTH",
    "MAX_MESSAGE_BYTES",
    "ROOTS_FIELD",
    "RootChoice",
    "apply_root_chain",
    "attach_roots",
    "choose_root",
    "split_roots",
    "walk_root_chain",
]

#: The member of a desired-state message that carries root versions.
ROOTS_FIELD = "roots"
#: Most root versions one message may carry (a fleet rotates a few times a year).
MAX_CHAIN_LENGTH = 64
#: Largest desired-state message with its chain (the envelope alone is capped at 256 KiB).
MAX_MESSAGE_BYTES = 1024 * 1024


def walk_root_chain(current: TrustedRoot, chain: Iterable[bytes]) -> TrustedRoot:
    """Walk ``chain`` from ``current`` without looking at expiry (python-tuf's ``update_root``).

    Args:
        current: the root the device trusts now.
        chain: root metadata bytes in ascending version order. Versions at or below
            ``current.version`` are skipped unverified (the device already moved past them).

    Returns:
        The newest root reached (``current`` itself when the chain holds nothing newer).

    Raises:
        MetadataFormatError: an entry is not root metadata, or the chain is too long.
        RootRotationError: an entry is not exactly the next version (a gap, a repeat, out of
            order), or is not signed by a threshold of the previous and of its own root keys.
    """
    root = current
    for n, data in enumerate(chain):
        if n >= MAX_CHAIN_LENGTH:
            raise MetadataFormatError(f"a root chain may hold at most {MAX_CHAIN_LENGTH} versions")
        version = int(parse_metadata(data, "root").signed.version)
        if version <= current.version:
            continue
        if version != root.version + 1:
            raise RootRotationError(
                f"root v{version} does not follow trusted version {root.version}"
            )
        root = root.update(data)
    return root


def apply_root_chain(current: TrustedRoot, chain: Iterable[bytes], *, now: datetime) -> TrustedRoot:
    """Walk ``chain`` from ``current`` and require the final root to be unexpired at ``now``.

    Intermediate versions may have expired (a device offline for a year must still walk the
    chain). What a caller that persists the walk must do with an expired final root is the
    caller's choice: the store keeps it (revocations take effect) and reports the expiry, as
    python-tuf's updater does; the fleet server refuses to ship it.

    Raises:
        MetadataFormatError, RootRotationError: see ``walk_root_chain``.
        ExpiredMetadataError: the final root has expired at ``now``.
    """
    root = walk_root_chain(current, chain)
    if root is not current:
        root.check_expiry(now)
    return root


@dataclass(frozen=True)
class RootChoice:
    """The root to trust at start, and why the provisioned one was not taken (if it was not).

    Attributes:
        root: the root to trust.
        persist: the stored copy must be (re)written with ``root``.
        warning: non-empty when a newer provisioned root was refused (the stored root stays).
    """

    root: TrustedRoot
    persist: bool
    warning: str = ""


def choose_root(stored: TrustedRoot | None, provisioned: TrustedRoot) -> RootChoice:
    """Decide between the stored (rotated) root and the provisioned root file.

    The stored root wins unless the provisioned file is exactly its next version and passes
    the rotation rule. A provisioned root more than one version ahead cannot be verified
    without the versions between: it is refused with a warning (``edge-agent root update``
    takes the chain); the device keeps its stored root and keeps serving.
    """
    if stored is None:
        return RootChoice(provisioned, persist=True)
    if provisioned.version <= stored.version:
        return RootChoice(stored, persist=False)
    if provisioned.version == stored.version + 1:
        try:
            return RootChoice(stored.update(provisioned.to_bytes()), persist=True)
        except BundleVerificationError as exc:
            return RootChoice(
                stored, False, f"provisioned root v{provisioned.version} refused: {exc}"
            )
    return RootChoice(
        stored,
        False,
        f"provisioned root v{provisioned.version} refused: it cannot be verified from the "
        f"trusted root v{stored.version} without versions {stored.version + 1}.."
        f"{provisioned.version - 1} (run `edge-agent root update` with the chain)",
    )


# ------------------------------------------------------------------------------------ wire
def _canonical(obj: Any) -> bytes:
    try:
        return str(encode_canonical(obj)).encode("utf-8")
    except (FormatError, TypeError, ValueError, RecursionError) as exc:
        raise MetadataFormatError(f"not canonical-JSON encodable: {exc}") from exc


def _loads(data: bytes, what: str) -> Any:
    return strict_json.loads(
        data, max_bytes=MAX_MESSAGE_BYTES, what=what, error=MetadataFormatError, floats=False
    )


def split_roots(data: bytes) -> tuple[bytes, tuple[bytes, ...]]:
    """Separate a desired-state message into the signed envelope and the root chain it carries.

    A message without ``"roots"`` is returned unchanged. Otherwise the envelope is re-encoded
    as canonical JSON without the chain (signatures cover only its ``signed`` part, which is
    judged by ``trust.desired`` exactly as if it had come alone).

    Raises:
        MetadataFormatError: oversized, not JSON, or ``roots`` is not a list of at most
            ``MAX_CHAIN_LENGTH`` JSON objects.
    """
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_MESSAGE_BYTES:
        raise MetadataFormatError(
            f"desired-state message must be bytes of at most {MAX_MESSAGE_BYTES}"
        )
    if b'"' + ROOTS_FIELD.encode() + b'"' not in data:
        return bytes(data), ()
    doc = _loads(data, "desired-state message")
    if not isinstance(doc, dict) or ROOTS_FIELD not in doc:
        return bytes(data), ()
    raw = doc.pop(ROOTS_FIELD)
    if not isinstance(raw, list) or len(raw) > MAX_CHAIN_LENGTH:
        raise MetadataFormatError(f"roots must be a list of at most {MAX_CHAIN_LENGTH} objects")
    roots = []
    for item in raw:
        if not isinstance(item, dict):
            raise MetadataFormatError("each root in the chain must be a JSON object")
        roots.append(_canonical(item))
    return _canonical(doc), tuple(roots)


def attach_roots(envelope: bytes, roots: Sequence[bytes]) -> bytes:
    """The desired-state message: ``envelope`` with the root chain beside it (server side).

    No chain (``roots`` empty) gives ``envelope`` unchanged, which every agent version reads.

    Raises:
        MetadataFormatError: the envelope or a root is not JSON, the chain is too long, or the
            message would exceed ``MAX_MESSAGE_BYTES``.
    """
    if not roots:
        return envelope
    if len(roots) > MAX_CHAIN_LENGTH:
        raise MetadataFormatError(f"a root chain may hold at most {MAX_CHAIN_LENGTH} versions")
    doc = _loads(envelope, "desired-state envelope")
    if not isinstance(doc, dict):
        raise MetadataFormatError("desired-state envelope must be a JSON object")
    doc[ROOTS_FIELD] = [_loads(r, "root metadata") for r in roots]
    message = _canonical(doc)
    if len(message) > MAX_MESSAGE_BYTES:  # devices would refuse it: say so on the server
        raise MetadataFormatError(
            f"desired state with its root chain is {len(message)} bytes; devices take at most "
            f"{MAX_MESSAGE_BYTES}"
        )
    return message
