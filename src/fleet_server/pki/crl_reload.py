"""How the CA tells the broker that the CRL changed: a reload command or a SIGHUP.

Mosquitto reads ``crlfile`` when a listener starts and again on SIGHUP; it checks the CRL at
every TLS handshake, never during a session. The CA rewrites the file atomically
(``CertificateAuthority.write_crl``); one of these makes the broker pick it up:

- ``command_reloader(["systemctl", "reload", "mosquitto"])``: any command, run without a shell,
  with a timeout; a non-zero exit is an error.
- ``pidfile_reloader(Path("/run/mosquitto/mosquitto.pid"))``: SIGHUP to the pid in the file
  (Mosquitto's ``pid_file`` option), for a broker on the same host under the same user.

A clustered broker (EMQX, VerneMQ, HiveMQ) has its own CRL distribution; the command form
calls whatever it needs. Does not decide *when* to reload (``fleet_server.pki.renewal`` does).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from fleet_server.errors import PkiError

__all__ = ["command_reloader", "pidfile_reloader"]


def command_reloader(argv: Sequence[str], timeout: float = 30.0) -> Callable[[], None]:
    """A reload that runs ``argv`` (no shell).

    The returned callable raises ``PkiError`` when the command cannot run, times out or exits
    non-zero.

    Raises:
        PkiError: ``argv`` is empty.
    """
    if not argv:
        raise PkiError("the CRL reload command is empty")
    args = list(argv)

    def reload() -> None:
        try:
            done = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PkiError(f"CRL reload command failed: {exc}") from exc
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace")[-200:]
            raise PkiError(f"CRL reload command exited {done.returncode}: {tail}")

    return reload


def pidfile_reloader(pid_file: Path) -> Callable[[], None]:
    """A reload that sends SIGHUP to the process whose pid ``pid_file`` holds.

    The returned callable raises ``PkiError`` when the file is unreadable or the process gone.
    """

    def reload() -> None:
        try:
            pid = int(Path(pid_file).read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError) as exc:
            raise PkiError(f"cannot signal the broker from {pid_file}: {exc}") from exc

    return reload
