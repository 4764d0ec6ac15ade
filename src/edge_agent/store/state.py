"""What a device has installed per model, as a pure value with pure transitions.

Owns: the per-model record (active version, kept versions with their status, the high-water
version used for rollback protection, recent events, and why the active version cannot serve
when it cannot) and its rules: install makes the new version active on probation and keeps the
last N; a failed probation or a manual rollback returns to the newest version still marked
good; a version that failed is not reinstalled unless forced; a model whose active version
cannot be loaded and has nothing to go back to is marked *down* with the cause, until another
version becomes active or the same one loads again. Persisting it is the store's job
(``edge_agent.store.store``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from edge_agent.errors import ContractError, ModelStoreError
from edge_agent.strict_json import loads as strict_loads

STATE_SCHEMA = 1
STATUSES = ("probation", "good", "failed", "rolled_back", "staged")
MAX_EVENTS = 50
#: A state file is a few KiB; a larger one is corrupt (or planted), not parsed.
MAX_STATE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class VersionRecord:
    """One installed version."""

    version: int
    manifest_sha256: str
    installed_at: str
    status: str = "probation"
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "manifest_sha256": self.manifest_sha256,
            "installed_at": self.installed_at,
            "status": self.status,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VersionRecord:
        try:
            rec = cls(
                int(d["version"]),
                str(d["manifest_sha256"]),
                str(d["installed_at"]),
                str(d["status"]),
                str(d.get("reason", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"bad version record: {exc}") from exc
        if rec.status not in STATUSES:
            raise ContractError(f"bad version status {rec.status!r}")
        return rec


@dataclass(frozen=True)
class Down:
    """The active version cannot serve and nothing can replace it: since when, and why."""

    version: int
    reason: str
    at: str

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "reason": self.reason, "at": self.at}

    @classmethod
    def from_dict(cls, d: object) -> Down:
        """Parse the ``down`` member of a state file.

        Raises:
            ContractError: not a down record.
        """
        if not isinstance(d, Mapping):
            raise ContractError("down must be an object")
        try:
            version, reason, at = d["version"], d["reason"], d["at"]
        except KeyError as exc:
            raise ContractError(f"bad down record: missing {exc}") from exc
        if type(version) is not int or not isinstance(reason, str) or not isinstance(at, str):
            raise ContractError("bad down record: version int, reason and at strings")
        return cls(version, reason, at)


@dataclass(frozen=True)
class ModelState:
    """Installed versions of one model, newest last.

    ``down`` is set while the active version cannot be served and no other version can take
    its place (e.g. its golden samples fail and nothing good is kept): the cause, persisted, so
    ``edge-agent status``, readiness and a restarted agent all say why.
    """

    name: str
    active: int | None = None
    high_water: int = 0
    versions: tuple[VersionRecord, ...] = ()
    events: tuple[Mapping[str, Any], ...] = ()
    down: Down | None = None

    def record(self, version: int) -> VersionRecord:
        """The record of ``version``.

        Raises:
            ModelNotFoundError: not installed.
        """
        from edge_agent.errors import ModelNotFoundError

        for rec in self.versions:
            if rec.version == version:
                return rec
        raise ModelNotFoundError(f"{self.name} v{version} is not installed")

    @property
    def active_record(self) -> VersionRecord | None:
        return None if self.active is None else self.record(self.active)

    def install(
        self, rec: VersionRecord, *, keep: int, now: str, force: bool = False
    ) -> tuple[ModelState, tuple[int, ...]]:
        """Make ``rec`` the active version on probation.

        Returns:
            The new state and the versions no longer kept (to delete from disk).

        Raises:
            ModelStoreError: the same version failed here before and ``force`` is not set.
        """
        existing = next((r for r in self.versions if r.version == rec.version), None)
        if existing is not None and existing.status == "failed" and not force:
            raise ModelStoreError(
                f"{self.name} v{rec.version} failed on this device before ({existing.reason}); "
                "install with force to retry"
            )
        others = [r for r in self.versions if r.version != rec.version]
        kept = self._prune([*others, rec], keep, protect=rec.version)
        dropped = tuple(sorted({r.version for r in others} - {r.version for r in kept}))
        state = replace(
            self,
            active=rec.version,
            high_water=max(self.high_water, rec.version),
            versions=tuple(kept),
            down=None,
        )
        return state._event(now, "installed", rec.version, ""), dropped

    def stage(self, rec: VersionRecord, now: str) -> ModelState:
        """Keep ``rec`` installed but not active (status ``staged``: a rollout's shadow).

        The high-water version rises as for an install: a staged version was verified, and an
        older bundle is refused after it (rollback protection). Nothing is pruned here; the next
        install prunes. A version already kept (and not failed) is left as it is.

        Raises:
            ModelStoreError: the version failed here before, or it is the active one.
        """
        existing = next((r for r in self.versions if r.version == rec.version), None)
        if existing is not None and existing.status == "failed":
            raise ModelStoreError(
                f"{self.name} v{rec.version} failed on this device before ({existing.reason})"
            )
        if rec.version == self.active:
            raise ModelStoreError(f"{self.name} v{rec.version} is active, not a shadow")
        if existing is not None:
            return self
        staged = replace(rec, status="staged")
        versions = tuple(sorted((*self.versions, staged), key=lambda r: r.version))
        state = replace(self, versions=versions, high_water=max(self.high_water, rec.version))
        return state._event(now, "staged", rec.version, "installed as a shadow, not serving")

    def unstage(self, version: int, now: str) -> ModelState:
        """Forget a staged version (its shadow was withdrawn); other versions are untouched."""
        rec = next((r for r in self.versions if r.version == version), None)
        if rec is None or rec.status != "staged":
            return self
        versions = tuple(r for r in self.versions if r.version != version)
        return replace(self, versions=versions)._event(now, "unstaged", version, "")

    def set_status(self, version: int, status: str, reason: str, now: str) -> ModelState:
        """Mark ``version`` (e.g. probation passed -> good)."""
        rec = replace(self.record(version), status=status, reason=reason)
        versions = tuple(rec if r.version == version else r for r in self.versions)
        return replace(self, versions=versions)._event(now, status, version, reason)

    def rollback(self, reason: str, now: str, *, failed: bool = True) -> ModelState:
        """Leave the active version for the newest other version marked good.

        ``failed`` marks the left version failed (automatic rollback after a failed health
        check or probation); a manual rollback marks it ``rolled_back``.

        Raises:
            ModelStoreError: nothing is active, or no other good version is kept.
        """
        if self.active is None:
            raise ModelStoreError(f"{self.name} has no active version to roll back from")
        target = self.last_good(exclude=self.active)
        if target is None:
            raise ModelStoreError(f"{self.name} has no other good version to roll back to")
        left = self.active
        state = self.set_status(left, "failed" if failed else "rolled_back", reason, now)
        state = replace(state, active=target, down=None)
        return state._event(now, "rollback", target, f"from v{left}: {reason}")

    def fail_to(self, target: int, reason: str, now: str) -> ModelState:
        """Mark the active version failed and make ``target`` (still serving) active again.

        Used when a new version fails its health check and no *good* version is kept, but the
        version that was serving before it is still installed (e.g. still on probation).

        Raises:
            ModelNotFoundError: ``target`` is not installed.
        """
        self.record(target)
        left = self.active
        state = self if left is None else self.set_status(left, "failed", reason, now)
        return replace(state, active=target, down=None)._event(
            now, "rollback", target, f"from v{left}: {reason}"
        )

    def revert_to(self, target: int, reason: str, now: str) -> ModelState:
        """Make a kept, not failed ``target`` active again; the left version is ``rolled_back``.

        What the fleet server asks when it sends a device back (a rollout aborted on quality):
        the previous version may still be on probation, and the left one has not failed here.

        Raises:
            ModelNotFoundError: ``target`` is not installed.
            ModelStoreError: ``target`` failed on this device before.
        """
        rec = self.record(target)
        if rec.status == "failed":
            raise ModelStoreError(f"{self.name} v{target} failed here before ({rec.reason})")
        left = self.active
        if left == target:
            return self
        state = self if left is None else self.set_status(left, "rolled_back", reason, now)
        return replace(state, active=target, down=None)._event(
            now, "rollback", target, f"from v{left}: {reason}"
        )

    def mark_down(self, version: int, reason: str, now: str) -> ModelState:
        """Record that the active ``version`` cannot serve and why (unchanged if already so).

        Raises:
            ModelStoreError: ``version`` is not the active version.
        """
        if self.active != version:
            raise ModelStoreError(f"{self.name} v{version} is not active (v{self.active} is)")
        if self.down is not None and (self.down.version, self.down.reason) == (version, reason):
            return self
        return replace(self, down=Down(version, reason, now))._event(now, "down", version, reason)

    def clear_down(self, now: str) -> ModelState:
        """The active version serves again (unchanged if it was not down)."""
        if self.down is None:
            return self
        version = self.down.version
        return replace(self, down=None)._event(now, "up", version, "serving again")

    def last_good(self, exclude: int | None = None) -> int | None:
        """Newest version marked good, other than ``exclude``."""
        good = [r.version for r in self.versions if r.status == "good" and r.version != exclude]
        return max(good) if good else None

    @staticmethod
    def _prune(versions: list[VersionRecord], keep: int, protect: int) -> list[VersionRecord]:
        """Keep ``keep`` previous versions (good ones first), plus the protected new one."""
        others = sorted((r for r in versions if r.version != protect), key=lambda r: r.version)
        good = [r for r in others if r.status == "good"][-keep:]
        rest = [r for r in others if r.status != "good"]
        kept = sorted(good + rest, key=lambda r: r.version)[-keep:] if keep else []
        if not any(r.status == "good" for r in kept) and good:
            kept = sorted([good[-1], *kept[1:]], key=lambda r: r.version)
        return [*kept, *(r for r in versions if r.version == protect)]

    def _event(self, now: str, kind: str, version: int, detail: str) -> ModelState:
        ev = {"at": now, "event": kind, "version": version, "detail": detail}
        return replace(self, events=(*self.events, ev)[-MAX_EVENTS:])

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": STATE_SCHEMA,
            "name": self.name,
            "active": self.active,
            "high_water": self.high_water,
            "versions": [r.to_dict() for r in self.versions],
            "events": [dict(e) for e in self.events],
            **({"down": self.down.to_dict()} if self.down is not None else {}),
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelState:
        """Parse a state file.

        Raises:
            ContractError: not a state file of a known schema.
        """
        try:
            d = strict_loads(data, max_bytes=MAX_STATE_BYTES, what="model state")
            if d.get("schema_version") != STATE_SCHEMA:
                raise ContractError(f"unknown state schema {d.get('schema_version')!r}")
            active = d["active"]
            return cls(
                name=str(d["name"]),
                active=None if active is None else int(active),
                high_water=int(d["high_water"]),
                versions=tuple(VersionRecord.from_dict(r) for r in d["versions"]),
                events=tuple(d.get("events", [])),
                down=None if d.get("down") is None else Down.from_dict(d["down"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ContractError(f"corrupt model state: {exc}") from exc
