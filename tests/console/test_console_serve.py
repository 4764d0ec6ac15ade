"""The console in ``fleet-server serve`` as a real process (real Mosquitto, SQLite registry):
the pages, templates and static files ship with the package and are served on the admin
listener; an account made with ``fleet-server accounts bootstrap`` logs in."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from fleet import stop_process, wait_until
from fleet_server.console.web import SECURITY_HEADERS
from model_builder.keystore import KeyStore
from mosquitto import MOSQUITTO, FleetBroker, fleet_broker, free_port

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

FLEET = str(Path(sys.executable).parent / "fleet-server")
TOKEN = "console-serve-admin-token-0123456789"
PASSWORD = "console serve password"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[FleetBroker]:
    with fleet_broker(tmp_path / "mqtt", ("cam-1",)) as b:
        yield b


def _config(tmp_path: Path, broker: FleetBroker) -> tuple[Path, int]:
    keys = KeyStore.init(tmp_path / "keys", now=datetime.now(UTC))
    creds = broker.creds[broker.server]
    port = free_port()
    (tmp_path / "token").write_text(TOKEN)
    path = tmp_path / "server.toml"
    path.write_text(
        f'[registry]\nstate_dir = "{tmp_path / "server"}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nca_path = "{creds.ca}"\n'
        f'cert_path = "{creds.cert}"\nkey_path = "{creds.key}"\n'
        f'[gateway]\nprefix = "{broker.prefix}"\n'
        f'[api]\nport = {port}\ntoken_file = "{tmp_path / "token"}"\n'
        f'[signing]\nonline_key = "{keys.path / "keys" / "online-1.pem"}"\n'
        f'root_path = "{keys.path / "root.json"}"\n'
    )
    return path, port


def test_serve_has_the_console(broker: FleetBroker, tmp_path: Path) -> None:
    config, port = _config(tmp_path, broker)
    boot = subprocess.run(
        [FLEET, "accounts", "bootstrap", "--config", str(config), "root", "--password-stdin"],
        input=PASSWORD + "\n", capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert boot.returncode == 0, boot.stdout + boot.stderr
    log = (tmp_path / "server.log").open("ab")
    server = subprocess.Popen([FLEET, "serve", "--config", str(config)], stdout=log,
                              stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, timeout=60, what="fleet-server serve answering")
        with httpx.Client(base_url=base, timeout=10) as c:
            r = c.get("/console/", follow_redirects=False)
            assert r.status_code == 303
            login = c.get(r.headers["location"])
            assert login.status_code == 200
            assert 'name="password"' in login.text
            for k, v in SECURITY_HEADERS.items():
                assert login.headers[k] == v
            js = c.get("/console/static/htmx.min.js")
            assert js.status_code == 200
            assert js.content.startswith(b"var htmx=")
            assert c.get("/console/static/console.css").status_code == 200
            r = c.post("/console/login", data={"name": "root", "password": PASSWORD},
                       follow_redirects=False)  # fmt: skip
            assert r.status_code == 303
            assert "httponly" in r.headers["set-cookie"].lower()
            page = c.get("/console/")
            assert page.status_code == 200
            assert "Fleet overview" in page.text
            assert "root" in page.text
    finally:
        stop_process(server)
        log.close()
