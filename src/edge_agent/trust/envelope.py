"""The signed envelope the server's online key signs: ``{"signed": ..., "signatures": [...]}``.

Desired-state documents (``trust.desired``) and remote commands (``trust.command``) travel in
it. Owns: the canonical encoding (securesystemslib ``encode_canonical``, as python-tuf signs),
the strict parse of an envelope (size cap before parsing, exact keys, at most
``MAX_SIGNATURES`` signatures with hex key ids, no key twice, the signed part in canonical form
as received), and the check that enough of the root's ``timestamp`` keys signed it. Does not
own what the signed part holds: each caller parses its own and checks its own freshness,
addressee and replay rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeVar

from securesystemslib.exceptions import FormatError, VerificationError
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import Signature

from edge_agent import strict_json
from edge_agent.errors import MetadataFormatError, SignatureThresholdError
from edge_agent.trust.fields import HEX_RE, exact_keys, str_field
from edge_agent.trust.root import TrustedRoot

__all__ = [
    "MAX_SIGNATURES",
    "SIGNING_ROLE",
    "canonical",
    "encode_envelope",
    "parse_envelope",
    "verify_signatures",
]

#: The root role whose keys sign desired state and commands (the server's online keys).
SIGNING_ROLE: Final = "timestamp"
#: At most this many signatures on one envelope.
MAX_SIGNATURES: Final = 32

T = TypeVar("T")


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes of ``obj``.

    Raises:
        MetadataFormatError: ``obj`` holds floats or other values canonical JSON refuses.
    """
    try:
        return str(encode_canonical(obj)).encode("utf-8")
    except FormatError as exc:
        raise MetadataFormatError(f"not canonical-JSON encodable: {exc}") from exc


def encode_envelope(
    signed: dict[str, Any], signatures: list[Signature], *, max_bytes: int | None = None
) -> bytes:
    """The wire bytes: canonical JSON of ``{"signed": signed, "signatures": [...]}``.

    Raises:
        MetadataFormatError: two signatures carry the same key id, or the result would exceed
            ``max_bytes``.
    """
    keyids = [s.keyid for s in signatures]
    if len(set(keyids)) != len(keyids):
        raise MetadataFormatError("several signatures carry the same key id")
    data = canonical(
        {
            "signed": signed,
            "signatures": [{"keyid": s.keyid, "sig": s.signature} for s in signatures],
        }
    )
    if max_bytes is not None and len(data) > max_bytes:
        raise MetadataFormatError(f"envelope of {len(data)} bytes exceeds {max_bytes}")
    return data


def parse_envelope(
    data: object,
    *,
    max_bytes: int,
    what: str,
    parse: Callable[[Any], T],
    signed_bytes: Callable[[T], bytes],
) -> tuple[T, bytes, dict[str, Signature]]:
    """Parse an envelope strictly: the signed part through ``parse``, and its signatures.

    Signatures cover the signed part as received; strict parsing guarantees it is exactly what
    ``signed_bytes`` of the parsed value encodes, so re-encoding cannot smuggle in fields the
    value object drops.

    Returns:
        The parsed signed part, the canonical bytes the signatures cover, the signatures by key.

    Raises:
        MetadataFormatError: not bytes, over ``max_bytes``, not strict JSON, missing or unknown
            keys, a bad signature entry, a key twice, or a signed part not in canonical form
            (and whatever ``parse`` raises for its part).
    """
    if not isinstance(data, bytes | bytearray) or len(data) > max_bytes:
        raise MetadataFormatError(f"{what} must be bytes of at most {max_bytes}")
    doc = strict_json.loads(
        bytes(data), max_bytes=max_bytes, what=what, error=MetadataFormatError, floats=False
    )
    env = exact_keys(doc, frozenset({"signed", "signatures"}), f"{what} envelope")
    value = parse(env["signed"])
    raw_sigs = env["signatures"]
    if not isinstance(raw_sigs, list) or len(raw_sigs) > MAX_SIGNATURES:
        raise MetadataFormatError(f"signatures must be a list of at most {MAX_SIGNATURES}")
    sigs: dict[str, Signature] = {}
    for raw in raw_sigs:
        entry = exact_keys(raw, frozenset({"keyid", "sig"}), "signature")
        keyid = str_field(entry["keyid"], "signature keyid", HEX_RE)
        sig = str_field(entry["sig"], "signature value", HEX_RE)
        if keyid in sigs:
            raise MetadataFormatError(f"several signatures by key {keyid[:16]}")
        sigs[keyid] = Signature(keyid, sig)
    payload = canonical(env["signed"])
    if payload != signed_bytes(value):
        raise MetadataFormatError("signed part is not in canonical form")
    return value, payload, sigs


def verify_signatures(
    root: TrustedRoot, payload: bytes, sigs: dict[str, Signature], what: str
) -> None:
    """Check that at least the root's ``timestamp`` threshold of its ``timestamp`` keys signed
    ``payload`` (builder keys and unknown keys do not count).

    Raises:
        SignatureThresholdError: too few valid signatures, or a signature that cannot be
            checked.
    """
    try:
        result = root.signed.get_verification_result(SIGNING_ROLE, payload, sigs)
    except (VerificationError, ValueError) as exc:
        raise SignatureThresholdError(f"{what} signature unverifiable: {exc}") from exc
    if not result.verified:
        raise SignatureThresholdError(
            f"{what} has {len(result.signed)} valid signature(s) from {SIGNING_ROLE} keys; "
            f"threshold is {result.threshold}"
        )
