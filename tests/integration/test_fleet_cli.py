"""fleet-server's CA and enrollment commands as real subprocesses (the documented flow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cryptography import x509

from edge_agent.common.identity import build_csr, generate_device_key
from fakes import FakeGateway

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


# --------------------------------------------------------------------------- admin API commands
import json  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from bundles import DigitsBundles  # noqa: E402
from edge_agent.wire.telemetry import StatusMessage  # noqa: E402
from fleet_server.admin.api import AdminServer, create_app  # noqa: E402
from fleet_server.cli.main import cli  # noqa: E402
from fleet_server.delivery.library import BundleLibrary  # noqa: E402
from fleet_server.registry.store import Registry  # noqa: E402
from fleet_server.service import FleetService  # noqa: E402

ADMIN_TOKEN = "admin-token-" + "z" * 20


@pytest.fixture
def admin_url(digits_bundles: DigitsBundles, tmp_path: Path) -> Iterator[str]:
    keys = digits_bundles.keys
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    service = FleetService(
        registry,
        BundleLibrary(tmp_path / "bundles", keys.trusted_root()),
        FakeGateway(status={"cam-1": StatusMessage("cam-1", "online", 1.0)}),
        [keys.signer("online-1")],
        clock=lambda: datetime.now(UTC),
        ttl=timedelta(hours=1),
    )
    server = AdminServer(create_app(service, ADMIN_TOKEN), "127.0.0.1", 0)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        registry.close()


def _invoke(url: str, *args: str) -> str:
    result = CliRunner().invoke(
        cli,
        list(args),
        env={"EDGEFLEET_ADMIN_URL": url, "EDGEFLEET_ADMIN_TOKEN": ADMIN_TOKEN},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_admin_commands_tables_and_json(admin_url: str, digits_bundles: DigitsBundles) -> None:
    out = _invoke(admin_url, "models", "publish", str(digits_bundles.path(1)))
    assert out.startswith("published digits v1 (stable) ")
    models = json.loads(_invoke(admin_url, "models", "list", "--json"))
    assert [(m["name"], m["version"]) for m in models] == [("digits", 1)]
    assert "digits  1" in _invoke(admin_url, "models", "list")

    _invoke(admin_url, "devices", "register", "cam-1", "--group", "lobby", "--tag", "site=a")
    _invoke(admin_url, "devices", "register", "cam-2", "--group", "lobby")
    results = json.loads(_invoke(admin_url, "assign", "--group", "lobby", "digits", "1", "--json"))
    assert [(r["device_id"], r["desired_version"]) for r in results] == [("cam-1", 1), ("cam-2", 1)]
    table = _invoke(admin_url, "assign", "--device", "cam-1", "digits", "1")
    assert table.splitlines()[0].split() == ["DEVICE", "DESIRED", "PUBLISHED", "ERROR"]
    assert table.splitlines()[1].split()[:3] == ["cam-1", "2", "yes"]

    lines = _invoke(admin_url, "devices", "list").splitlines()
    assert lines[0].split() == ["DEVICE", "GROUP", "STATUS", "STATE", "DESIRED", "MODELS"]
    assert lines[1].split() == ["cam-1", "lobby", "online", "active", "2", "digits@v1"]
    assert lines[2].split() == ["cam-2", "lobby", "offline", "active", "1", "digits@v1"]
    shown = json.loads(_invoke(admin_url, "devices", "show", "cam-1", "--json"))
    assert shown["tags"] == {"site": "a"}
    assert shown["desired_version"] == 2
    assert "telemetry_acked" in _invoke(admin_url, "devices", "show", "cam-1")

    wave = json.loads(_invoke(admin_url, "waves", "start", models[0]["sha256"], "--json"))
    assert wave["wave"] == "wave-1"
    status = json.loads(_invoke(admin_url, "status", "--json"))
    assert (status["devices"], status["online"], status["bundles"]) == (2, 1, 1)
    assert "gateway.desired_published" in _invoke(admin_url, "status")
    assert _invoke(admin_url, "telemetry", "tail", "--json") == ""


def test_admin_errors_map_to_exit_codes(admin_url: str, tmp_path: Path) -> None:
    env = {"EDGEFLEET_ADMIN_URL": admin_url, "EDGEFLEET_ADMIN_TOKEN": "wrong-token-" + "x" * 10}
    denied = subprocess.run(
        [str(BIN), "status"], env={**os.environ, **env}, capture_output=True, text=True, check=False
    )
    assert denied.returncode == 6
    assert denied.stderr.startswith("error[admin_unauthorized]")
    env["EDGEFLEET_ADMIN_TOKEN"] = ADMIN_TOKEN
    missing = subprocess.run(
        [str(BIN), "devices", "show", "cam-404"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 3
    assert "not enrolled" in missing.stderr
    env["EDGEFLEET_ADMIN_URL"] = "http://127.0.0.1:9"  # discard port: nothing listens
    down = subprocess.run(
        [str(BIN), "models", "list"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert down.returncode == 7
    assert down.stderr.startswith("error[admin_unreachable]")


def test_revoke_tells_the_server_when_a_token_is_given(admin_url: str, tmp_path: Path) -> None:
    assert run("ca", "init", "--ca-dir", "ca", cwd=tmp_path).returncode == 0
    (tmp_path / "cam-7.csr").write_bytes(build_csr(generate_device_key(), "cam-7"))
    enroll = ("devices", "enroll", "--ca-dir", "ca", "--csr", "cam-7.csr", "--device-id", "cam-7")
    assert run(*enroll, "--out", "cam-7.crt", cwd=tmp_path).returncode == 0
    _invoke(admin_url, "devices", "register", "cam-7")
    result = CliRunner().invoke(
        cli,
        ["devices", "revoke", "--ca-dir", str(tmp_path / "ca"), "cam-7"],
        env={"EDGEFLEET_ADMIN_URL": admin_url, "EDGEFLEET_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    assert result.exit_code == 0, result.output
    assert "server: cam-7 marked revoked" in result.output
    shown = json.loads(_invoke(admin_url, "devices", "show", "cam-7", "--json"))
    assert shown["revoked_at"] is not None
    # --server without a token is a usage error; --no-server never calls it
    usage = CliRunner().invoke(
        cli, ["devices", "revoke", "--ca-dir", str(tmp_path / "ca"), "cam-8", "--server"], env={}
    )
    assert usage.exit_code == 2
