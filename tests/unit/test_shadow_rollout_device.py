"""A device runs a rollout-assigned shadow (issue 12 item 2): real onnxruntime digits models.

The signed desired state names v1 serving and a newer bundle as its shadow: the deployer checks
and *stages* it (never active), the agent replays the document's fraction of served requests on
it, counts agreement and which classes flip to which (rows = live answer, columns = shadow
answer), and no client ever gets a shadow answer, even when asking for its version. Then the
shadow is promoted (installed for serving from the staged file, no download) or withdrawn
(stopped and removed).
"""

from __future__ import annotations

import hashlib
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bundles import DigitsBundles, mislabelled_bundle
from edge_agent.bundle import read_raw
from edge_agent.config import AgentConfig, StoreConfig, SyncConfig
from edge_agent.errors import ModelNotFoundError
from edge_agent.quality.confusion import Confusion
from edge_agent.serving.agent import Agent
from edge_agent.serving.service import InferenceRequest
from edge_agent.store import ModelStore
from edge_agent.sync.deploy import Deployer
from edge_agent.trust.assignment import ModelAssignment, ShadowAssignment
from edge_agent.trust.desired import DesiredState
from edge_agent.wire.telemetry_build import report_from_status
from support import DEVICE

NOW = datetime.now(UTC).replace(microsecond=0)


def _assignment(path: Path, version: int) -> ModelAssignment:
    data = path.read_bytes()
    return ModelAssignment(
        version=version,
        channel="stable",
        bundle_sha256=hashlib.sha256(data).hexdigest(),
        bundle_length=len(data),
        targets_sha256=hashlib.sha256(read_raw(path).targets_bytes).hexdigest(),
    )


def _with_shadow(serving: ModelAssignment, shadow: ModelAssignment, ppm: int) -> ModelAssignment:
    s = ShadowAssignment(
        shadow.version,
        shadow.channel,
        shadow.bundle_sha256,
        shadow.bundle_length,
        shadow.targets_sha256,
        ppm,
    )
    return ModelAssignment(
        serving.version,
        serving.channel,
        serving.bundle_sha256,
        serving.bundle_length,
        serving.targets_sha256,
        shadow=s,
    )


def _state(version: int, **models: ModelAssignment) -> DesiredState:
    return DesiredState("cam-1", version, NOW + timedelta(hours=1), models)


class _Device:
    def __init__(self, tmp_path: Path, bundles: DigitsBundles) -> None:
        config = AgentConfig(store=StoreConfig(state_dir=str(tmp_path / "state")))
        store = ModelStore(tmp_path / "state", bundles.keys.trusted_root(), DEVICE)
        self.agent = Agent(config, store, background_drift=False)
        self.agent.install(bundles.path(1))
        self.agent.start()
        self.events: list[tuple[Any, ...]] = []
        self.dir = tmp_path / "sync"
        self.deploy = Deployer(
            self.agent,
            self.dir,
            SyncConfig(),
            event=lambda *e: self.events.append(e),
            wake=lambda: None,
        )

    def downloaded(self, path: Path) -> None:
        """Put a finished download where the deployer finds it (as after a restart)."""
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        target = self.dir / "downloads" / "digits" / f"{sha}.bundle"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)

    def close(self) -> None:
        self.agent.close()


def _serve(agent: Agent, x: np.ndarray, **kw: Any) -> list[str]:
    versions = []
    for i in range(0, len(x), 8):
        res = agent.infer(InferenceRequest("digits", {"input": x[i : i + 8]}, **kw))
        versions.append(res.model_version)
    return versions


def _flush(agent: Agent) -> dict[str, Any]:
    shadow = agent.candidates.shadow("digits")
    assert shadow is not None
    assert shadow.flush(30.0)
    return shadow.stats()


def test_rollout_shadow_is_staged_runs_and_never_answers(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    bad = mislabelled_bundle(digits_bundles, 2, tmp_path)
    dev = _Device(tmp_path, digits_bundles)
    try:
        v1, v2 = _assignment(digits_bundles.path(1), 1), _assignment(bad, 2)
        dev.downloaded(bad)
        dev.deploy.apply(_state(2, digits=_with_shadow(v1, v2, 1_000_000)))
        assert dev.deploy.shadow_outcomes["digits"] == (2, "installed", "")
        st = dev.agent.store.state("digits")
        assert st.active == 1
        assert st.record(2).status == "staged"
        assert st.high_water == 2  # rollback protection counts the staged version

        x, y = digits_bundles.x_eval, digits_bundles.y_eval
        versions = _serve(dev.agent, x)
        assert set(versions) == {"1"}  # every client answer is the live model's
        stats = _flush(dev.agent)
        assert stats["version"] == 2
        rows = stats["agree_rows"] + stats["disagree_rows"]
        assert rows == len(x)
        flips = Confusion.from_dict({"counts": stats["flips"]})
        assert flips.n == rows
        assert flips.correct == stats["agree_rows"]
        # the labelling bug shows: live 3 -> shadow 8 is the top flip
        (live, shadow, count), *_ = flips.flips(top=3)
        assert (live, shadow) == (3, 8)
        assert count >= 0.5 * int((y == 3).sum())
        # no client reaches the shadow, even by its version
        with pytest.raises(ModelNotFoundError):
            dev.agent.infer(
                InferenceRequest("digits", {"input": x[:1]}, version="2")  # type: ignore[call-arg]
            )
        assert dev.agent.model_names() == ["digits"]
        # the reported state says the shadow runs; telemetry carries the flips per version
        assert dev.deploy.status()["shadows"]["digits"]["outcome"] == "installed"
        report = report_from_status("cam-1", 1, dev.agent.status(), [], 1.0)
        part = report.models["digits"].shadow_flips
        assert part is not None
        assert part.versions[2].compared == rows
        assert part.versions[2].flips == flips

        # promotion: the document now names v2 serving (no shadow): installed from the staged
        # file without a download, and the shadow stops
        dev.deploy.apply(_state(3, digits=v2))
        st = dev.agent.store.state("digits")
        assert st.active == 2
        assert st.record(2).status == "probation"
        assert dev.agent.candidates.shadow("digits") is None
        assert "digits" not in dev.deploy.shadow_outcomes
        assert not dev.deploy.downloads
        assert set(_serve(dev.agent, x[:16])) == {"2"}
    finally:
        dev.close()


def test_withdrawn_shadow_stops_and_is_removed(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    dev = _Device(tmp_path, digits_bundles)
    try:
        v1, v2 = _assignment(digits_bundles.path(1), 1), _assignment(digits_bundles.path(2), 2)
        dev.downloaded(digits_bundles.path(2))
        dev.deploy.apply(_state(2, digits=_with_shadow(v1, v2, 500_000)))
        assert dev.agent.candidates.rollout_shadow("digits") == 2
        _serve(dev.agent, digits_bundles.x_eval[:200])
        stats = _flush(dev.agent)
        assert 0 < stats["sampled"] < stats["offered"]  # the document's fraction, sampled
        assert stats["disagree_rows"] == 0  # the same model: no flips off the diagonal
        # withdrawn (an abort in the shadow phase sends v1 alone): stopped and removed
        dev.deploy.apply(_state(3, digits=v1))
        st = dev.agent.store.state("digits")
        assert st.active == 1
        assert [r.version for r in st.versions] == [1]
        assert not (tmp_path / "state" / "models" / "digits" / "v2").exists()
        assert dev.agent.candidates.shadow("digits") is None
        assert dev.deploy.shadow_outcomes == {}
    finally:
        dev.close()


def test_shadow_older_than_high_water_is_refused(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    dev = _Device(tmp_path, digits_bundles)
    try:
        dev.agent.install(digits_bundles.path(3))  # high water 3
        v3, v2 = _assignment(digits_bundles.path(3), 3), _assignment(digits_bundles.path(2), 2)
        # a shadow must be newer than serving: v3 serving with shadow v2 cannot even be built,
        # so name v1 serving (kept) with shadow v2 < high water 3
        v1 = _assignment(digits_bundles.path(1), 1)
        assert v3.version == 3
        dev.deploy.apply(_state(2, digits=_with_shadow(v1, v2, 100_000)))
        version, outcome, reason = dev.deploy.shadow_outcomes["digits"]
        assert (version, outcome) == (2, "failed")
        assert "rollback protection" in reason
        assert dev.agent.candidates.shadow("digits") is None
    finally:
        dev.close()
