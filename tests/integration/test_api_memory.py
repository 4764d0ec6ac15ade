"""The daemon's memory stays within ``api.max_decode_memory_bytes`` under hostile bodies.

A real ``edge-agent run`` process serving the digits model; eight clients at once send bodies
that are cheap to send and expensive to decode. The peak resident set of the process
(``VmHWM`` in ``/proc/<pid>/status``, reset after warm-up through ``clear_refs``) may exceed the
resident set before the attack by at most the configured budget. This is a memory bound, not a
timing one: nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bundles import DigitsBundles
from support import wait_until

BIN = Path(sys.executable).parent
MAX_BODY = 8 * 1024 * 1024
BUDGET = 64 * 1024 * 1024


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{key} not in /proc/{pid}/status")


def _post(port: int, body: bytes, statuses: list[int]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v2/models/digits/infer", body=body)
        response = conn.getresponse()
        response.read()
        statuses.append(response.status)
    finally:
        conn.close()


def _data_body(items: bytes, size: int) -> bytes:
    head = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1],"data":['
    count = (size - len(head) - 4) // (len(items) + 1)
    return head + b",".join([items] * count) + b"]}]}"


@pytest.fixture
def daemon(tmp_path: Path, digits_bundles: DigitsBundles):  # type: ignore[no-untyped-def]
    (tmp_path / "root.json").write_bytes(digits_bundles.keys.root_bytes())
    port = _free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f"[api]\nport = {port}\nmax_request_bytes = {MAX_BODY}\n"
        f"max_decode_memory_bytes = {BUDGET}\n"
        f'[store]\nstate_dir = "{tmp_path / "state"}"\nroot_path = "{tmp_path / "root.json"}"\n'
    )
    install = [str(BIN / "edge-agent"), "install", str(digits_bundles.path(1))]
    subprocess.run([*install, "--config", str(config)], check=True, capture_output=True)
    log = (tmp_path / "daemon.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "edge-agent"), "run", "--config", str(config)], stdout=log, stderr=log
    )

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail("daemon not ready: " + (tmp_path / "daemon.log").read_text())
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v2/health/ready")
            return conn.getresponse().status == 200
        except OSError:
            return False

    try:
        wait_until(ready, 60, lambda: "daemon ready: " + (tmp_path / "daemon.log").read_text())
    except pytest.fail.Exception:
        proc.kill()
        raise
    yield proc, port
    proc.kill()
    proc.wait()
    log.close()


@pytest.mark.parametrize(
    ("case", "items", "size", "expect"),
    [
        # The body: 8 MiB of empty arrays (~220 MB to decode): refused after reading.
        ("empty arrays", b"[]", MAX_BODY, 413),
        # Admitted (its bound is within the budget), decoded one or two at a time: a column of
        # short numbers (~23 bytes of memory per byte), refused by validation afterwards.
        ("column", b"[0.5]", 1536 * 1024, 400),
    ],
)
def test_eight_hostile_bodies_stay_within_the_decode_budget(
    daemon: tuple[subprocess.Popen[bytes], int], case: str, items: bytes, size: int, expect: int
) -> None:
    proc, port = daemon
    warm = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
    ).encode()
    for _ in range(3):
        _post(port, warm, [])
    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status(proc.pid, "VmRSS")
    body = _data_body(items, size)
    statuses: list[int] = []
    threads = [threading.Thread(target=_post, args=(port, body, statuses)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    peak = _status(proc.pid, "VmHWM")
    assert statuses == [expect] * 8
    assert proc.poll() is None
    grown = peak - before
    assert grown <= BUDGET, f"{case}: peak grew {grown >> 20} MiB, budget {BUDGET >> 20} MiB"
