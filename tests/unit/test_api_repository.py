"""The model repository extension's REST and gRPC halves over a fake service: off by default
(404 / UNIMPLEMENTED, not advertised), the wire shapes, parameters (a hostile table), and the
one error table for both front ends."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import grpc
import pytest
from starlette.testclient import TestClient
from test_api_app import CONFIG, FakeService
from test_grpc_service import FakeContext, call

from edge_agent.api.app import create_app, limiter_from_config
from edge_agent.api.grpc_v2.messages import message_class
from edge_agent.api.grpc_v2.service import GrpcInference
from edge_agent.api.metrics import ApiMetrics
from edge_agent.api.repository import EXTENSION, check_unload, index_ready, load_version
from edge_agent.errors import (
    API_STATUS,
    ConfigError,
    InputValidationError,
    ModelNotFoundError,
    ModelStoreError,
)
from edge_agent.serving.repository.index import IndexEntry

ON = dataclasses.replace(CONFIG, repository_control=True)
HTTP = {family: http for family, http, _ in API_STATUS}
GRPC = {family: getattr(grpc.StatusCode, code) for family, _, code in API_STATUS}


class FakeRepository(FakeService):
    """The fake service with a repository: ``double`` v1 and v2 kept, v2 serving."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, int | None]] = []
        self.unloaded = False

    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        entries = [
            IndexEntry("double", "1", "UNAVAILABLE", "outside the version policy"),
            IndexEntry("double", "2", "UNAVAILABLE" if self.unloaded else "READY"),
        ]
        return [e for e in entries if e.state == "READY"] if ready_only else entries

    def load_model(self, name: str, version: int | None = None) -> None:
        self.calls.append(("load", name, version))
        if name != "double" or version not in (None, 1, 2):
            raise ModelNotFoundError(f"model {name!r} v{version} is not installed")
        if version == 1:
            raise ModelStoreError("double v1 failed here before")
        self.unloaded = False

    def unload_model(self, name: str) -> None:
        self.calls.append(("unload", name, None))
        if name != "double":
            raise ModelNotFoundError(f"model {name!r} is not installed")
        self.unloaded = True


def grpc_servicer(service: FakeService, *, on: bool = True) -> GrpcInference:
    repository = service if on else None
    return GrpcInference(
        service,
        ApiMetrics(),
        limiter_from_config(CONFIG),
        repository=repository,  # type: ignore[arg-type]
    )


def test_off_by_default_nothing_served_nor_advertised() -> None:
    service = FakeRepository()
    rest = TestClient(create_app(service, CONFIG))
    assert EXTENSION not in rest.get("/v2").json()["extensions"]
    for path in ("/v2/repository/index", "/v2/repository/models/double/unload"):
        assert rest.post(path, content=b"").status_code == 404
    assert service.calls == []
    servicer = grpc_servicer(service, on=False)
    assert "RepositoryIndex" not in servicer.handler()._method_handlers  # type: ignore[attr-defined]
    meta = servicer.server_metadata(message_class("ServerMetadataRequest")(), FakeContext())
    assert EXTENSION not in meta.extensions


def test_on_needs_a_service_with_a_repository() -> None:
    with pytest.raises(ConfigError, match="no model repository"):
        create_app(FakeService(), ON)


def test_rest_index_load_unload() -> None:
    service = FakeRepository()
    rest = TestClient(create_app(service, ON))
    assert EXTENSION in rest.get("/v2").json()["extensions"]
    # tritonclient.http sends an empty body; the protocol allows {"ready": bool}.
    every = rest.post("/v2/repository/index", content=b"")
    assert every.status_code == 200
    assert every.json() == [
        {"name": "double", "version": "1", "state": "UNAVAILABLE",
         "reason": "outside the version policy"},
        {"name": "double", "version": "2", "state": "READY", "reason": ""},
    ]  # fmt: skip
    ready = rest.post("/v2/repository/index", json={"ready": True}).json()
    assert [e["version"] for e in ready] == ["2"]
    unload = {"parameters": {"unload_dependents": False}}  # what tritonclient sends
    response = rest.post("/v2/repository/models/double/unload", json=unload)
    assert (response.status_code, response.content) == (200, b"")
    assert rest.post("/v2/repository/index", json={"ready": True}).json() == []
    assert rest.post("/v2/repository/models/double/load", json={}).status_code == 200
    body = {"parameters": {"version": "2"}}
    assert rest.post("/v2/repository/models/double/load", json=body).status_code == 200
    assert service.calls == [("unload", "double", None), ("load", "double", None),
                             ("load", "double", 2)]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "family"),
    [
        ("models/nope/load", {}, ModelNotFoundError),
        ("models/nope/unload", {}, ModelNotFoundError),
        ("models/double/load", {"parameters": {"version": 9}}, ModelNotFoundError),
        ("models/double/load", {"parameters": {"version": 1}}, ModelStoreError),
        ("models/double/load", {"parameters": {"config": "{}"}}, InputValidationError),
        ("models/double/load", {"parameters": {"file:1/model.onnx": "AAAA"}}, InputValidationError),
        ("models/double/load", {"parameters": {"version": 0}}, InputValidationError),
        ("models/double/load", {"parameters": {"version": "v2"}}, InputValidationError),
        ("models/double/load", {"parameters": {"version": 2.0}}, InputValidationError),
        ("models/double/load", {"parameters": {"version": True}}, InputValidationError),
        ("models/double/load", {"parameters": []}, InputValidationError),
        ("models/double/load", {"version": 2}, InputValidationError),
        ("models/double/load", [], InputValidationError),
        ("models/double/unload", {"parameters": {"unload_dependents": "no"}}, InputValidationError),
        ("models/double/unload", {"parameters": {"force": True}}, InputValidationError),
        ("index", {"ready": "yes"}, InputValidationError),
        ("index", {"repository_name": "other"}, InputValidationError),
        ("index", {"models": []}, InputValidationError),
    ],
)
def test_rest_errors_come_from_the_one_table(path: str, body: Any, family: type) -> None:
    service = FakeRepository()
    rest = TestClient(create_app(service, ON))
    response = rest.post(f"/v2/repository/{path}", content=json.dumps(body).encode())
    assert response.status_code == HTTP[family]
    assert response.json()["error"]


@pytest.mark.parametrize("body", [b"{", b"\xff", b'{"ready": true, "ready": false}', b"[1]"])
def test_rest_undecodable_bodies_are_400(body: bytes) -> None:
    rest = TestClient(create_app(FakeRepository(), ON))
    assert rest.post("/v2/repository/index", content=body).status_code == 400


def test_rest_oversized_body_is_413() -> None:
    rest = TestClient(create_app(FakeRepository(), ON))
    response = rest.post("/v2/repository/index", content=b" " * (65 * 1024))
    assert response.status_code == 413


def repository_request(kind: str, name: str = "double", **parameters: Any) -> Any:
    request = message_class(f"Repository{kind}Request")(model_name=name)
    for key, value in parameters.items():
        field = {bool: "bool_param", int: "int64_param", str: "string_param"}[type(value)]
        setattr(request.parameters[key], field, value)
    return request


def test_grpc_index_load_unload() -> None:
    service = FakeRepository()
    servicer = grpc_servicer(service)
    names = set(servicer.handler()._method_handlers)  # type: ignore[attr-defined]
    assert {f"/inference.GRPCInferenceService/Repository{n}" for n in
            ("Index", "ModelLoad", "ModelUnload")} <= names  # fmt: skip
    meta = servicer.server_metadata(message_class("ServerMetadataRequest")(), FakeContext())
    assert EXTENSION in meta.extensions
    index = servicer.repository_index(message_class("RepositoryIndexRequest")(), FakeContext())
    assert [(m.name, m.version, m.state) for m in index.models] == [
        ("double", "1", "UNAVAILABLE"),
        ("double", "2", "READY"),
    ]
    unload = repository_request("ModelUnload", unload_dependents=False)
    servicer.repository_unload(unload, FakeContext())
    ready = message_class("RepositoryIndexRequest")(ready=True)
    assert list(servicer.repository_index(ready, FakeContext()).models) == []
    servicer.repository_load(repository_request("ModelLoad", version=2), FakeContext())
    servicer.repository_load(repository_request("ModelLoad", version="2"), FakeContext())
    assert service.calls[1:] == [("load", "double", 2), ("load", "double", 2)]


@pytest.mark.parametrize(
    ("method", "request_", "family"),
    [
        ("repository_load", repository_request("ModelLoad", "nope"), ModelNotFoundError),
        ("repository_load", repository_request("ModelLoad", version=1), ModelStoreError),
        ("repository_load", repository_request("ModelLoad", config="{}"), InputValidationError),
        ("repository_load", repository_request("ModelLoad", version=-2), InputValidationError),
        ("repository_unload", repository_request("ModelUnload", "nope"), ModelNotFoundError),
        ("repository_unload", repository_request("ModelUnload", x=True), InputValidationError),
        (
            "repository_index",
            message_class("RepositoryIndexRequest")(repository_name="other"),
            InputValidationError,
        ),
        (
            "repository_load",
            message_class("RepositoryModelLoadRequest")(model_name="double", repository_name="x"),
            InputValidationError,
        ),
    ],
)
def test_grpc_errors_come_from_the_one_table(method: str, request_: Any, family: type) -> None:
    context = FakeContext()
    assert call(grpc_servicer(FakeRepository()), method, request_, context) is None
    assert context.code == GRPC[family]


@pytest.mark.parametrize(
    ("parameters", "version"),
    [({}, None), ({"version": 3}, 3), ({"version": "12"}, 12), ({"version": "1" * 17}, None)],
)
def test_load_version(parameters: dict[str, Any], version: int | None) -> None:
    if parameters.get("version") == "1" * 17:
        with pytest.raises(InputValidationError, match="positive integer"):
            load_version(parameters)
        return
    assert load_version(parameters) == version


def test_unload_and_index_parameters() -> None:
    check_unload({})
    check_unload({"unload_dependents": True})
    assert index_ready({}) is False
    assert index_ready({"ready": True, "repository_name": ""}) is True
    with pytest.raises(InputValidationError):
        check_unload({"unload_dependents": 1})
