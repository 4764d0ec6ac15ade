"""The model repository extension and versioned serving against a real daemon: tritonclient.grpc
and tritonclient.http (both in the dev dependencies) through index, unload, load and versioned
inference, plus raw REST for what the clients do not send (the index's ``ready`` filter).

The daemon runs with ``[api] repository_control = true`` and ``version_policy = {specific =
[1]}`` over digits v1, v2 and v3 (v3 active): v1 serves by number, v2 is kept outside the policy.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from test_agent_daemon import BIN, agent_cli

from bundles import DigitsBundles
from edge_agent.client import AgentClient
from edge_agent.config import ApiConfig
from edge_agent.errors import API_STATUS, ModelNotFoundError, ModelStoreError
from mosquitto import distinct_ports
from support import wait_until

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
tritonclient_http = pytest.importorskip("tritonclient.http")  # the dev extra [grpc,http]
from tritonclient.grpc import service_pb2 as triton_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

GRPC_CODE = {family: code for family, _, code in API_STATUS}
HTTP_STATUS = {family: http for family, http, _ in API_STATUS}


class Daemon:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, grpc_port: int, log: Path):
        self.proc = proc
        self.port = port
        self.url = f"127.0.0.1:{grpc_port}"
        self.log = log
        self.rest = AgentClient(ApiConfig(port=port), timeout=30)

    def grpc(self) -> Any:
        return tritonclient_grpc.InferenceServerClient(url=self.url)


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, digits_bundles: DigitsBundles
) -> Iterator[Daemon]:
    tmp_path = tmp_path_factory.mktemp("repository-daemon")
    (tmp_path / "root.json").write_bytes(digits_bundles.keys.root_bytes())
    port, grpc_port = distinct_ports(2)
    config = tmp_path / "agent.toml"
    config.write_text(
        f"[api]\nport = {port}\nrepository_control = true\n"
        f"[grpc]\nenabled = true\nport = {grpc_port}\n"
        "[serving]\nversion_policy = { specific = [1] }\n"
        f'[store]\nstate_dir = "{tmp_path / "state"}"\nroot_path = "{tmp_path / "root.json"}"\n'
    )
    for version in (1, 2, 3):
        installed = agent_cli("install", str(digits_bundles.path(version)), config=config)
        assert installed.returncode == 0, installed.stderr
    log = tmp_path / "daemon.log"
    out = log.open("w")
    proc = subprocess.Popen(
        [str(BIN / "edge-agent"), "run", "--config", str(config)], stdout=out, stderr=out
    )
    daemon = Daemon(proc, port, grpc_port, log)

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail("daemon exited: " + log.read_text())
        try:
            return daemon.rest.ready()
        except Exception:
            return False

    try:
        wait_until(ready, 60, lambda: "daemon ready: " + log.read_text())
    except pytest.fail.Exception:
        proc.kill()
        raise
    yield daemon
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    out.close()
    assert "Traceback" not in log.read_text()


def code_of(exc: InferenceServerException) -> str:
    return str(exc.status()).removeprefix("StatusCode.")


def grpc_infer(client: Any, x: np.ndarray, version: str = "") -> str:
    tensor = tritonclient_grpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x.astype(np.float32))
    result = client.infer("digits", [tensor], model_version=version)
    assert result.as_numpy("probabilities").shape == (len(x), 10)
    return str(result.get_response(as_json=True)["model_version"])


def rest_infer(daemon: Daemon, x: np.ndarray, version: str | None = None) -> tuple[int, Any]:
    path = "/v2/models/digits" + (f"/versions/{version}" if version else "") + "/infer"
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.astype(np.float32).ravel().tolist()}]}  # fmt: skip
    return daemon.rest.request("POST", path, body)


def http_index(daemon: Daemon, ready: bool | None = None) -> list[dict[str, str]]:
    """What ``tritonclient.http``'s ``get_model_repository_index`` sends: an empty POST."""
    body = None if ready is None else {"ready": ready}
    status, document = daemon.rest.request("POST", "/v2/repository/index", body)
    assert status == 200, document
    return list(document)


def by_version(entries: list[Any]) -> dict[str, tuple[str, str]]:
    return {str(e["version"]): (e["state"], e["reason"]) for e in entries}


def test_index_over_rest_and_grpc(daemon: Daemon) -> None:
    rest = by_version(http_index(daemon))
    assert rest["1"] == ("READY", "")
    assert rest["3"] == ("READY", "")
    assert rest["2"][0] == "UNAVAILABLE"
    assert "version policy" in rest["2"][1]
    grpc_index = daemon.grpc().get_model_repository_index(as_json=True)["models"]
    # protobuf's JSON leaves out an empty reason
    assert by_version([{"reason": "", **m} for m in grpc_index]) == rest
    ready = http_index(daemon, ready=True)
    assert sorted(e["version"] for e in ready) == ["1", "3"]
    assert "model_repository" in daemon.grpc().get_server_metadata(as_json=True)["extensions"]


def test_kept_versions_by_number(daemon: Daemon, digits_bundles: DigitsBundles) -> None:
    x = digits_bundles.x_eval[:4]
    client = daemon.grpc()
    assert grpc_infer(client, x) == "3"
    assert grpc_infer(client, x, "1") == "1"
    assert grpc_infer(client, x, "3") == "3"
    status, body = rest_infer(daemon, x, "1")
    assert (status, body["model_version"]) == (200, "1")
    assert client.is_model_ready("digits", "1")
    assert client.get_model_metadata("digits", "1", as_json=True)["versions"] == ["1"]
    # v2 is kept but outside the policy: the typed not-found error on both front ends.
    with pytest.raises(InferenceServerException) as info:
        grpc_infer(client, x, "2")
    assert code_of(info.value) == GRPC_CODE[ModelNotFoundError]
    assert rest_infer(daemon, x, "2")[0] == HTTP_STATUS[ModelNotFoundError]
    status, _ = daemon.rest.request("GET", "/v2/models/digits/versions/2/ready")
    assert status == HTTP_STATUS[ModelNotFoundError]


def test_unload_and_load_with_tritonclient(daemon: Daemon, digits_bundles: DigitsBundles) -> None:
    x = digits_bundles.x_eval[:2]
    client = daemon.grpc()
    client.unload_model("digits")  # sends unload_dependents = false
    try:
        for version in ("", "1"):
            with pytest.raises(InferenceServerException) as info:
                grpc_infer(client, x, version)
            assert code_of(info.value) == GRPC_CODE[ModelStoreError]
            assert "unloaded" in info.value.message()
        status, body = rest_infer(daemon, x)
        assert status == HTTP_STATUS[ModelStoreError]
        assert "unloaded" in body["error"]
        assert {s for s, _ in by_version(http_index(daemon)).values()} == {"UNAVAILABLE"}
        assert daemon.rest.ready()  # an unloaded model does not make the server unready
        assert "digits@1 no longer serves by version" in daemon.log.read_text()  # freed
    finally:
        # tritonclient.http's load_model sends "{}".
        assert daemon.rest.request("POST", "/v2/repository/models/digits/load", {})[0] == 200
    assert grpc_infer(client, x) == "3"
    wait_until(lambda: by_version(http_index(daemon))["1"][0] == "READY", 30)
    assert grpc_infer(client, x, "1") == "1"


def test_load_a_kept_version_and_back(daemon: Daemon, digits_bundles: DigitsBundles) -> None:
    x = digits_bundles.x_eval[:2]
    # tritonclient's load_model has no version argument: Triton's own message, with the
    # parameter this API adds, over a plain channel.
    load = triton_pb2.RepositoryModelLoadRequest(model_name="digits")
    load.parameters["version"].int64_param = 2
    grpc.insecure_channel(daemon.url).unary_unary(
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        request_serializer=triton_pb2.RepositoryModelLoadRequest.SerializeToString,
        response_deserializer=triton_pb2.RepositoryModelLoadResponse.FromString,
    )(load, timeout=60)
    try:
        assert grpc_infer(daemon.grpc(), x) == "2"
        assert by_version(http_index(daemon))["2"] == ("READY", "")
    finally:
        body = {"parameters": {"version": "3"}}
        status, answer = daemon.rest.request("POST", "/v2/repository/models/digits/load", body)
        assert status == 200, answer
    assert grpc_infer(daemon.grpc(), x) == "3"
    status, body = daemon.rest.request(
        "POST", "/v2/repository/models/digits/load", {"parameters": {"config": "{}"}}
    )
    assert status == 400
    assert "signed bundles" in body["error"]
    with pytest.raises(InferenceServerException) as info:
        daemon.grpc().load_model("nope")
    assert code_of(info.value) == GRPC_CODE[ModelNotFoundError]


def test_tritonclient_http_repository(daemon: Daemon, digits_bundles: DigitsBundles) -> None:
    client = tritonclient_http.InferenceServerClient(url=f"127.0.0.1:{daemon.port}")
    assert {e["version"] for e in client.get_model_repository_index()} == {"1", "2", "3"}
    client.unload_model("digits")
    try:
        assert not any(e["state"] == "READY" for e in client.get_model_repository_index())
        assert rest_infer(daemon, digits_bundles.x_eval[:1])[0] == HTTP_STATUS[ModelStoreError]
    finally:
        client.load_model("digits")
    status, body = rest_infer(daemon, digits_bundles.x_eval[:1], "1")
    assert (status, body["model_version"]) == (200, "1")
