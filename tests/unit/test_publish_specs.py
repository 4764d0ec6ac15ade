"""Every publisher sends with the QoS and retain flag ``TOPIC_SPECS`` gives its topic's kind.

One fleet on the in-memory broker (``MemoryBroker.published`` counts every publish, wills
included, by ``(topic, qos, retain)`` as the publisher sent it): the gateway (desired state,
acks, clearing a garbage retained status), remote diagnostics (a signed command, its answer,
a support bundle's block requests and blocks), certificate renewal (the device's renewer and the
CA's renewal service), a device's sync loop and MQTT session (status
online/offline and its will, reported state, telemetry, block requests), block delivery
(unicast and broadcast) and the cloud-fallback worker and client (request, response). Each
kind with a publisher (all but ``events``) must have been published at least once, so a
publisher that stops running fails the test rather than passing it vacuously. Every publish
the test itself makes goes through ``Topics.publication`` too, so the whole journal is checked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clock import FakeClock
from edge_agent.common.identity import IdentityStore
from edge_agent.common.memory import MemoryBroker
from edge_agent.config import AgentConfig, StoreConfig, SyncConfig
from edge_agent.serving.agent import Agent
from edge_agent.store import ModelStore
from edge_agent.sync.loop import SyncAgent
from edge_agent.sync.ops.renewal import CertRenewer
from edge_agent.trust import TrustedRoot
from edge_agent.trust.assignment import ModelAssignment
from edge_agent.wire.fallback import FallbackRequest, FallbackResponse
from edge_agent.wire.telemetry import Event
from edge_agent.wire.topics import KINDS, TOPIC_SPECS, Topics
from edge_agent.wire.transfer import BlockPlan, BlockRequest
from fleet_server.config import GatewayConfig
from fleet_server.delivery.block_server import BlockServer, Pacer
from fleet_server.delivery.desired import make_desired_state, sign_desired_state
from fleet_server.diagnostics.service import Diagnostics
from fleet_server.fallback.cloud_models import CloudModel
from fleet_server.fallback.worker import FallbackWorker
from fleet_server.gateway.gateway import Gateway
from fleet_server.pki.ca import CertificateAuthority
from fleet_server.pki.renewal import RenewalService
from fleet_server.registry.store import Registry
from model_builder.keystore import KeyStore
from support import DEVICE

T = Topics()
WAIT = 10.0  # deadline for another thread's answer (normally milliseconds)


class _Runtime:
    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        return {"probabilities": np.ones((np.asarray(feeds["input"]).shape[0], 3), np.float32)}


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    r = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    r.upgrade()
    for device in ("dev-1", "dev-2", "dev-3"):
        r.enroll(device, group="test")
    yield r
    r.close()


def _check_journal(broker: MemoryBroker) -> set[str]:
    """Every publish against its kind's spec; returns the kinds seen."""
    seen: set[str] = set()
    for (topic, qos, retain), _n in broker.published().items():
        kind = T.parse(topic)[0]
        spec = TOPIC_SPECS[kind]
        assert (qos, retain) == (spec.qos, spec.retain), (topic, qos, retain)
        seen.add(kind)
    return seen


def test_every_publish_uses_its_topic_spec(tmp_path: Path, registry: Registry) -> None:
    clock = FakeClock()
    keys = KeyStore.init(tmp_path / "keys", now=datetime.now(UTC))
    broker = MemoryBroker(clock=clock, blocking=True)

    # A bundle the device is told to fetch (its content is never installed: only the
    # transfer matters here), published where the gateway's block server reads bundles.
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    data = bytes(range(256)) * 600
    sha = hashlib.sha256(data).hexdigest()
    (bundles / f"{sha}.bundle").write_bytes(data)
    registry.publish_bundle(
        "m", 1, channel="stable", sha256=sha, length=len(data), targets_sha256="0" * 64
    )

    server = broker.client("fleet.server")
    gateway = Gateway(
        registry,
        server,
        GatewayConfig(bundles_dir=bundles, ingest_max_wait_seconds=0.0),
        clock=clock.time,
    )
    gateway.start()
    server.connect()
    fallback_client = broker.client("fallback.server")
    worker = FallbackWorker(
        fallback_client,
        {"m": CloudModel("m", "7", _Runtime())},  # type: ignore[arg-type]
        T,
        "fleet-fallback",
    )
    worker.start()
    fallback_client.connect()

    state = tmp_path / "dev-1"
    config = AgentConfig(
        device_id="dev-1", store=StoreConfig(state_dir=str(state)), sync=SyncConfig(enabled=True)
    )
    agent = Agent(config, ModelStore(state, TrustedRoot.from_bytes(keys.root_chain()[0]), DEVICE))
    device = broker.client("dev-1", announce_status=True, clock=clock.time)
    sync = SyncAgent(config, agent, client=device, clock=clock.time)
    try:
        # desired (gateway) -> status online, reported, block requests (device) -> blocks_resp
        assignment = ModelAssignment(
            version=1,
            channel="stable",
            bundle_sha256=sha,
            bundle_length=len(data),
            targets_sha256="0" * 64,
        )
        desired = make_desired_state(
            "dev-1", 1, {"m": assignment}, datetime.now(UTC), timedelta(hours=1)
        )
        gateway.publish_desired("dev-1", sign_desired_state(desired, [keys.signer("online-1")]))
        sync.start(background=False)
        for _ in range(20):
            broker.pump()
            sync.step()
            clock.advance(1.0)
        # telemetry (device) -> ack (gateway)
        sync.uplink.add_event(Event("dev-1", 0, "installed", clock.time(), model="m", version=1))
        sync.step()
        assert broker.pump_until(lambda: sync.outbox.stats().entries == 0, WAIT), "not acked"

        # A garbage retained status: the gateway clears it (an empty retained message).
        other = broker.client("dev-2")
        other.connect()
        garbage = T.publication("status", "dev-2")
        other.publish(garbage.topic, b"not json", garbage.qos, garbage.retain)
        assert broker.pump_until(lambda: broker.retained(garbage.topic) is None, WAIT)

        # A wave: the block server broadcasts.
        gateway_blocks = BlockServer(
            registry,
            server,
            T,
            bundles_dir=bundles,
            block_size=65536,
            broadcast_min_devices=2,
            round_seconds=0.1,
            pacer=Pacer(1000.0, monotonic=clock, sleep=clock.advance),
            count=lambda _name, _n: None,
            monotonic=clock,
        )
        plan = BlockPlan(len(data), sha, 65536)
        gateway_blocks.serve_round(
            [
                ("dev-2", BlockRequest(plan.transfer_id, ((0, 1),))),
                ("dev-3", BlockRequest(plan.transfer_id, ((0, 2),))),  # block 1: unicast
            ]
        )
        gateway_blocks.close()

        # Cloud fallback: request (device) -> answer (worker).
        asker = broker.client("dev-3")
        asker.connect()
        request = FallbackRequest("m", {"input": np.zeros((1, 4), np.float32)}, 1000.0)
        answer = asker.request(
            T.fallback_req("dev-3"), request.to_bytes(), T.fallback_resp("dev-3", "tok"), WAIT
        )
        assert FallbackResponse.from_bytes(answer.payload).ok

        # Remote diagnostics: a signed command (server) -> its answer (device); a support
        # bundle: block requests (server) -> its blocks (device).
        diag = Diagnostics(
            registry,
            server,
            T,
            [keys.signer("online-1")],
            tmp_path / "diag",
            clock=clock.wall,  # the device's clock: a command is fresh by it
            monotonic=clock,
        )
        gateway.attach_diagnostics(diag)
        sync.commands.start()  # the command thread (started with the sync thread in a daemon)
        (bundle,) = diag.issue("support-bundle", {}, device_id="dev-1").commands

        def uploaded() -> bool:
            sync.step()
            diag.tick()
            return diag.get(bundle.id).state in ("uploaded", "upload_failed")

        assert broker.pump_until(uploaded, WAIT), (diag.get(bundle.id), sync.commands.stats())
        assert diag.get(bundle.id).state == "uploaded"
        diag.close()

        # Certificate renewal: request, confirm (device) -> certificate, confirmation (the CA).
        now = datetime.now(UTC)
        ca = CertificateAuthority.init(tmp_path / "ca", now=now)
        identity = IdentityStore(tmp_path / "dev-4")
        identity.provision_ca(ca.cert_pem)
        first = ca.sign_csr(identity.write_csr("dev-4"), "dev-4", now=now)
        identity.install_certificate(first, "dev-4", now)
        RenewalService(ca, server, group="fleet-ca").start()
        renewing = broker.client("dev-4")
        renewing.connect()
        req = T.publication("cert_req", "dev-4")
        renewer = CertRenewer(
            identity,
            "dev-4",
            publish=lambda b: renewing.publish(req.topic, b, req.qos, req.retain),
            switch=lambda *_a: None,
            event=lambda *_a: None,
            now=lambda: now + timedelta(days=300),  # past 2/3 of its year
        )
        renewing.subscribe(T.device("cert_resp", "dev-4"), renewer.on_response)
        renewer.drive()
        assert broker.pump_until(lambda: (renewer.drive(), renewer.state)[1] == "idle", WAIT)
        assert renewer.renewals == 1
        renewing.close()

        # The device goes away twice: a dropped connection (its will), then a clean close.
        device.drop()
        device.reconnect()
        broker.pump()
    finally:
        sync.close()
        agent.close()
        worker.close()
        gateway.close()
        server.close()
        fallback_client.close()

    # ``events``: no production code publishes there (agents send events inside telemetry
    # batches); the gateway still consumes the topic.
    assert _check_journal(broker) == set(KINDS) - {"events"}
    status = T.device_status("dev-1")
    spec = TOPIC_SPECS["status"]
    # online twice, the will and the shutdown status: all retained, at the spec's QoS.
    assert broker.published()[(status, spec.qos, spec.retain)] >= 4
    retained = broker.retained(status)
    assert retained is not None
    assert b"shutdown" in retained.payload


def test_the_journal_check_catches_a_wrong_flag() -> None:
    """The check above can fail: a reported state published without retain is caught."""
    broker = MemoryBroker()
    c = broker.client("dev-1")
    c.connect()
    c.publish(T.device_reported("dev-1"), b"{}", 1, False)
    with pytest.raises(AssertionError):
        _check_journal(broker)
