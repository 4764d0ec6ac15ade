"""How the CA tells the broker that the CRL changed: a reload command or a SIGHUP.

Mosquitto reads ``crlfile`` when a listener starts and again on SIGHUP; it checks the CRL at
every TLS handshake, never during a session. The CA rewrites the file atomically
(``CertificateAuthority.write_crl``); one of these makes the broker pick it up:

- ``command_reloader(["systemctl", "reload", "mosquitto"])``: any command, run without a shell,
  with a timeout; a non-zero exit is an error.
- ``pidfile_reloader(Path("/run/mosquitto/mosquitto.pid"))``: SIGHUP to the pid in the file
  (Mosquitto's ``pid_file`` option), for a broker on the same host under the same user.

A clustered broker (EMQX, VerneMQ, HiveMQ) has its own CRL distribution; the command form
calls whatever it needs. ``CoalescedReload`` runs either on a thread of its own, at most once per
interval however many revocations asked for it: a burst of renewals costs the broker a few
reloads, not one each (a storm of SIGHUPs is also what Mosquitto 2.0 handles worst), and the
MQTT handler that confirmed a renewal never waits for the broker. Does not decide *when* a
reload is needed (``fleet_server.pki.renewal`` does).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from fleet_server.errors import PkiError

__all__ = ["CoalescedReload", "command_reloader", "pidfile_reloader"]

log = logging.getLogger(__name__)


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


class CoalescedReload:
    """Calls ``reload`` on a background thread, at most once per ``interval`` seconds.

    Calling the instance only asks for a reload and returns at once; every request made while
    one is waiting joins it. A failed reload is logged and counted (the CRL file is already
    written: the next reload enforces it). ``close`` stops the thread after a last pending run.
    """

    def __init__(self, reload: Callable[[], None], interval: float = 1.0) -> None:
        self._reload = reload
        self._interval = interval
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self.runs = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="crl-reload", daemon=True)
        self._thread.start()

    def __call__(self) -> None:
        self._wanted.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wanted.wait(0.5)
            if not self._wanted.is_set():
                continue
            self._stop.wait(self._interval)  # gather the requests of a burst into one reload
            self._wanted.clear()
            try:
                self._reload()
                self.runs += 1
            except (PkiError, OSError) as exc:
                self.failures += 1
                log.error("broker CRL reload failed: %s", exc)

    def close(self, timeout: float = 30.0) -> None:
        """Run a pending reload, then stop the thread."""
        self._stop.set()
        self._thread.join(timeout)
        if self._wanted.is_set():
            self._wanted.clear()
            try:
                self._reload()
                self.runs += 1
            except (PkiError, OSError) as exc:
                self.failures += 1
                log.error("broker CRL reload failed: %s", exc)
