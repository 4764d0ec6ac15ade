"""The fleet's certificate authority: CA creation, CSR checks and signing, revocation, tokens.

Pure functions take bytes/values and a ``now`` and return certificates, CRLs and token records;
``fleet_server.pki.ca.CertificateAuthority`` is the thin file-backed store around them.

Devices generate their own keys (``edge_agent.common.identity``); this module never sees a device
key.
The server's MQTT client key and the broker's TLS key are generated here because they live on
the server. Does not talk to the broker (``broker_config`` writes its files).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.errors import IdentityError
from edge_agent.ids import validate_device_id
from fleet_server.errors import (
    CsrRejectedError,
    PkiError,
    TokenExpiredError,
    TokenUnknownError,
    TokenUsedError,
)

__all__ = [
    "CaMaterial",
    "KeyAndCert",
    "TokenRecord",
    "build_crl",
    "check_csr",
    "create_ca",
    "issue_broker_cert",
    "issue_server_client_cert",
    "new_token",
    "redeem_token",
    "sign_device_csr",
    "validate_consumer_name",
]

ROLE_DEVICE = "device"
ROLE_SERVER = "server"
ROLE_BROKER = "broker"
ROLE_CONSUMER = "consumer"
DEFAULT_CA_VALIDITY = timedelta(days=3650)
DEFAULT_DEVICE_VALIDITY = timedelta(days=365)
DEFAULT_CRL_VALIDITY = timedelta(days=30)
DEFAULT_TOKEN_TTL = timedelta(hours=24)
_BACKDATE = timedelta(minutes=5)  # tolerate device clocks slightly behind the CA's
_MIN_RSA_BITS = 2048
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1)


@dataclass(frozen=True)
class CaMaterial:
    """The CA's certificate and private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class KeyAndCert:
    """A server-side key pair with its certificate, both PEM."""

    key_pem: bytes
    cert_pem: bytes


def _name(cn: str, role: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if role is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    return x509.Name(attrs)


def create_ca(common_name: str, *, now: datetime, validity: timedelta) -> CaMaterial:
    """A new self-signed EC P-256 CA that may only sign end-entity certificates (pathlen 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return CaMaterial(cert=cert, key=key)


def _leaf(
    ca: CaMaterial,
    subject: x509.Name,
    public_key: Any,
    sans: Sequence[x509.GeneralName],
    eku: x509.ObjectIdentifier,
    now: datetime,
    validity: timedelta,
) -> x509.Certificate:
    not_after = min(now + validity, ca.cert.not_valid_after_utc)
    # A short-lived certificate is backdated by a tenth of its life at most, so a device that
    # renews at a fraction of the validity period renews at that fraction of its real life.
    backdate = min(_BACKDATE, validity / 10)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )


def check_csr(csr_pem: bytes, device_id: str) -> x509.CertificateSigningRequest:
    """Check a device CSR before signing it; return the parsed CSR.

    The CSR must carry a valid self-signature, a subject of exactly one CN equal to the
    operator-given ``device_id``, an EC P-256/P-384 or RSA >= 2048-bit key, no SAN other than
    ``device_id``, and must not ask for CA powers (basicConstraints CA, keyCertSign/cRLSign).

    Raises:
        CsrRejectedError: with ``reason`` naming the failed check.
    """
    try:
        validate_device_id(device_id)
    except IdentityError as exc:
        raise CsrRejectedError(str(exc), reason="bad_device_id") from exc
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise CsrRejectedError(f"not a PEM CSR: {exc}", reason="malformed") from exc
    if not csr.is_signature_valid:
        raise CsrRejectedError("CSR signature does not verify", reason="bad_signature")
    attrs = list(csr.subject)
    if len(attrs) != 1 or attrs[0].oid != NameOID.COMMON_NAME or attrs[0].value != device_id:
        raise CsrRejectedError(
            f"CSR subject {csr.subject.rfc4514_string()!r} is not CN={device_id}",
            reason="cn_mismatch",
        )
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _EC_CURVES):
            raise CsrRejectedError(f"EC curve {key.curve.name} not accepted", reason="key_type")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise CsrRejectedError(f"RSA key of {key.key_size} bits", reason="key_type")
    else:
        raise CsrRejectedError(f"key type {type(key).__name__} not accepted", reason="key_type")
    try:
        extensions = list(csr.extensions)
    except (ValueError, x509.DuplicateExtension) as exc:
        raise CsrRejectedError(f"CSR extensions malformed: {exc}", reason="malformed") from exc
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise CsrRejectedError("CSR requests a CA certificate", reason="ca_requested")
        if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            raise CsrRejectedError("CSR requests CA key usages", reason="ca_requested")
        if isinstance(value, x509.SubjectAlternativeName) and list(value) != [
            x509.DNSName(device_id)
        ]:
            raise CsrRejectedError("CSR SAN names another identity", reason="san_mismatch")
    return csr


def sign_device_csr(
    ca: CaMaterial, csr_pem: bytes, device_id: str, *, now: datetime, validity: timedelta
) -> x509.Certificate:
    """Check ``csr_pem`` and issue the device's client certificate (CN = SAN = device id).

    Nothing requested in the CSR beyond its key is copied: extensions are the CA's choice.

    Raises:
        CsrRejectedError: the CSR fails ``check_csr``.
    """
    csr = check_csr(csr_pem, device_id)
    return _leaf(
        ca,
        _name(device_id, ROLE_DEVICE),
        csr.public_key(),
        [x509.DNSName(device_id)],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        now,
        validity,
    )


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# Server identities live in a namespace no device id can enter: a device id is a single DNS
# label (no dots), a server name ends in ".server". The broker grants the server's name the
# whole topic tree, so a device must never be able to hold a certificate with that name.
SERVER_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,55}\.server$")


def validate_server_name(name: str) -> str:
    """A server identity name such as ``fleet.server``.

    Raises:
        PkiError: not of the form ``<label>.server``.
    """
    if not isinstance(name, str) or not SERVER_NAME_PATTERN.fullmatch(name):
        raise PkiError(f"invalid server name {name!r}: use '<label>.server', e.g. 'fleet.server'")
    return name


# Read-only telemetry consumers (dashboards, Telegraf, Node-RED) get their own namespace for
# the same reason: no device id (one DNS label, no dots) and no server name can end in it.
CONSUMER_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,53}\.consumer$")


def validate_consumer_name(name: str) -> str:
    """A consumer identity name such as ``grafana.consumer``.

    Raises:
        PkiError: not of the form ``<label>.consumer``.
    """
    if not isinstance(name, str) or not CONSUMER_NAME_PATTERN.fullmatch(name):
        raise PkiError(
            f"invalid consumer name {name!r}: use '<label>.consumer', e.g. 'grafana.consumer'"
        )
    return name


def issue_server_client_cert(
    ca: CaMaterial,
    server_cn: str,
    *,
    now: datetime,
    validity: timedelta,
    role: str = ROLE_SERVER,
) -> tuple[KeyAndCert, x509.Certificate]:
    """A new key and clientAuth certificate for a server (or consumer) MQTT connection.

    Raises:
        PkiError: ``server_cn`` is not a valid name for ``role`` (``server``: ``<label>.server``,
            ``consumer``: ``<label>.consumer``).
    """
    if role == ROLE_CONSUMER:
        validate_consumer_name(server_cn)
    elif role == ROLE_SERVER:
        validate_server_name(server_cn)
    else:
        raise PkiError(f"no client certificates for role {role!r}")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(
        ca,
        _name(server_cn, role),
        key.public_key(),
        [x509.DNSName(server_cn)],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        now,
        validity,
    )
    return KeyAndCert(pem_key(key), pem_cert(cert)), cert


def issue_broker_cert(
    ca: CaMaterial,
    *,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    now: datetime,
    validity: timedelta,
) -> tuple[KeyAndCert, x509.Certificate]:
    """A new key and serverAuth certificate for the broker's TLS listener.

    Raises:
        PkiError: no names given, or an IP address that does not parse.
    """
    try:
        ips = [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    except ValueError as exc:
        raise PkiError(f"invalid broker IP address: {exc}") from exc
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans.extend(ips)
    if not sans:
        raise PkiError("the broker certificate needs at least one DNS name or IP address")
    key = ec.generate_private_key(ec.SECP256R1())
    cn = dns_names[0] if dns_names else ip_addresses[0]
    cert = _leaf(
        ca,
        _name(cn, ROLE_BROKER),
        key.public_key(),
        sans,
        ExtendedKeyUsageOID.SERVER_AUTH,
        now,
        validity,
    )
    return KeyAndCert(pem_key(key), pem_cert(cert)), cert


def build_crl(
    ca: CaMaterial,
    revoked: Sequence[tuple[int, datetime]],
    *,
    crl_number: int,
    now: datetime,
    validity: timedelta,
) -> bytes:
    """A PEM CRL signed by the CA listing ``(serial, revoked_at)`` pairs (may be empty).

    The broker refuses every client once the CRL's next update has passed, so it must be
    rewritten (``CertificateAuthority.write_crl``) well within ``validity``.
    """
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(now + validity)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class TokenRecord:
    """A one-time enrollment token as stored: only its SHA-256, never the token itself."""

    device_id: str
    digest: str
    expires_at: datetime
    used_at: datetime | None = None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(device_id: str, *, now: datetime, ttl: timedelta) -> tuple[str, TokenRecord]:
    """A random 256-bit token for ``device_id`` and the record to store (hash + expiry).

    Raises:
        PkiError: invalid device id.
    """
    try:
        validate_device_id(device_id)
    except IdentityError as exc:
        raise PkiError(str(exc)) from exc
    token = secrets.token_urlsafe(32)
    return token, TokenRecord(device_id, _digest(token), now + ttl)


def redeem_token(records: Sequence[TokenRecord], token: str, *, now: datetime) -> TokenRecord:
    """The record ``token`` belongs to, if it may be redeemed at ``now``.

    Every stored digest is compared in constant time (no early exit on a match).

    Raises:
        TokenUnknownError: no such token.
        TokenUsedError: already redeemed.
        TokenExpiredError: past its expiry.
    """
    digest = _digest(token)
    found: TokenRecord | None = None
    for record in records:
        if hmac.compare_digest(record.digest, digest):
            found = record
    if found is None:
        raise TokenUnknownError("unknown enrollment token")
    if found.used_at is not None:
        raise TokenUsedError(f"enrollment token for {found.device_id} was already used")
    if now >= found.expires_at:
        raise TokenExpiredError(f"enrollment token for {found.device_id} has expired")
    return found
