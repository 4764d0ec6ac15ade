"""The memory-of-failure scenario, shared by the SQLite and PostgreSQL registry tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from fleet_server.errors import AbortedVersionError, QuarantinedVersionError
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry import rollouts as store
from fleet_server.registry.store import Registry
from fleet_server.registry.version_history import version_history
from fleet_server.rollouts.admission import Override
from fleet_server.rollouts.policy import RolloutPolicy, Selector

# The default policy's quarantine_after (2): the second abort quarantines.
POLICY = RolloutPolicy(canary_count=2, steps=(0.5, 1.0), dwell_seconds=60, min_devices=2)
LINE = Selector(group="line-3")
IDS = [f"dev-{i}" for i in range(10)]


@dataclass
class RecordingService:
    """The ``AssignPort`` of a runner: records assignments."""

    assigned: list[tuple[str, str, int]] = field(default_factory=list)

    def assign(self, target: str, name: str, version: int, *, group: bool = False) -> list[Any]:
        self.assigned.append((target, name, version))
        return []


def memory_scenario(registry: Registry, runner: RolloutRunner, step: Callable[[], None]) -> None:
    """Create, abort, refuse, override, abort again: quarantined; history shows every step.

    ``registry`` has ``digits`` v2 published and devices in group ``line-3``.
    """
    assert version_history(registry, "digits") == {}
    r1 = runner.create("digits", 2, selector=LINE, policy=POLICY)
    step()
    runner.abort(r1.id)
    [h] = version_history(registry, "digits").values()
    assert (h.status, len(h.aborts), h.aborts[0]["by"], h.quarantine) == (
        "aborted",
        1,
        "operator",
        None,
    )
    # Today's bug: accepted again. Now refused until an operator says why.
    with pytest.raises(AbortedVersionError, match="aborted 1 time"):
        runner.create("digits", 2, selector=LINE, policy=POLICY)
    r2 = runner.create(
        "digits", 2, selector=LINE, policy=POLICY, override_aborted="labels fixed in v2 build"
    )
    assert r2.overrides == (Override("aborted", "labels fixed in v2 build"),)
    created = store.rollout_events(registry, r2.id)[0]
    assert created.detail["overrides"] == [
        {"kind": "aborted", "reason": "labels fixed in v2 build"}
    ]
    assert store.get_rollout(registry, r2.id).overrides == r2.overrides  # persisted
    step()
    aborted = runner.abort(r2.id)
    assert aborted.state == "aborted"
    # Aborted twice: quarantined at once.
    assert store.quarantined(registry, "digits", 2)
    h = version_history(registry, "digits", 2)[("digits", 2)]
    assert (h.status, len(h.aborts), h.rollouts) == ("quarantined", 2, 2)
    assert h.quarantine is not None
    assert "quarantined after 2 aborted rollout(s)" in h.quarantine.reason
    assert [o["reason"] for o in h.overrides] == ["labels fixed in v2 build"]
    assert h.summary() == "quarantined, aborted 2x, 1 override(s)"
    with pytest.raises(QuarantinedVersionError, match="--override-quarantine"):
        runner.create("digits", 2, selector=LINE, policy=POLICY, override_aborted="again")
    r3 = runner.create("digits", 2, selector=LINE, policy=POLICY, override_quarantine="hotfix")
    assert r3.overrides == (Override("quarantine", "hotfix"),)
    h = version_history(registry, "digits")[("digits", 2)]
    assert sorted(o["kind"] for o in h.overrides) == ["aborted", "quarantine"]
    assert version_history(registry, "other") == {}
