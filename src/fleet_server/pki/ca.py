"""The file-backed fleet CA: key, certificate, issued serials, revocations, tokens, CRL.

Layout of a CA directory: ``ca.key`` (0600), ``ca.crt``, ``state.json`` (issued serials,
revocations and hashed enrollment tokens) and ``crl.pem`` (what the broker loads). Every write
is atomic and every change runs under an exclusive lock. The decisions themselves (CSR checks,
signing, CRLs, tokens) are the pure functions of ``fleet_server.pki.certs``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge_agent.common.durable import exclusive_lock, write_atomic
from fleet_server.errors import CsrRejectedError, PkiError
from fleet_server.pki.certs import (
    DEFAULT_CA_VALIDITY,
    DEFAULT_CRL_VALIDITY,
    DEFAULT_DEVICE_VALIDITY,
    DEFAULT_TOKEN_TTL,
    ROLE_BROKER,
    ROLE_CONSUMER,
    ROLE_DEVICE,
    ROLE_SERVER,
    CaMaterial,
    KeyAndCert,
    TokenRecord,
    build_crl,
    create_ca,
    issue_broker_cert,
    issue_server_client_cert,
    new_token,
    pem_cert,
    pem_key,
    redeem_token,
    sign_device_csr,
)


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
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise PkiError(f"CA state file is corrupt: {type(exc).__name__}: {exc}") from exc


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
        return pem_cert(self.material.cert)

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
            write_atomic(directory / _CA_KEY, pem_key(material.key), mode=0o600)
            write_atomic(directory / _CA_CERT, pem_cert(material.cert))
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
        return pem_cert(cert)

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
        return pem_cert(cert)

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

    def issue_consumer_identity(
        self, name: str, *, now: datetime, validity: timedelta = DEFAULT_DEVICE_VALIDITY
    ) -> KeyAndCert:
        """Key and client certificate for a read-only telemetry consumer (role consumer).

        ``fleet-server broker-config`` gives every unrevoked consumer identity read access to
        the devices' telemetry, events, status and reported topics, and nothing else.

        Raises:
            CsrRejectedError: ``name`` already belongs to another role.
            PkiError: not ``<label>.consumer``, or the CA state cannot be read.
        """
        with exclusive_lock(self.directory):
            state = self._load()
            self._check_role(state, name, ROLE_CONSUMER)
            pair, cert = issue_server_client_cert(
                self.material, name, now=now, validity=validity, role=ROLE_CONSUMER
            )
            self._record(state, cert, name, ROLE_CONSUMER)
        return pair

    def consumers(self) -> list[str]:
        """Names of the consumer identities with at least one unrevoked certificate, sorted.

        Raises:
            PkiError: the CA state cannot be read.
        """
        state = self._load()
        return sorted(
            {c.name for c in state.issued if c.role == ROLE_CONSUMER and c.revoked_at is None}
        )

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
