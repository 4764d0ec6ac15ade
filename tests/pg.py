"""A throwaway PostgreSQL cluster for integration tests (the scale-out path).

``pg_cluster()`` runs ``initdb`` + ``pg_ctl`` from ``/usr/lib/postgresql/*/bin`` (else from PATH)
into a temporary directory on a free loopback port (trust auth, unix socket in the same directory)
and stops it afterwards; it never touches the system's PostgreSQL service. When run as root, the
cluster runs as the ``postgres`` user (PostgreSQL refuses root), in a directory under /tmp it can
reach.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text


def _pg_bin() -> Path | None:
    """Debian's newest ``/usr/lib/postgresql/<v>/bin``, else the directory of ``pg_ctl`` on PATH."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
        reverse=True,
    )
    if found:
        return found[0].parent
    on_path = shutil.which("pg_ctl")
    if on_path and (Path(on_path).resolve().parent / "initdb").exists():
        return Path(on_path).resolve().parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgCluster:
    def __init__(self, bindir: Path, base: Path, run_as: dict[str, Any]) -> None:
        self.bindir, self.base, self.run_as = bindir, base, run_as
        self.data, self.sock = base / "data", base / "sock"
        self.port = _free_port()
        self._n = 0

    def _run(self, *args: str) -> None:
        subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            check=True,
            capture_output=True,
            timeout=60,
            **self.run_as,
        )

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8")
        opts = (
            f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=100"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "log"), "-o", opts, "-w",
                  "-t", "30", "start")  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        self._n += 1
        name = f"registry_{self._n}"
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)


def pg_cluster() -> Iterator[PgCluster]:
    """Start a cluster, yield it, stop and delete it (skips when PostgreSQL is not installed)."""
    bindir = _pg_bin()
    if bindir is None or not (bindir / "pg_ctl").exists():
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql or PATH "
            "(scripts/setup.sh installs the Debian package postgresql)"
        )
    run_as: dict[str, Any] = {}
    base = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            pytest.skip("running as root and there is no 'postgres' user to run the cluster as")
        os.chown(base, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    for sub in ("sock",):
        (base / sub).mkdir()
        if run_as:
            os.chown(base / sub, run_as["user"], run_as["group"])
    cluster = PgCluster(bindir, base, run_as)
    try:
        cluster.start()
    except subprocess.CalledProcessError as exc:
        log = base / "log"
        detail = log.read_text() if log.exists() else exc.stderr.decode(errors="replace")
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start a throwaway PostgreSQL: {detail[-2000:]}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
