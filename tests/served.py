"""``fleet-server serve`` as a real process, driven by the ``fleet-server`` CLI as subprocesses.

``server_config`` writes a server config for a ``FleetBroker`` (registry in ``tmp_path``, the
admin API on a free port with ``TOKEN``, signing with the builder's key store, rollouts judged
every second). ``served_fleet`` starts ``fleet-server serve`` on it, waits until ``status``
answers, and yields a ``FleetCli`` whose ``run`` calls the CLI with the server's URL and token
in its environment, as an operator's shell would; the server is stopped on exit.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fleet import stop_process, wait_until
from mosquitto import FleetBroker, free_port

TOKEN = "rollout-e2e-admin-token-0123456789"
FLEET = str(Path(sys.executable).parent / "fleet-server")


def server_config(
    tmp_path: Path,
    broker: FleetBroker,
    keys_dir: Path,
    port: int | None = None,
    *,
    rollout_interval: float = 1.0,
    fallback: bool = True,
) -> tuple[Path, int]:
    """Write ``tmp_path/server.toml`` for ``broker`` (admin API on ``port``, a free one when
    None); returns its path and the admin API port."""
    creds = broker.creds[broker.server]
    port = free_port() if port is None else port
    (tmp_path / "token").write_text(TOKEN)
    path = tmp_path / "server.toml"
    path.write_text(
        f'[registry]\nstate_dir = "{tmp_path / "server"}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nca_path = "{creds.ca}"\n'
        f'cert_path = "{creds.cert}"\nkey_path = "{creds.key}"\n'
        f'[gateway]\nprefix = "{broker.prefix}"\n'
        f'[api]\nport = {port}\ntoken_file = "{tmp_path / "token"}"\n'
        f'[signing]\nonline_key = "{keys_dir / "keys" / "online-1.pem"}"\n'
        f'root_path = "{keys_dir / "root.json"}"\n'
        + ("[fallback]\nenabled = true\n" if fallback else "")
        + f"[rollouts]\ninterval_seconds = {rollout_interval}\n"
    )
    return path, port


@dataclass(frozen=True)
class FleetCli:
    """The ``fleet-server`` CLI pointed at a served fleet."""

    env: dict[str, str]

    def run(self, *args: str, code: int | None = 0) -> subprocess.CompletedProcess[str]:
        """``fleet-server ARGS``; asserts its exit code is ``code`` unless ``code`` is None."""
        res = subprocess.run(
            [FLEET, *args], env=self.env, capture_output=True, text=True, timeout=60, check=False
        )
        if code is not None:
            assert res.returncode == code, res.stdout + res.stderr
        return res


@contextmanager
def served_fleet(tmp_path: Path, broker: FleetBroker, keys_dir: Path) -> Iterator[FleetCli]:
    """``fleet-server serve`` on ``server_config``'s config, up and answering ``status``."""
    config, port = server_config(tmp_path, broker, keys_dir)
    cli = FleetCli(
        {"EDGEFLEET_ADMIN_URL": f"http://127.0.0.1:{port}", "EDGEFLEET_ADMIN_TOKEN": TOKEN}
    )
    with (tmp_path / "server.log").open("ab") as log:
        server = subprocess.Popen(
            [FLEET, "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_until(
                lambda: cli.run("status", code=None).returncode == 0,
                timeout=60,
                what="fleet-server up",
            )
            yield cli
        finally:
            stop_process(server)
