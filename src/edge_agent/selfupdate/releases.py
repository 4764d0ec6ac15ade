"""The on-disk layout of agent releases and the persisted update state machine.

Standard library (and ``edge_agent.common.durable``) only: the launcher imports this module and
must keep working whatever a new release ships.

Layout under the agent root (``/var/lib/edgefleet/agent`` by default)::

    base.json            the base install the launcher runs from (prefix, python, site dirs):
                         the dependency layer every release reuses offline
    releases/<n>/        one virtualenv per release number; complete once ``release.json`` is
                         in it (written last, durably)
    current -> releases/<n>   the release the launcher starts; absent: the base install
    update.json          the state machine below
    trial.json           written by an agent on trial once it is healthy
    .lock                one writer of update.json at a time (``durable.exclusive_lock``)

State machine (``update.json``; every change is one atomic, fsynced replace)::

    (none) or confirmed or rolled_back
        --install-->  staged      candidate complete on disk, ``current`` untouched
        --launcher--> trying      written BEFORE ``current`` is swapped to the candidate
        --healthy-->  confirmed   the trial file names the candidate and the child's pid
        --failed-->   rolled_back ``current`` swapped back FIRST, then the state written

The invariant that makes a kill -9 or a power loss at any step safe: an unconfirmed release
runs only under the launcher that switched to it. A launcher that starts and finds ``trying``
(it, or the machine, died during a trial) rolls back before it starts anything, so the
candidate is never started again by a restart, and ``current`` always names a complete
release (or the base install). ``staged`` is safe to resume: the candidate is complete.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_agent.common import durable

__all__ = [
    "BASE",
    "DEFAULT_AGENT_ROOT",
    "ENV_AGENT_ROOT",
    "ENV_FAILPOINT",
    "ENV_TRIAL_FILE",
    "ENV_TRIAL_RELEASE",
    "MAX_FAILED",
    "STATES",
    "Layout",
    "UpdateState",
    "failpoint",
]

BASE = "base"
DEFAULT_AGENT_ROOT = "/var/lib/edgefleet/agent"
#: Set by the launcher in the agent's environment: where the layout lives.
ENV_AGENT_ROOT = "EDGEFLEET_AGENT_ROOT"
#: Set by the launcher only for an agent on trial: where to write that it is healthy.
ENV_TRIAL_FILE = "EDGEFLEET_TRIAL_FILE"
ENV_TRIAL_RELEASE = "EDGEFLEET_TRIAL_RELEASE"
#: Test hook: a named step SIGKILLs its own process (a real kill -9 at exactly that point).
ENV_FAILPOINT = "EDGEFLEET_FAILPOINT"
STATES = ("staged", "trying", "confirmed", "rolled_back")
#: Releases that failed their trial here and are refused from then on (the newest are kept).
MAX_FAILED = 32
SCHEMA_VERSION = 1
MAX_STATE_BYTES = 64 * 1024
MAX_REASON = 300


def failpoint(name: str) -> None:
    """Die by SIGKILL here when ``EDGEFLEET_FAILPOINT`` names this step (tests only)."""
    if os.environ.get(ENV_FAILPOINT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class UpdateState:
    """The persisted state of the agent's self-update.

    Attributes:
        state: one of ``STATES``, or ``""`` when no update ever happened.
        candidate: the release being (or last) tried, ``0`` when none.
        previous: what ``current`` named before the candidate (``BASE`` or a release number).
        reason: why it rolled back (bounded, printable).
        failed: releases that failed their trial on this device (refused from then on).
        changed_at: wall-clock time of the last transition.
    """

    state: str = ""
    candidate: int = 0
    previous: str = BASE
    reason: str = ""
    failed: tuple[int, ...] = ()
    changed_at: float = 0.0

    def to_bytes(self) -> bytes:
        d = asdict(self)
        d["failed"] = list(self.failed)
        d["schema_version"] = SCHEMA_VERSION
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> UpdateState:
        """Parse ``update.json``; a damaged file reads as a failed trial (the safe side).

        A file this process wrote atomically cannot be half-written; one that does not parse
        was damaged by something else, and nothing in it can be trusted to name a release.
        """
        try:
            d: Any = json.loads(data[:MAX_STATE_BYTES])
            state = d["state"]
            if state not in (*STATES, "") or d.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(state)
            return cls(
                state=state,
                candidate=int(d["candidate"]),
                previous=_release_name(d["previous"]),
                reason=str(d["reason"])[:MAX_REASON],
                failed=tuple(int(x) for x in d["failed"])[-MAX_FAILED:],
                changed_at=float(d["changed_at"]),
            )
        except (ValueError, KeyError, TypeError):
            return cls(state="trying", previous=BASE, reason="update.json was unreadable")

    def fail(self, reason: str) -> UpdateState:
        """This state's candidate has failed: ``rolled_back``, remembered as failed."""
        failed = (*(x for x in self.failed if x != self.candidate), self.candidate)
        return replace(
            self,
            state="rolled_back",
            reason=_printable(reason),
            failed=failed[-MAX_FAILED:],
            changed_at=time.time(),
        )


def _release_name(value: object) -> str:
    text = str(value)
    if text != BASE and not (text.isdigit() and len(text) <= 10):
        raise ValueError(f"bad release name {text[:20]!r}")
    return text


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:MAX_REASON]


@dataclass(frozen=True)
class Layout:
    """Paths and atomic operations of the agent root. Cheap to build; holds no handles."""

    root: Path
    base_prefix: Path = field(default_factory=lambda: Path(sys.prefix))

    @classmethod
    def open(cls, root: Path) -> Layout:
        """The layout as the launcher recorded it (its base install from ``base.json``).

        An agent process runs inside a release virtualenv, so its own ``sys.prefix`` is not
        the base install; the launcher's is.
        """
        layout = cls(Path(root))
        prefix = layout.base().get("prefix")
        return cls(Path(root), Path(prefix)) if isinstance(prefix, str) else layout

    @property
    def releases(self) -> Path:
        return self.root / "releases"

    @property
    def current_link(self) -> Path:
        return self.root / "current"

    @property
    def state_file(self) -> Path:
        return self.root / "update.json"

    @property
    def trial_file(self) -> Path:
        return self.root / "trial.json"

    @property
    def base_file(self) -> Path:
        return self.root / "base.json"

    def release_dir(self, name: str) -> Path:
        """The prefix of release ``name`` (``BASE``: the base install)."""
        return self.base_prefix if name == BASE else self.releases / name

    def is_complete(self, name: str) -> bool:
        return name == BASE or (self.release_dir(name) / "release.json").is_file()

    def executable(self, name: str) -> Path:
        """The ``edge-agent`` console script of release ``name``."""
        return self.release_dir(name) / "bin" / "edge-agent"

    # ----------------------------------------------------------------- current
    def current(self) -> str:
        """What ``current`` names: a release number, or ``BASE`` (no link, or a broken one)."""
        try:
            target = self.current_link.readlink()
        except FileNotFoundError:
            return BASE
        name = target.name
        try:
            name = _release_name(name)
        except ValueError:
            return BASE
        return name if self.is_complete(name) else BASE

    def switch(self, name: str) -> None:
        """Point ``current`` at ``name`` atomically (a new link renamed over the old one)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / ".current.tmp"
        tmp.unlink(missing_ok=True)
        if name == BASE:
            self.current_link.unlink(missing_ok=True)
        else:
            tmp.symlink_to(f"releases/{name}")
            tmp.replace(self.current_link)
        durable.fsync_dir(self.root)

    # ----------------------------------------------------------------- state
    def load_state(self) -> UpdateState:
        try:
            data = self.state_file.read_bytes()
        except FileNotFoundError:
            return UpdateState()
        except OSError as exc:  # unreadable: nothing in it can be trusted (as damaged)
            data = str(exc).encode()
        return UpdateState.from_bytes(data)

    def save_state(self, state: UpdateState) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        durable.write_atomic(self.state_file, state.to_bytes())

    @contextmanager
    def locked(self, timeout: float = 60.0) -> Iterator[None]:
        """Hold the layout's writer lock (installer and launcher both take it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with durable.exclusive_lock(self.root, timeout):
            yield

    def release_info(self, name: str) -> dict[str, Any]:
        """``release.json`` of a complete release (``{}`` for the base install or a bad file)."""
        if name == BASE:
            return {}
        try:
            info = json.loads((self.release_dir(name) / "release.json").read_bytes()[:65536])
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def release_number(self, name: str) -> int | None:
        """The release number ``name`` runs (``None``: the base install)."""
        return None if name == BASE else int(name)

    # ----------------------------------------------------------------- transitions
    def begin_trial(self) -> UpdateState | None:
        """``staged`` -> ``trying``: state first, then the switch. ``None`` if nothing staged.

        A staged candidate that is not complete on disk (cannot happen through ``install``,
        which writes ``release.json`` last) is marked failed instead.
        """
        with self.locked():
            st = self.load_state()
            if st.state != "staged":
                return None
            if not self.is_complete(str(st.candidate)):
                self.save_state(st.fail("staged release is incomplete on disk"))
                return None
            trying = replace(st, state="trying", changed_at=time.time())
            self.save_state(trying)
            self.trial_file.unlink(missing_ok=True)
            failpoint("launcher-after-trying")
            self.switch(str(st.candidate))
            failpoint("launcher-after-switch")
            return trying

    def confirm(self, st: UpdateState) -> UpdateState:
        """``trying`` -> ``confirmed`` (the candidate stays ``current``)."""
        with self.locked():
            done = replace(st, state="confirmed", reason="", changed_at=time.time())
            self.save_state(done)
            return done

    def roll_back(self, st: UpdateState, reason: str) -> UpdateState:
        """``trying`` -> ``rolled_back``: ``current`` back to ``previous`` first, then the state.

        Idempotent: after a crash between the two steps the next launcher repeats both.
        """
        with self.locked():
            previous = st.previous if self.is_complete(st.previous) else BASE
            self.switch(previous)
            failpoint("launcher-after-switch-back")
            done = replace(st.fail(reason), previous=previous)
            self.save_state(done)
            return done

    def write_base(self, python: str, site_dirs: list[str]) -> None:
        """Record the base install (what releases reuse as their dependencies)."""
        doc = {"prefix": str(self.base_prefix), "python": python, "site": site_dirs}
        data = json.dumps(doc, sort_keys=True).encode()
        try:
            if self.base_file.read_bytes() == data:
                return
        except FileNotFoundError:
            pass
        self.root.mkdir(parents=True, exist_ok=True)
        durable.write_atomic(self.base_file, data)

    def base(self) -> dict[str, Any]:
        """``base.json`` (``{}`` when no launcher has run here yet)."""
        try:
            doc = json.loads(self.base_file.read_bytes()[:65536])
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}
