"""The real daemon hands back its startup memory once serving, and only when configured to."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from bundles import DigitsBundles
from edge_agent.client import AgentClient
from edge_agent.config import ApiConfig
from mosquitto import free_port
from support import wait_until

BIN = Path(sys.executable).parent
RELEASED = re.compile(r"released ([0-9.]+) MB of library pages")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux memory calls")


def _rss_file_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile")


@contextmanager
def _start(
    tmp_path: Path, digits_bundles: DigitsBundles, runtime: str
) -> Iterator[tuple[subprocess.Popen[bytes], AgentClient, Path]]:
    (tmp_path / "root.json").write_bytes(digits_bundles.keys.root_bytes())
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f"log_json = true\n[api]\nport = {port}\n"
        f'[store]\nstate_dir = "{tmp_path / "state"}"\nroot_path = "{tmp_path / "root.json"}"\n'
        f"[runtime]\n{runtime}\n"
    )
    install = subprocess.run(
        [str(BIN / "edge-agent"), "install", str(digits_bundles.path(1)), "--config", str(config)],
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert install.returncode == 0, install.stderr
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "edge-agent"), "run", "--config", str(config)], stdout=out, stderr=out
        )
    client = AgentClient(ApiConfig(port=port), timeout=5)

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail("daemon exited: " + log.read_text())
        try:
            return client.ready()
        except Exception:
            return False

    try:
        wait_until(ready, 60, lambda: "daemon ready: " + log.read_text())
        yield proc, client, log
    finally:
        proc.terminate()
        proc.wait(30)


def _messages(log: Path) -> list[str]:
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line)["msg"])
        except (ValueError, KeyError):
            continue
    return out


def test_the_daemon_pages_out_library_pages_once_ready_and_keeps_serving(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    with _start(tmp_path, digits_bundles, "release_startup_memory = true") as (proc, client, log):
        found = wait_until(
            lambda: next((RELEASED.search(m) for m in _messages(log) if RELEASED.search(m)), None),
            30,
            lambda: "release logged: " + log.read_text(),
        )
        assert float(found.group(1)) > 1.0  # onnxruntime alone touches more at load
        assert _rss_file_kib(proc.pid) > 0
        x = digits_bundles.x_eval[:4]
        out = client.infer("digits", {"input": x})
        pred = np.argmax(np.asarray(out["outputs"][0]["data"]).reshape(4, 10), axis=1)
        assert (pred == digits_bundles.y_eval[:4]).sum() >= 3


def test_the_daemon_keeps_its_pages_when_release_is_off(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    runtime = "release_startup_memory = false\nmalloc_arenas = 0"
    with _start(tmp_path, digits_bundles, runtime) as (_proc, client, log):
        assert client.infer("digits", {"input": digits_bundles.x_eval[:1]})["outputs"]
        messages = _messages(log)
        assert any(m.startswith("ready:") for m in messages), messages
        assert not any(RELEASED.search(m) for m in messages)
