"""Ground truth from a real agent to the server's accuracy, in one chain.

A real ``Agent`` serving the digits model with onnxruntime answers requests through its v2 API;
the application labels them (``POST .../feedback``); the agent's telemetry reports (built from
its status exactly as the sync loop builds them) are stored by the registry's ingest; the
server's ``model_accuracy`` shows the same counts, with the interval, that the labels and the
agent's answers give.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from bundles import DigitsBundles
from edge_agent.api.app import create_app
from edge_agent.config import AgentConfig, ApiConfig, StoreConfig
from edge_agent.quality.confusion import Confusion, wilson_interval
from edge_agent.serving.agent import Agent
from edge_agent.store import ModelStore
from edge_agent.wire.telemetry import report_from_status
from fleet_server.history.accuracy import model_accuracy
from fleet_server.registry.store import Registry
from support import DEVICE


@pytest.fixture
def agent(tmp_path: Path, digits_bundles: DigitsBundles) -> Iterator[Agent]:
    config = AgentConfig(device_id="dev-1", store=StoreConfig(state_dir=str(tmp_path / "s")))
    store = ModelStore(tmp_path / "s", digits_bundles.keys.trusted_root(), DEVICE)
    a = Agent(config, store, background_drift=False)
    a.install(digits_bundles.path(1))
    a.start()
    yield a
    a.close()


def test_labels_told_to_a_device_reach_the_servers_accuracy(
    tmp_path: Path, agent: Agent, digits_bundles: DigitsBundles
) -> None:
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    registry.enroll("dev-1", group="line-1")
    registry.publish_bundle("digits", 1, channel="stable", sha256="1" * 64, length=10,
                            targets_sha256="3" * 64)  # fmt: skip
    start = datetime.now(UTC) - timedelta(minutes=1)

    def send(seq: int) -> None:
        report = report_from_status("dev-1", seq, agent.status(), [], float(seq))
        registry.ingest("dev-1", [report])

    send(1)  # the baseline: no labels yet
    x, y = digits_bundles.x_eval[:40], digits_bundles.y_eval[:40]
    truth = Confusion.zero(10)
    with TestClient(create_app(agent, ApiConfig())) as client:
        for i in range(0, 40, 4):  # batches of four rows, labelled row by row
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [4, 64],
                                "data": x[i : i + 4].reshape(-1).tolist()}]}  # fmt: skip
            doc = client.post("/v2/models/digits/infer", json=body).json()
            out = doc["outputs"][0]
            predicted = np.asarray(out["data"]).reshape(out["shape"]).argmax(axis=1)
            labels = [int(v) for v in y[i : i + 4]]
            got = client.post(
                "/v2/models/digits/feedback", json={"id": doc["id"], "labels": labels}
            )
            assert got.json()["counted"] == 4
            truth = truth.merge(Confusion.from_labels(y[i : i + 4], predicted, 10))
    send(2)
    [v1] = model_accuracy(registry, "digits", start)["versions"]
    fleet = v1["fleet"]
    assert (fleet["n"], fleet["correct"]) == (40, truth.correct)
    assert (fleet["low"], fleet["high"]) == pytest.approx(wilson_interval(truth.correct, 40))
    assert v1["groups"]["line-1"]["n"] == 40
    registry.close()
