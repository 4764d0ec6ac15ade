"""Certificate messages: renewal on ``.../cert/req`` and ``.../cert/resp``, claim enrollment.

Owns the two value objects of the renewal exchange and their strict parsers:

- ``CertRequest``: ``renew`` carries a CSR for a key the device has just generated and the
  serial of the certificate it is connected with; ``confirm`` names the serial of the new
  certificate once the device is connected with it, so the CA may revoke the older ones.
- ``CertResponse``: ``issued`` (with the certificate PEM), ``confirmed``, or ``refused`` (a
  stable ``reason`` and whether a retry can succeed).
- ``ClaimEnrollment``: a first-boot enrollment under a provisioning claim (claim secret, device
  id, CSR), the body of ``POST /v1/enroll`` on the CA's enrollment listener.

Who is asking is not in the message: the topic level is the device id, and the broker's ACL
lets only the client whose certificate CN is that id publish there. The PEM texts are bounded
and ASCII-only here; whether they are a valid CSR or certificate is checked by the CA
(``fleet_server.pki.certs.check_csr``) and the device (``edge_agent.common.identity``), which
own the cryptography. Pure: bytes in, values out; no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Self

from edge_agent.errors import ContractError
from edge_agent.wire.fields import (
    SCHEMA_VERSION,
    Wire,
    as_device_id,
    as_int,
    as_str,
    check_header,
    load_json,
    require,
)

__all__ = [
    "MAX_CERT_MESSAGE_BYTES",
    "REFUSAL_REASONS",
    "CertRequest",
    "CertResponse",
    "ClaimEnrollment",
]

#: A CSR or a certificate of an EC or RSA-4096 key is well under 8 KiB of PEM.
MAX_PEM_CHARS: Final = 8192
MAX_CERT_MESSAGE_BYTES: Final = 16 * 1024
#: Why the CA refused: stable labels (telemetry and docs use them).
REFUSAL_REASONS: Final = (
    "malformed",  # the request could not be parsed
    "csr_rejected",  # the CSR failed the CA's checks (CN, key type, CA powers, signature)
    "unknown_certificate",  # the serial named is not a live certificate of this device
    "revoked",  # the device is revoked (registry or CA)
    "not_enrolled",  # the device is not enrolled
    "rate_limited",  # asked again too soon
    "unavailable",  # the CA could not do it now (disk, lock): retry
)
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9_-]{8,64}")
_SERIAL: Final = re.compile(r"[0-9a-f]{1,40}")
_PEM: Final = re.compile(
    r"-----BEGIN [A-Z ]{1,40}-----[A-Za-z0-9+/=\r\n]+-----END [A-Z ]{1,40}-----\n?"
)


def _request_id(v: Any) -> str:
    if not isinstance(v, str) or not _REQUEST_ID.fullmatch(v):
        raise ContractError("request_id must be 8-64 of [A-Za-z0-9_-]")
    return v


def _serial(v: Any) -> int:
    """A certificate serial as lowercase hex (at most 160 bits, RFC 5280)."""
    if not isinstance(v, str) or not _SERIAL.fullmatch(v):
        raise ContractError("serial must be 1-40 lowercase hex digits")
    return int(v, 16)


def _pem(v: Any, what: str) -> str:
    text = as_str(v, what, MAX_PEM_CHARS)
    if not _PEM.fullmatch(text):
        raise ContractError(f"{what} is not one PEM block")
    return text


@dataclass(frozen=True)
class CertRequest(Wire):
    """A renewal step the device asks of the CA.

    Attributes:
        action: ``renew`` or ``confirm``.
        request_id: Chosen by the device; the response repeats it.
        serial: ``renew``: the certificate the device is connected with; ``confirm``: the new
            certificate it is now connected with.
        csr_pem: ``renew`` only: the CSR of the new key (PEM).
    """

    action: str
    request_id: str
    serial: int
    csr_pem: str | None = None

    def __post_init__(self) -> None:
        if self.action not in ("renew", "confirm"):
            raise ContractError(f"cert request action {self.action!r} is not renew or confirm")
        _request_id(self.request_id)
        if not 0 < self.serial < 2**160:
            raise ContractError("serial out of range")
        if (self.action == "renew") != (self.csr_pem is not None):
            raise ContractError("a renew request carries a CSR, a confirm does not")
        if self.csr_pem is not None:
            _pem(self.csr_pem, "csr")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "type": "cert_request",
            "action": self.action,
            "request_id": self.request_id,
            "serial": format(self.serial, "x"),
        }
        if self.csr_pem is not None:
            d["csr"] = self.csr_pem
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """Raises ContractError (any field missing, of the wrong type or out of bounds)."""
        m = check_header(d, "cert_request")
        action = require(m, "action", "cert_request")
        csr = m.get("csr")
        allowed = {"schema_version", "type", "action", "request_id", "serial", "csr"}
        if set(m) - allowed:
            raise ContractError(f"cert_request: unknown fields {sorted(set(m) - allowed)[:5]}")
        return cls(
            action=as_str(action, "action", 16),
            request_id=_request_id(require(m, "request_id", "cert_request")),
            serial=_serial(require(m, "serial", "cert_request")),
            csr_pem=None if csr is None else _pem(csr, "csr"),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Raises ContractError (not strict JSON within ``MAX_CERT_MESSAGE_BYTES``, or as
        ``from_dict``)."""
        return cls.from_dict(load_json(data, MAX_CERT_MESSAGE_BYTES))


@dataclass(frozen=True)
class CertResponse(Wire):
    """The CA's answer to one ``CertRequest``.

    Attributes:
        request_id: The request's id.
        outcome: ``issued``, ``confirmed`` or ``refused``.
        cert_pem: ``issued`` only: the new certificate (PEM).
        reason: ``refused`` only: one of ``REFUSAL_REASONS``.
        retry: ``refused`` only: whether asking again later can succeed.
        revoked: ``confirmed`` only: how many older certificates the CA revoked.
    """

    request_id: str
    outcome: str
    cert_pem: str | None = None
    reason: str | None = None
    retry: bool = False
    revoked: int = 0

    def __post_init__(self) -> None:
        _request_id(self.request_id)
        if self.outcome not in ("issued", "confirmed", "refused"):
            raise ContractError(f"cert response outcome {self.outcome!r} unknown")
        if (self.outcome == "issued") != (self.cert_pem is not None):
            raise ContractError("an issued response carries a certificate, no other does")
        if (self.outcome == "refused") != (self.reason is not None):
            raise ContractError("a refused response carries a reason, no other does")
        if self.reason is not None and self.reason not in REFUSAL_REASONS:
            raise ContractError(f"refusal reason {self.reason!r} unknown")
        if self.cert_pem is not None:
            _pem(self.cert_pem, "cert")
        as_int(self.revoked, "revoked")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "type": "cert_response",
            "request_id": self.request_id,
            "outcome": self.outcome,
        }
        if self.cert_pem is not None:
            d["cert"] = self.cert_pem
        if self.reason is not None:
            d["reason"] = self.reason
            d["retry"] = self.retry
        if self.outcome == "confirmed":
            d["revoked"] = self.revoked
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """Raises ContractError (any field missing, of the wrong type or out of bounds)."""
        m = check_header(d, "cert_response")
        allowed = {"schema_version", "type", "request_id", "outcome", "cert", "reason", "retry"}
        allowed.add("revoked")
        if set(m) - allowed:
            raise ContractError(f"cert_response: unknown fields {sorted(set(m) - allowed)[:5]}")
        cert = m.get("cert")
        reason = m.get("reason")
        retry = m.get("retry", False)
        if not isinstance(retry, bool):
            raise ContractError("retry must be a boolean")
        return cls(
            request_id=_request_id(require(m, "request_id", "cert_response")),
            outcome=as_str(require(m, "outcome", "cert_response"), "outcome", 16),
            cert_pem=None if cert is None else _pem(cert, "cert"),
            reason=None if reason is None else as_str(reason, "reason", 32),
            retry=retry,
            revoked=as_int(m.get("revoked", 0), "revoked"),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Raises ContractError (not strict JSON within ``MAX_CERT_MESSAGE_BYTES``, or as
        ``from_dict``)."""
        return cls.from_dict(load_json(data, MAX_CERT_MESSAGE_BYTES))


_CLAIM_SECRET: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\.[A-Za-z0-9_-]{43}")


@dataclass(frozen=True)
class ClaimEnrollment(Wire):
    """A first-boot enrollment under a provisioning claim (``POST /v1/enroll``, over TLS).

    Attributes:
        claim: The claim secret the device was provisioned with (``<name>.<secret>``).
        device_id: The identity the device asks for (the CSR's CN and SAN).
        csr_pem: The CSR of the key the device generated (PEM).
    """

    claim: str
    device_id: str
    csr_pem: str

    def __post_init__(self) -> None:
        if not isinstance(self.claim, str) or not _CLAIM_SECRET.fullmatch(self.claim):
            raise ContractError("claim is not a claim secret (<name>.<43 characters>)")
        as_device_id(self.device_id)
        _pem(self.csr_pem, "csr")

    def __repr__(self) -> str:  # never print the secret
        return f"ClaimEnrollment(claim={self.claim.split('.')[0]}.***, device_id={self.device_id})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "type": "claim_enrollment",
            "claim": self.claim,
            "device_id": self.device_id,
            "csr": self.csr_pem,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """Raises ContractError (any field missing, of the wrong type or out of bounds)."""
        m = check_header(d, "claim_enrollment")
        allowed = {"schema_version", "type", "claim", "device_id", "csr"}
        if set(m) - allowed:
            raise ContractError(f"claim_enrollment: unknown fields {sorted(set(m) - allowed)[:5]}")
        return cls(
            claim=as_str(require(m, "claim", "claim_enrollment"), "claim", 128),
            device_id=as_device_id(require(m, "device_id", "claim_enrollment")),
            csr_pem=_pem(require(m, "csr", "claim_enrollment"), "csr"),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Raises ContractError (not strict JSON within ``MAX_CERT_MESSAGE_BYTES``, or as
        ``from_dict``)."""
        return cls.from_dict(load_json(data, MAX_CERT_MESSAGE_BYTES))
