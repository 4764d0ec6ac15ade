"""Ground-truth feedback through the v2 API on a real agent (onnxruntime, the digits model).

Infer, report the true labels by request id (``POST /v2/models/digits/feedback``), and the
confusion counts are in the agent's status and in the telemetry report it would publish; a
table of hostile feedback bodies gets 400/404 with the protocol's ``{"error": ...}`` and never
counts anything; the CLI's client speaks the same endpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from bundles import DigitsBundles
from edge_agent.api.app import create_app
from edge_agent.api.grpc_v2.codec import encode_infer
from edge_agent.cli.main import cli
from edge_agent.client import AgentClient, AgentRequestError
from edge_agent.config import AgentConfig, ApiConfig, ModelPolicy, StoreConfig
from edge_agent.errors import ERRORS, UnknownRequestError
from edge_agent.quality.confusion import Confusion
from edge_agent.serving.agent import Agent
from edge_agent.serving.service import InferenceRequest
from edge_agent.store import ModelStore
from edge_agent.wire.telemetry import TelemetryReport, report_from_status
from support import DEVICE


@pytest.fixture
def agent(tmp_path: Path, digits_bundles: DigitsBundles) -> Iterator[Agent]:
    config = AgentConfig(store=StoreConfig(state_dir=str(tmp_path / "state")))
    store = ModelStore(tmp_path / "state", digits_bundles.keys.trusted_root(), DEVICE)
    a = Agent(config, store, background_drift=False)
    a.install(digits_bundles.path(1))
    a.start()
    yield a
    a.close()


@pytest.fixture
def client(agent: Agent) -> Iterator[TestClient]:
    with TestClient(create_app(agent, ApiConfig()), raise_server_exceptions=False) as c:
        yield c


def infer(client: TestClient, x: np.ndarray, **extra: Any) -> dict[str, Any]:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape)}], **extra}
    body["inputs"][0]["data"] = x.reshape(-1).tolist()
    r = client.post("/v2/models/digits/infer", json=body)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def predicted(doc: dict[str, Any]) -> list[int]:
    out = doc["outputs"][0]
    return np.asarray(out["data"]).reshape(out["shape"]).argmax(axis=1).tolist()  # type: ignore[no-any-return]


def test_feedback_counts_reach_the_telemetry_report(
    client: TestClient, agent: Agent, digits_bundles: DigitsBundles
) -> None:
    x, y = digits_bundles.x_eval, digits_bundles.y_eval
    truth = Confusion.zero(10)
    # One-row requests without an id: the response carries the id the agent gave them.
    ids = []
    for i in range(12):
        doc = infer(client, x[i : i + 1])
        ids.append(doc["id"])
        truth = truth.add(int(y[i]), predicted(doc)[0])
    assert len(set(ids)) == 12
    for i, rid in enumerate(ids):
        label: int | str = int(y[i]) if i % 2 else str(y[i])  # an index or the class name
        r = client.post("/v2/models/digits/feedback", json={"id": rid, "label": label})
        assert r.status_code == 200, r.text
        assert r.json() == {
            "model_name": "digits",
            "id": rid,
            "model_version": "1",
            "counted": 1,
            "skipped": 0,
        }
    # A batch request with the client's own id, labelled row by row (null: unknown).
    doc = infer(client, x[20:25], id="client-7")
    assert doc["id"] == "client-7"
    labels: list[int | None] = [int(v) for v in y[20:25]]
    labels[2] = None
    for t, p in zip(labels, predicted(doc), strict=True):
        truth = truth if t is None else truth.add(t, p)
    r = client.post(
        "/v2/models/digits/versions/1/feedback", json={"id": "client-7", "labels": labels}
    )
    assert r.status_code == 200, r.text
    assert (r.json()["counted"], r.json()["skipped"]) == (4, 1)
    # A batch of feedback items: per-item problems are reported, not raised.
    doc = infer(client, x[30:31])
    rid = doc["id"]
    items = [{"id": rid, "label": int(y[30])}, {"id": "nope", "label": 1}, {"id": rid, "label": 1}]
    r = client.post("/v2/models/digits/feedback", json={"items": items})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert r.json()["counted"] == 1
    assert [x.get("outcome") for x in results] == [None, "unknown_id", "unknown_id"]
    truth = truth.add(int(y[30]), predicted(doc)[0])

    status = agent.status()["models"]["digits"]["ground_truth"]
    assert status["feedback"] == {"counted": 17, "unknown_id": 2, "expired": 0, "bad_label": 0}
    report = report_from_status("dev-1", 1, agent.status(), [], 100.0)
    got = report.models["digits"].ground_truth
    assert got is not None
    assert got.confusion == {1: truth}
    assert got.feedback["counted"] == 17
    # What the device publishes parses back to the same counts.
    again = TelemetryReport.from_bytes(report.to_bytes())
    assert again.models["digits"].ground_truth == got
    assert truth.n == 17
    assert truth.correct >= 15


HOSTILE: list[tuple[str, bytes, int]] = [
    ("not json", b"{", 400),
    ("not an object", b"[1, 2]", 400),
    ("a string", b'"id"', 400),
    ("no id", b'{"label": 1}', 400),
    ("id not a string", b'{"id": 7, "label": 1}', 400),
    ("empty id", b'{"id": "", "label": 1}', 400),
    ("huge id", json.dumps({"id": "i" * 300, "label": 1}).encode(), 400),
    ("no label", b'{"id": "ID"}', 400),
    ("label and labels", b'{"id": "ID", "label": 1, "labels": [1]}', 400),
    ("unknown key", b'{"id": "ID", "label": 1, "truth": 1}', 400),
    ("labels not a list", b'{"id": "ID", "labels": 1}', 400),
    ("parameters not an object", b'{"id": "ID", "label": 1, "parameters": 1}', 400),
    ("class out of range", b'{"id": "ID", "label": 10}', 400),
    ("negative class", b'{"id": "ID", "label": -1}', 400),
    ("unknown class name", b'{"id": "ID", "label": "ten"}', 400),
    ("bool label", b'{"id": "ID", "label": true}', 400),
    ("float label", b'{"id": "ID", "label": 1.0}', 400),
    ("null label", b'{"id": "ID", "label": null}', 400),
    ("labels for one row of another length", b'{"id": "ID", "labels": [1, 2]}', 400),
    ("NaN", b'{"id": "ID", "label": NaN}', 400),
    ("duplicate keys", b'{"id": "ID", "id": "ID", "label": 1}', 400),
    ("deep nesting", b'{"id": "ID", "label": ' + b"[" * 100 + b"]" * 100 + b"}", 400),
    ("huge integer", b'{"id": "ID", "label": 1' + b"0" * 30 + b"}", 400),
    ("empty items", b'{"items": []}', 400),
    ("items not a list", b'{"items": {}}', 400),
    ("items with a bad entry", b'{"items": [{"id": "ID", "label": 1}, 3]}', 400),
    ("too many items", json.dumps({"items": [{"id": "a", "label": 1}] * 1001}).encode(), 400),
    ("batch with an unknown key", b'{"items": [{"id": "ID", "label": 1}], "x": 1}', 400),
    ("unknown id", b'{"id": "never-seen", "label": 1}', 404),
    ("body too large", b'{"id": "' + b"a" * (1024 * 1024) + b'"}', 413),
]


@pytest.mark.parametrize(("body", "status"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_feedback_bodies(
    client: TestClient, agent: Agent, digits_bundles: DigitsBundles, body: bytes, status: int
) -> None:
    rid = infer(client, digits_bundles.x_eval[:1])["id"]
    r = client.post(
        "/v2/models/digits/feedback", content=body.replace(b'"ID"', f'"{rid}"'.encode())
    )
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}
    assert r.json()["error"]
    # Nothing was counted, and the answer is still there for a correct label.
    assert agent.ground_truth.confusion("digits") == {}
    ok = client.post("/v2/models/digits/feedback", json={"id": rid, "label": 3})
    assert ok.status_code == 200
    assert ok.json()["counted"] == 1


def test_unknown_model_version_and_route(client: TestClient, digits_bundles: DigitsBundles) -> None:
    rid = infer(client, digits_bundles.x_eval[:1])["id"]
    body = {"id": rid, "label": 1}
    assert client.post("/v2/models/nope/feedback", json=body).status_code == 404
    # Version 2 did not answer it: unknown there, and still counted under version 1.
    r = client.post("/v2/models/digits/versions/2/feedback", json=body)
    assert r.status_code == 404
    assert "error" in r.json()
    assert client.post("/v2/models/digits/versions/x/feedback", json=body).status_code == 404
    assert client.get("/v2/models/digits/feedback").status_code == 405
    assert client.post("/v2/models/digits/versions/1/feedback", json=body).status_code == 200


def test_unknown_request_is_one_row_of_the_error_table() -> None:
    assert ERRORS.api_status(UnknownRequestError("x")) == (404, "NOT_FOUND")


def test_no_memory_no_id_and_no_cost(tmp_path: Path, digits_bundles: DigitsBundles) -> None:
    config = AgentConfig(
        api=ApiConfig(feedback_requests=0), store=StoreConfig(state_dir=str(tmp_path / "s"))
    )
    store = ModelStore(tmp_path / "s", digits_bundles.keys.trusted_root(), DEVICE)
    a = Agent(config, store, background_drift=False)
    a.install(digits_bundles.path(1))
    a.start()
    try:
        with TestClient(create_app(a, config.api)) as c:
            assert "id" not in infer(c, digits_bundles.x_eval[:1])
            r = c.post("/v2/models/digits/feedback", json={"id": "a", "label": 1})
            assert r.status_code == 404
    finally:
        a.close()


def test_grpc_answers_carry_the_given_id(agent: Agent, digits_bundles: DigitsBundles) -> None:
    result = agent.infer(
        InferenceRequest("digits", {"input": digits_bundles.x_eval[:1].astype(np.float32)})
    )
    assert result.request_id is not None
    response = encode_infer(result, request_id=result.request_id)
    assert response.id == result.request_id
    assert agent.feedback("digits", None, response.id, 0, rows=False).counted == 1


def test_client_and_cli_send_feedback(
    agent: Agent, client: TestClient, digits_bundles: DigitsBundles, monkeypatch: pytest.MonkeyPatch
) -> None:
    rid = infer(client, digits_bundles.x_eval[:1])["id"]
    sent: list[tuple[str, str, Any]] = []

    def request(self: AgentClient, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        sent.append((method, path, body))
        r = client.request(method, path, json=body)
        return r.status_code, r.json()

    monkeypatch.setattr(AgentClient, "request", request)
    result = CliRunner().invoke(cli, ["feedback", "digits", "--id", rid, "--label", "4"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["counted"] == 1
    assert sent[-1] == ("POST", "/v2/models/digits/feedback", {"id": rid, "label": 4})
    again = CliRunner().invoke(cli, ["feedback", "digits", "--id", rid, "--label", "4"])
    assert again.exit_code != 0
    assert "404" in again.output + str(again.exception)
    rid = infer(client, digits_bundles.x_eval[:2])["id"]
    with pytest.raises(AgentRequestError):  # two rows need two labels
        AgentClient(ApiConfig()).feedback("digits", rid, [1])
    got = AgentClient(ApiConfig()).feedback("digits", rid, ["1", None], version="1")
    assert sent[-1][1] == "/v2/models/digits/versions/1/feedback"
    assert (got["counted"], got["skipped"]) == (1, 1)


def test_both_ab_arms_count_under_the_version_that_answered(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    policy = ModelPolicy(ab_candidate="digits@1", ab_fraction=0.5, probation_requests=1)
    config = AgentConfig(store=StoreConfig(state_dir=str(tmp_path / "s")), model_defaults=policy)
    store = ModelStore(tmp_path / "s", digits_bundles.keys.trusted_root(), DEVICE)
    a = Agent(config, store, background_drift=False)
    try:
        a.install(digits_bundles.path(1))
        a.start()
        x = digits_bundles.x_eval.astype(np.float32)
        a.infer(InferenceRequest("digits", {"input": x[:1]}))
        a.tick()  # v1 passes probation
        a.install(digits_bundles.path(2))  # v2 serves, v1 is the A/B candidate
        a.start()
        answered: dict[str, int] = {}
        for i in range(40):
            result = a.infer(
                InferenceRequest("digits", {"input": x[i : i + 1]}, routing_key=f"user-{i}")
            )
            assert result.request_id is not None
            version = a.feedback("digits", None, result.request_id, 0, rows=False).model_version
            assert str(version) == result.parameters["model_version"]
            answered[result.parameters["ab_arm"]] = version
        assert answered == {"candidate": 1, "live": 2}  # both arms answered and were counted
        counts = a.ground_truth.confusion("digits")
        assert set(counts) == {1, 2}
        assert counts[1].n + counts[2].n == 40
    finally:
        a.close()
