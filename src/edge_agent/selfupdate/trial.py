"""What an agent on trial does to confirm it is healthy (the launcher judges the file).

Owns ``TrialWatch``: in an agent started by the launcher for a trial (``EDGEFLEET_TRIAL_FILE``
and ``EDGEFLEET_TRIAL_RELEASE`` in its environment), a thread that waits until the agent is
healthy and then writes the trial file once, atomically: ``{"release": n, "pid": <own pid>,
"version": "...", "healthy": true}``. Healthy means what the caller's ``check`` says (the
daemon: serving on its front ends, every installed model loaded and its golden samples
passed, and with fleet sync on, connected with its reported state published); ``check``
returns ``None`` when healthy or why not yet. The launcher's deadline decides when "not yet"
becomes a failure; this module never gives up by itself.

Does not own the state machine or the switch (``edge_agent.selfupdate.releases``, the
launcher).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from edge_agent import __version__
from edge_agent.common import durable
from edge_agent.selfupdate.releases import ENV_TRIAL_FILE, ENV_TRIAL_RELEASE

__all__ = ["TrialWatch"]

log = logging.getLogger("edge_agent.trial")
CHECK_SECONDS = 0.25


class TrialWatch:
    """Writes the trial file once ``check()`` returns ``None`` (see module docstring)."""

    def __init__(self, path: Path, release: int, check: Callable[[], str | None]) -> None:
        self.path = path
        self.release = release
        self.check = check
        self.confirmed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trial", daemon=True)

    @staticmethod
    def on_trial() -> bool:
        """True in an agent the launcher started for a trial."""
        return bool(os.environ.get(ENV_TRIAL_FILE))

    @classmethod
    def from_env(cls, check: Callable[[], str | None]) -> TrialWatch | None:
        """The watch for this process when the launcher started it for a trial, else ``None``."""
        path, release = os.environ.get(ENV_TRIAL_FILE), os.environ.get(ENV_TRIAL_RELEASE, "")
        if not path or not release.isdigit():
            return None
        return cls(Path(path), int(release), check)

    def start(self) -> None:
        log.info("on trial as agent release %d", self.release)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        last = ""
        while not self._stop.wait(CHECK_SECONDS):
            try:
                why = self.check()
            except Exception:  # a health probe that throws is "not yet", never a crash
                log.exception("trial health check failed")
                continue
            if why is not None:
                if why != last:
                    log.info("trial: not healthy yet: %s", why)
                    last = why
                continue
            doc = {"release": self.release, "pid": os.getpid(), "version": __version__,
                   "healthy": True}  # fmt: skip
            try:
                durable.write_atomic(self.path, json.dumps(doc).encode())
            except OSError as exc:
                log.error("cannot write the trial file %s: %s", self.path, exc)
                continue
            log.info("trial: healthy, confirmed to the launcher")
            self.confirmed.set()
            return
