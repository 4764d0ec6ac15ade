"""Remote diagnostics end to end: real Mosquitto (TLS, ACLs), the gateway, real agents.

The server's ``Diagnostics`` signs each command with the online key and publishes it on the
device's ``commands`` topic; the agent verifies, runs and answers it; a support bundle comes
back in blocks the server pulls and verifies against the SHA-256 the device announced. Forged,
replayed, misaddressed and unknown commands are refused, answered and counted on the device.
An offline device gets its command when it reconnects; an expired one never runs. A real
``edge-agent run`` daemon restarts on command: it drains and exits 75.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from bundles import DigitsBundles
from edge_agent.common.logring import LogRing
from edge_agent.common.mqtt_types import MessageProperties
from edge_agent.trust.command import SignedCommand, encode_command
from edge_agent.wire.topics import Topics
from fleet import (
    FleetHarness,
    daemon_config,
    start_daemon,
    start_device,
    stop_process,
    wait_until,
)
from fleet_server.admin.api import AdminServer, create_app
from fleet_server.admin.audit import Auditor
from fleet_server.admin.client import AdminClient
from fleet_server.admin.ops.diagnostics import diagnostics_routes
from fleet_server.cli.main import cli
from fleet_server.delivery.library import BundleLibrary
from fleet_server.diagnostics.book import CommandRecord
from fleet_server.diagnostics.commands import make_command, new_command_id, sign_command
from fleet_server.diagnostics.service import Diagnostics
from fleet_server.service import FleetService
from mosquitto import MOSQUITTO, fleet_broker, free_port

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

WAIT = 60.0  # generous: daemons start slowly on a loaded machine
TOKEN = "d" * 32


@pytest.fixture
def fleet(digits_bundles: DigitsBundles, tmp_path: Path) -> Iterator[FleetHarness]:
    with fleet_broker(tmp_path / "mqtt", ("dev-a", "dev-b")) as broker:
        harness = FleetHarness(broker, digits_bundles.keys, tmp_path / "fleet")
        try:
            yield harness
        finally:
            harness.close()


@pytest.fixture
def diag(
    fleet: FleetHarness, digits_bundles: DigitsBundles, tmp_path: Path
) -> Iterator[Diagnostics]:
    d = Diagnostics(
        fleet.registry,
        fleet.client,
        Topics(fleet.broker.prefix),
        [digits_bundles.keys.signer("online-1")],
        tmp_path / "diagnostics",
        clock=lambda: datetime.now(UTC),
        upload_retry_seconds=0.5,
    )
    fleet.gateway.attach_diagnostics(d)
    d.start()
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def ring() -> Iterator[LogRing]:
    ring = LogRing(max_records=1000)
    logger = logging.getLogger("edge_agent")
    logger.addHandler(ring)
    try:
        yield ring
    finally:
        logger.removeHandler(ring)


def _settled(diag: Diagnostics, record: CommandRecord, *states: str) -> CommandRecord:
    return wait_until(
        lambda: (r := diag.get(record.id)).state in states and r,
        WAIT,
        what=f"{record.name} {record.id} in {states}",
    )


def test_ping_logs_health_check_and_a_verified_support_bundle(
    fleet: FleetHarness, diag: Diagnostics, digits_bundles: DigitsBundles, ring: LogRing
) -> None:
    v1 = fleet.publish(digits_bundles.path(1))
    device = start_device(fleet.agent_config("dev-a"), log_ring=ring)
    fleet.devices["dev-a"] = device
    fleet.assign("dev-a", {"digits": v1})
    wait_until(lambda: device.agent.registry.get("digits") is not None, WAIT, what="v1 loaded")
    logging.getLogger("edge_agent.test").warning("marker <b>%s</b>", "\x1b[31m")

    (ping,) = diag.issue("ping", {}, device_id="dev-a").commands
    assert ping.state == "pending"
    assert ping.sequence == 1
    answered = _settled(diag, ping, "answered")
    assert answered.answer is not None
    assert answered.answer["ok"] is True
    assert answered.answer["result"]["last_sequence"] == 1

    (logs,) = diag.issue("logs", {"level": "warning"}, device_id="dev-a").commands
    result = _settled(diag, logs, "answered").answer
    assert result is not None
    messages = [r["msg"] for r in result["result"]["records"]]
    assert "marker <b>\x1b[31m</b>" in messages
    assert all(r["level"] in ("warning", "error", "critical") for r in result["result"]["records"])

    (check,) = diag.issue("health-check", {"model": "digits"}, device_id="dev-a").commands
    health = _settled(diag, check, "answered").answer
    assert health is not None
    assert health["result"]["ok"] is True
    assert health["result"]["total"] > 0
    (missing,) = diag.issue("health-check", {"model": "nope"}, device_id="dev-a").commands
    refused = _settled(diag, missing, "refused").answer
    assert refused is not None
    assert refused["error"]["code"] == "command_failed"

    (bundle,) = diag.issue("support-bundle", {}, device_id="dev-a").commands
    done = _settled(diag, bundle, "uploaded", "upload_failed")
    assert done.state == "uploaded", done.upload
    path = diag.bundle_path("dev-a", bundle.id)
    data = path.read_bytes()
    assert done.upload is not None
    assert hashlib.sha256(data).hexdigest() == done.upload["sha256"]
    assert len(data) == done.upload["length"]
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = set(tar.getnames())
        assert {"manifest.json", "status.json", "store.json", "config.json", "logs.jsonl"} <= names
        config = json.loads(tar.extractfile("config.json").read())  # type: ignore[union-attr]
        store = json.loads(tar.extractfile("store.json").read())  # type: ignore[union-attr]
        logs_jsonl = tar.extractfile("logs.jsonl").read()  # type: ignore[union-attr]
    assert config["device_id"] == "dev-a"
    assert "digits" in store
    assert b"marker" in logs_jsonl
    assert diag.stats()["bundles_uploaded"] == 1
    assert device.sync.counts["upload_blocks_sent"] >= 1
    assert device.sync.counts["commands_ran_support-bundle"] == 1


def test_an_offline_device_runs_its_command_on_reconnect_and_an_expired_one_never(
    fleet: FleetHarness, diag: Diagnostics
) -> None:
    fleet.start_device("dev-a")
    wait_until(lambda: "dev-a" in fleet.gateway.online(), WAIT, what="dev-a online")
    fleet.stop_device("dev-a")  # its persistent session stays on the broker
    (short,) = diag.issue("ping", {}, device_id="dev-a", ttl=timedelta(seconds=1)).commands
    (later,) = diag.issue("ping", {}, device_id="dev-a").commands
    _settled(diag, short, "expired")
    assert diag.get(later.id).state == "pending"

    device = fleet.start_device("dev-a")
    answered = _settled(diag, later, "answered")
    assert answered.answer is not None
    assert answered.answer["result"]["last_sequence"] == 2
    assert device.sync.counts["commands_ran_ping"] == 1  # the expired one did not run
    assert diag.get(short.id).state in ("expired", "refused")


def _publish(fleet: FleetHarness, device_id: str, data: bytes, correlation: str) -> None:
    topics = Topics(fleet.broker.prefix)
    fleet.client.publish(
        topics.device("commands", device_id),
        data,
        1,
        False,
        MessageProperties(
            response_topic=topics.device("command_resp", device_id),
            correlation_data=correlation.encode(),
        ),
    )


def test_forged_replayed_misaddressed_and_unknown_commands_are_refused_and_counted(
    fleet: FleetHarness, diag: Diagnostics, digits_bundles: DigitsBundles
) -> None:
    device = fleet.start_device("dev-a")
    wait_until(lambda: "dev-a" in fleet.gateway.online(), WAIT, what="dev-a online")
    keys = digits_bundles.keys
    online = keys.signer("online-1")
    now = datetime.now(UTC)

    forged = make_command("dev-a", 7, "ping", {}, now)
    _publish(fleet, "dev-a", sign_command(forged, [keys.signer("targets-1")]), new_command_id())
    other = make_command("dev-b", 7, "ping", {}, now)
    _publish(fleet, "dev-a", sign_command(other, [online]), new_command_id())
    good = sign_command(make_command("dev-a", 7, "ping", {}, now), [online])
    _publish(fleet, "dev-a", good, new_command_id())
    _publish(fleet, "dev-a", good, new_command_id())  # the same bytes again
    shell = SignedCommand(
        new_command_id(),
        "dev-a",
        8,
        "shell",
        {"cmd": "reboot"},
        now.replace(microsecond=0),
        now.replace(microsecond=0) + timedelta(minutes=5),
    )
    _publish(fleet, "dev-a", encode_command(shell, [online.sign(shell.signed_bytes())]), "ab" * 16)

    def counts() -> dict[str, int]:
        return device.sync.counts

    wait_until(lambda: counts().get("commands_refused_command_unknown") == 1, WAIT, what="refusals")
    c = counts()
    assert c["commands_refused_signature_threshold"] == 1
    assert c["commands_refused_mix_and_match"] == 1
    assert c["commands_refused_rollback"] == 1
    assert c["commands_ran_ping"] == 1
    # Each was answered (the server drops answers to commands it did not issue, and counts them).
    wait_until(lambda: diag.stats().get("answer_unknown") == 5, WAIT, what="5 answers")


def test_the_cli_through_the_admin_api_and_its_audit_log(
    fleet: FleetHarness, diag: Diagnostics, digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    keys = digits_bundles.keys
    service = FleetService(
        fleet.registry,
        BundleLibrary(tmp_path / "library", keys.trusted_root()),
        fleet.gateway,
        [keys.signer("online-1")],
        clock=lambda: datetime.now(UTC),
        ttl=timedelta(hours=1),
    )
    app = create_app(
        service,
        TOKEN,
        extra_routes=(lambda guard: diagnostics_routes(diag, guard),),
        auditor=Auditor(fleet.registry, lambda: datetime.now(UTC), max_body_bytes=1 << 20),
    )
    server = AdminServer(app, "127.0.0.1", 0)
    server.start()
    ring = LogRing()
    logging.getLogger("edge_agent").addHandler(ring)
    try:
        fleet.devices["dev-a"] = start_device(fleet.agent_config("dev-a"), log_ring=ring)
        wait_until(lambda: "dev-a" in fleet.gateway.online(), WAIT, what="dev-a online")
        logging.getLogger("edge_agent.test").error("cli marker \x07bell")
        url = ["--url", f"http://127.0.0.1:{server.port}", "--token", TOKEN]
        runner = CliRunner()
        ping = runner.invoke(cli, ["devices", "ping", "dev-a", *url])
        assert ping.exit_code == 0, ping.output
        assert "answered" in ping.output
        logs = runner.invoke(cli, ["devices", "logs", "dev-a", "--level", "error", *url])
        assert logs.exit_code == 0, logs.output
        assert "cli marker \\x07bell" in logs.output  # the control character is escaped
        out = tmp_path / "bundle.tar.gz"
        bundle = runner.invoke(cli, ["devices", "support-bundle", "dev-a", "-o", str(out), *url])
        assert bundle.exit_code == 0, bundle.output
        with tarfile.open(out, "r:gz") as tar:
            assert "logs.jsonl" in tar.getnames()
        listed = runner.invoke(cli, ["devices", "commands", "dev-a", *url])
        assert listed.output.count("answered") == 2
        assert "uploaded" in listed.output
        with AdminClient(f"http://127.0.0.1:{server.port}", TOKEN) as client:
            entries = client.audit(action="POST /v1/devices/{device_id}/commands")
        outcomes = [e for e in entries if e["status"] is not None]
        assert [e["status"] for e in outcomes] == [202, 202, 202], entries
        assert {e["object"] for e in outcomes} == {"device:dev-a"}
        neither = runner.invoke(cli, ["devices", "restart", *url])
        assert neither.exit_code == 2, neither.output  # a DEVICE_ID or --group, not neither
        assert "give a DEVICE_ID or --group" in neither.output
        sent = runner.invoke(cli, ["devices", "ping", "dev-a", "--no-wait", "--json", *url])
        assert sent.exit_code == 0, sent.output
        (record,) = json.loads(sent.output)
        assert (record["device_id"], record["name"]) == ("dev-a", "ping")
    finally:
        logging.getLogger("edge_agent").removeHandler(ring)
        server.stop()


def test_a_real_agent_restarts_on_command_with_exit_code_75(
    fleet: FleetHarness, diag: Diagnostics, digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    config = daemon_config(
        fleet.broker, digits_bundles.keys, tmp_path / "daemons", "dev-b", free_port()
    )
    log = tmp_path / "dev-b.log"
    proc = start_daemon(config, log)
    try:
        wait_until(lambda: "dev-b" in fleet.gateway.online(), WAIT, what="dev-b online")
        (restart,) = diag.issue("restart", {}, device_id="dev-b").commands
        answered = _settled(diag, restart, "answered")
        assert answered.answer is not None
        assert answered.answer["result"] == {"restarting": True, "exit_code": 75}
        assert proc.wait(WAIT) == 75
        assert "restart requested by a signed remote command" in log.read_text()

        proc = start_daemon(config, log)  # what the service manager does on exit 75
        (ping,) = diag.issue("ping", {}, device_id="dev-b").commands
        pong = _settled(diag, ping, "answered").answer
        assert pong is not None
        assert pong["result"]["last_sequence"] == 2
        assert proc.poll() is None  # the restart was not run a second time
    finally:
        stop_process(proc)
