"""The real server: uvicorn on a loopback port and a Unix socket, real HTTP, graceful drain.

Run as a script (``python test_api_server.py <socket> <drain_seconds>``) it serves a slow fake
service until SIGTERM: the SIGTERM test uses that to check the real signal path in a process of
its own.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from edge_agent.api.app import create_app
from edge_agent.api.server import ServerHandle, serve
from edge_agent.config import ApiConfig
from edge_agent.errors import ConfigError, ModelNotFoundError
from edge_agent.serving.service import InferenceRequest, InferenceResult


class SlowService:
    """Doubles its inputs after sleeping ``parameters["sleep"]`` seconds."""

    def __init__(self, announce: bool = False) -> None:
        self.announce = announce
        self.started = threading.Semaphore(0)

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def not_ready(self) -> dict[str, str]:
        return {}

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "edgefleet", "version": "test", "extensions": []}

    def model_names(self) -> list[str]:
        return ["double"]

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        if name != "double":
            raise ModelNotFoundError(name)
        return {"name": name, "versions": ["1"], "platform": "fake", "inputs": [], "outputs": []}

    def model_ready(self, name: str, version: str | None = None) -> bool:
        self.model_metadata(name)
        return True

    def infer(self, request: InferenceRequest) -> InferenceResult:
        self.model_metadata(request.model)
        self.started.release()
        if self.announce:
            print("infer-started", flush=True)
        time.sleep(float(request.parameters.get("sleep", 0)))
        return InferenceResult(
            model=request.model,
            model_version="1",
            outputs={k + "_doubled": v * 2 for k, v in request.inputs.items()},
        )


BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


def slow_body(seconds: float) -> dict[str, Any]:
    return {**BODY, "parameters": {"sleep": seconds}}


def api_config(tmp_path: Path, **overrides: Any) -> ApiConfig:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "unix_socket": str(tmp_path / "api.sock"),
        "rate_limit_per_second": 1e6,
        "rate_limit_burst": 1_000_000,
        "drain_seconds": 5.0,
    }
    values.update(overrides)
    return ApiConfig(**values)


@contextmanager
def running(service: Any, config: ApiConfig) -> Iterator[tuple[ServerHandle, threading.Thread]]:
    handles: queue.Queue[ServerHandle | BaseException] = queue.Queue()

    def target() -> None:
        try:
            serve(create_app(service, config), config, ready_callback=handles.put)
        except BaseException as exc:
            handles.put(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    handle = handles.get(timeout=10)
    if isinstance(handle, BaseException):
        raise handle
    try:
        yield handle, thread
    finally:
        handle.shutdown()
        thread.join(timeout=15)


def uds_client(path: str) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=path), base_url="http://agent", timeout=10
    )


def test_serves_tcp_and_unix_socket(tmp_path: Path) -> None:
    config = api_config(tmp_path)
    sock = config.unix_socket
    assert sock is not None
    with running(SlowService(), config) as (handle, thread):
        assert handle.tcp_address[1] > 0
        info = Path(sock).stat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660
        with httpx.Client(base_url=handle.url, timeout=10) as tcp, uds_client(sock) as uds:
            for client in (tcp, uds):
                assert client.get("/v2/health/ready").json() == {"ready": True}
                response = client.post("/v2/models/double/infer", json=BODY)
                assert response.status_code == 200
                assert response.json()["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0]
                assert client.post("/v2/models/nope/infer", json=BODY).status_code == 404
                assert client.post("/v2/models/double/infer", content=b"{").status_code == 400
            x = np.arange(4, dtype=np.float32)
            header = json.dumps(
                {
                    "inputs": [
                        {
                            "name": "x",
                            "datatype": "FP32",
                            "shape": [4],
                            "parameters": {"binary_data_size": 16},
                        }
                    ],
                    "parameters": {"binary_data_output": True},
                }
            ).encode()
            response = uds.post(
                "/v2/models/double/infer",
                content=header + x.tobytes(),
                headers={"Inference-Header-Content-Length": str(len(header))},
            )
            n = int(response.headers["inference-header-content-length"])
            assert np.frombuffer(response.content[n:], "<f4").tolist() == [0.0, 2.0, 4.0, 6.0]
            metrics = tcp.get("/metrics").text
            assert 'edgefleet_api_requests_total{endpoint="infer",model="double"' in metrics
    assert not thread.is_alive()
    assert not os.path.lexists(sock)


def test_oversized_bodies_get_413_over_real_http(tmp_path: Path) -> None:
    config = api_config(tmp_path, max_request_bytes=1024 * 1024)

    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield bytes(65536)

    with running(SlowService(), config) as (handle, _):
        with httpx.Client(base_url=handle.url, timeout=10) as client:
            declared = client.post("/v2/models/double/infer", content=bytes(4 * 1024 * 1024))
            chunked = client.post("/v2/models/double/infer", content=chunks())
        for response in (declared, chunked):
            assert response.status_code == 413
            assert "limit is 1048576 bytes" in response.json()["error"]
        assert httpx.get(handle.url + "/v2/health/live").status_code == 200


def test_shutdown_lets_in_flight_requests_finish(tmp_path: Path) -> None:
    config = api_config(tmp_path)
    sock = config.unix_socket
    assert sock is not None
    service = SlowService()
    responses: list[httpx.Response] = []

    def call(client: httpx.Client) -> None:
        with client:
            responses.append(client.post("/v2/models/double/infer", json=slow_body(1.5)))

    with running(service, config) as (handle, thread):
        callers = [
            threading.Thread(target=call, args=(httpx.Client(base_url=handle.url, timeout=10),)),
            threading.Thread(target=call, args=(uds_client(sock),)),
        ]
        for caller in callers:
            caller.start()
        for _ in callers:
            assert service.started.acquire(timeout=5)
        handle.shutdown()

        # listeners close at once: a new connection is refused while the old ones finish
        from support import wait_until  # here: this module also runs as a script (no tests/)

        def refused() -> bool:
            try:
                socket.create_connection(handle.tcp_address, timeout=0.2).close()
            except OSError:
                return True
            return False

        wait_until(refused, 1.0, "connections to be refused after shutdown")
        for caller in callers:
            caller.join(timeout=10)
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert [r.status_code for r in responses] == [200, 200]
    assert not os.path.lexists(sock)


def test_drain_timeout_bounds_shutdown(tmp_path: Path) -> None:
    config = api_config(tmp_path, drain_seconds=0.5)
    service = SlowService()
    outcomes: list[int | str] = []

    def call(url: str) -> None:
        try:
            response = httpx.post(url + "/v2/models/double/infer", json=slow_body(4.0), timeout=10)
            outcomes.append(response.status_code)
        except httpx.HTTPError as exc:
            outcomes.append(type(exc).__name__)

    with running(service, config) as (handle, thread):
        caller = threading.Thread(target=call, args=(handle.url,))
        caller.start()
        assert service.started.acquire(timeout=5)
        started = time.monotonic()
        handle.shutdown()
        thread.join(timeout=10)
        assert time.monotonic() - started < 2.5  # the drain, not the 4 s model call
        caller.join(timeout=10)
    assert len(outcomes) == 1
    assert outcomes[0] != 200  # the stuck request was cut off (uvicorn answers 500), not answered


def test_sigterm_drains_and_exits_cleanly(tmp_path: Path) -> None:
    sock = str(tmp_path / "api.sock")
    with server_process(sock) as (proc, _):
        assert proc.stdout is not None
        responses: list[httpx.Response] = []

        def call() -> None:
            with uds_client(sock) as client:
                responses.append(client.post("/v2/models/double/infer", json=slow_body(1.0)))

        caller = threading.Thread(target=call)
        caller.start()
        assert proc.stdout.readline().strip() == "infer-started"
        proc.send_signal(signal.SIGTERM)
        caller.join(timeout=10)
        assert proc.wait(timeout=10) == 0  # returned normally: the signal was not re-raised
        assert [r.status_code for r in responses] == [200]
        assert not os.path.lexists(sock)
        assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")


def test_socket_path_checks(tmp_path: Path) -> None:
    config = api_config(tmp_path)
    sock = config.unix_socket
    assert sock is not None
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock)
    stale.close()  # a socket file nobody listens on, as a crash leaves it
    with running(SlowService(), config):
        with uds_client(sock) as client:
            assert client.get("/v2/health/live").status_code == 200
        with pytest.raises(ConfigError, match="in use"):
            serve(create_app(SlowService(), config), config)
    regular = tmp_path / "file.sock"
    regular.write_text("not a socket")
    other = api_config(tmp_path, unix_socket=str(regular))
    with pytest.raises(ConfigError, match="not a socket"):
        serve(create_app(SlowService(), other), other)
    assert regular.read_text() == "not a socket"


@contextmanager
def server_process(sock: str, *flags: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """This module run as a server in a process of its own; yields it and its URL."""
    proc = subprocess.Popen(
        [sys.executable, __file__, sock, "5", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["unix_socket"] == sock
        yield proc, ready["url"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_indicative_throughput(tmp_path: Path) -> None:
    """Prints requests/s and latency of the real server (own process, fake service); no asserts
    on timing. The httpx clients share the same cores, so this is a floor, not a benchmark."""
    sock = str(tmp_path / "api.sock")
    payload = json.dumps(BODY).encode()
    with server_process(sock, "--quiet") as (proc, url):
        for label, factory in (
            ("tcp", lambda: httpx.Client(base_url=url, timeout=10)),
            ("uds", lambda: uds_client(sock)),
        ):
            latencies: list[list[float]] = [[] for _ in range(8)]
            statuses: list[list[int]] = [[] for _ in range(8)]

            def worker(factory: Any, mine: list[float], codes: list[int]) -> None:
                with factory() as client:
                    for _ in range(250):
                        t0 = time.perf_counter()
                        response = client.post("/v2/models/double/infer", content=payload)
                        mine.append(time.perf_counter() - t0)
                        codes.append(response.status_code)

            threads = [
                threading.Thread(target=worker, args=(factory, latencies[i], statuses[i]))
                for i in range(8)
            ]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
            assert list(itertools.chain(*statuses)) == [200] * 2000
            p50, p99 = np.percentile(list(itertools.chain(*latencies)), [50, 99]) * 1000
            print(
                f"\n[{label}] 2000 requests, 8 threads: {2000 / elapsed:.0f} req/s,"
                f" p50 {p50:.2f} ms, p99 {p99:.2f} ms"
            )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def _main() -> None:
    sock, drain = sys.argv[1], float(sys.argv[2])
    config = ApiConfig(
        host="127.0.0.1",
        port=0,
        unix_socket=sock,
        drain_seconds=drain,
        rate_limit_per_second=1e6,
        rate_limit_burst=1_000_000,
    )

    def ready(handle: ServerHandle) -> None:
        print(json.dumps({"url": handle.url, "unix_socket": handle.unix_socket}), flush=True)

    service = SlowService(announce="--quiet" not in sys.argv)
    serve(create_app(service, config), config, ready_callback=ready)


if __name__ == "__main__":
    _main()
