"""The gRPC listener beside the HTTP API: one drain on SIGTERM (in-flight calls on both finish),
exclusive ports, the Unix socket's rules.

Run as a script (``python test_grpc_server.py <dir>``) it serves the slow fake service of
``test_api_server`` over HTTP and gRPC until SIGTERM, in a process of its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from test_api_server import SlowService, slow_body

from edge_agent.api.app import create_app, limiter_from_config
from edge_agent.api.grpc_v2.messages import message_class
from edge_agent.api.grpc_v2.server import GrpcListener
from edge_agent.api.grpc_v2.service import GrpcInference
from edge_agent.api.metrics import ApiMetrics
from edge_agent.api.server import ServerHandle, serve
from edge_agent.config import ApiConfig, GrpcConfig
from edge_agent.errors import ConfigError

Request = message_class("ModelInferRequest")
Response = message_class("ModelInferResponse")


def slow_request(seconds: float) -> Any:
    req = Request(model_name="double")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([1, 2])
    req.parameters["sleep"].double_param = seconds
    return req


def infer_stub(target: str) -> Any:
    return grpc.insecure_channel(target).unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )


@contextmanager
def server_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    proc = subprocess.Popen(
        [sys.executable, __file__, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield proc, json.loads(proc.stdout.readline())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_drains_http_and_grpc_together(tmp_path: Path) -> None:
    with server_process(tmp_path) as (proc, where):
        assert proc.stdout is not None
        answers: dict[str, Any] = {}

        def grpc_call() -> None:
            try:
                answers["grpc"] = infer_stub(where["grpc_unix"])(slow_request(1.0), timeout=20)
            except grpc.RpcError as exc:
                answers["grpc"] = exc

        def http_call() -> None:
            with httpx.Client(base_url=where["url"], timeout=20) as client:
                answers["http"] = client.post("/v2/models/double/infer", json=slow_body(1.0))

        callers = [threading.Thread(target=grpc_call), threading.Thread(target=http_call)]
        for caller in callers:
            caller.start()
        for _ in callers:
            assert proc.stdout.readline().strip() == "infer-started"
        proc.send_signal(signal.SIGTERM)  # both calls are in flight now
        for caller in callers:
            caller.join(timeout=20)
        assert proc.wait(timeout=20) == 0
        assert answers["http"].status_code == 200
        reply = answers["grpc"]
        assert not isinstance(reply, grpc.RpcError), reply
        assert [o.name for o in reply.outputs] == ["x_doubled"]
        stderr = proc.stderr.read() if proc.stderr else ""
        assert "Traceback" not in stderr
        assert not os.path.lexists(where["grpc_unix"].removeprefix("unix:"))
        with pytest.raises(grpc.RpcError) as info:  # and nothing answers any more
            infer_stub(where["grpc"])(slow_request(0), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def listener(config: GrpcConfig) -> GrpcListener:
    servicer = GrpcInference(SlowService(), ApiMetrics(), limiter_from_config(ApiConfig()))
    return GrpcListener(servicer, config)


def test_port_and_socket_are_exclusive(tmp_path: Path) -> None:
    sock = tmp_path / "g.sock"
    first = listener(GrpcConfig(enabled=True, port=0, unix_socket=str(sock)))
    first.start()
    try:
        assert oct(sock.stat().st_mode & 0o777) == oct(0o660)
        with pytest.raises(ConfigError, match="cannot listen"):  # no silent SO_REUSEPORT sharing
            listener(GrpcConfig(enabled=True, port=first.port or 0)).start()
        with pytest.raises(ConfigError, match="in use"):
            listener(GrpcConfig(enabled=True, port=0, unix_socket=str(sock))).start()
    finally:
        first.begin_drain(0)
        first.wait_drained()
    assert not sock.exists()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # a socket file nobody listens on, as a crash leaves it: replaced
    again = listener(GrpcConfig(enabled=True, port=0, unix_socket=str(sock)))
    again.start()
    again.begin_drain(0)
    again.wait_drained()
    regular = tmp_path / "file.sock"
    regular.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        listener(GrpcConfig(enabled=True, port=0, unix_socket=str(regular))).start()
    assert regular.read_text() == "not a socket"


def test_calls_over_the_bound_get_resource_exhausted() -> None:
    service = SlowService()
    servicer = GrpcInference(service, ApiMetrics(), limiter_from_config(ApiConfig()))
    config = GrpcConfig(enabled=True, port=0, max_workers=1, max_concurrent_rpcs=1)
    bound = GrpcListener(servicer, config)
    bound.start()
    try:
        stub = infer_stub(bound.target)
        slow = stub.future(slow_request(1.0), timeout=20)
        assert service.started.acquire(timeout=20)  # the one admitted call is running
        with pytest.raises(grpc.RpcError) as info:
            stub(slow_request(0), timeout=20)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert [o.name for o in slow.result().outputs] == ["x_doubled"]
    finally:
        bound.begin_drain(0)
        bound.wait_drained()


def test_a_listener_that_cannot_start_stops_serve(tmp_path: Path) -> None:
    regular = tmp_path / "file.sock"
    regular.write_text("not a socket")
    config = ApiConfig(port=0, unix_socket=str(tmp_path / "api.sock"))
    bad = listener(GrpcConfig(enabled=True, port=0, unix_socket=str(regular)))
    with pytest.raises(ConfigError, match="not a socket"):
        serve(create_app(SlowService(), config), config, listeners=[bad])
    assert not (tmp_path / "api.sock").exists()


def _main() -> None:
    where = Path(sys.argv[1])
    config = ApiConfig(port=0, unix_socket=str(where / "api.sock"), drain_seconds=5.0)
    service = SlowService(announce=True)
    metrics = ApiMetrics()
    app = create_app(service, config, metrics)
    servicer = GrpcInference(service, metrics, app.state.rate_limiter)
    grpc_config = GrpcConfig(enabled=True, port=0, unix_socket=str(where / "grpc.sock"))
    grpc_listener = GrpcListener(servicer, grpc_config)

    def ready(handle: ServerHandle) -> None:
        target = {"grpc": grpc_listener.target, "grpc_unix": f"unix:{where / 'grpc.sock'}"}
        print(json.dumps({"url": handle.url, **target}), flush=True)

    serve(app, config, ready_callback=ready, listeners=[grpc_listener])


if __name__ == "__main__":
    _main()
