"""The fleet's certificate authority: CA creation, CSR checks and signing, revocation, tokens.

Pure functions take bytes/values and a ``now`` and return certificates, CRLs and token records;
``CertificateAuthority`` is the thin file-backed store around them (CA key 0600, one JSON state
file of issued serials, revocations and hashed tokens, and the CRL the broker loads, each
written atomically under an exclusive lock).

Devices generate their own keys (``edge_agent.identity``); this module never sees a device key.
The server's MQTT client key and the broker's TLS key are generated here because they live on
the server. Does not talk to the broker (``broker_config`` writes its files).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.durable import exclusive_lock, write_atomic
from edge_agent.errors import IdentityError
from edge_agent.identity import validate_device_id
from fleet_server.errors import (
    CsrRejectedError,
    PkiError,
    TokenExpiredError,
    TokenUnknownError,
    TokenUsedError,
)

__all__ = [
    "CaMaterial",
    "CertificateAuthority",
    "IssuedCert",
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
]

ROLE_DEVICE = "device"
ROLE_SERVER = "server"
ROLE_BROKER = "broker"
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
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
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


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def issue_server_client_cert(
    ca: CaMaterial, server_cn: str, *, now: datetime, validity: timedelta
) -> tuple[KeyAndCert, x509.Certificate]:
    """A new key and clientAuth certificate for the fleet server's own MQTT connection.

    Raises:
        PkiError: ``server_cn`` is not a valid identity name.
    """
    try:
        validate_device_id(server_cn)
    except IdentityError as exc:
        raise PkiError(f"invalid server name: {exc}") from exc
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(
        ca,
        _name(server_cn, ROLE_SERVER),
        key.public_key(),
        [x509.DNSName(server_cn)],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        now,
        validity,
    )
    return KeyAndCert(_pem_key(key), _pem_cert(cert)), cert


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
    return KeyAndCert(_pem_key(key), _pem_cert(cert)), cert


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


@dataclass(frozen=True)
class IssuedCert:
    """One certificate the CA issued, as recorded in its state file."""

    serial: int
    name: str
    role: str
    not_after: datetime
    revoked_at: datetime | None = None


_STATE_FILE = "state.json"
_CA_KEY = "ca.key"
_CA_CERT = "ca.crt"
_CRL = "crl.pem"


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@dataclass
class _State:
    crl_number: int
    issued: list[IssuedCert]
    tokens: list[TokenRecord]

    def to_bytes(self) -> bytes:
        doc = {
            "schema_version": 1,
            "crl_number": self.crl_number,
            "issued": [
                {
                    "serial": format(c.serial, "x"),
                    "name": c.name,
                    "role": c.role,
                    "not_after": _iso(c.not_after),
                    "revoked_at": _iso(c.revoked_at),
                }
                for c in self.issued
            ],
            "tokens": [
                {
                    "device_id": t.device_id,
                    "digest": t.digest,
                    "expires_at": _iso(t.expires_at),
                    "used_at": _iso(t.used_at),
                }
                for t in self.tokens
            ],
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> _State:
        try:
            doc = json.loads(data)
            if doc.get("schema_version") != 1:
                raise PkiError(f"unsupported CA state version {doc.get('schema_version')!r}")
            issued = [
                IssuedCert(
                    serial=int(c["serial"], 16),
                    name=str(c["name"]),
                    role=str(c["role"]),
                    not_after=datetime.fromisoformat(c["not_after"]),
                    revoked_at=_dt(c["revoked_at"]),
                )
                for c in doc["issued"]
            ]
            tokens = []
            for t in doc["tokens"]:
                expires = datetime.fromisoformat(t["expires_at"])
                tokens.append(
                    TokenRecord(str(t["device_id"]), str(t["digest"]), expires, _dt(t["used_at"]))
                )
            return cls(int(doc["crl_number"]), issued, tokens)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PkiError(f"CA state file is corrupt: {exc}") from exc


class CertificateAuthority:
    """The file-backed fleet CA: ``ca.key`` (0600), ``ca.crt``, ``state.json``, ``crl.pem``.

    Every mutation holds an exclusive lock on the directory and writes atomically, so two
    operators running the CLI at once cannot lose an issued serial or a revocation.
    """

    def __init__(self, directory: Path, material: CaMaterial) -> None:
        self.directory = Path(directory)
        self.material = material

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate (what devices and the broker trust)."""
        return _pem_cert(self.material.cert)

    @property
    def cert_path(self) -> Path:
        """Path of the CA certificate file."""
        return self.directory / _CA_CERT

    @property
    def crl_path(self) -> Path:
        """Path of the current CRL (PEM) the broker loads."""
        return self.directory / _CRL

    @classmethod
    def init(
        cls,
        directory: Path,
        *,
        now: datetime,
        common_name: str = "edgefleet fleet CA",
        validity: timedelta = DEFAULT_CA_VALIDITY,
    ) -> CertificateAuthority:
        """Create a new CA in ``directory`` (with an empty CRL).

        Raises:
            PkiError: a CA already exists there.
            OSError: the files cannot be written.
        """
        directory = Path(directory)
        with exclusive_lock(directory):
            if (directory / _CA_KEY).exists():
                raise PkiError(f"{directory} already holds a CA; refusing to overwrite it")
            material = create_ca(common_name, now=now, validity=validity)
            write_atomic(directory / _CA_KEY, _pem_key(material.key), mode=0o600)
            write_atomic(directory / _CA_CERT, _pem_cert(material.cert))
            write_atomic(directory / _STATE_FILE, _State(0, [], []).to_bytes(), mode=0o600)
        ca = cls(directory, material)
        ca.write_crl(now=now)
        return ca

    @classmethod
    def open(cls, directory: Path) -> CertificateAuthority:
        """Load the CA in ``directory``.

        Raises:
            PkiError: no CA there, or its files cannot be parsed.
        """
        directory = Path(directory)
        try:
            key = serialization.load_pem_private_key(
                (directory / _CA_KEY).read_bytes(), password=None
            )
            cert = x509.load_pem_x509_certificate((directory / _CA_CERT).read_bytes())
        except FileNotFoundError as exc:
            raise PkiError(f"no CA in {directory} (run `fleet-server ca init`)") from exc
        except ValueError as exc:
            raise PkiError(f"CA files in {directory} are corrupt: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.public_key() != key.public_key():
            raise PkiError(f"CA key and certificate in {directory} do not match")
        return cls(directory, CaMaterial(cert=cert, key=key))

    def _load(self) -> _State:
        try:
            return _State.from_bytes((self.directory / _STATE_FILE).read_bytes())
        except FileNotFoundError as exc:
            raise PkiError(f"CA state missing in {self.directory}") from exc

    def _save(self, state: _State) -> None:
        write_atomic(self.directory / _STATE_FILE, state.to_bytes(), mode=0o600)

    def issued(self) -> list[IssuedCert]:
        """Every certificate this CA has issued, oldest first.

        Raises:
            PkiError: the state file is missing or corrupt.
        """
        return list(self._load().issued)

    @staticmethod
    def _check_role(state: _State, name: str, role: str) -> None:
        for c in state.issued:
            if c.name == name and c.role != role:
                raise CsrRejectedError(
                    f"{name!r} is already a {c.role} identity", reason="role_conflict"
                )

    def _record(self, state: _State, cert: x509.Certificate, name: str, role: str) -> None:
        state.issued.append(IssuedCert(cert.serial_number, name, role, cert.not_valid_after_utc))
        self._save(state)

    def sign_csr(
        self,
        csr_pem: bytes,
        device_id: str,
        *,
        now: datetime,
        validity: timedelta = DEFAULT_DEVICE_VALIDITY,
    ) -> bytes:
        """Check and sign a device CSR; record the serial; return the certificate PEM.

        Raises:
            CsrRejectedError: the CSR fails its checks, or the name belongs to another role.
            PkiError: the CA state cannot be read.
        """
        with exclusive_lock(self.directory):
            state = self._load()
            self._check_role(state, device_id, ROLE_DEVICE)
            cert = sign_device_csr(self.material, csr_pem, device_id, now=now, validity=validity)
            self._record(state, cert, device_id, ROLE_DEVICE)
        return _pem_cert(cert)

    def create_token(
        self, device_id: str, *, now: datetime, ttl: timedelta = DEFAULT_TOKEN_TTL
    ) -> str:
        """A one-time enrollment token for ``device_id``; only its hash is stored.

        Raises:
            PkiError: invalid device id, or the CA state cannot be read.
        """
        with exclusive_lock(self.directory):
            state = self._load()
            token, record = new_token(device_id, now=now, ttl=ttl)
            state.tokens = [t for t in state.tokens if t.used_at is None and t.expires_at > now]
            state.tokens.append(record)
            self._save(state)
        return token

    def redeem_token(
        self,
        token: str,
        csr_pem: bytes,
        *,
        now: datetime,
        validity: timedelta = DEFAULT_DEVICE_VALIDITY,
    ) -> bytes:
        """Sign ``csr_pem`` for the device the token was issued to, consuming the token.

        A CSR that fails its checks leaves the token unused, so the device can retry.

        Raises:
            EnrollmentError: the token is unknown, used or expired (see ``redeem_token``).
            CsrRejectedError: the CSR fails its checks (e.g. CN is not the token's device).
            PkiError: the CA state cannot be read.
        """
        with exclusive_lock(self.directory):
            state = self._load()
            record = redeem_token(state.tokens, token, now=now)
            self._check_role(state, record.device_id, ROLE_DEVICE)
            cert = sign_device_csr(
                self.material, csr_pem, record.device_id, now=now, validity=validity
            )
            state.tokens = [replace(t, used_at=now) if t is record else t for t in state.tokens]
            self._record(state, cert, record.device_id, ROLE_DEVICE)
        return _pem_cert(cert)

    def issue_server_identity(
        self, server_cn: str, *, now: datetime, validity: timedelta = DEFAULT_DEVICE_VALIDITY
    ) -> KeyAndCert:
        """Key and client certificate for the fleet server's MQTT connection (role server).

        Raises:
            CsrRejectedError: ``server_cn`` is already a device identity.
            PkiError: invalid name, or the CA state cannot be read.
        """
        with exclusive_lock(self.directory):
            state = self._load()
            self._check_role(state, server_cn, ROLE_SERVER)
            pair, cert = issue_server_client_cert(
                self.material, server_cn, now=now, validity=validity
            )
            self._record(state, cert, server_cn, ROLE_SERVER)
        return pair

    def issue_broker_identity(
        self,
        *,
        dns_names: Sequence[str],
        ip_addresses: Sequence[str],
        now: datetime,
        validity: timedelta = DEFAULT_DEVICE_VALIDITY,
    ) -> KeyAndCert:
        """Key and serverAuth certificate for the broker's TLS listener.

        Raises:
            PkiError: no or invalid names, or the CA state cannot be read.
        """
        with exclusive_lock(self.directory):
            state = self._load()
            pair, cert = issue_broker_cert(
                self.material,
                dns_names=dns_names,
                ip_addresses=ip_addresses,
                now=now,
                validity=validity,
            )
            self._record(state, cert, cert.subject.rfc4514_string(), ROLE_BROKER)
        return pair

    def revoke(self, name: str, *, now: datetime) -> list[int]:
        """Revoke every unrevoked certificate issued to ``name`` and rewrite the CRL.

        Returns the serials newly revoked.

        Raises:
            PkiError: no certificate was ever issued to ``name``, or state cannot be read.
        """
        with exclusive_lock(self.directory):
            state = self._load()
            if not any(c.name == name for c in state.issued):
                raise PkiError(f"no certificate was issued to {name!r}")
            newly = [c.serial for c in state.issued if c.name == name and c.revoked_at is None]
            state.issued = [
                replace(c, revoked_at=now) if c.serial in newly else c for c in state.issued
            ]
            self._save(state)
        self.write_crl(now=now)
        return newly

    def write_crl(self, *, now: datetime, validity: timedelta = DEFAULT_CRL_VALIDITY) -> bytes:
        """Sign a fresh CRL of every revoked serial, write it atomically, and return it.

        Raises:
            PkiError: the CA state cannot be read.
        """
        with exclusive_lock(self.directory):
            state = self._load()
            state.crl_number += 1
            revoked = [(c.serial, c.revoked_at) for c in state.issued if c.revoked_at]
            crl = build_crl(
                self.material,
                revoked,
                crl_number=state.crl_number,
                now=now,
                validity=validity,
            )
            self._save(state)
            write_atomic(self.crl_path, crl)
        return crl
