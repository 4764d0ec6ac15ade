"""``fleet-server ca consumer-identity`` and ``broker-config`` with consumers (CliRunner, real CA).

The broker-side behaviour (a consumer reads telemetry and writes nothing) is tested against a
real Mosquitto in ``tests/integration/test_broker_acl.py``; here: the commands, the names they
accept, and that the generated ACL follows the CA (issued and revoked consumers) while keeping
the operator's ``acl.local``.
"""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import NameOID

from fleet_server.cli.main import cli
from fleet_server.errors import BrokerConfigError


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_consumer_identity_is_issued_granted_read_only_and_revocable(tmp_path: Path) -> None:
    ca_dir, out, broker = tmp_path / "ca", tmp_path / "consumer", tmp_path / "broker"
    assert _run("ca", "init", "--ca-dir", str(ca_dir))[0] == 0
    code, output = _run("ca", "consumer-identity", "grafana.consumer", "--ca-dir", str(ca_dir),
                        "--out", str(out))  # fmt: skip
    assert code == 0, output
    cert = x509.load_pem_x509_certificate((out / "grafana.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "grafana.consumer"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == (
        "consumer"
    )
    assert (out / "grafana.key").stat().st_mode & 0o077 == 0

    code, output = _run("broker-config", "--ca-dir", str(ca_dir), "--dir", str(broker))
    assert code == 0, output
    acl = (broker / "acl").read_text()
    section = acl.split("user grafana.consumer\n", 1)[1].split("\n\n", 1)[0]
    rules = [line for line in section.splitlines() if line.startswith("topic")]
    assert all(r.startswith(("topic read ", "topic deny ")) for r in rules), rules
    assert "topic read edgefleet/devices/+/telemetry" in rules
    assert "topic deny edgefleet/devices/grafana.consumer/#" in rules
    conf = (broker / "mosquitto.conf").read_text()
    assert "message_size_limit " in conf
    assert "max_queued_bytes " in conf

    # An operator rule survives regeneration; a revoked consumer loses its section.
    local = broker / "acl.local"
    local.write_text(local.read_text() + "user nodered.consumer\ntopic read edgefleet/x\n")
    assert _run("devices", "revoke", "grafana.consumer", "--no-server", "--ca-dir",
                str(ca_dir))[0] == 0  # fmt: skip
    assert _run("broker-config", "--ca-dir", str(ca_dir), "--dir", str(broker))[0] == 0
    acl = (broker / "acl").read_text()
    assert "user grafana.consumer" not in acl
    assert "user nodered.consumer\ntopic read edgefleet/x" in acl


def test_consumer_names_outside_their_namespace_are_refused(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    assert _run("ca", "init", "--ca-dir", str(ca_dir))[0] == 0
    for name in ("dev-a", "fleet.server", "Bad.consumer", "a.b.consumer", "x.consumer/#"):
        code, output = _run("ca", "consumer-identity", name, "--ca-dir", str(ca_dir), "--out",
                            str(tmp_path / "out"))  # fmt: skip
        assert code != 0, name
        assert "Traceback" not in output
    result = CliRunner().invoke(cli, ["broker-config", "--ca-dir", str(ca_dir), "--dir",
                                      str(tmp_path / "b"), "--consumer-cn", "dev-a"])  # fmt: skip
    assert isinstance(result.exception, BrokerConfigError)
    assert "consumer" in str(result.exception)
