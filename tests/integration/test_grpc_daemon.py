"""gRPC conformance against a real daemon: tritonclient.grpc (and a raw channel with Triton's own
messages) over TCP and the Unix socket, the same answers and error table as REST."""

from __future__ import annotations

import re
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from test_agent_daemon import BIN, agent_cli

from bundles import DigitsBundles
from edge_agent.client import AgentClient, AgentRequestError
from edge_agent.config import ApiConfig
from edge_agent.errors import API_STATUS, InputValidationError, ModelNotFoundError
from mosquitto import distinct_ports
from support import wait_until

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2 as triton_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

MAX_MESSAGE = 256 * 1024
GRPC_CODE = {family: code for family, _, code in API_STATUS}
HTTP_STATUS = {family: http for family, http, _ in API_STATUS}


class Daemon:
    def __init__(
        self, proc: subprocess.Popen[bytes], ports: tuple[int, int], sock: Path, rest: Any
    ) -> None:
        port, grpc_port = ports
        self.proc = proc
        self.http = f"http://127.0.0.1:{port}"
        self.url = f"127.0.0.1:{grpc_port}"
        self.sock = sock
        self.rest = rest

    def client(self) -> Any:
        return tritonclient_grpc.InferenceServerClient(url=self.url)


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, digits_bundles: DigitsBundles
) -> Iterator[Daemon]:
    tmp_path = tmp_path_factory.mktemp("grpc-daemon")
    (tmp_path / "root.json").write_bytes(digits_bundles.keys.root_bytes())
    port, grpc_port = distinct_ports(2)
    sock = tmp_path / "grpc.sock"
    config = tmp_path / "agent.toml"
    config.write_text(
        f"[api]\nport = {port}\n"
        f'[grpc]\nenabled = true\nport = {grpc_port}\nunix_socket = "{sock}"\n'
        f"max_message_bytes = {MAX_MESSAGE}\n"
        f'[store]\nstate_dir = "{tmp_path / "state"}"\nroot_path = "{tmp_path / "root.json"}"\n'
    )
    assert agent_cli("install", str(digits_bundles.path(1)), config=config).returncode == 0
    log = (tmp_path / "daemon.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "edge-agent"), "run", "--config", str(config)], stdout=log, stderr=log
    )
    rest = AgentClient(ApiConfig(port=port), timeout=5)

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail("daemon did not become ready: " + (tmp_path / "daemon.log").read_text())
        try:
            return rest.ready()
        except Exception:
            return False

    try:
        wait_until(ready, 60, lambda: "daemon ready: " + (tmp_path / "daemon.log").read_text())
    except pytest.fail.Exception:
        proc.kill()
        raise
    yield Daemon(proc, (port, grpc_port), sock, rest)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not sock.exists()  # the gRPC socket file is removed at shutdown
    log.close()
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()


def code_of(exc: InferenceServerException) -> str:
    return str(exc.status()).removeprefix("StatusCode.")


def test_server_probes_and_metadata(daemon: Daemon) -> None:
    client = daemon.client()
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "edgefleet-edge-agent"
    assert meta["extensions"] == daemon.rest.request("GET", "/v2")[1]["extensions"]
    assert client.is_model_ready("digits")
    with pytest.raises(InferenceServerException) as info:
        client.is_model_ready("nope")
    assert code_of(info.value) == GRPC_CODE[ModelNotFoundError]
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert code_of(info.value) == "NOT_FOUND"


def metadata_request(client: Any, x: np.ndarray) -> tuple[list[Any], str]:
    """Inputs built from the model's metadata, as a generic v2 client does."""
    meta = client.get_model_metadata("digits", as_json=True)
    rest_meta = None
    inputs = []
    for spec in meta["inputs"]:
        assert spec["datatype"] == "FP32"
        assert [int(d) for d in spec["shape"]] == [-1, 64]
        tensor = tritonclient_grpc.InferInput(spec["name"], list(x.shape), spec["datatype"])
        tensor.set_data_from_numpy(x.astype(np.float32))
        inputs.append(tensor)
    del rest_meta
    return inputs, meta["outputs"][0]["name"]


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_infer_matches_rest(daemon: Daemon, digits_bundles: DigitsBundles, batch: int) -> None:
    client = daemon.client()
    x = digits_bundles.x_eval[:batch].astype(np.float32)
    inputs, output = metadata_request(client, x)
    result = client.infer("digits", inputs, request_id="r-1")
    scores = result.as_numpy(output)
    assert scores.shape == (batch, 10)
    response = result.get_response(as_json=True)
    assert response["id"] == "r-1"
    assert response["model_version"] == "1"
    assert response["parameters"]["inference_source"]["string_param"] == "device"
    rest = daemon.rest.infer("digits", {"input": x})
    np.testing.assert_allclose(scores, np.asarray(rest["outputs"][0]["data"]).reshape(batch, 10))
    accuracy = (scores.argmax(axis=1) == digits_bundles.y_eval[:batch]).mean()
    assert accuracy >= 0.75


def test_requested_outputs(daemon: Daemon, digits_bundles: DigitsBundles) -> None:
    client = daemon.client()
    x = digits_bundles.x_eval[:2].astype(np.float32)
    inputs, output = metadata_request(client, x)
    wanted = [tritonclient_grpc.InferRequestedOutput(output)]
    result = client.infer("digits", inputs, outputs=wanted)
    assert [o["name"] for o in result.get_response(as_json=True)["outputs"]] == [output]
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", inputs, outputs=[tritonclient_grpc.InferRequestedOutput("nope")])
    assert code_of(info.value) == GRPC_CODE[InputValidationError]
    assert "reason: output" in info.value.message()


def raw_stub(target: str) -> Any:
    """ModelInfer with Triton's own generated messages over a plain channel (typed contents)."""
    channel = grpc.insecure_channel(target)
    return channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=triton_pb2.ModelInferRequest.SerializeToString,
        response_deserializer=triton_pb2.ModelInferResponse.FromString,
    )


def typed_request(x: np.ndarray, **parameters: Any) -> Any:
    request = triton_pb2.ModelInferRequest(model_name="digits", id="typed")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    for key, value in parameters.items():
        request.parameters[key].string_param = value
    return request


@pytest.mark.parametrize("over_unix_socket", [False, True])
def test_typed_contents(
    daemon: Daemon, digits_bundles: DigitsBundles, over_unix_socket: bool
) -> None:
    x = digits_bundles.x_eval[:3].astype(np.float32)
    target = f"unix:{daemon.sock}" if over_unix_socket else daemon.url
    response = raw_stub(target)(typed_request(x, routing_key="app-1"), timeout=10)
    assert response.id == "typed"
    assert response.outputs[0].datatype == "FP32"
    assert list(response.outputs[0].shape) == [3, 10]
    scores = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(3, 10)
    rest = daemon.rest.infer("digits", {"input": x})
    np.testing.assert_allclose(scores, np.asarray(rest["outputs"][0]["data"]).reshape(3, 10))


def test_tritonclient_over_unix_socket(daemon: Daemon, digits_bundles: DigitsBundles) -> None:
    client = tritonclient_grpc.InferenceServerClient(url=f"unix:{daemon.sock}")
    assert client.is_server_ready()
    x = digits_bundles.x_eval[:1].astype(np.float32)
    inputs, output = metadata_request(client, x)
    assert client.infer("digits", inputs).as_numpy(output).shape == (1, 10)
    assert oct(daemon.sock.stat().st_mode & 0o777) == oct(0o660)


def bad_requests(x: np.ndarray) -> dict[str, tuple[Any, type[Exception], int]]:
    """Hostile or wrong requests -> (request, the family REST answers with, its HTTP status)."""
    cases: dict[str, tuple[Any, type[Exception], int]] = {}
    unknown = typed_request(x)
    unknown.model_name = "nope"
    cases["unknown model"] = (unknown, ModelNotFoundError, 404)
    rank = typed_request(x.reshape(-1))
    cases["wrong rank"] = (rank, InputValidationError, 400)
    nan = x.copy()
    nan[0, 0] = np.nan
    cases["nan"] = (typed_request(nan), InputValidationError, 400)
    fp64 = triton_pb2.ModelInferRequest(model_name="digits")
    tensor = fp64.inputs.add(name="input", datatype="FP64", shape=list(x.shape))
    tensor.contents.fp64_contents.extend(x.reshape(-1).tolist())
    cases["FP64 to an FP32 input"] = (fp64, InputValidationError, 400)
    mixed = typed_request(x)
    mixed.inputs[0].contents.int_contents.append(1)
    cases["contents of another datatype"] = (mixed, InputValidationError, 400)
    short = triton_pb2.ModelInferRequest(model_name="digits")
    short.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    short.raw_input_contents.append(x.tobytes()[:-4])
    cases["raw contents too short"] = (short, InputValidationError, 400)
    huge = triton_pb2.ModelInferRequest(model_name="digits")
    huge.inputs.add(name="input", datatype="FP32", shape=[2**31 - 1, 2**31 - 1, 2**31 - 1])
    huge.raw_input_contents.append(b"\0" * 16)
    cases["huge dims"] = (huge, InputValidationError, 400)
    batch = typed_request(np.zeros((65, 64), np.float32))
    cases["batch over the contract"] = (batch, InputValidationError, 400)
    return cases


def test_error_table_is_the_rest_table(daemon: Daemon, digits_bundles: DigitsBundles) -> None:
    x = digits_bundles.x_eval[:2].astype(np.float32)
    stub = raw_stub(daemon.url)
    for label, (request, family, http) in bad_requests(x).items():
        with pytest.raises(grpc.RpcError) as info:
            stub(request, timeout=10)
        assert info.value.code().name == GRPC_CODE[family], label  # type: ignore[attr-defined]
        assert HTTP_STATUS[family] == http, label
    # the same request over REST answers with the same row's HTTP status
    with pytest.raises(AgentRequestError) as rest_info:
        daemon.rest.infer("digits", {"input": x.reshape(-1)})
    assert rest_info.value.status == HTTP_STATUS[InputValidationError]
    with pytest.raises(grpc.RpcError) as info:
        stub(typed_request(x.reshape(-1)), timeout=10)
    assert "reason: rank" in info.value.details() or "reason: shape" in info.value.details()  # type: ignore[attr-defined]
    # a message over grpc.max_message_bytes: RESOURCE_EXHAUSTED, as REST's 413
    big = np.zeros((64, MAX_MESSAGE // 64), np.float32)
    with pytest.raises(grpc.RpcError) as info:
        stub(typed_request(big), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    # bytes that are not a ModelInferRequest: INVALID_ARGUMENT (REST: 400 for an undecodable body)
    garbage = grpc.insecure_channel(daemon.url).unary_unary(
        "/inference.GRPCInferenceService/ModelInfer"
    )
    with pytest.raises(grpc.RpcError) as info:
        garbage(b"\x0a\xff\xff\xff\xff\x0f", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    # and the daemon keeps serving, counting every failure in the REST metrics' series
    assert daemon.client().is_server_ready()
    with urllib.request.urlopen(daemon.http + "/metrics", timeout=5) as response:
        text = response.read().decode()
    invalid = re.findall(r'edgefleet_api_requests_total\{[^}]*outcome="invalid"[^}]*\} (\S+)', text)
    assert sum(float(v) for v in invalid) >= 6
