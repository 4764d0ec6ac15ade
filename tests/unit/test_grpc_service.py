"""The gRPC servicer over the REST tests' fake service: one error table for both front ends,
rate limiting, routing, probes, metadata and metrics."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from starlette.testclient import TestClient
from test_api_app import CONFIG, FAILURES, FakeClock, FakeService
from test_grpc_codec import hostile_request

from edge_agent.api.app import create_app, limiter_from_config
from edge_agent.api.grpc_v2.messages import message_class
from edge_agent.api.grpc_v2.service import GrpcInference
from edge_agent.api.metadata import EXTENSIONS
from edge_agent.api.metrics import ApiMetrics
from edge_agent.common.ratelimit import RateLimiter
from edge_agent.errors import API_STATUS, INTERNAL_STATUS, api_status


class AbortedError(Exception):
    pass


class FakeContext:
    """The part of ``grpc.ServicerContext`` the servicer uses."""

    def __init__(self, peer: str = "ipv4:127.0.0.1:5555", metadata: Any = ()) -> None:
        self._peer = peer
        self._metadata = tuple(metadata)
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> Any:
        return self._metadata

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise AbortedError(details)


def infer_request(model: str = "double", **parameters: Any) -> Any:
    req = message_class("ModelInferRequest")(model_name=model, id="q")
    req.inputs.add(name="x", datatype="FP32", shape=[2, 2]).contents.fp32_contents.extend(
        [1, 2, 3, 4]
    )
    for key, value in parameters.items():
        req.parameters[key].string_param = value
    return req


def servicer(service: FakeService, limiter: RateLimiter | None = None) -> GrpcInference:
    limiter = limiter if limiter is not None else limiter_from_config(CONFIG)  # len() 0
    return GrpcInference(service, ApiMetrics(), limiter)


def call(servicer: GrpcInference, method: str, request: Any, context: FakeContext) -> Any:
    try:
        return getattr(servicer, method)(request, context)
    except AbortedError:
        return None


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_one_error_table_for_rest_and_grpc(failure: str) -> None:
    service = FakeService()
    rest = TestClient(create_app(service, CONFIG), raise_server_exceptions=False)
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}],
        "parameters": {"fail": failure},
    }
    status = rest.post("/v2/models/double/infer", json=body).status_code
    context = FakeContext()
    assert call(servicer(service), "model_infer", infer_request(fail=failure), context) is None
    assert context.code is not None
    expected = api_status(FAILURES[failure]())
    assert (status, context.code.name) == expected
    rows = {(http, code) for _, http, code in API_STATUS} | {INTERNAL_STATUS}
    assert expected in rows
    if expected == INTERNAL_STATUS:
        assert "secret" not in context.details  # never the exception's text
    if failure == "invalid":
        assert "reason: out_of_range" in context.details
        assert "field: x" in context.details


def test_unknown_model_and_metadata() -> None:
    grpc_api = servicer(FakeService())
    context = FakeContext()
    req = message_class("ModelMetadataRequest")(name="nope")
    assert call(grpc_api, "model_metadata", req, context) is None
    assert context.code == grpc.StatusCode.NOT_FOUND
    assert call(grpc_api, "model_infer", infer_request("nope"), context) is None
    assert context.code == grpc.StatusCode.NOT_FOUND
    meta = grpc_api.model_metadata(message_class("ModelMetadataRequest")(name="double"), context)
    assert (meta.name, list(meta.versions), meta.platform) == (
        "double",
        ["1", "2"],
        "onnxruntime_onnx",
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 2])]
    server = grpc_api.server_metadata(message_class("ServerMetadataRequest")(), context)
    assert list(server.extensions) == list(EXTENSIONS)  # what this API serves, as REST's


def test_probes_follow_the_service() -> None:
    service = FakeService()
    grpc_api = servicer(service)
    context = FakeContext()
    ready_req = message_class("ModelReadyRequest")(name="double", version="2")
    assert grpc_api.model_ready(ready_req, context).ready
    service.model_is_ready = False
    assert not grpc_api.model_ready(ready_req, context).ready
    service.is_ready = False
    assert not grpc_api.server_ready(message_class("ServerReadyRequest")(), context).ready

    def broken() -> bool:
        raise RuntimeError("probe exploded")

    service.live = broken  # type: ignore[method-assign]
    assert not grpc_api.server_live(message_class("ServerLiveRequest")(), context).live


def test_infer_routes_and_answers() -> None:
    service = FakeService()
    grpc_api = servicer(service)
    context = FakeContext(metadata=[("x-routing-key", "from-metadata")])
    response = grpc_api.model_infer(infer_request(), context)
    assert (response.model_name, response.model_version, response.id) == ("double", "2", "q")
    doubled = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 2)
    np.testing.assert_array_equal(doubled, [[2, 4], [6, 8]])
    assert response.parameters["drift_alert"].bool_param is False
    assert service.requests[-1].routing_key == "from-metadata"
    grpc_api.model_infer(infer_request(routing_key="from-parameter"), context)
    assert service.requests[-1].routing_key == "from-parameter"
    assert service.requests[-1].payload_bytes == infer_request(routing_key="x" * 14).ByteSize()
    req = infer_request()
    req.parameters["routing_key"].int64_param = 3
    assert call(grpc_api, "model_infer", req, context) is None
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT


def test_rate_limit_per_peer_and_one_bucket_for_unix_clients() -> None:
    limiter = RateLimiter(rate=0.001, burst=1, clock=FakeClock())
    grpc_api = servicer(FakeService(), limiter)
    for peer in ("ipv4:10.0.0.1:1", "ipv6:[::1]:2", "unix:/run/a.sock"):
        assert grpc_api.model_infer(infer_request(), FakeContext(peer)) is not None
        context = FakeContext(peer)
        assert call(grpc_api, "model_infer", infer_request(), context) is None
        assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    context = FakeContext("unix:")  # another Unix-socket client: the same bucket
    assert call(grpc_api, "model_infer", infer_request(), context) is None
    assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    text = grpc_api.metrics.render().decode()
    assert 'outcome="rate_limited"' in text


@settings(max_examples=200, deadline=None)
@given(hostile_request())
def test_any_message_gets_an_answer_or_a_table_status(req: Any) -> None:
    req.model_name = "double"
    context = FakeContext()
    answer = call(servicer(FakeService()), "model_infer", req, context)
    if answer is None:  # aborted: with a status of the table, never INTERNAL
        assert context.code is not None
        assert context.code.name in {code for _, _, code in API_STATUS}
    else:
        assert list(answer.outputs) or not req.inputs
