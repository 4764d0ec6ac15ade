"""The launcher: the small, stable process systemd runs, which owns the switch and the fallback.

``python -m edge_agent.selfupdate.launcher [--root DIR] [--trial-seconds N] -- run --config F``
starts ``<current release>/bin/edge-agent run --config F`` and stays its parent. It runs from
the base install, which self-update never touches, and imports only the standard library and
``edge_agent.selfupdate.releases``: a new agent release cannot break it.

What it does (the state machine is ``edge_agent.selfupdate.releases``):

- At start, a ``trying`` state means a trial was interrupted (kill -9, power loss, a stop): it
  rolls back before starting anything. Then a ``staged`` candidate is switched to.
- While an agent runs, it watches ``update.json``; when the agent stages a release it stops
  the agent (SIGTERM, its normal drain), moves ``staged -> trying``, swaps ``current`` and
  starts the candidate with ``EDGEFLEET_TRIAL_FILE`` set.
- The trial passes when the candidate writes that file naming its release and its own pid
  (it does so once it is serving, every installed model loaded and golden-checked, and, with
  fleet sync on, connected and its reported state published) before ``--trial-seconds``.
  It fails when the candidate exits, or the deadline passes: the launcher stops it, swaps
  ``current`` back, records the release as failed, and starts the previous agent, which
  reports the outcome.
- Outside a trial, an agent that exits by itself makes the launcher exit with the same code,
  so systemd's ``Restart=`` and exit-status rules keep their meaning. SIGTERM/SIGINT are
  forwarded and the launcher exits 0 after the agent; SIGHUP is forwarded.
- systemd: ``Type=notify`` with ``NotifyAccess=all``. The launcher sends ``READY=1`` once an
  agent runs, and feeds the watchdog itself only while it switches or judges a trial (a
  candidate loading its models must not be killed for it); otherwise the agent's own
  watchdog pings count, so a hung agent is still restarted by systemd, whose restart finds
  either a confirmed release or, mid-trial, ``trying`` and rolls back.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import FrameType

from edge_agent.selfupdate.releases import (
    BASE,
    DEFAULT_AGENT_ROOT,
    ENV_AGENT_ROOT,
    ENV_TRIAL_FILE,
    ENV_TRIAL_RELEASE,
    Layout,
    UpdateState,
    failpoint,
)

__all__ = ["DEFAULT_TRIAL_SECONDS", "Launcher", "main"]

log = logging.getLogger("edge_agent.launcher")
DEFAULT_TRIAL_SECONDS = 120.0
POLL_SECONDS = 0.25
STOP_SECONDS = 15.0
EXIT_LAUNCHER = 1
HEALTHY = ""
PR_SET_PDEATHSIG = 1


def _die_with_launcher() -> None:
    """In the agent, before exec: be SIGKILLed when the launcher dies (Linux ``prctl``).

    systemd kills the whole unit when the launcher dies; this gives the same guarantee outside
    systemd, so a killed launcher never leaves an agent running that its successor would race.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def sd_notify(message: str) -> None:
    """Send ``message`` to systemd's notify socket when there is one (never raises)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), addr)
    except OSError:
        return


class Launcher:
    """Runs one agent at a time from ``layout``, judging trials and rolling back."""

    def __init__(
        self,
        layout: Layout,
        agent_args: list[str],
        *,
        trial_seconds: float = DEFAULT_TRIAL_SECONDS,
        stop_seconds: float = STOP_SECONDS,
    ) -> None:
        self.layout = layout
        self.agent_args = agent_args
        self.trial_seconds = trial_seconds
        self.stop_seconds = stop_seconds
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self._ready_sent = False

    # ------------------------------------------------------------------ signals
    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        self._forward(signum)

    def _forward(self, signum: int, _frame: FrameType | None = None) -> None:
        child = self.child
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        """Supervise until stopped; returns the process exit code (module docstring)."""
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._forward)
        try:
            self.recover()
        except OSError as exc:  # an agent must run even when the root cannot be written
            log.error("cannot finish the interrupted trial's rollback: %s", exc)
        while not self.stopping:
            try:
                trial = self.layout.begin_trial()
            except OSError as exc:
                log.error("cannot switch to the staged release: %s", exc)
                trial = None
            name = self.layout.current()
            try:
                child = self._spawn(name, trial)
            except OSError as exc:
                if trial is not None:
                    self.layout.roll_back(trial, f"new agent could not start: {exc.strerror}")
                    continue
                if name == BASE:
                    log.error("cannot start the base agent: %s", exc)
                    return EXIT_LAUNCHER
                log.error("cannot start release %s (%s): back to the base install", name, exc)
                self.layout.switch(BASE)
                continue
            if trial is not None:
                verdict = self._judge(child, trial)
                if verdict == HEALTHY:
                    failpoint("launcher-before-confirm")
                    self.layout.confirm(trial)
                    log.info("agent release %d confirmed", trial.candidate)
                else:
                    log.error("agent release %d failed its trial: %s", trial.candidate, verdict)
                    self._stop(child)
                    failpoint("launcher-before-rollback")
                    self.layout.roll_back(trial, verdict)
                    continue
            code = self._supervise(child)
            if code is None:
                continue  # a release was staged: switch to it
            return 0 if self.stopping else code
        return 0

    def recover(self) -> UpdateState:
        """Finish what a killed launcher left: an interrupted trial rolls back."""
        st = self.layout.load_state()
        if st.state == "trying":
            log.warning("agent release %d was on trial when the launcher stopped", st.candidate)
            st = self.layout.roll_back(
                st, st.reason or "trial interrupted before the new agent confirmed"
            )
        return st

    # ------------------------------------------------------------------ one agent
    def _spawn(self, name: str, trial: UpdateState | None) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env[ENV_AGENT_ROOT] = str(self.layout.root)
        env.pop(ENV_TRIAL_FILE, None)
        env.pop(ENV_TRIAL_RELEASE, None)
        if trial is not None:
            env[ENV_TRIAL_FILE] = str(self.layout.trial_file)
            env[ENV_TRIAL_RELEASE] = str(trial.candidate)
        exe = self.layout.executable(name)
        log.info("starting agent %s%s", name, " (trial)" if trial is not None else "")
        self.child = subprocess.Popen(
            [str(exe), *self.agent_args],
            env=env,
            preexec_fn=_die_with_launcher,  # noqa: PLW1509 - the launcher has one thread
        )
        failpoint("launcher-after-spawn")
        if not self._ready_sent:
            sd_notify("READY=1")
            self._ready_sent = True
        return self.child

    def _judge(self, child: subprocess.Popen[bytes], trial: UpdateState) -> str:
        """``HEALTHY``, or why the trial failed."""
        deadline = time.monotonic() + self.trial_seconds
        while True:
            sd_notify("WATCHDOG=1")
            code = child.poll()
            if code is not None:
                return f"new agent exited with code {code} during its trial"
            if self._trial_passed(child, trial):
                return HEALTHY
            if self.stopping:
                return "agent stopped during its trial"
            if time.monotonic() >= deadline:
                return f"new agent did not confirm within {self.trial_seconds:g}s"
            time.sleep(POLL_SECONDS)

    def _trial_passed(self, child: subprocess.Popen[bytes], trial: UpdateState) -> bool:
        try:
            doc = json.loads(self.layout.trial_file.read_bytes()[:4096])
        except (OSError, ValueError):
            return False
        return (
            isinstance(doc, dict)
            and doc.get("release") == trial.candidate
            and doc.get("pid") == child.pid
            and doc.get("healthy") is True
        )

    def _supervise(self, child: subprocess.Popen[bytes]) -> int | None:
        """Wait for the agent to exit (its code), or for a staged release (``None``)."""
        while True:
            code = child.poll()
            if code is not None:
                self.child = None
                return code
            if not self.stopping and self.layout.load_state().state == "staged":
                log.info("a new agent release is staged: stopping the running agent")
                self._stop(child)
                return None
            time.sleep(POLL_SECONDS)

    def _stop(self, child: subprocess.Popen[bytes]) -> None:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(self.stop_seconds)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.child = None


def _site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return sorted({paths["purelib"], paths["platlib"]})


def main(argv: list[str] | None = None) -> int:
    """Entry point (``python -m edge_agent.selfupdate.launcher``); returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="edge-agent-launcher",
        description="Run edge-agent from the current release; switch, try and roll back.",
    )
    parser.add_argument("--root", default=os.environ.get(ENV_AGENT_ROOT, DEFAULT_AGENT_ROOT))
    parser.add_argument("--trial-seconds", type=float, default=DEFAULT_TRIAL_SECONDS)
    parser.add_argument("agent_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    agent_args = list(args.agent_args)
    if agent_args[:1] == ["--"]:
        agent_args = agent_args[1:]
    if not agent_args or args.trial_seconds <= 0:
        parser.error("give the agent's arguments after --, e.g. -- run --config agent.toml")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    layout = Layout(Path(args.root), Path(sys.prefix))
    try:
        layout.write_base(sys.executable, _site_dirs())
        with layout.locked():  # the lock file is the launcher's, whoever installs later
            pass
    except (OSError, TimeoutError) as exc:
        log.error("agent root %s is not writable: %s", args.root, exc)
        return EXIT_LAUNCHER
    return Launcher(layout, agent_args, trial_seconds=args.trial_seconds).run()


if __name__ == "__main__":
    sys.exit(main())
