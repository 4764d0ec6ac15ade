"""A rollout's shadow phase on a real fleet (issue 12 item 2): real Mosquitto with TLS and ACLs,
the gateway and registry in process, four real agents (onnxruntime) with their sync loops, and
the rollout runner with the shadow phase on.

A confidently wrong candidate (``examples.digits_mislabelled_mlp``: most 3s trained as 8s) is
sent to the two canaries as a shadow; their live-vs-shadow answers disagree far more than the
policy allows, the ``shadow_disagreement`` gate names the 3 -> 8 flips, and the rollout is
aborted before any canary serves it: no client ever gets an answer from it, and the shadows are
withdrawn. A good candidate (the live model under the next version) passes the shadow phase and its
canaries then serve it.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from bundles import DigitsBundles, mislabelled_bundle
from edge_agent.bundle import read_raw
from edge_agent.contract import BundleManifest
from edge_agent.serving.service import InferenceRequest
from edge_agent.trust.assignment import ModelAssignment, ShadowAssignment
from fleet import FleetHarness, wait_until
from fleet_server.delivery.desired import make_desired_state, sign_desired_state
from fleet_server.jobs.rollout_runner import RolloutRunner
from fleet_server.registry.values import BundleRecord
from fleet_server.rollouts.policy import RolloutPolicy, Selector
from fleet_server.rollouts.state import Rollout
from mosquitto import fleet_broker

DEVICES = ("dev-a", "dev-b", "dev-c", "dev-d")


@pytest.fixture
def fleet(digits_bundles: DigitsBundles, tmp_path: Path) -> Iterator[FleetHarness]:
    with fleet_broker(tmp_path / "mqtt", DEVICES) as broker:
        harness = FleetHarness(broker, digits_bundles.keys, tmp_path / "fleet")
        try:
            yield harness
        finally:
            harness.close()


class Service:
    """The runner's ``AssignPort`` over the harness: signs and publishes like the server."""

    def __init__(self, fleet: FleetHarness, records: dict[int, BundleRecord]) -> None:
        self.fleet, self.records = fleet, records
        self.shadows: list[str] = []

    def assign(self, target: str, name: str, version: int, *, group: bool = False) -> list[object]:
        self.fleet.assign(target, {name: self.records[version]})
        return []

    def assign_shadow(
        self, device_id: str, name: str, version: int, shadow: int, fraction_ppm: int
    ) -> object:
        s, c = self.records[version], self.records[shadow]
        a = ModelAssignment(
            s.version,
            s.channel,
            s.sha256,
            s.length,
            s.targets_sha256,
            shadow=ShadowAssignment(
                c.version, c.channel, c.sha256, c.length, c.targets_sha256, fraction_ppm
            ),
        )
        signer = self.fleet.keys.signer("online-1")
        now = datetime.now(UTC)
        record = self.fleet.registry.assign_desired(
            device_id,
            lambda v: sign_desired_state(
                make_desired_state(device_id, v, {name: a}, now), [signer]
            ),
        )
        self.fleet.gateway.publish_desired(device_id, record.document)
        self.shadows.append(device_id)
        return record


def _publish(fleet: FleetHarness, bundle: Path) -> BundleRecord:
    """``FleetHarness.publish`` with the manifest recorded, as ``models publish`` does (the
    runner reads the candidate's task from it)."""
    data = bundle.read_bytes()
    raw = read_raw(bundle)
    m = BundleManifest.from_bytes(raw.manifest_bytes)
    sha = hashlib.sha256(data).hexdigest()
    shutil.copyfile(bundle, fleet.bundles_dir / f"{sha}.bundle")
    return fleet.registry.publish_bundle(
        m.name,
        m.version,
        channel=m.channel,
        sha256=sha,
        length=len(data),
        targets_sha256=hashlib.sha256(raw.targets_bytes).hexdigest(),
        manifest=m.to_dict(),
    )


def _policy() -> RolloutPolicy:
    return RolloutPolicy(
        canary_count=2,
        steps=(1.0,),
        dwell_seconds=0,
        min_devices=1,
        on_breach="abort",
        shadow_fraction=1.0,
        shadow_dwell_seconds=0,
    )


def _serving(fleet: FleetHarness, device: str) -> int | None:
    """The version ``device``'s agent answers with now."""
    entry = fleet.devices[device].agent.registry.get("digits")
    return None if entry is None else entry.pipeline.version


def _traffic(fleet: FleetHarness, x: np.ndarray, rng: np.random.Generator) -> set[str]:
    """32 rows per device through its agent; the versions that answered."""
    answered = set()
    for device in fleet.devices.values():
        rows = rng.integers(0, len(x), 32)
        res = device.agent.infer(InferenceRequest("digits", {"input": x[rows]}))
        answered.add(res.model_version)
    return answered


def _drive(
    fleet: FleetHarness,
    runner: RolloutRunner,
    rollout_id: str,
    x: np.ndarray,
    done: object,
    answered: set[str],
    states: set[str],
) -> Rollout:
    rng = np.random.default_rng(3)

    def step() -> Rollout | None:
        answered.update(_traffic(fleet, x, rng))
        runner.step()
        r = runner.get(rollout_id)
        if r.phase == "shadow" and r.active:
            states.update(runner.device_states(r).values())
        return r if done(r) else None  # type: ignore[operator]

    def why() -> str:
        r = runner.get(rollout_id)
        out = [str(r.reasons)]
        for d in r.shadows:
            rep = fleet.registry.get_device(d).reported or {}
            out.append(f"{d}: {rep.get('models')}")
            rows = fleet.registry.telemetry(device_id=d, after_id=None, limit=1, kind="report")
            if rows:
                m = (rows[-1].payload.get("models") or {}).get("digits") or {}
                out.append(f"  last report: shadow={m.get('shadow')} flips={m.get('shadow_flips')}")
        return "\n".join(out)

    return wait_until(step, timeout=120, what=why)


def test_a_confidently_wrong_candidate_is_halted_in_the_shadow_phase(
    fleet: FleetHarness, digits_bundles: DigitsBundles, tmp_path: Path
) -> None:
    records = {
        1: _publish(fleet, digits_bundles.path(1)),
        2: _publish(fleet, mislabelled_bundle(digits_bundles, 2, tmp_path)),
        3: _publish(fleet, digits_bundles.path(3)),
    }
    for d in DEVICES:
        fleet.start_device(d)
        fleet.assign(d, {"digits": records[1]})

    def ready() -> bool:
        for d in DEVICES:
            rep = fleet.registry.get_device(d).reported or {}
            active = ((rep.get("models") or {}).get("digits") or {}).get("active")
            if active != 1 or "shadow" not in (rep.get("capabilities") or []):
                return False
        return True

    wait_until(ready, timeout=60, what="every device on v1, advertising shadows")
    service = Service(fleet, records)
    runner = RolloutRunner(fleet.registry, service, lambda: datetime.now(UTC))
    x = digits_bundles.x_eval
    answered: set[str] = set()

    bad = runner.create(
        "digits", 2, selector=Selector(group="test"), policy=_policy(), from_version=1
    )
    states: set[str] = set()
    r = _drive(fleet, runner, bad.id, x, lambda r: r.state == "aborted", answered, states)
    assert states == {"shadow", "control"}  # as rollouts status shows the shadow phase
    assert r.phase == "shadow"
    assert r.members == {}  # no canary ever served it
    assert len(r.shadows) == 2
    assert sorted(service.shadows) == sorted(r.shadows)
    gate = next(g for g in r.gates if g.name == "shadow_disagreement")
    assert gate.status == "breach"
    assert "3 -> 8" in gate.detail, gate.detail
    assert answered == {"1"}  # no client answer came from the shadow
    for d in DEVICES:
        assert fleet.devices[d].agent.store.state("digits").active == 1
    # the shadows are withdrawn: the canaries stop running v2 and drop it
    wait_until(
        lambda: all(fleet.devices[d].agent.candidates.shadow("digits") is None for d in r.shadows),
        timeout=30,
        what="shadows withdrawn",
    )

    # a fixed build gets the next version (the devices saw v2: rollback protection)
    good = runner.create(
        "digits", 3, selector=Selector(group="test"), policy=_policy(), from_version=1
    )
    passed: list[Rollout] = []

    def serving(r: Rollout) -> bool:
        if r.phase != "serving" or r.wave < 0:
            return False
        if not passed:
            passed.append(r)  # the step that left the shadow phase, with its gates
        # serving, not only stored: a device records the install as active before its new
        # session has loaded and passed its health check, and answers from v1 until then
        return all(_serving(fleet, d) == 3 for d in passed[0].members)

    _drive(fleet, runner, good.id, x, serving, answered, set())
    first = passed[0]
    gate = next(g for g in first.gates if g.name == "shadow_disagreement")
    assert gate.status == "ok", gate.detail
    assert len(first.shadows) == 2
    assert set(first.shadows) <= set(first.members)  # the shadowed canaries now serve it
    rng = np.random.default_rng(9)
    assert "3" in _traffic(fleet, x, rng)
