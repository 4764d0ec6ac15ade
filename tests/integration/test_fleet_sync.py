"""Fleet sync end to end: real Mosquitto (TLS, ACLs), gateway, registry and agents.

Desired state in, signed bundles delivered in blocks and installed, reported state and
telemetry back with end-to-end acknowledgements; and the faults the sync layer promises to
survive: replayed desired state, a bundle that fails its builder signature, the server down
for a while (nothing lost, nothing duplicated), the broker killed mid-transfer.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from bundles import DigitsBundles, build_digits_bundles
from edge_agent.serving.service import InferenceRequest
from edge_agent.sync.transfer_store import PartialDownload
from edge_agent.wire.transfer import BlockPlan
from fleet import FleetHarness, daemon_config, wait_until
from fleet_server.config import GatewayConfig
from mosquitto import MOSQUITTO, FleetBroker, fleet_broker

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

DEVICES = ("dev-a", "dev-b")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[FleetBroker]:
    with fleet_broker(tmp_path / "mqtt", DEVICES) as b:
        yield b


@pytest.fixture
def fleet(
    broker: FleetBroker, digits_bundles: DigitsBundles, tmp_path: Path
) -> Iterator[FleetHarness]:
    harness = FleetHarness(broker, digits_bundles.keys, tmp_path / "fleet")
    try:
        yield harness
    finally:
        harness.close()


def _reported(fleet: FleetHarness, device_id: str, name: str = "digits") -> dict[str, object]:
    rec = fleet.registry.get_device(device_id)
    models = (rec.reported or {}).get("models", {})
    return dict(models.get(name, {}))


def _active(fleet: FleetHarness, device_id: str, version: int) -> bool:
    r = _reported(fleet, device_id)
    return r.get("active") == version and r.get("outcome") == "installed"


def _infer(fleet: FleetHarness, device_id: str, x: np.ndarray) -> str:
    agent = fleet.devices[device_id].agent
    result = agent.infer(InferenceRequest(model="digits", inputs={"input": x}))
    return result.model_version


def test_model_delivered_installed_reported_and_telemetry_acknowledged(
    fleet: FleetHarness, digits_bundles: DigitsBundles
) -> None:
    v1 = fleet.publish(digits_bundles.path(1))
    for d in DEVICES:
        fleet.start_device(d)
        fleet.assign(d, {"digits": v1})
    for d in DEVICES:
        wait_until(lambda d=d: _active(fleet, d, 1), what=f"{d} runs v1")
        assert _infer(fleet, d, digits_bundles.x_eval[:4]) == "1"
    # Telemetry: reports and the 'installed' event reach the registry and are acknowledged.
    for d in DEVICES:
        wait_until(
            lambda d=d: any(
                t.kind == "event" and t.payload.get("kind") == "installed"
                for t in fleet.registry.telemetry(device_id=d, limit=1000)
            ),
            what=f"{d}'s installed event",
        )
        wait_until(
            lambda d=d: (
                fleet.devices[d].sync.outbox.stats().entries == 0
                and fleet.registry.seq_state(d).acked_upto >= 3
            ),
            what=f"{d}'s outbox drained by acks",
        )
        state = fleet.registry.seq_state(d)
        assert state.lost == 0
        assert state.gaps == 0
    reports = [
        t.payload
        for t in fleet.registry.telemetry(device_id="dev-a", limit=1000)
        if t.kind == "report"
    ]
    assert any(r["models"].get("digits", {}).get("outcomes", {}).get("ok") for r in reports)
    stats = fleet.gateway.stats()
    assert stats.acks_sent >= 2
    assert stats.reported_stored >= 2

    # An update: v2 replaces v1, v1 stays kept for rollback.
    v2 = fleet.publish(digits_bundles.path(2))
    fleet.assign("dev-a", {"digits": v2})
    wait_until(lambda: _active(fleet, "dev-a", 2), what="dev-a runs v2")
    assert _reported(fleet, "dev-a")["kept"] == [2, 1]
    assert _infer(fleet, "dev-a", digits_bundles.x_eval[:1]) == "2"
    assert _active(fleet, "dev-b", 1)  # another device's assignment is not ours


def test_replayed_desired_state_is_refused_and_counted(
    fleet: FleetHarness, digits_bundles: DigitsBundles
) -> None:
    v1 = fleet.publish(digits_bundles.path(1))
    v2 = fleet.publish(digits_bundles.path(2))
    device = fleet.start_device("dev-a")
    old = fleet.assign("dev-a", {"digits": v1})
    wait_until(lambda: _active(fleet, "dev-a", 1))
    fleet.assign("dev-a", {"digits": v2})
    wait_until(lambda: _active(fleet, "dev-a", 2))
    fleet.gateway.publish_desired("dev-a", old.document)  # a replay of the older document
    wait_until(lambda: device.sync.counts["desired_rejected"] == 1, what="replay refused")
    assert _infer(fleet, "dev-a", digits_bundles.x_eval[:1]) == "2"
    wait_until(
        lambda: any(
            t.payload.get("kind") == "desired_rejected"
            for t in fleet.registry.telemetry(device_id="dev-a", limit=1000)
        ),
        what="desired_rejected event at the server",
    )


def test_bundle_failing_its_signature_is_not_installed(
    fleet: FleetHarness, digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    v1 = fleet.publish(digits_bundles.path(1))
    device = fleet.start_device("dev-a")
    fleet.assign("dev-a", {"digits": v1})
    wait_until(lambda: _active(fleet, "dev-a", 1))
    # v2 signed by a builder key the device does not trust; the server (compromised or wrong)
    # names it with a valid online signature and the right digest.
    foreign = build_digits_bundles(tmp_path / "foreign")
    bad = fleet.publish(foreign.path(2))
    fleet.assign("dev-a", {"digits": bad})
    wait_until(lambda: _reported(fleet, "dev-a").get("outcome") == "failed", what="refusal")
    assert _reported(fleet, "dev-a")["active"] == 1
    assert device.sync.counts["install_failures"] == 1
    assert _infer(fleet, "dev-a", digits_bundles.x_eval[:1]) == "1"
    # Named again (a new desired-state version): refused from memory, not downloaded again.
    requests = fleet.gateway.stats().block_requests
    fleet.assign("dev-a", {"digits": bad})
    wait_until(
        lambda: "refused before" in str(_reported(fleet, "dev-a").get("reason")),
        what="the remembered refusal",
    )
    assert fleet.gateway.stats().block_requests == requests
    assert device.sync.counts["install_failures"] == 1


def test_server_down_loses_and_duplicates_nothing(
    fleet: FleetHarness, digits_bundles: DigitsBundles
) -> None:
    device = fleet.start_device("dev-a", report_interval_seconds=0.2)
    wait_until(lambda: fleet.registry.seq_state("dev-a").acked_upto >= 2)
    fleet.stop_server()
    wait_until(lambda: device.sync.outbox.stats().entries >= 10, what="reports buffered offline")
    # Stop producing, bring the server back, restart the agent: its outbox (on disk) drains.
    fleet.stop_device("dev-a")
    fleet.start_server()
    device = fleet.start_device("dev-a", report_interval_seconds=3600)
    wait_until(lambda: device.sync.outbox.stats().entries == 0, timeout=30, what="drain")
    seqs = [t.seq for t in fleet.registry.telemetry(device_id="dev-a", limit=10_000)]
    assert seqs == sorted(set(seqs)), "duplicates stored"
    assert seqs == list(range(1, len(seqs) + 1)), "a gap: something was lost"
    state = fleet.registry.seq_state("dev-a")
    assert state.lost == 0
    assert state.gaps == 0
    assert state.acked_upto == len(seqs)


@pytest.fixture(scope="module")
def wide_bundle(digits_bundles: DigitsBundles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multi-block bundle (the 1.1M-parameter MLP in fp16, about 2.3 MB) under the same keys."""
    from model_builder.build import build_bundle
    from model_builder.config import BuildConfig
    from model_builder.data import Dataset
    from model_builder.examples import digits_wide_mlp

    ex = digits_wide_mlp()
    result = build_bundle(
        ex.model_bytes,
        "onnx",
        Dataset({ex.input_name: ex.x_calib}, None),
        Dataset({ex.input_name: ex.x_eval}, ex.y_eval),
        (ex.input_contract(max_batch=64), ex.output_contract()),
        BuildConfig(name="wide", version=1, mode="fp16", measure_latency=False, arch=("any",)),
        digits_bundles.keys,
        now=datetime.now(UTC),
    )
    path = tmp_path_factory.mktemp("wide") / "wide-1.efb"
    path.write_bytes(result.bundle)
    return path


def test_broker_killed_mid_transfer_resumes_and_installs_whole_file(
    broker: FleetBroker, digits_bundles: DigitsBundles, wide_bundle: Path, tmp_path: Path
) -> None:
    # Throttled so the transfer takes seconds and the kill lands in the middle of it.
    config = GatewayConfig(
        prefix=broker.prefix, bundles_dir=tmp_path / "bundles", max_blocks_per_second=10
    )
    fleet = FleetHarness(broker, digits_bundles.keys, tmp_path / "fleet", gateway_config=config)
    try:
        record = fleet.publish(wide_bundle)
        total = -(-record.length // (64 * 1024))
        assert total >= 20
        device = fleet.start_device("dev-a", block_window=4)
        fleet.assign("dev-a", {"wide": record})

        def received() -> int:
            dl = device.sync.status()["downloads"].get("wide")
            return int(dl["received"]) if dl else 0

        wait_until(lambda: received() >= 8, what="transfer under way")
        broker.kill()
        at_kill = received()
        assert 0 < at_kill < total
        broker.start()
        wait_until(
            lambda: _reported(fleet, "dev-a", "wide").get("outcome") == "installed", timeout=60
        )
        assert device.agent.store.state("wide").active == 1
        # Resumed, not restarted: the blocks received before the kill were not asked for again.
        assert fleet.gateway.stats().blocks_unicast + fleet.gateway.stats().blocks_broadcast < (
            total + at_kill
        )
        # A broker without persistence loses every retained message on restart: the device
        # publishes its (unchanged) reported state again once it is reconnected.
        stored = fleet.gateway.stats().reported_stored
        broker.kill()
        broker.start()
        wait_until(
            lambda: fleet.gateway.stats().reported_stored > stored,
            timeout=30,
            what="the reported state published again after the broker restart",
        )
        assert _reported(fleet, "dev-a", "wide").get("outcome") == "installed"
    finally:
        fleet.close()


def test_garbage_on_the_device_topics_is_counted_and_serving_goes_on(
    fleet: FleetHarness, digits_bundles: DigitsBundles
) -> None:
    v1 = fleet.publish(digits_bundles.path(1))
    device = fleet.start_device("dev-a")
    fleet.assign("dev-a", {"digits": v1})
    wait_until(lambda: _active(fleet, "dev-a", 1))
    topics = fleet.gateway._topics  # the server identity may write every device topic
    for payload in (b"", b"not json", b"{}", b'{"signed": {}, "signatures": []}', b"x" * 300_000):
        fleet.client.publish(topics.device("desired", "dev-a"), payload, 1, False)
    for payload in (b"", b"\x00\x05hello", b"\xff" * 70_000):
        fleet.client.publish(topics.device("blocks_resp", "dev-a"), payload, 1, False)
        fleet.client.publish(topics.broadcast("w1"), payload, 1, False)
    fleet.client.publish(topics.device("ack", "dev-a"), b"garbage", 1, False)
    wait_until(lambda: device.sync.counts["desired_rejected"] == 5, what="desired refusals")
    wait_until(lambda: device.sync.counts["bad_blocks"] == 6, what="block refusals")
    wait_until(lambda: device.sync.uplink.stats().bad_acks == 1, what="ack refusal")
    assert _infer(fleet, "dev-a", digits_bundles.x_eval[:1]) == "1"
    assert _active(fleet, "dev-a", 1)


def test_agent_killed_during_a_transfer_resumes_after_restart(
    broker: FleetBroker, digits_bundles: DigitsBundles, wide_bundle: Path, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys

    from mosquitto import free_port

    config = GatewayConfig(
        prefix=broker.prefix, bundles_dir=tmp_path / "bundles", max_blocks_per_second=10
    )
    fleet = FleetHarness(broker, digits_bundles.keys, tmp_path / "fleet", gateway_config=config)
    procs: list[subprocess.Popen[bytes]] = []
    log = (tmp_path / "daemon.log").open("ab")

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "edge-agent"), "run", "--config", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        return proc

    def transfer() -> dict[str, int]:
        return dict(_reported(fleet, "dev-a", "wide").get("transfer") or {})

    try:
        record = fleet.publish(wide_bundle)
        path = daemon_config(
            broker,
            digits_bundles.keys,
            fleet.directory,
            "dev-a",
            free_port(),
            sync="block_window = 4\nblock_retry_seconds = 0.5\n",
        )
        proc = start()
        fleet.assign("dev-a", {"wide": record})
        # The bitmap is persisted every 16 blocks: kill after at least one checkpoint.
        wait_until(lambda: transfer().get("received_blocks", 0) >= 20, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        downloads = fleet.directory / "dev-a" / "state" / "sync" / "downloads"
        part = next(downloads.rglob("*.part"))
        assert part.stat().st_size == record.length  # preallocated, never a byte more
        with PartialDownload(part.parent, BlockPlan(record.length, record.sha256)) as pd:
            resumed = pd.resumed_blocks  # what a restart finds durably on disk
        assert resumed >= 16
        stats = fleet.gateway.stats()
        sent_before = stats.blocks_unicast + stats.blocks_broadcast
        start()
        wait_until(
            lambda: _reported(fleet, "dev-a", "wide").get("outcome") == "installed", timeout=90
        )
        assert _reported(fleet, "dev-a", "wide")["active"] == 1
        total = -(-record.length // (64 * 1024))
        stats = fleet.gateway.stats()
        # Resumed, not restarted: fewer blocks than the whole bundle were sent after the kill.
        assert stats.blocks_unicast + stats.blocks_broadcast - sent_before < total
        assert not list(downloads.rglob("*.part"))

        def status() -> str:
            return subprocess.run(
                [str(Path(sys.executable).parent / "edge-agent"), "status", "--config", str(path)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            ).stdout

        # The daemon's sync loop writes its status once a second; the CLI shows it.
        text = wait_until(lambda: next((t for t in [status()] if "wide: installed" in t), None))
        assert "fleet sync: connected" in text
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        log.close()
        fleet.close()
