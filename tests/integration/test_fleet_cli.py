"""fleet-server's CA and enrollment commands as real subprocesses (the documented flow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cryptography import x509

from edge_agent.identity import build_csr, generate_device_key

BIN = Path(sys.executable).parent / "fleet-server"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_ca_enroll_revoke_and_broker_config(tmp_path: Path) -> None:
    assert run("ca", "init", "--ca-dir", "ca", cwd=tmp_path).returncode == 0
    (tmp_path / "gw-0001.csr").write_bytes(build_csr(generate_device_key(), "gw-0001"))
    ok = run(
        "devices",
        "enroll",
        "--ca-dir",
        "ca",
        "--csr",
        "gw-0001.csr",
        "--device-id",
        "gw-0001",
        "--out",
        "gw-0001.crt",
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "gw-0001.crt").read_bytes())
    assert "CN=gw-0001" in cert.subject.rfc4514_string()
    # the CSR names gw-0001: enrolling it as another device is refused with a typed error
    bad = run(
        "devices",
        "enroll",
        "--ca-dir",
        "ca",
        "--csr",
        "gw-0001.csr",
        "--device-id",
        "gw-0002",
        "--out",
        "x.crt",
        cwd=tmp_path,
    )
    assert bad.returncode == 3
    assert bad.stderr.startswith("error[csr_rejected]")
    token = run("devices", "token", "--ca-dir", "ca", "gw-0002", cwd=tmp_path)
    assert token.returncode == 0
    assert len(token.stdout.strip()) >= 32
    revoked = run("devices", "revoke", "--ca-dir", "ca", "gw-0001", cwd=tmp_path)
    assert revoked.returncode == 0
    crl = x509.load_pem_x509_crl((tmp_path / "ca" / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    conf = run("broker-config", "--ca-dir", "ca", "--dir", "broker", "--port", "8883", cwd=tmp_path)
    assert conf.returncode == 0, conf.stderr
    text = (tmp_path / "broker" / "mosquitto.conf").read_text()
    assert "require_certificate true" in text
    assert "use_identity_as_username true" in text
    assert "set_tcp_nodelay true" in text
