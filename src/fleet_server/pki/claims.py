"""Provisioning claims: one enrollment credential for a whole production batch.

A claim has a name, a secret (shown once; only its SHA-256 is stored), a device limit, an
expiry and, optionally, an operator approval step. A device that holds the claim enrolls at
first boot with a key it generated itself: it sends its CSR, its device id and the claim
secret; the CA signs when the claim is live and the device id has never had a certificate.
With approval on, the first request records the device as *pending* (keyed by its public key,
so nobody else can take the slot over) and the operator approves pending devices
(``fleet-server claims approve``); the device's next request is then signed.

What a claim can never do: re-key an existing identity (a device id the CA ever issued a
certificate to is refused: a leaked claim cannot impersonate an enrolled device), exceed its
limit (enrolled plus pending devices), or outlive its expiry or its revocation.

Pure: records and a ``now`` in, records out or a typed refusal; ``CertificateAuthority`` keeps
them in its state file under its lock.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Final

from fleet_server.errors import ClaimPendingError, ClaimRefusedError, PkiError

__all__ = [
    "MAX_CLAIM_DEVICES",
    "ClaimRecord",
    "PendingDevice",
    "admit",
    "approve",
    "claim_name_of",
    "new_claim",
]

#: Largest device limit of one claim (a batch; more is several claims).
MAX_CLAIM_DEVICES: Final = 100_000
CLAIM_NAME: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_SECRET: Final = re.compile(r"([a-z0-9][a-z0-9-]{0,62})\.([A-Za-z0-9_-]{43})")


@dataclass(frozen=True)
class PendingDevice:
    """A device waiting for the operator's approval under an approval-gated claim."""

    device_id: str
    key_sha256: str
    requested_at: datetime
    approved_at: datetime | None = None


@dataclass(frozen=True)
class ClaimRecord:
    """A claim as stored: never the secret, only its digest."""

    name: str
    digest: str
    created_at: datetime
    expires_at: datetime
    limit: int
    require_approval: bool
    revoked_at: datetime | None = None
    enrolled: tuple[str, ...] = ()
    pending: tuple[PendingDevice, ...] = ()

    def state(self, now: datetime) -> str:
        """``revoked``, ``expired``, ``full`` or ``active``."""
        if self.revoked_at is not None:
            return "revoked"
        if now >= self.expires_at:
            return "expired"
        if len(self.enrolled) >= self.limit:
            return "full"
        return "active"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form kept in the CA state file."""
        return {
            "name": self.name,
            "digest": self.digest,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "limit": self.limit,
            "require_approval": self.require_approval,
            "revoked_at": None if self.revoked_at is None else self.revoked_at.isoformat(),
            "enrolled": list(self.enrolled),
            "pending": [
                {
                    "device_id": p.device_id,
                    "key_sha256": p.key_sha256,
                    "requested_at": p.requested_at.isoformat(),
                    "approved_at": None if p.approved_at is None else p.approved_at.isoformat(),
                }
                for p in self.pending
            ],
        }

    @classmethod
    def from_dict(cls, d: Any) -> ClaimRecord:
        """Raises KeyError, TypeError, ValueError (the CA turns them into ``PkiError``)."""

        def dt(v: Any) -> datetime | None:
            return None if v is None else datetime.fromisoformat(v)

        return cls(
            name=str(d["name"]),
            digest=str(d["digest"]),
            created_at=datetime.fromisoformat(d["created_at"]),
            expires_at=datetime.fromisoformat(d["expires_at"]),
            limit=int(d["limit"]),
            require_approval=bool(d["require_approval"]),
            revoked_at=dt(d["revoked_at"]),
            enrolled=tuple(str(x) for x in d["enrolled"]),
            pending=tuple(
                PendingDevice(
                    str(p["device_id"]),
                    str(p["key_sha256"]),
                    datetime.fromisoformat(p["requested_at"]),
                    dt(p["approved_at"]),
                )
                for p in d["pending"]
            ),
        )


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_claim(
    name: str, *, now: datetime, ttl: timedelta, limit: int, require_approval: bool
) -> tuple[str, ClaimRecord]:
    """A new claim: its secret (``<name>.<256 random bits>``, shown once) and its record.

    Raises:
        PkiError: a bad name, limit or time to live.
    """
    if not isinstance(name, str) or not CLAIM_NAME.fullmatch(name):
        raise PkiError(f"invalid claim name {name!r}: 1-63 of [a-z0-9-], not starting with '-'")
    if not 1 <= limit <= MAX_CLAIM_DEVICES:
        raise PkiError(f"claim limit {limit} outside 1-{MAX_CLAIM_DEVICES}")
    if ttl <= timedelta(0):
        raise PkiError("a claim must live for a positive time")
    secret = f"{name}.{secrets.token_urlsafe(32)}"
    return secret, ClaimRecord(
        name, _digest(secret), now, now + ttl, limit, require_approval=require_approval
    )


def claim_name_of(secret: str) -> str:
    """The claim name a secret names (its part before the dot).

    Raises:
        ClaimRefusedError: not a claim secret (reason ``unknown``).
    """
    m = _SECRET.fullmatch(secret) if isinstance(secret, str) else None
    if m is None:
        raise ClaimRefusedError("not a claim secret", reason="unknown")
    return m.group(1)


def admit(
    record: ClaimRecord | None,
    secret: str,
    device_id: str,
    key_sha256: str,
    *,
    known_device: bool,
    now: datetime,
) -> ClaimRecord:
    """Decide one enrollment under a claim; return the record to store if it may be signed.

    ``known_device``: the CA has issued a certificate to ``device_id`` before (any role).
    The returned record already counts the device as enrolled; the caller stores it only
    once the certificate is signed.

    Raises:
        ClaimRefusedError: ``unknown`` (no such claim or a wrong secret, compared in constant
            time), ``revoked``, ``expired``, ``full`` (limit reached), ``device_exists``,
            ``key_mismatch`` (a pending device id asked with another key).
        ClaimPendingError: approval is required and not given yet; carries the record to
            store (the device is now pending) as ``record``.
    """
    if record is None or not hmac.compare_digest(record.digest, _digest(secret)):
        raise ClaimRefusedError("unknown claim or wrong secret", reason="unknown")
    if record.revoked_at is not None:
        raise ClaimRefusedError(f"claim {record.name} is revoked", reason="revoked")
    if now >= record.expires_at:
        raise ClaimRefusedError(f"claim {record.name} has expired", reason="expired")
    if known_device or device_id in record.enrolled:
        raise ClaimRefusedError(
            f"{device_id} already has an identity; a claim cannot re-key it",
            reason="device_exists",
        )
    pending = next((p for p in record.pending if p.device_id == device_id), None)
    if pending is not None and not hmac.compare_digest(pending.key_sha256, key_sha256):
        raise ClaimRefusedError(f"{device_id} is pending with another key", reason="key_mismatch")
    if pending is None and len(record.enrolled) + len(record.pending) >= record.limit:
        raise ClaimRefusedError(f"claim {record.name} is used up", reason="full")
    if record.require_approval and (pending is None or pending.approved_at is None):
        if pending is None:
            waiting = (*record.pending, PendingDevice(device_id, key_sha256, now))
            record = replace(record, pending=waiting)
        raise ClaimPendingError(
            f"{device_id} waits for an operator to approve it under claim {record.name}",
            record=record,
        )
    return replace(
        record,
        enrolled=(*record.enrolled, device_id),
        pending=tuple(p for p in record.pending if p.device_id != device_id),
    )


def approve(record: ClaimRecord, device_ids: tuple[str, ...], *, now: datetime) -> ClaimRecord:
    """Approve pending devices of ``record`` (every pending one when ``device_ids`` is empty).

    Raises:
        PkiError: a named device is not pending under this claim.
    """
    waiting = {p.device_id for p in record.pending}
    missing = [d for d in device_ids if d not in waiting]
    if missing:
        raise PkiError(f"not pending under claim {record.name}: {', '.join(missing[:10])}")
    chosen = set(device_ids) or waiting
    return replace(
        record,
        pending=tuple(
            replace(p, approved_at=p.approved_at or now) if p.device_id in chosen else p
            for p in record.pending
        ),
    )
