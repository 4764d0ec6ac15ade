"""The device's X.509 identity: its key, its CSR, and the certificate the fleet CA issued.

Owns the device side of enrollment and the device-id rule both sides share (a device id is a
certificate CN, an MQTT username and client id, and a topic level, so it must be safe in all
four). The key is generated here and never leaves the device: only the CSR does. The pure
functions take bytes/values and a ``now``; ``IdentityStore`` is the thin file-backed part.

Renewal keeps a working pair on disk at every instant: the new key and certificate are written
*beside* the current ones (``device.next.key``, ``device.next.crt``), and only after the device
has connected with them are they copied over the current pair (``promote_next``). Two files
cannot be replaced in one atomic step, so ``recover`` (run before every start) picks whichever
complete pair is valid and newest and finishes or discards an interrupted renewal: a crash at
any step leaves the old pair or the new one, never a mix.

Does not talk to the fleet server or the broker (the MQTT adapter loads the files this module
wrote) and never imports fleet_server.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from edge_agent.common.durable import write_atomic
from edge_agent.errors import IdentityError
from edge_agent.ids import validate_device_id

__all__ = [
    "IdentityStore",
    "build_csr",
    "generate_device_key",
    "key_from_pem",
    "key_to_pem",
    "renewal_due",
    "verify_device_certificate",
]

KEY_FILE = "device.key"
CSR_FILE = "device.csr"
CERT_FILE = "device.crt"
CA_FILE = "fleet-ca.crt"
NEXT_KEY_FILE = "device.next.key"
NEXT_CERT_FILE = "device.next.crt"


def generate_device_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 private key for the device."""
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (protected by file mode 0600 on the device)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_from_pem(data: bytes) -> ec.EllipticCurvePrivateKey:
    """Parse a device key.

    Raises:
        IdentityError: not a PEM private key, or not an EC P-256 key.
    """
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"device key cannot be read: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise IdentityError("device key is not an EC P-256 key")
    return key


def build_csr(key: ec.EllipticCurvePrivateKey, device_id: str) -> bytes:
    """A PEM CSR with CN = SAN = ``device_id``, signed by ``key``.

    Raises:
        IdentityError: ``device_id`` is invalid.
    """
    validate_device_id(device_id)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(device_id)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _load_cert(data: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise IdentityError(f"{what} is not a PEM certificate: {exc}") from exc


def _common_name(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else None


def verify_device_certificate(
    cert_pem: bytes,
    ca_cert_pem: bytes,
    key: ec.EllipticCurvePrivateKey,
    device_id: str,
    now: datetime,
) -> x509.Certificate:
    """Check an issued certificate before the device installs it.

    It must chain to the provisioned fleet CA and be valid at ``now`` (RFC 5280 path
    validation by cryptography's verifier), carry the clientAuth EKU, name exactly
    ``device_id`` in its CN and SAN, and certify the public half of ``key``.

    Raises:
        IdentityError: any of these checks fails, or the inputs cannot be parsed.
    """
    validate_device_id(device_id)
    cert = _load_cert(cert_pem, "issued certificate")
    ca = _load_cert(ca_cert_pem, "fleet CA certificate")
    verifier = PolicyBuilder().store(Store([ca])).time(now).build_client_verifier()
    try:
        verified = verifier.verify(cert, [])
    except VerificationError as exc:
        raise IdentityError(f"certificate does not chain to the fleet CA: {exc}") from exc
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise IdentityError("certificate lacks the clientAuth extended key usage")
    if _common_name(cert) != device_id:
        raise IdentityError(f"certificate CN is {_common_name(cert)!r}, expected {device_id!r}")
    names = verified.subjects or []
    if [n.value for n in names if isinstance(n, x509.DNSName)] != [device_id]:
        raise IdentityError(f"certificate SAN does not name exactly {device_id!r}")
    if cert.public_key() != key.public_key():
        raise IdentityError("certificate does not certify this device's key")
    return cert


def renewal_due(cert: x509.Certificate, fraction: float) -> datetime:
    """When a certificate should be renewed: after ``fraction`` of its validity period.

    Raises:
        IdentityError: ``fraction`` is not in (0, 1).
    """
    if not 0 < fraction < 1:
        raise IdentityError(f"renewal fraction {fraction} must be in (0, 1)")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * fraction


@dataclass(frozen=True)
class IdentityStore:
    """The device's identity files in one directory: key (0600), CSR, certificate, fleet CA."""

    directory: Path

    @property
    def key_path(self) -> Path:
        """The private key file (never leaves the device)."""
        return self.directory / KEY_FILE

    @property
    def cert_path(self) -> Path:
        """The installed device certificate."""
        return self.directory / CERT_FILE

    @property
    def ca_path(self) -> Path:
        """The provisioned fleet CA certificate (the broker's trust anchor too)."""
        return self.directory / CA_FILE

    @property
    def csr_path(self) -> Path:
        """The last CSR written for the operator."""
        return self.directory / CSR_FILE

    @property
    def next_key_path(self) -> Path:
        """A renewal's new key, beside the current one until it is promoted."""
        return self.directory / NEXT_KEY_FILE

    @property
    def next_cert_path(self) -> Path:
        """A renewal's new certificate, beside the current one until it is promoted."""
        return self.directory / NEXT_CERT_FILE

    def load_or_create_key(self) -> ec.EllipticCurvePrivateKey:
        """The device key, generated and written (0600, atomically) on first use.

        Raises:
            IdentityError: an existing key file cannot be parsed.
            OSError: the key cannot be written.
        """
        if self.key_path.exists():
            return key_from_pem(self.key_path.read_bytes())
        self.directory.mkdir(parents=True, exist_ok=True)
        key = generate_device_key()
        write_atomic(self.key_path, key_to_pem(key), mode=0o600)
        return key

    def write_csr(self, device_id: str) -> bytes:
        """Build the CSR for ``device_id`` from the device key, write it, and return it.

        Raises:
            IdentityError: invalid device id or unreadable key.
            OSError: the files cannot be written.
        """
        csr = build_csr(self.load_or_create_key(), device_id)
        write_atomic(self.csr_path, csr)
        return csr

    def provision_ca(self, ca_cert_pem: bytes) -> None:
        """Install the fleet CA certificate the device will trust.

        Raises:
            IdentityError: not a PEM certificate.
            OSError: the file cannot be written.
        """
        _load_cert(ca_cert_pem, "fleet CA certificate")
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.ca_path, ca_cert_pem)

    def install_certificate(self, cert_pem: bytes, device_id: str, now: datetime) -> None:
        """Verify the issued certificate against the provisioned CA and key, then install it.

        Raises:
            IdentityError: no key or CA provisioned, or the certificate fails verification.
            OSError: the file cannot be written.
        """
        if not self.key_path.exists() or not self.ca_path.exists():
            raise IdentityError(f"{self.directory}: device key or fleet CA not provisioned")
        key = key_from_pem(self.key_path.read_bytes())
        verify_device_certificate(cert_pem, self.ca_path.read_bytes(), key, device_id, now)
        write_atomic(self.cert_path, cert_pem)

    def current_certificate(self) -> x509.Certificate:
        """The installed certificate.

        Raises:
            IdentityError: none installed, or it cannot be parsed.
        """
        try:
            data = self.cert_path.read_bytes()
        except FileNotFoundError as exc:
            raise IdentityError(f"{self.directory}: no device certificate installed") from exc
        return _load_cert(data, "device certificate")

    def create_next_key(self) -> ec.EllipticCurvePrivateKey:
        """A fresh key for a renewal, written (0600, atomically) beside the current one.

        A leftover next certificate (of an earlier attempt) is removed first, so the next pair
        can never be a new key with an old attempt's certificate.

        Raises:
            OSError: the key cannot be written.
        """
        self.next_cert_path.unlink(missing_ok=True)
        key = generate_device_key()
        write_atomic(self.next_key_path, key_to_pem(key), mode=0o600)
        return key

    def install_next_certificate(
        self, cert_pem: bytes, device_id: str, now: datetime
    ) -> x509.Certificate:
        """Verify a renewal's certificate against the CA and the next key; write it beside.

        Raises:
            IdentityError: no next key, or the certificate fails ``verify_device_certificate``.
            OSError: the file cannot be written.
        """
        try:
            key = key_from_pem(self.next_key_path.read_bytes())
        except FileNotFoundError as exc:
            raise IdentityError("no renewal key: the certificate has nothing to certify") from exc
        cert = verify_device_certificate(cert_pem, self.ca_path.read_bytes(), key, device_id, now)
        write_atomic(self.next_cert_path, cert_pem)
        return cert

    def promote_next(self) -> None:
        """Make the next pair the current one (key first, then certificate), then drop it.

        A crash between the two copies leaves a key that does not match the certificate;
        ``recover`` then still finds the complete next pair and finishes the copy.

        Raises:
            OSError: a file cannot be read or written.
        """
        write_atomic(self.key_path, self.next_key_path.read_bytes(), mode=0o600)
        write_atomic(self.cert_path, self.next_cert_path.read_bytes())
        self.next_cert_path.unlink(missing_ok=True)
        self.next_key_path.unlink(missing_ok=True)

    def discard_next(self) -> None:
        """Forget an unfinished renewal (the current pair is untouched). Raises OSError."""
        self.next_cert_path.unlink(missing_ok=True)
        self.next_key_path.unlink(missing_ok=True)

    def _valid_pair(
        self, key_path: Path, cert_path: Path, device_id: str, now: datetime
    ) -> x509.Certificate | None:
        try:
            key = key_from_pem(key_path.read_bytes())
            return verify_device_certificate(
                cert_path.read_bytes(), self.ca_path.read_bytes(), key, device_id, now
            )
        except (OSError, IdentityError):
            return None

    def recover(self, device_id: str, now: datetime) -> x509.Certificate | None:
        """Finish or discard an interrupted renewal; return the current certificate if valid.

        The next pair wins when it is complete, valid at ``now`` and issued after the current
        one (or the current one is broken: a crash between ``promote_next``'s two copies);
        otherwise it is discarded. Run before the MQTT adapter loads the files.

        Raises:
            OSError: the files cannot be written.
        """
        current = self._valid_pair(self.key_path, self.cert_path, device_id, now)
        if self.next_key_path.exists() or self.next_cert_path.exists():
            nxt = self._valid_pair(self.next_key_path, self.next_cert_path, device_id, now)
            if nxt is not None and (
                current is None or nxt.not_valid_before_utc > current.not_valid_before_utc
            ):
                self.promote_next()
                return nxt
            self.discard_next()
        return current
