"""The file-backed fleet CA: key, certificate, issued serials, revocations, tokens, CRL.

Layout of a CA directory: ``ca.key`` (0600), ``ca.crt``, ``state.json`` (issued serials,
revocations, hashed enrollment tokens and provisioning claims) and ``crl.pem`` (what the
broker loads). Every write is atomic and every change runs under an exclusive lock. The
decisions themselves (CSR checks, signing, CRLs, tokens, claims) are the pure functions of
``fleet_server.pki.certs`` and ``fleet_server.pki.claims``.

Renewal (``renew_device`` then ``confirm_device``) never revokes the certificate a device is
connected with before the device has proved, by confirming over its new connection, that the
new one works. The CRL lists revoked certificates until they expire (an expired certificate
is refused by its dates alone), so short-lived certificates keep it short.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge_agent.common.durable import exclusive_lock, write_atomic
from fleet_server.errors import (
    ClaimPendingError,
    ClaimRefusedError,
    CsrRejectedError,
    PkiError,
    RenewalRefusedError,
)
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
    check_csr,
    create_ca,
    issue_broker_cert,
    issue_server_client_cert,
    new_token,
    pem_cert,
    pem_key,
    redeem_token,
    sign_device_csr,
)
from fleet_server.pki.claims import ClaimRecord, admit, approve, claim_name_of, new_claim


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
    claims: list[ClaimRecord]

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
            "claims": [c.to_dict() for c in self.claims],
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
            claims = [ClaimRecord.from_dict(c) for c in doc.get("claims", [])]
            return cls(int(doc["crl_number"]), issued, tokens, claims)
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
            write_atomic(directory / _STATE_FILE, _State(0, [], [], []).to_bytes(), mode=0o600)
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
        """Sign a fresh CRL of every revoked, unexpired serial, write it atomically, return it.

        Raises:
            PkiError: the CA state cannot be read.
        """
        with exclusive_lock(self.directory):
            state = self._load()
            crl = self._sign_crl(state, now=now, validity=validity)
            self._save(state)
            write_atomic(self.crl_path, crl)
        return crl

    def _sign_crl(
        self, state: _State, *, now: datetime, validity: timedelta = DEFAULT_CRL_VALIDITY
    ) -> bytes:
        """A CRL of ``state``'s revoked, unexpired serials; bumps its CRL number (unsaved)."""
        state.crl_number += 1
        revoked = [
            (c.serial, c.revoked_at) for c in state.issued if c.revoked_at and c.not_after > now
        ]
        return build_crl(
            self.material, revoked, crl_number=state.crl_number, now=now, validity=validity
        )

    # ------------------------------------------------------------------ renewal
    @staticmethod
    def _live(state: _State, device_id: str, serial: int, now: datetime) -> IssuedCert:
        for c in state.issued:
            if c.serial == serial and c.name == device_id and c.role == ROLE_DEVICE:
                if c.revoked_at is not None:
                    raise RenewalRefusedError(
                        f"certificate {serial:x} of {device_id} is revoked", reason="revoked"
                    )
                if c.not_after <= now:
                    break
                return c
        raise RenewalRefusedError(
            f"{serial:x} is not a live certificate of {device_id}", reason="unknown_certificate"
        )

    def renew_device(
        self,
        device_id: str,
        current_serial: int,
        csr_pem: bytes,
        *,
        now: datetime,
        validity: timedelta = DEFAULT_DEVICE_VALIDITY,
    ) -> tuple[bytes, list[int]]:
        """Sign a renewal CSR of a device connected with ``current_serial``.

        Any other unrevoked certificate of the device (an earlier renewal that was never
        confirmed) is revoked, so a device holds at most its current certificate and one
        pending one. Returns the new certificate PEM and the serials revoked (the CRL is
        rewritten when there are any).

        Raises:
            RenewalRefusedError: ``current_serial`` is not a live certificate of the device.
            CsrRejectedError: the CSR fails its checks.
            PkiError: the CA state cannot be read.
        """
        with exclusive_lock(self.directory):
            state = self._load()
            self._live(state, device_id, current_serial, now)
            cert = sign_device_csr(self.material, csr_pem, device_id, now=now, validity=validity)
            stale = [
                c.serial
                for c in state.issued
                if c.name == device_id
                and c.role == ROLE_DEVICE
                and c.revoked_at is None
                and c.serial != current_serial
            ]
            state.issued = [
                replace(c, revoked_at=now) if c.serial in stale else c for c in state.issued
            ]
            crl = self._sign_crl(state, now=now) if stale else None
            self._record(state, cert, device_id, ROLE_DEVICE)  # saves the state
            if crl is not None:  # after the state that lists its revocations
                write_atomic(self.crl_path, crl)
        return pem_cert(cert), stale

    def confirm_device(self, device_id: str, serial: int, *, now: datetime) -> list[int]:
        """The device is connected with ``serial``: revoke its other certificates (CRL too).

        Idempotent: a repeated confirmation revokes nothing more. Returns the serials revoked.

        Raises:
            RenewalRefusedError: ``serial`` is not a live certificate of the device.
            PkiError: the CA state cannot be read.
        """
        with exclusive_lock(self.directory):
            state = self._load()
            self._live(state, device_id, serial, now)
            older = [
                c.serial
                for c in state.issued
                if c.name == device_id
                and c.role == ROLE_DEVICE
                and c.revoked_at is None
                and c.serial != serial
            ]
            if older:  # one state write and one CRL write, under one lock
                state.issued = [
                    replace(c, revoked_at=now) if c.serial in older else c for c in state.issued
                ]
                crl = self._sign_crl(state, now=now)
                self._save(state)
                write_atomic(self.crl_path, crl)
        return older

    def device_status(self, device_id: str, *, now: datetime) -> str:
        """``enrolled`` (a live certificate), ``revoked`` (certificates, none live and at least
        one revoked), ``expired`` or ``unknown``.

        Raises:
            PkiError: the CA state cannot be read.
        """
        certs = [c for c in self._load().issued if c.name == device_id and c.role == ROLE_DEVICE]
        if not certs:
            return "unknown"
        if any(c.revoked_at is None and c.not_after > now for c in certs):
            return "enrolled"
        return "revoked" if any(c.revoked_at is not None for c in certs) else "expired"

    # ------------------------------------------------------------------ claims
    def create_claim(
        self,
        name: str,
        *,
        now: datetime,
        ttl: timedelta,
        limit: int,
        require_approval: bool = False,
    ) -> str:
        """A new provisioning claim; returns its secret (shown once, stored hashed).

        Raises:
            PkiError: bad name, limit or ttl; a claim of that name exists; unreadable state.
        """
        with exclusive_lock(self.directory):
            state = self._load()
            if any(c.name == name for c in state.claims):
                raise PkiError(f"a claim named {name!r} exists already")
            secret, record = new_claim(
                name, now=now, ttl=ttl, limit=limit, require_approval=require_approval
            )
            state.claims.append(record)
            self._save(state)
        return secret

    def claims(self) -> list[ClaimRecord]:
        """Every claim, oldest first. Raises PkiError (unreadable state)."""
        return list(self._load().claims)

    def _update_claim(self, name: str, change: Callable[[ClaimRecord], ClaimRecord]) -> ClaimRecord:
        with exclusive_lock(self.directory):
            state = self._load()
            for i, record in enumerate(state.claims):
                if record.name == name:
                    state.claims[i] = change(record)
                    self._save(state)
                    return state.claims[i]
        raise PkiError(f"no claim named {name!r}")

    def revoke_claim(self, name: str, *, now: datetime) -> ClaimRecord:
        """Stop every further enrollment under the claim (enrolled devices keep theirs).

        Raises:
            PkiError: no such claim, or unreadable state.
        """
        return self._update_claim(name, lambda r: replace(r, revoked_at=r.revoked_at or now))

    def approve_claim(
        self, name: str, device_ids: Sequence[str] = (), *, now: datetime
    ) -> ClaimRecord:
        """Approve pending devices under the claim (all of them when none are named).

        Raises:
            PkiError: no such claim, a named device is not pending, or unreadable state.
        """
        return self._update_claim(name, lambda r: approve(r, tuple(device_ids), now=now))

    def enroll_with_claim(
        self,
        secret: str,
        device_id: str,
        csr_pem: bytes,
        *,
        now: datetime,
        validity: timedelta = DEFAULT_DEVICE_VALIDITY,
    ) -> bytes:
        """Sign a first-boot CSR under a provisioning claim; return the certificate PEM.

        Raises:
            ClaimRefusedError: the claim does not admit the device (``reason`` says why;
                ``csr_rejected`` when the CSR fails its checks).
            ClaimPendingError: the claim needs the operator's approval of this device first.
            PkiError: the CA state cannot be read.
        """
        name = claim_name_of(secret)
        try:
            csr = check_csr(csr_pem, device_id)
        except CsrRejectedError as exc:
            raise ClaimRefusedError(str(exc), reason="csr_rejected") from exc
        key_sha = hashlib.sha256(
            csr.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).hexdigest()
        with exclusive_lock(self.directory):
            state = self._load()
            index = next((i for i, c in enumerate(state.claims) if c.name == name), None)
            record = None if index is None else state.claims[index]
            known = any(c.name == device_id for c in state.issued)
            try:
                admitted = admit(record, secret, device_id, key_sha, known_device=known, now=now)
            except ClaimPendingError as exc:
                if index is not None and isinstance(exc.record, ClaimRecord):
                    state.claims[index] = exc.record
                    self._save(state)
                raise
            assert index is not None  # admit refuses an unknown claim
            cert = sign_device_csr(self.material, csr_pem, device_id, now=now, validity=validity)
            state.claims[index] = admitted
            self._record(state, cert, device_id, ROLE_DEVICE)
        return pem_cert(cert)
