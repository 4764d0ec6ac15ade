"""Second half of the demo: a whole fleet on one machine, every part a real process.

Uses the signed bundle and key store ``model-builder demo`` wrote into OUT, then:

1. creates the fleet CA, the server's MQTT identity and a Mosquitto configuration (TLS, client
   certificates, per-device ACLs) with ``fleet-server``, and starts Mosquitto;
2. enrolls two devices the way a real device is enrolled: each generates its key and a CSR
   (``edge-agent identity csr``), the operator signs it (``fleet-server devices enroll``), the
   device checks and installs its certificate (``edge-agent identity install``);
3. starts ``fleet-server serve`` (SQLite registry, MQTT gateway, admin API) and two
   ``edge-agent run`` daemons with fleet sync on;
4. publishes the bundle and assigns it to the device group (``fleet-server models publish``,
   ``assign``): each agent verifies the signed desired state, downloads the bundle in blocks,
   verifies it and installs it;
5. sends held-out digits to both agents' local KServe v2 APIs (to the second one also
   mis-scaled inputs, so its drift sketches alert), waits for their telemetry, and prints what
   the server knows: devices, versions, inference counts, drift, telemetry received and lost;
6. stops everything (SIGTERM) and leaves nothing running.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.client import AgentClient
from edge_agent.config import ApiConfig

BIN = Path(sys.executable).parent
DEVICES = ("demo-dev-1", "demo-dev-2")
TOKEN = "demo-admin-token-" + os.urandom(8).hex()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*args: str, env: dict[str, str] | None = None) -> str:
    """Run a CLI to completion; its stdout, or exit with its diagnosis."""
    res = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    if res.returncode != 0:
        raise CliError(f"{' '.join(args[:3])} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout.strip()


class CliError(RuntimeError):
    """A command of the demo failed."""


def wait(what: str, predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # not up yet
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


class Stack:
    """The processes started so far; ``stop`` ends them in reverse order."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append((name, proc))
        return proc

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text()[-2000:]
                raise SystemExit(f"{name} exited with {proc.returncode}:\n{tail}")

    def stop(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                codes[name] = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait(10)
        return codes


class Admin:
    """``fleet-server`` admin commands against the running server, parsed from ``--json``."""

    def __init__(self, url: str) -> None:
        self.env = {"EDGEFLEET_ADMIN_URL": url, "EDGEFLEET_ADMIN_TOKEN": TOKEN}

    def __call__(self, *args: str) -> Any:
        return json.loads(run("fleet-server", *args, "--json", env=self.env))

    def tail(self) -> list[dict[str, Any]]:
        """Every stored telemetry entry (``telemetry tail --json`` prints JSON lines)."""
        out = run("fleet-server", "telemetry", "tail", "--limit", "10000", "--json", env=self.env)
        return [json.loads(line) for line in out.splitlines() if line.strip()]


def main(out: Path) -> int:
    out = out.resolve()  # agent and server configs resolve relative paths against themselves
    bundle = max(out.glob("digits-*.efb"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    version = int(bundle.stem.rsplit("-", 1)[1])
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(mosquitto).exists():
        sys.exit("mosquitto is not installed (scripts/setup.sh installs it)")
    fleet = out / "fleet"
    if fleet.exists():
        shutil.rmtree(fleet)
    logs = fleet / "logs"
    logs.mkdir(parents=True)
    mqtt_port, admin_port = free_port(), free_port()
    admin = Admin(f"http://127.0.0.1:{admin_port}")
    stack = Stack(logs)
    try:
        print("fleet 1/4: fleet CA, server identity and Mosquitto config (TLS, client certs, ACLs)")
        ca_dir = fleet / "ca"
        ca_cert = Path(run("fleet-server", "ca", "init", "--ca-dir", str(ca_dir)))
        run(
            "fleet-server",
            "ca",
            "server-identity",
            "--ca-dir",
            str(ca_dir),
            "--out",
            str(fleet / "server-id"),
        )
        user = ["--user", "root"] if os.geteuid() == 0 else []
        conf = run(
            "fleet-server",
            "broker-config",
            "--ca-dir",
            str(ca_dir),
            "--dir",
            str(fleet / "broker"),
            "--port",
            str(mqtt_port),
            *user,
        )
        stack.start("mosquitto", [mosquitto, "-c", conf])
        wait(
            "mosquitto",
            lambda: socket.create_connection(("127.0.0.1", mqtt_port), 0.2).close() or True,
        )

        print("fleet 2/4: enrolling two devices (key made on the device, CSR signed by the CA)")
        agents: dict[str, tuple[Path, Path]] = {}

        def write_agent_config(config: Path, device: str, home: Path, port: int) -> None:
            config.write_text(
                f'device_id = "{device}"\n[api]\nport = {port}\n'
                f'[store]\nstate_dir = "{home / "state"}"\n'
                f'root_path = "{out / "keys" / "root.json"}"\n'
                "[drift]\nwindow_values = 200\nwindow_seconds = 2.0\n"
                # Hard examples (top probability under 0.9) go to the cloud model.
                '[fallback]\nmode = "prefer_device"\nmin_confidence = 0.9\ndeadline_ms = 1000.0\n'
                "[model_defaults]\nprobation_requests = 50\n"
                f'[sync]\nenabled = true\nport = {mqtt_port}\nidentity_dir = "{home / "id"}"\n'
                "report_interval_seconds = 1.0\nreconnect_max_seconds = 2.0\n"
            )

        for device in DEVICES:
            home = fleet / device
            home.mkdir()
            config = home / "agent.toml"
            write_agent_config(config, device, home, free_port())
            csr = run(
                "edge-agent", "identity", "csr", "--config", str(config), "--ca", str(ca_cert)
            )
            cert = home / "issued.crt"
            run(
                "fleet-server",
                "devices",
                "enroll",
                "--ca-dir",
                str(ca_dir),
                "--csr",
                csr,
                "--device-id",
                device,
                "--out",
                str(cert),
            )
            run("edge-agent", "identity", "install", str(cert), "--config", str(config))
            agents[device] = (config, home)
        print(f"   {', '.join(DEVICES)}: certificates issued by {ca_cert}")

        print("fleet 3/4: fleet-server serve (SQLite registry, MQTT gateway, admin API), 2 agents")
        (fleet / "admin.token").write_text(TOKEN)
        server_toml = fleet / "server.toml"
        server_toml.write_text(
            f'[registry]\nstate_dir = "{fleet / "server"}"\n'
            f'[mqtt]\nport = {mqtt_port}\nca_path = "{ca_cert}"\n'
            f'cert_path = "{fleet / "server-id" / "server.crt"}"\n'
            f'key_path = "{fleet / "server-id" / "server.key"}"\n'
            f'[api]\nport = {admin_port}\ntoken_file = "{fleet / "admin.token"}"\n'
            f'[signing]\nonline_key = "{out / "keys" / "keys" / "online-1.pem"}"\n'
            f'root_path = "{out / "keys" / "root.json"}"\n'
            "[fallback]\nenabled = true\n"
        )
        stack.start(
            "fleet-server", [str(BIN / "fleet-server"), "serve", "--config", str(server_toml)]
        )
        wait("the admin API", lambda: admin("status"))
        for device in DEVICES:
            admin("devices", "register", device, "--group", "demo")
        started = time.monotonic()
        ports: dict[str, int] = {}
        for device, (config, home) in agents.items():
            # The API port is chosen right before the start: one chosen at enrollment could be
            # taken by another process by now on a busy machine.
            ports[device] = free_port()
            write_agent_config(config, device, home, ports[device])
            stack.start(device, [str(BIN / "edge-agent"), "run", "--config", str(config)])

        def online() -> bool:
            stack.check()  # an agent that exited says why, at once
            return bool(admin("status").get("online") == 2)

        wait("both agents online", online)
        stack.check()

        print(f"fleet 4/4: publish {bundle.name}, assign it to group 'demo', deliver over MQTT")
        admin("models", "publish", str(bundle))
        admin("assign", "--group", "demo", "digits", str(version))

        def delivered() -> bool:
            stack.check()
            for device in DEVICES:
                shown = admin("devices", "show", device)
                model = ((shown.get("reported") or {}).get("models") or {}).get("digits", {})
                if model.get("active") != version:
                    return False
            return True

        wait("delivery to both devices", delivered, timeout=120)
        print(
            f"   both devices run digits v{version} ({time.monotonic() - started:.1f} s after "
            "their agents started)"
        )

        data = np.load(out / "example" / "eval.npz")
        x, y = data["input"].astype(np.float32), data["y"]
        served: dict[str, tuple[int, int]] = {}
        for i, (device, port) in enumerate(ports.items()):
            client = AgentClient(ApiConfig(port=port), timeout=10)
            correct = n = 0
            for start in range(0, min(len(x), 320), 8):
                batch = x[start : start + 8]
                if i == 1:  # the second device's camera drifted: inputs at half scale
                    batch = batch * 0.5
                reply = client.infer("digits", {"input": batch})
                probs = np.asarray(reply["outputs"][0]["data"]).reshape(-1, 10)
                correct += int((probs.argmax(axis=1) == y[start : start + 8]).sum())
                n += len(batch)
            served[device] = (correct, n)

        def reported_all() -> list[dict[str, Any]] | None:
            rows = admin.tail()
            latest: dict[str, dict[str, Any]] = {}
            for row in rows:
                if row.get("kind") == "report":
                    latest[row["device_id"]] = row
            done = all(
                (
                    latest.get(d, {})
                    .get("payload", {})
                    .get("models", {})
                    .get("digits", {})
                    .get("outcomes", {})
                    .get("ok", 0)
                )
                >= served[d][1] // 8
                for d in DEVICES
            )
            return rows if done else None

        rows = wait("telemetry of every request", reported_all, timeout=60)
        time.sleep(3)  # one more report window, so the drift windows are in
        rows = admin.tail()
        print("\nsummary (from the fleet server's registry)")
        print(
            f"{'device':<12} {'model':<10} {'requests':>8} {'cloud':>5} {'accuracy':>9} "
            f"{'drift alerts':>12} {'features drifted':>16} {'telemetry':>9} {'lost':>4}"
        )
        summary: dict[str, Any] = {}
        for device in DEVICES:
            mine = [r for r in rows if r["device_id"] == device]
            reports = [r["payload"] for r in mine if r["kind"] == "report"]
            model = reports[-1]["models"]["digits"]
            windows = [w for r in reports for w in r["models"].get("digits", {}).get("drift", [])]
            alerts = [w for w in windows if w.get("alert")]
            drifted = sorted({f for w in alerts for f in w.get("drifted", [])})
            shown = admin("devices", "show", device)
            lost = (shown.get("seq") or {}).get("lost", 0)
            correct, n = served[device]
            cloud = int(reports[-1]["counts"].get("cloud", 0))
            print(
                f"{device:<12} digits v{model['version']:<2} {sum(model['outcomes'].values()):>8} "
                f"{cloud:>5} {correct / n:>9.1%} {len(alerts):>5}/{len(windows):<6} "
                f"{len(drifted):>16} {len(mine):>9} {lost:>4}"
            )
            summary[device] = {
                "version": model["version"],
                "requests": sum(model["outcomes"].values()),
                "accuracy": correct / n,
                "cloud_answers": cloud,
                "drift_windows": len(windows),
                "drift_alerts": len(alerts),
                "telemetry_items": len(mine),
                "lost": lost,
            }
        g = admin("status")["gateway"]
        print(
            f"server: {g['items_inserted']} telemetry items stored, {g['duplicates']} duplicate "
            f"deliveries ignored, {g['lost']} lost, {g['acks_sent']} acks sent; bundle blocks "
            f"{g['blocks_broadcast']} broadcast + {g['blocks_unicast']} unicast for "
            f"{g['block_requests']} requests"
        )
    finally:
        codes = stack.stop()
    print(f"\nstopped cleanly: {codes}; logs in {logs}")
    (out / "fleet-summary.json").write_text(json.dumps(summary, indent=2))
    bad_exit = [n for n, c in codes.items() if c not in (0, -signal.SIGTERM)]
    ok = (
        not bad_exit
        and all(s["version"] == version for s in summary.values())
        and summary[DEVICES[1]]["drift_alerts"] > 0
        and summary[DEVICES[0]]["accuracy"] > 0.9
        and sum(s["cloud_answers"] for s in summary.values()) > 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        code = main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out"))
    except CliError as exc:
        sys.exit(f"demo failed: {exc}")
    raise SystemExit(code)
