"""Cloud fallback answers with the version each device runs: real Mosquitto (TLS, ACLs), the
fallback worker with the registry-backed source (``RegistryCloudModels``, as ``fleet-server
serve`` wires it) over a real SQLite registry and real bundles run with onnxruntime.

v1 (good) and v2 (a published candidate that answers differently) are both published: a device
on v1 still gets v1's answers, a device on v2 gets v2's, an agent older than ``model_version``
gets what the registry says it runs, and a version that is not published is refused with a
typed reply instead of being answered by the newest bundle.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_fallback_mqtt import WAIT, agent, connect

from bundles import DigitsBundles, misnormalised_bundle
from edge_agent.common.mqtt import MqttClient
from edge_agent.errors import FallbackRemoteError
from edge_agent.serving.fallback_mqtt import MqttFallbackTransport
from edge_agent.serving.service import InferenceRequest
from edge_agent.wire.fallback import FallbackRequest, FallbackResponse
from edge_agent.wire.reported import ModelReport, ReportedState
from edge_agent.wire.topics import Topics
from fleet_server.fallback.cloud_models import CloudModels, RegistryCloudModels
from fleet_server.fallback.worker import FallbackWorker
from fleet_server.registry.store import Registry
from mosquitto import FleetBroker, broker_fixture

broker = broker_fixture(scope="module", devices=("dev-a", "dev-b"))


@pytest.fixture
def clients() -> Iterator[list[MqttClient]]:
    made: list[MqttClient] = []
    yield made
    for c in made:
        c.close()


@pytest.fixture
def fleet(tmp_path: Path, digits_bundles: DigitsBundles) -> Iterator[tuple[Registry, Path, Path]]:
    """A registry with digits v1 (good) and v2 (answers differently) published."""
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    store = tmp_path / "bundles"
    store.mkdir()
    v2 = misnormalised_bundle(digits_bundles, 2, tmp_path)
    for version, path in ((1, digits_bundles.path(1)), (2, v2)):
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        shutil.copy(path, store / f"{sha}.bundle")
        registry.publish_bundle(
            "digits", version, channel="stable", sha256=sha, length=len(data), targets_sha256=sha
        )
    for device, version in (("dev-a", 1), ("dev-b", 2)):
        registry.enroll(device)
        state = ReportedState(device, 0.0, models={"digits": ModelReport(active=version)})
        registry.record_reported(device, state.to_dict())
    yield registry, store, v2
    registry.close()


def start_worker(
    made: list[MqttClient], b: FleetBroker, registry: Registry, store: Path, root: Any
) -> FallbackWorker:
    source = RegistryCloudModels(registry, store, lambda: root, clock=lambda: datetime.now(UTC))
    client = connect(made, b, b.server, announce_status=False, clean_start=True, session_expiry=0)
    w = FallbackWorker(client, {}, Topics(b.prefix), "fbv", source=source)
    w.start()
    return w


def local_answers(path: Path, root: Any, x: np.ndarray) -> np.ndarray:
    m = CloudModels.from_bundles([path], root, now=datetime.now(UTC))["digits"]
    return np.asarray(m.run({"input": x})["probabilities"])


def ask_raw(client: MqttClient, b: FleetBroker, device: str, x: np.ndarray) -> FallbackResponse:
    """A request as an agent before ``model_version`` sent it (no version field)."""
    topics = Topics(b.prefix)
    payload = FallbackRequest("digits", {"input": x}, 5000.0).to_bytes()
    assert b'"model_version"' not in payload
    msg = client.request(
        topics.fallback_req(device), payload, topics.fallback_resp(device, "old"), WAIT
    )
    return FallbackResponse.from_bytes(msg.payload)


def test_each_device_gets_the_answers_of_the_version_it_runs(
    broker: FleetBroker,
    clients: list[MqttClient],
    fleet: tuple[Registry, Path, Path],
    digits_bundles: DigitsBundles,
    tmp_path: Path,
) -> None:
    registry, store, v2_path = fleet
    root = digits_bundles.keys.trusted_root()
    x = digits_bundles.x_eval[:32]
    want1 = local_answers(digits_bundles.path(1), root, x)
    want2 = local_answers(v2_path, root, x)
    assert not np.allclose(want1, want2, atol=1e-3)  # the versions are told apart
    w = start_worker(clients, broker, registry, store, root)

    # An agent on v1 (prefer_cloud: every request goes to the cloud) while v2 is published.
    dev_a = connect(clients, broker, "dev-a")
    a = agent(
        tmp_path / "a",
        digits_bundles,
        MqttFallbackTransport(dev_a, Topics(broker.prefix), "dev-a"),
        "prefer_cloud",
        install=True,
        deadline_ms=5000,
    )
    try:
        res = a.infer(InferenceRequest("digits", {"input": x}))
    finally:
        a.close()
    assert (res.source, res.parameters["model_version"]) == ("cloud", "1")
    np.testing.assert_allclose(res.outputs["probabilities"], want1, atol=1e-5)

    # A device on v2 names v2 and gets v2's answers.
    dev_b = connect(clients, broker, "dev-b")
    tb = MqttFallbackTransport(dev_b, Topics(broker.prefix), "dev-b")
    out = tb.request("digits", {"input": x}, deadline_s=5.0, reason="policy", model_version=2)
    np.testing.assert_allclose(out["probabilities"], want2, atol=1e-5)

    # A version that is not published is refused, typed; never the newest bundle instead.
    with pytest.raises(FallbackRemoteError) as err:
        tb.request("digits", {"input": x}, deadline_s=5.0, reason="policy", model_version=3)
    assert err.value.remote_code == "unknown_version"

    # Agents older than model_version: the registry says what each runs.
    old_a, old_b = ask_raw(dev_a, broker, "dev-a", x), ask_raw(dev_b, broker, "dev-b", x)
    assert (old_a.model_version, old_b.model_version) == ("1", "2")
    np.testing.assert_allclose(old_a.outputs["probabilities"], want1, atol=1e-5)
    np.testing.assert_allclose(old_b.outputs["probabilities"], want2, atol=1e-5)
    # ... and one the registry knows no version for is refused with the code it knows.
    state = ReportedState("dev-b", 0.0, models={})
    registry.record_reported("dev-b", state.to_dict())
    old = ask_raw(dev_b, broker, "dev-b", x)
    assert (old.ok, old.error_code) == (False, "unknown_model")
    w.close()
    stats = w.stats()
    assert stats["models_loaded"] == 2
    assert stats["errors_unknown_version"] == 1
