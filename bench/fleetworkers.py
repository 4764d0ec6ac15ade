"""Bench plumbing for ``bench_ingest_workers.py``: PostgreSQL, worker identities, gateway workers.

Owns: a throwaway PostgreSQL cluster (``initdb`` + ``pg_ctl`` from ``/usr/lib/postgresql/*/bin``
into a temporary directory, a free loopback port, trust auth, the unix socket in the same
directory, run as the ``postgres`` user when we are root; never the system service; mirrors
``tests/pg.py`` without importing from ``tests/``), the fleet PKI and broker with extra server
worker identities (``BrokerConfig(worker_cns=...)`` grants each the server's ACL rights), and
gateway worker processes: each its own spawned process with its own certificate/client id and
its own ``MqttClient`` + ``Gateway`` + ``Registry`` on the shared PostgreSQL URL and the same
share group, driven over a pipe (``stats`` / ``stop``).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fleet_server.pki.broker_config import BrokerConfig, write_broker_config
from fleet_server.pki.ca import CertificateAuthority
from fleetbench import PREFIX, Broker, Creds, free_port, proc_cpu_seconds

SHARE_GROUP = "fleet"


# --------------------------------------------------------------------------- PostgreSQL
def pg_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    return found[0].parent if found else None


class PgCluster:
    """A throwaway PostgreSQL cluster; ``start``, ``create_database``, ``stop`` (removes it)."""

    def __init__(self) -> None:
        bindir = pg_bindir()
        if bindir is None or not (bindir / "pg_ctl").exists():
            raise RuntimeError("PostgreSQL server binaries not found in /usr/lib/postgresql")
        self.bindir = bindir
        self.base = Path(tempfile.mkdtemp(prefix="edgefleet-bench-pg-"))
        self.data, self.sock = self.base / "data", self.base / "sock"
        self.port = free_port()
        self.run_as: dict[str, Any] = {}
        self.started = False
        self.sock.mkdir()
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            user = pwd.getpwnam("postgres")
            for p in (self.base, self.sock):
                os.chown(p, user.pw_uid, user.pw_gid)
            self.run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            check=True,
            capture_output=True,
            timeout=timeout,
            **self.run_as,
        )

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8")
        opts = (
            f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=100"
        )
        self.started = True
        try:
            self._run(
                "pg_ctl", "-D", str(self.data), "-l", str(self.base / "log"), "-o", opts,
                "-w", "-t", "30", "start",
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            log = self.base / "log"
            detail = log.read_text() if log.exists() else exc.stderr.decode(errors="replace")
            raise RuntimeError(f"could not start PostgreSQL: {detail[-2000:]}") from exc

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def cpu_seconds(self) -> float:
        """CPU seconds of the postmaster and its live children (backends, WAL writer...)."""
        pm = self.postmaster_pid()
        if pm is None:
            return 0.0
        total = proc_cpu_seconds(pm)
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pm:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def stop(self) -> None:
        """Stop (immediate) and delete the cluster directory. Never raises."""
        try:
            if self.started:
                with contextlib.suppress(Exception):
                    self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
                pm = self.postmaster_pid()
                if pm is not None and Path(f"/proc/{pm}").exists():
                    with contextlib.suppress(OSError):
                        os.kill(pm, 9)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


# --------------------------------------------------------------------------- broker + identities
def worker_identities(
    ca: CertificateAuthority, root: Path, names: tuple[str, ...]
) -> dict[str, Creds]:
    """A server certificate per extra worker CN (``<label>.server``)."""
    out: dict[str, Creds] = {}
    now = datetime.now(UTC)
    for name in names:
        pair = ca.issue_server_identity(name, now=now)
        (root / f"{name}.key").write_bytes(pair.key_pem)
        (root / f"{name}.crt").write_bytes(pair.cert_pem)
        out[name] = Creds(str(ca.cert_path), str(root / f"{name}.crt"), str(root / f"{name}.key"))
    return out


def broker_with_workers(
    directory: Path,
    ca: CertificateAuthority,
    server: Creds,
    server_cn: str,
    workers: tuple[str, ...],
) -> Broker:
    """``fleetbench.Broker`` whose ACL also grants the server's rights to ``workers``."""
    port = free_port()
    config = BrokerConfig(
        port=port,
        prefix=PREFIX,
        server_cn=server_cn,
        worker_cns=workers,
        run_as_user="root" if os.geteuid() == 0 else None,
    )
    files = write_broker_config(directory / "broker", ca, config, now=datetime.now(UTC))
    return Broker(directory, files, port, server)


# --------------------------------------------------------------------------- gateway worker
def _task_cpu(tid: int) -> float:
    try:
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu() -> dict[str, float]:
    out: dict[str, float] = {}
    for t in threading.enumerate():
        if t.native_id is not None:
            out[t.name] = out.get(t.name, 0.0) + _task_cpu(t.native_id)
    return out


def gateway_main(
    conn: Connection, identity: str, creds: tuple[str, str, str], host: str, port: int, url: str
) -> None:
    """One fleet-server gateway worker: its own session, gateway and registry engine."""
    from edge_agent.common.mqtt import MqttClient
    from edge_agent.common.mqtt_types import MqttConfig
    from fleet_server.config import GatewayConfig
    from fleet_server.gateway.gateway import Gateway
    from fleet_server.registry.store import Registry

    registry = client = gateway = None
    bundles = Path(tempfile.mkdtemp(prefix=f"bench-{identity}-"))
    try:
        registry = Registry.open(url)
        ca, cert, key = creds
        client = MqttClient(
            MqttConfig(
                host=host,
                port=port,
                device_id=identity,
                ca_path=Path(ca),
                cert_path=Path(cert),
                key_path=Path(key),
                prefix=PREFIX,
                announce_status=False,
                clean_start=False,
                inbox_size=100_000,
                reconnect_max=1.0,
            )
        )
        gateway = Gateway(
            registry,
            client,
            GatewayConfig(prefix=PREFIX, share_group=SHARE_GROUP, bundles_dir=bundles),
        )
        gateway.start()
        client.connect()
        client.wait_connected(10)
        time.sleep(0.5)  # SUBACKs
        conn.send(("ready", os.getpid()))
        while True:
            try:
                cmd = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                break
            if cmd[0] == "stats":
                s = gateway.stats()
                conn.send(
                    (
                        "stats",
                        {
                            "acks_sent": s.acks_sent,
                            "items_inserted": s.items_inserted,
                            "duplicates": s.duplicates,
                            "lost": s.lost,
                            "rejected": dict(s.rejected),
                            "db_failures": s.db_failures,
                            "ack_failures": s.ack_failures,
                            "ingest_pending": s.ingest_pending,
                            "messages": dict(s.messages),
                            "threads": _thread_cpu(),
                        },
                    )
                )
            elif cmd[0] == "stop":
                break
    except Exception as exc:  # reported to the parent, which fails the run
        with contextlib.suppress(Exception):
            conn.send(("error", f"{identity}: {type(exc).__name__}: {exc}"))
    finally:
        if gateway is not None:
            gateway.close()
        if client is not None:
            client.close()
        if registry is not None:
            registry.close()
        shutil.rmtree(bundles, ignore_errors=True)
        with contextlib.suppress(Exception):
            conn.send(("stopped",))


class GatewayWorkers:
    """N gateway worker processes (one identity each); ``stats``, ``cpu_seconds``, ``close``."""

    def __init__(
        self, identities: dict[str, Creds], broker: Broker, url: str, timeout: float = 30.0
    ) -> None:
        ctx = mp.get_context("spawn")
        self.names = list(identities)
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        try:
            for name, c in identities.items():
                parent, child = ctx.Pipe()
                p = ctx.Process(
                    target=gateway_main,
                    args=(child, name, (c.ca, c.cert, c.key), broker.host, broker.port, url),
                    name=f"gateway-{name}",
                    daemon=True,
                )
                p.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(p)
            for name, c in zip(self.names, self.conns, strict=True):
                if not c.poll(timeout):
                    raise RuntimeError(f"gateway worker {name} did not start in {timeout}s")
                msg = c.recv()
                if msg[0] != "ready":
                    raise RuntimeError(f"gateway worker failed: {msg}")
        except BaseException:
            self.close()
            raise

    def stats(self) -> list[dict[str, Any]]:
        for c in self.conns:
            c.send(("stats",))
        out = []
        for name, c in zip(self.names, self.conns, strict=True):
            if not c.poll(30):
                raise RuntimeError(f"gateway worker {name} did not answer")
            msg = c.recv()
            if msg[0] != "stats":
                raise RuntimeError(f"gateway worker {name}: {msg}")
            out.append(msg[1])
        return out

    def cpu_seconds(self) -> list[float]:
        return [proc_cpu_seconds(p.pid) if p.pid else 0.0 for p in self.procs]

    def close(self) -> None:
        """Stop every worker (gateway, session, engine closed), kill it if it hangs."""
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.send(("stop",))
        for p in self.procs:
            p.join(15)
            if p.is_alive():
                p.kill()
                p.join(5)
        for c in self.conns:
            c.close()
        self.conns, self.procs = [], []
