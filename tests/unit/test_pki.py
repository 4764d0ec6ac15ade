"""The fleet CA: CSR checks, issued certificates, tokens, revocation and the CLI around them."""

from __future__ import annotations

import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from edge_agent.common.identity import (
    IdentityStore,
    build_csr,
    generate_device_key,
    verify_device_certificate,
)
from edge_agent.errors import IdentityError
from fleet_server.cli import main as cli
from fleet_server.errors import (
    ERRORS,
    BrokerConfigError,
    CsrRejectedError,
    EnrollmentError,
    PkiError,
    TokenExpiredError,
    TokenUnknownError,
    TokenUsedError,
)
from fleet_server.pki.broker_config import BrokerConfig, render_acl
from fleet_server.pki.ca import CertificateAuthority
from fleet_server.pki.certs import (
    CaMaterial,
    check_csr,
    create_ca,
    new_token,
    redeem_token,
    sign_device_csr,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
YEAR = timedelta(days=365)


@pytest.fixture(scope="module")
def ca() -> CaMaterial:
    return create_ca("test fleet CA", now=NOW, validity=10 * YEAR)


def _csr(
    cn: str = "dev-a",
    *,
    key: object | None = None,
    extensions: list[tuple[x509.ExtensionType, bool]] | None = None,
    extra_subject: list[x509.NameAttribute] | None = None,
) -> bytes:
    signing_key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), *(extra_subject or [])])
    builder = x509.CertificateSigningRequestBuilder().subject_name(name)
    for ext, critical in extensions or []:
        builder = builder.add_extension(ext, critical=critical)
    algorithm = None if isinstance(signing_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(signing_key, algorithm)  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM)


def _tampered_csr() -> bytes:
    """A CSR for dev-a whose CN and SAN were rewritten to dev-b after signing."""
    der = x509.load_pem_x509_csr(build_csr(generate_device_key(), "dev-a")).public_bytes(
        serialization.Encoding.DER
    )
    forged = x509.load_der_x509_csr(der.replace(b"dev-a", b"dev-b"))
    return forged.public_bytes(serialization.Encoding.PEM)


def _ku(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


BAD_CSRS: list[tuple[str, Callable[[], bytes], str, str]] = [
    ("wrong CN", lambda: _csr("dev-b"), "dev-a", "cn_mismatch"),
    (
        "extra subject attribute",
        lambda: _csr(extra_subject=[x509.NameAttribute(NameOID.ORGANIZATION_NAME, "evil")]),
        "dev-a",
        "cn_mismatch",
    ),
    ("signature broken by tampering", _tampered_csr, "dev-b", "bad_signature"),
    (
        "requests CA basic constraints",
        lambda: _csr(extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)]),
        "dev-a",
        "ca_requested",
    ),
    (
        "requests keyCertSign",
        lambda: _csr(extensions=[(_ku(cert_sign=True), True)]),
        "dev-a",
        "ca_requested",
    ),
    (
        "SAN names another device",
        lambda: _csr(extensions=[(x509.SubjectAlternativeName([x509.DNSName("dev-b")]), False)]),
        "dev-a",
        "san_mismatch",
    ),
    (
        "RSA 1024",
        lambda: _csr(key=rsa.generate_private_key(public_exponent=65537, key_size=1024)),
        "dev-a",
        "key_type",
    ),
    (
        "EC secp256k1 curve",
        lambda: _csr(key=ec.generate_private_key(ec.SECP256K1())),
        "dev-a",
        "key_type",
    ),
    ("Ed25519 key", lambda: _csr(key=ed25519.Ed25519PrivateKey.generate()), "dev-a", "key_type"),
    ("not a CSR", lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "dev-a", "malformed"),
    ("device id with '+'", lambda: _csr("dev+a"), "dev+a", "bad_device_id"),
    ("device id with '/'", lambda: _csr("a/b"), "a/b", "bad_device_id"),
]


@pytest.mark.parametrize(
    ("make", "device_id", "reason"),
    [pytest.param(m, d, r, id=n) for n, m, d, r in BAD_CSRS],
)
def test_bad_csr_is_refused(
    ca: CaMaterial, make: Callable[[], bytes], device_id: str, reason: str
) -> None:
    csr = make()
    with pytest.raises(CsrRejectedError) as info:
        sign_device_csr(ca, csr, device_id, now=NOW, validity=YEAR)
    assert info.value.reason == reason


def test_good_csr_passes_the_same_checks(ca: CaMaterial) -> None:
    # Positive control for the table above: the builders make acceptable CSRs by default.
    check_csr(_csr(), "dev-a")
    check_csr(_csr(extensions=[(_ku(cert_sign=False), True)]), "dev-a")
    check_csr(_csr(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)), "dev-a")


def test_issued_cert_chains_to_ca_with_client_auth(ca: CaMaterial) -> None:
    key = generate_device_key()
    cert = sign_device_csr(ca, build_csr(key, "dev-a"), "dev-a", now=NOW, validity=YEAR)
    verifier = PolicyBuilder().store(Store([ca.cert])).time(NOW).build_client_verifier()
    verified = verifier.verify(cert, [])
    assert [n.value for n in verified.subjects or []] == ["dev-a"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-a"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.public_key() == key.public_key()
    ca_bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert ca_bc.ca
    assert ca_bc.path_length == 0
    # The device's own check agrees, and refuses the certificate past its validity.
    assert verify_device_certificate(
        cert.public_bytes(serialization.Encoding.PEM),
        ca.cert.public_bytes(serialization.Encoding.PEM),
        key,
        "dev-a",
        NOW,
    )
    with pytest.raises(IdentityError, match="chain"):
        verify_device_certificate(
            cert.public_bytes(serialization.Encoding.PEM),
            ca.cert.public_bytes(serialization.Encoding.PEM),
            key,
            "dev-a",
            NOW + 2 * YEAR,
        )


def test_device_refuses_cert_from_other_ca_or_for_other_key(ca: CaMaterial) -> None:
    key = generate_device_key()
    other_ca = create_ca("rogue", now=NOW, validity=YEAR)
    pem = serialization.Encoding.PEM
    rogue = sign_device_csr(other_ca, build_csr(key, "dev-a"), "dev-a", now=NOW, validity=YEAR)
    with pytest.raises(IdentityError, match="chain"):
        verify_device_certificate(
            rogue.public_bytes(pem), ca.cert.public_bytes(pem), key, "dev-a", NOW
        )
    someone_else = sign_device_csr(
        ca, build_csr(generate_device_key(), "dev-a"), "dev-a", now=NOW, validity=YEAR
    )
    with pytest.raises(IdentityError, match="key"):
        verify_device_certificate(
            someone_else.public_bytes(pem), ca.cert.public_bytes(pem), key, "dev-a", NOW
        )


def test_serials_are_random_and_distinct(ca: CaMaterial) -> None:
    serials = {
        sign_device_csr(ca, _csr(), "dev-a", now=NOW, validity=YEAR).serial_number for _ in range(5)
    }
    assert len(serials) == 5
    assert all(s.bit_length() > 64 for s in serials)


# --- tokens (pure) ---------------------------------------------------------------------------


def test_token_is_stored_hashed_and_redeemable_once() -> None:
    token, record = new_token("dev-a", now=NOW, ttl=timedelta(hours=1))
    assert token not in record.digest
    assert redeem_token([record], token, now=NOW + timedelta(minutes=59)) == record


@pytest.mark.parametrize(
    ("used", "at", "error"),
    [
        (False, timedelta(hours=1), TokenExpiredError),
        (False, timedelta(days=3), TokenExpiredError),
        (True, timedelta(minutes=1), TokenUsedError),
    ],
    ids=["expired-at-boundary", "expired-long-ago", "already-used"],
)
def test_token_refused(used: bool, at: timedelta, error: type[EnrollmentError]) -> None:
    token, record = new_token("dev-a", now=NOW, ttl=timedelta(hours=1))
    if used:
        record = type(record)(record.device_id, record.digest, record.expires_at, NOW)
    with pytest.raises(error):
        redeem_token([record], token, now=NOW + at)


def test_unknown_token_refused() -> None:
    _, record = new_token("dev-a", now=NOW, ttl=timedelta(hours=1))
    with pytest.raises(TokenUnknownError):
        redeem_token([record], "not-the-token", now=NOW)


# --- the file-backed CA ----------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", now=NOW)


def test_ca_files_and_reopen(store: CertificateAuthority) -> None:
    key_mode = stat.S_IMODE((store.directory / "ca.key").stat().st_mode)
    assert key_mode == 0o600
    again = CertificateAuthority.open(store.directory)
    assert again.cert_pem == store.cert_pem
    with pytest.raises(PkiError, match="already"):
        CertificateAuthority.init(store.directory, now=NOW)
    with pytest.raises(PkiError, match="no CA"):
        CertificateAuthority.open(store.directory / "missing")


@pytest.mark.parametrize(
    "state",
    [b"{broken", b"[1]", b"[" * 100_000 + b"]" * 100_000, b'{"schema_version": 1}', b"\xff"],
)
def test_a_corrupt_ca_state_file_is_a_typed_error(
    store: CertificateAuthority, state: bytes
) -> None:
    (store.directory / "state.json").write_bytes(state)
    with pytest.raises(PkiError, match="corrupt"):
        CertificateAuthority.open(store.directory).issued()


def test_token_enrollment_is_single_use(store: CertificateAuthority) -> None:
    token = store.create_token("dev-a", now=NOW)
    # A CSR for another device does not consume the token ...
    with pytest.raises(CsrRejectedError):
        store.redeem_token(token, _csr("dev-b"), now=NOW)
    cert = x509.load_pem_x509_certificate(store.redeem_token(token, _csr("dev-a"), now=NOW))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-a"
    # ... but a successful redemption does.
    with pytest.raises(TokenUsedError):
        store.redeem_token(token, _csr("dev-a"), now=NOW)


def test_expired_token_refused_by_store(store: CertificateAuthority) -> None:
    token = store.create_token("dev-a", now=NOW, ttl=timedelta(minutes=5))
    with pytest.raises(TokenExpiredError):
        store.redeem_token(token, _csr("dev-a"), now=NOW + timedelta(minutes=6))


def test_revoked_serial_in_crl_signed_by_ca(store: CertificateAuthority) -> None:
    a = x509.load_pem_x509_certificate(store.sign_csr(_csr("dev-a"), "dev-a", now=NOW))
    b = x509.load_pem_x509_certificate(store.sign_csr(_csr("dev-b"), "dev-b", now=NOW))
    before = x509.load_pem_x509_crl(store.crl_path.read_bytes())
    assert store.revoke("dev-a", now=NOW) == [a.serial_number]
    crl = x509.load_pem_x509_crl(store.crl_path.read_bytes())
    ca_key = store.material.cert.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(ca_key)
    assert crl.get_revoked_certificate_by_serial_number(a.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(b.serial_number) is None
    assert crl.issuer == store.material.cert.subject
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number > before.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    # A CRL signed by another key does not verify with the CA key.
    rogue = create_ca("rogue", now=NOW, validity=YEAR).key.public_key()
    assert not crl.is_signature_valid(rogue)
    with pytest.raises(PkiError, match="no certificate"):
        store.revoke("dev-unknown", now=NOW)


def test_device_id_cannot_take_the_server_role(store: CertificateAuthority) -> None:
    """Server names ('<label>.server') and device ids (one DNS label) never overlap, so no
    device can be enrolled under the name the broker grants the whole topic tree."""
    store.issue_server_identity("fleet.server", now=NOW)
    with pytest.raises((CsrRejectedError, IdentityError, PkiError)):
        store.sign_csr(_csr("fleet.server"), "fleet.server", now=NOW)
    # and a server identity can never be issued under a device-shaped name
    with pytest.raises(PkiError, match="server"):
        store.issue_server_identity("fleet-server", now=NOW)
    with pytest.raises(BrokerConfigError, match="server"):
        BrokerConfig(server_cn="fleet-server").validate()


def test_identity_store_keeps_key_private(tmp_path: Path, store: CertificateAuthority) -> None:
    device = IdentityStore(tmp_path / "device")
    device.provision_ca(store.cert_pem)
    csr = device.write_csr("dev-a")
    assert b"PRIVATE KEY" not in csr
    assert stat.S_IMODE(device.key_path.stat().st_mode) == 0o600
    device.install_certificate(store.sign_csr(csr, "dev-a", now=NOW), "dev-a", NOW)
    assert device.cert_path.exists()
    with pytest.raises(IdentityError):
        device.install_certificate(store.sign_csr(_csr("dev-a"), "dev-a", now=NOW), "dev-a", NOW)


# --- broker config (pure parts) --------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        BrokerConfig(prefix="edge/#"),
        BrokerConfig(prefix="$SYS"),
        BrokerConfig(prefix="a/%u"),
        BrokerConfig(prefix=""),
        BrokerConfig(port=0),
        BrokerConfig(server_cn="Fleet Server"),
        BrokerConfig(dns_names=(), ip_addresses=()),
    ],
)
def test_broker_config_rejects_unsafe_settings(config: BrokerConfig) -> None:
    with pytest.raises(BrokerConfigError):
        config.validate()


def test_acl_confines_devices_to_their_own_topics() -> None:
    acl = render_acl("fleet/x", "fleet.server").splitlines()
    assert "pattern write fleet/x/devices/%u/telemetry" in acl
    assert "pattern read fleet/x/devices/%u/desired" in acl
    assert "pattern read fleet/x/broadcast/#" in acl
    device_rules = [line for line in acl if line.startswith("pattern")]
    assert all("/devices/%u/" in r or r.endswith("/broadcast/#") for r in device_rules)
    server = acl[acl.index("user fleet.server") :]
    assert "topic readwrite fleet/x/#" in server


# --- CLI -------------------------------------------------------------------------------------


def _run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return int(info.value.code or 0)


def test_cli_token_enroll_revoke_and_broker_config(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    assert _run(["ca", "init", "--dir", str(ca_dir)]) == 0
    csr_file = tmp_path / "dev-a.csr"
    csr_file.write_bytes(_csr("dev-a"))
    authority = CertificateAuthority.open(ca_dir)
    token = authority.create_token("dev-a", now=datetime.now(UTC))
    common = ["--ca-dir", str(ca_dir), "--csr", str(csr_file), "--out", str(tmp_path / "a.crt")]
    assert _run(["devices", "enroll", *common, "--token", token]) == 0
    assert (tmp_path / "a.crt").exists()
    assert _run(["devices", "enroll", *common, "--token", token]) == ERRORS.exit_code(
        EnrollmentError
    )
    assert _run(["devices", "enroll", *common, "--device-id", "dev-b"]) == ERRORS.exit_code(
        CsrRejectedError
    )
    assert _run(["devices", "revoke", "--ca-dir", str(ca_dir), "dev-a"]) == 0
    assert _run(["devices", "revoke", "--ca-dir", str(ca_dir), "nobody"]) == ERRORS.exit_code(
        PkiError
    )
    broker = tmp_path / "broker"
    argv = ["broker-config", "--ca-dir", str(ca_dir), "--dir", str(broker), "--port", "18883"]
    assert _run(argv) == 0
    conf = (broker / "mosquitto.conf").read_text()
    for line in (
        "listener 18883 127.0.0.1",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "set_tcp_nodelay true",
        "allow_anonymous false",
        f"crlfile {(ca_dir / 'crl.pem').resolve()}",
    ):
        assert line in conf.splitlines()
    assert _run([*argv, "--prefix", "bad/#"]) == ERRORS.exit_code(BrokerConfigError)
