"""The v2 HTTP API over a fake InferenceService: every endpoint, every error path, metrics."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
import pytest
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.testclient import TestClient

from clock import FakeClock
from edge_agent.api.app import create_app
from edge_agent.api.metrics import ApiMetrics
from edge_agent.common.ratelimit import RateLimiter
from edge_agent.config import ApiConfig
from edge_agent.errors import (
    AdmissionError,
    EdgefleetError,
    FallbackError,
    InferenceError,
    InputValidationError,
    ModelNotFoundError,
    RateLimitedError,
)
from edge_agent.serving.service import InferenceRequest, InferenceResult

FAILURES: dict[str, Callable[[], Exception]] = {
    "invalid": lambda: InputValidationError(
        "2 rows out of range", field="x", reason="out_of_range", counts={"out_of_range": 2}
    ),
    "not_found": lambda: ModelNotFoundError("model 'double' has no version '9'"),
    "inference": lambda: InferenceError("onnxruntime: invalid shape"),
    "fallback": lambda: FallbackError("cloud fallback deadline exceeded"),
    "budget": lambda: AdmissionError("memory budget exceeded"),
    "rate": lambda: RateLimitedError("fallback budget spent"),
    "edgefleet": lambda: EdgefleetError("secret detail"),
    "boom": lambda: RuntimeError("secret detail at /etc/edgefleet/key.pem"),
}


class FakeService:
    """Implements InferenceService: doubles every input; fails on ``parameters["fail"]``."""

    def __init__(self) -> None:
        self.is_live = True
        self.is_ready = True
        self.models = {"double": ["1", "2"]}
        self.model_is_ready = True
        self.requests: list[InferenceRequest] = []
        self.threads: list[str] = []

    def live(self) -> bool:
        return self.is_live

    def ready(self) -> bool:
        return self.is_ready

    def not_ready(self) -> dict[str, str]:
        return {}

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "edgefleet", "version": "0.1.0", "extensions": []}

    def model_names(self) -> list[str]:
        return list(self.models)

    def _check(self, name: str, version: str | None) -> None:
        if name not in self.models or (version is not None and version not in self.models[name]):
            raise ModelNotFoundError(f"no model {name!r} version {version!r}")

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        self._check(name, version)
        return {
            "name": name,
            "versions": self.models[name],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
            "outputs": [{"name": "x_doubled", "datatype": "FP32", "shape": [-1, 2]}],
        }

    def model_ready(self, name: str, version: str | None = None) -> bool:
        self._check(name, version)
        return self.model_is_ready

    def infer(self, request: InferenceRequest) -> InferenceResult:
        self.requests.append(request)
        self.threads.append(threading.current_thread().name)
        self._check(request.model, request.version)
        failure = request.parameters.get("fail")
        if failure:
            raise FAILURES[failure]()
        return InferenceResult(
            model=request.model,
            model_version=request.version or "2",
            outputs={f"{k}_doubled": v * 2 for k, v in request.inputs.items()},
            source=request.parameters.get("source", "device"),
            parameters={"drift_alert": False, "validation_dropped": {"nan": 0}},
        )


CONFIG = ApiConfig(max_request_bytes=4096, rate_limit_per_second=1000.0, rate_limit_burst=1000)


@pytest.fixture
def service() -> FakeService:
    return FakeService()


@pytest.fixture
def app(service: FakeService) -> Starlette:
    return create_app(service, CONFIG)


@pytest.fixture
def client(app: Starlette) -> TestClient:
    return TestClient(app, raise_server_exceptions=False)


def infer_body(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]
    }
    doc.update(extra)
    return doc


def binary_input(name: str, datatype: str, shape: list[int], size: int) -> dict[str, Any]:
    return {
        "name": name,
        "datatype": datatype,
        "shape": shape,
        "parameters": {"binary_data_size": size},
    }


def json_input(datatype: str, shape: list[int], data: Any, name: str = "x") -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def encoded(*inputs: dict[str, Any]) -> bytes:
    return json.dumps({"inputs": list(inputs)}, separators=(",", ":")).encode()


def metrics_text(client: TestClient) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def split_binary(response: Any) -> tuple[dict[str, Any], bytes]:
    n = int(response.headers["inference-header-content-length"])
    return json.loads(response.content[:n]), response.content[n:]


# --- health and metadata --------------------------------------------------------------------


def test_live_and_ready(client: TestClient, service: FakeService) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    service.is_ready = False
    not_ready = client.get("/v2/health/ready")
    assert not_ready.status_code == 503
    assert "error" in not_ready.json()
    service.is_live = False
    assert client.get("/v2/health/live").status_code == 503


def test_server_metadata_advertises_binary_tensor_extension(client: TestClient) -> None:
    meta = client.get("/v2").json()
    assert meta["name"] == "edgefleet"
    assert "binary_tensor_data" in meta["extensions"]


@pytest.mark.parametrize("path", ["/v2/models/double", "/v2/models/double/versions/1"])
def test_model_metadata(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.json()["versions"] == ["1", "2"]


@pytest.mark.parametrize("path", ["/v2/models/nope", "/v2/models/double/versions/9"])
def test_model_metadata_unknown_is_404(client: TestClient, path: str) -> None:
    for suffix in ("", "/ready"):
        response = client.get(path + suffix)
        assert response.status_code == 404
        assert set(response.json()) == {"error"}


def test_model_ready(client: TestClient, service: FakeService) -> None:
    assert client.get("/v2/models/double/ready").json() == {"name": "double", "ready": True}
    assert client.get("/v2/models/double/versions/2/ready").status_code == 200
    service.model_is_ready = False
    response = client.get("/v2/models/double/versions/2/ready")
    assert response.status_code == 503
    assert "not ready" in response.json()["error"]


def test_unknown_route_and_wrong_method_use_the_error_format(client: TestClient) -> None:
    missing = client.get("/v2/nothing/here")
    assert missing.status_code == 404
    assert set(missing.json()) == {"error"}
    wrong = client.get("/v2/models/double/infer")
    assert wrong.status_code == 405
    assert set(wrong.json()) == {"error"}


# --- inference ------------------------------------------------------------------------------


def test_infer_json_round_trip(client: TestClient, service: FakeService) -> None:
    response = client.post("/v2/models/double/infer", json=infer_body(id="req-1"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    doc = response.json()
    assert doc["model_name"] == "double"
    assert doc["model_version"] == "2"
    assert doc["id"] == "req-1"
    assert doc["outputs"] == [
        {"name": "x_doubled", "datatype": "FP32", "shape": [2, 2], "data": [2.0, 4.0, 6.0, 8.0]}
    ]
    assert doc["parameters"] == {
        "drift_alert": False,
        "validation_dropped": {"nan": 0},
        "model_version": "2",
        "inference_source": "device",
    }
    (seen,) = service.requests
    assert seen.inputs["x"].dtype == np.float32
    assert seen.request_id == "req-1"
    assert seen.payload_bytes == len(response.request.content)
    assert seen.version is None
    assert seen.parameters == {}
    assert service.threads[0].startswith("edgefleet-api")  # never on the event loop


def test_infer_versioned_route(client: TestClient, service: FakeService) -> None:
    response = client.post("/v2/models/double/versions/1/infer", json=infer_body())
    assert response.json()["model_version"] == "1"
    assert service.requests[0].version == "1"


def test_cloud_source_is_reported(client: TestClient) -> None:
    doc = client.post("/v2/models/double/infer", json=infer_body(parameters={"source": "cloud"}))
    assert doc.json()["parameters"]["inference_source"] == "cloud"


def test_binary_input_json_output(client: TestClient) -> None:
    x = np.array([[1.5, -2.0], [0.0, 8.0]], dtype=np.float32)
    header = json.dumps({"inputs": [binary_input("x", "FP32", [2, 2], x.nbytes)]}).encode()
    response = client.post(
        "/v2/models/double/infer",
        content=header + x.tobytes(),
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == (x * 2).reshape(-1).tolist()


def test_json_input_binary_output(client: TestClient) -> None:
    body = infer_body(parameters={"binary_data_output": True})
    response = client.post("/v2/models/double/infer", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    doc, rest = split_binary(response)
    (out,) = doc["outputs"]
    assert out["parameters"] == {"binary_data_size": 16}
    assert np.frombuffer(rest, "<f4").tolist() == [2.0, 4.0, 6.0, 8.0]


def test_binary_in_binary_out_per_output(client: TestClient) -> None:
    a = np.arange(3, dtype=np.int64)
    header = json.dumps(
        {
            "inputs": [
                binary_input("a", "INT64", [3], 24),
                {"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]},
            ],
            "outputs": [
                {"name": "b_doubled"},
                {"name": "a_doubled", "parameters": {"binary_data": True}},
            ],
        }
    ).encode()
    response = client.post(
        "/v2/models/double/infer",
        content=header + a.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    doc, rest = split_binary(response)
    assert [o["name"] for o in doc["outputs"]] == ["b_doubled", "a_doubled"]
    assert doc["outputs"][0]["data"] == [2, 0]
    assert np.frombuffer(rest, "<i8").tolist() == [0, 2, 4]


def test_routing_key_from_parameter_or_header(client: TestClient, service: FakeService) -> None:
    client.post("/v2/models/double/infer", json=infer_body(), headers={"X-Routing-Key": "h"})
    client.post(
        "/v2/models/double/infer",
        json=infer_body(parameters={"routing_key": "p"}),
        headers={"X-Routing-Key": "h"},
    )
    client.post("/v2/models/double/infer", json=infer_body())
    assert [r.routing_key for r in service.requests] == ["h", "p", None]
    bad = client.post("/v2/models/double/infer", json=infer_body(parameters={"routing_key": 5}))
    assert bad.status_code == 400
    assert "routing_key" in bad.json()["error"]


ERRORS = [
    ("invalid", 400, "out_of_range"),
    ("not_found", 404, "model_not_found"),
    ("inference", 503, "inference_failed"),
    ("fallback", 503, "fallback_unavailable"),
    ("budget", 503, "memory_budget"),
    ("rate", 429, "rate_limited"),
    ("edgefleet", 500, "edgefleet_error"),
    ("boom", 500, "exception"),
]


@pytest.mark.parametrize(("failure", "status", "reason"), ERRORS)
def test_service_errors_map_to_status_and_are_counted(
    client: TestClient, failure: str, status: int, reason: str
) -> None:
    response = client.post("/v2/models/double/infer", json=infer_body(parameters={"fail": failure}))
    assert response.status_code == status
    doc = response.json()
    assert set(doc) == {"error"}
    assert f'reason="{reason}"' in metrics_text(client)
    if status == 500:
        assert "secret" not in response.text
        assert "Traceback" not in response.text
        assert doc["error"] == f"internal error ({reason})"
    if status == 429:
        assert response.headers["retry-after"] == "1"


def test_validation_error_message_names_reason_field_and_rows(client: TestClient) -> None:
    response = client.post(
        "/v2/models/double/infer", json=infer_body(parameters={"fail": "invalid"})
    )
    message = response.json()["error"]
    assert "reason: out_of_range" in message
    assert "field: x" in message
    assert "out_of_range=2" in message


def test_unknown_model_on_infer_is_404(client: TestClient) -> None:
    response = client.post("/v2/models/nope/infer", json=infer_body())
    assert response.status_code == 404
    assert 'model="_unknown",outcome="not_found"' in metrics_text(client)


def test_unknown_requested_output_is_400(client: TestClient) -> None:
    response = client.post("/v2/models/double/infer", json=infer_body(outputs=[{"name": "zzz"}]))
    assert response.status_code == 400
    assert "zzz" in response.json()["error"]


BIN_HEADER = encoded(binary_input("x", "FP32", [1], 4))
HEADER_LENGTH = "Inference-Header-Content-Length"
SIXTY_FIVE = [json_input("FP32", [1], [1], name=f"x{i}") for i in range(65)]
NAN_INT = encoded(json_input("INT32", [1], [1])).replace(b"[1]}", b"[NaN]}")
BAD_BODIES: list[tuple[str, bytes, dict[str, str], str]] = [
    ("not json", b"this is not json", {}, "json"),
    ("wrong datatype", encoded(json_input("FLOAT", [1], [1])), {}, "datatype"),
    ("shape mismatch", encoded(json_input("FP32", [3], [1, 2])), {}, "shape"),
    # zero elements, but numpy cannot even make the empty array: a shape error, not a crash
    (
        "empty, huge span",
        encoded(json_input("BOOL", [0, 41409, 14920639, 14928204], [])),
        {},
        "shape",
    ),
    (
        "empty binary, huge span",
        encoded(binary_input("x", "BOOL", [0, 2**31 - 1, 2**31 - 1], 0)),
        {HEADER_LENGTH: str(len(encoded(binary_input("x", "BOOL", [0, 2**31 - 1, 2**31 - 1], 0))))},
        "shape",
    ),
    ("data not a list", encoded(json_input("FP32", [1], 1)), {}, "data"),
    ("NaN in INT32", NAN_INT, {}, "data"),
    ("too many inputs", encoded(*SIXTY_FIVE), {}, "too_many_inputs"),
    ("binary sizes", BIN_HEADER + bytes(8), {HEADER_LENGTH: str(len(BIN_HEADER))}, "binary_size"),
    ("bad header", b"{}", {HEADER_LENGTH: "abc"}, "binary_size"),
]


@pytest.mark.parametrize(
    ("body", "headers", "reason"), [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES]
)
def test_undecodable_requests_are_400_and_counted_by_reason(
    client: TestClient, service: FakeService, body: bytes, headers: dict[str, str], reason: str
) -> None:
    response = client.post("/v2/models/double/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert f"reason: {reason}" in response.json()["error"]
    assert service.requests == []  # refused before the service saw it
    assert f'outcome="invalid",reason="{reason}"' in metrics_text(client)
    assert client.get("/v2/health/live").status_code == 200  # and the app keeps serving


# --- size limits ----------------------------------------------------------------------------


def call_asgi(
    app: Starlette,
    path: str,
    headers: dict[str, str],
    chunks: list[bytes],
    client: tuple[str, int] | None = ("10.0.0.1", 4000),
) -> tuple[int, dict[str, str], bytes, int]:
    """Drive the app directly, counting how many body chunks it actually read."""
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    read = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        if not pending:
            await anyio.sleep_forever()
        read += 1
        return pending.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": client,
        "server": ("127.0.0.1", 8080),
    }
    anyio.run(app, scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body, read


def test_content_length_over_limit_is_413_before_reading(app: Starlette) -> None:
    status, headers, body, read = call_asgi(
        app, "/v2/models/double/infer", {"content-length": "999999"}, [b"x" * 10]
    )
    assert status == 413
    assert read == 0
    assert headers["connection"] == "close"
    assert "4096" in json.loads(body)["error"]


def test_lying_content_length_is_capped_while_reading(app: Starlette) -> None:
    status, _, _, read = call_asgi(
        app, "/v2/models/double/infer", {"content-length": "10"}, [b"x" * 1000] * 10
    )
    assert status == 413
    assert read == 5  # stopped as soon as the cap was passed


def test_chunked_body_over_limit_is_413(client: TestClient) -> None:
    def chunks() -> Any:
        for _ in range(10):
            yield b"x" * 1000

    response = client.post("/v2/models/double/infer", content=chunks())
    assert response.status_code == 413
    assert 'outcome="too_large",reason="payload_too_large"' in metrics_text(client)


def test_invalid_content_length_is_400(app: Starlette) -> None:
    status, _, _, _ = call_asgi(app, "/v2/models/double/infer", {"content-length": "-1"}, [b""])
    assert status == 400


# --- rate limiting --------------------------------------------------------------------------


def test_rate_limit_with_retry_after_and_recovery(service: FakeService) -> None:
    clock = FakeClock(50.0)
    limiter = RateLimiter(rate=0.25, burst=2, clock=clock)
    client = TestClient(create_app(service, CONFIG, rate_limiter=limiter))
    path = "/v2/models/double/infer"
    assert [client.post(path, json=infer_body()).status_code for _ in range(2)] == [200, 200]
    limited = client.post(path, json=infer_body())
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "4"
    assert client.get("/v2/models/double").status_code == 429  # model endpoints share the bucket
    assert client.get("/v2/health/ready").status_code == 200  # probes are never limited
    assert len(service.requests) == 2
    clock.now += 4.0
    assert client.post(path, json=infer_body()).status_code == 200
    assert 'outcome="rate_limited",reason="rate_limited"' in metrics_text(client)


def test_unix_socket_clients_share_one_bucket(service: FakeService) -> None:
    limiter = RateLimiter(rate=0.001, burst=1, clock=FakeClock(50.0))
    app = create_app(service, CONFIG, rate_limiter=limiter)
    body = [json.dumps(infer_body()).encode()]
    path = "/v2/models/double/infer"
    assert call_asgi(app, path, {}, body, client=None)[0] == 200
    assert call_asgi(app, path, {}, body, client=None)[0] == 429
    assert call_asgi(app, path, {}, body, client=("10.0.0.2", 1))[0] == 200  # TCP peers apart
    assert call_asgi(app, path, {}, body, client=("10.0.0.2", 2))[0] == 429  # per IP, not port


# --- metrics --------------------------------------------------------------------------------


def test_metrics_series_after_requests(client: TestClient) -> None:
    client.post("/v2/models/double/infer", json=infer_body())
    client.post("/v2/models/double/infer", json=infer_body(parameters={"source": "cloud"}))
    client.post("/v2/models/double/infer", json=infer_body(parameters={"fail": "invalid"}))
    client.get("/v2/models/double")
    text = metrics_text(client)
    ok = 'model="double",outcome="ok"'
    expected = [
        f'edgefleet_api_requests_total{{endpoint="infer",{ok},reason="none"}} 2.0',
        'outcome="invalid",reason="out_of_range"} 1.0',
        f'edgefleet_api_requests_total{{endpoint="metadata",{ok},reason="none"}} 1.0',
        f'edgefleet_api_request_duration_seconds_bucket{{le="0.005",{ok}}}',
        f"edgefleet_api_request_duration_seconds_count{{{ok}}} 2.0",
        'edgefleet_inference_source_total{model="double",source="device"} 1.0',
        'edgefleet_inference_source_total{model="double",source="cloud"} 1.0',
        'edgefleet_model_version_info{model="double",version="2"} 1.0',
        "edgefleet_api_in_flight_requests 0.0",
    ]
    for line in expected:
        assert line in text, line


def test_made_up_model_names_do_not_become_labels(client: TestClient) -> None:
    for i in range(20):
        client.post(f"/v2/models/made-up-{i}/infer", json=infer_body())
        client.post(f"/v2/models/made-up-{i}/infer", content=b"garbage")
        client.get(f"/v2/models/made-up-{i}")
    assert "made-up" not in metrics_text(client)


def test_each_app_has_its_own_registry(service: FakeService) -> None:
    first, second = ApiMetrics(), ApiMetrics()
    TestClient(create_app(service, CONFIG, first)).post(
        "/v2/models/double/infer", json=infer_body()
    )
    assert b'outcome="ok"' in first.render()
    assert b'outcome="ok"' not in second.render()
    assert REGISTRY.get_sample_value("edgefleet_api_in_flight_requests") is None


def test_metrics_hooks() -> None:
    metrics = ApiMetrics()
    metrics.set_model_version("digits", "3")
    metrics.set_model_version("digits", "4")
    metrics.count_rejected_rows("digits", {"nan": 3, "inf": 0})
    metrics.count_source("digits", "cloud", 5)
    text = metrics.render().decode()
    assert 'edgefleet_model_version_info{model="digits",version="4"} 1.0' in text
    assert 'version="3"' not in text
    assert 'edgefleet_validation_rows_rejected_total{model="digits",reason="nan"} 3.0' in text
    assert 'reason="inf"' not in text
    assert 'edgefleet_inference_source_total{model="digits",source="cloud"} 5.0' in text
    metrics.remove_model("digits")
    assert "edgefleet_model_version_info{" not in metrics.render().decode()
