"""The agent against real onnxruntime sessions on signed digits bundles.

Covers: serving, install with health check and self-rollback, probation failure on real
traffic, memory admission, A/B stickiness, shadow comparison, cloud fallback routing with a
fake transport, capture.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bundles import DigitsBundles
from edge_agent.config import AgentConfig, CaptureConfig, FallbackConfig, ModelPolicy, StoreConfig
from edge_agent.errors import (
    FallbackError,
    InputValidationError,
    ModelNotFoundError,
    ModelStoreError,
)
from edge_agent.serving.agent import Agent
from edge_agent.serving.capture import CaptureRing
from edge_agent.serving.routing import Router
from edge_agent.serving.service import InferenceRequest
from edge_agent.store import ModelStore
from support import DEVICE


class FakeCloud:
    """A cloud that answers with a fixed one-hot class, or fails on demand."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[str] = []

    def request(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        deadline_s: float,
        reason: str,
        device_outputs: Mapping[str, Any] | None = None,
        model_version: int | None = None,
    ) -> Mapping[str, Any]:
        self.calls.append(reason)
        if self.fail:
            raise FallbackError("cloud down")
        n = len(next(iter(inputs.values())))
        out = np.zeros((n, 10), np.float32)
        out[:, 7] = 1.0
        return {"probabilities": out}


def make_agent(
    tmp_path: Path,
    bundles: DigitsBundles,
    *,
    install: tuple[str, ...] = ("1",),
    transport: FakeCloud | None = None,
    **cfg: Any,
) -> Agent:
    device = cfg.pop("device", DEVICE)
    config = AgentConfig(
        store=StoreConfig(
            state_dir=str(tmp_path / "state"), memory_budget_mb=cfg.pop("budget", 512)
        ),
        **cfg,
    )
    store = ModelStore(tmp_path / "state", bundles.keys.trusted_root(), device)
    agent = Agent(config, store, transport=transport, background_drift=False)
    for ref in install:
        v, _, flavour = ref.partition("-")
        agent.install(bundles.path(int(v), flavour or "good"))
    agent.start()
    return agent


def request(bundles: DigitsBundles, n: int = 1, start: int = 0, **kw: Any) -> InferenceRequest:
    return InferenceRequest("digits", {"input": bundles.x_eval[start : start + n]}, **kw)


def test_serves_real_predictions(tmp_path: Path, digits_bundles: DigitsBundles) -> None:
    agent = make_agent(tmp_path, digits_bundles)
    assert agent.ready()
    res = agent.infer(request(digits_bundles, 64))
    pred = np.argmax(res.outputs["probabilities"], axis=1)
    assert (pred == digits_bundles.y_eval[:64]).mean() > 0.9
    assert res.source == "device"
    assert res.parameters["model_version"] == "1"
    meta = agent.model_metadata("digits")
    assert meta["inputs"][0]["shape"] == [-1, 64]
    with pytest.raises(ModelNotFoundError):
        agent.infer(InferenceRequest("nope", {"input": digits_bundles.x_eval[:1]}))


def test_probation_passes_and_marks_good(tmp_path: Path, digits_bundles: DigitsBundles) -> None:
    agent = make_agent(tmp_path, digits_bundles, model_defaults=ModelPolicy(probation_requests=30))
    assert agent.registry.get("digits").on_probation  # type: ignore[union-attr]
    for i in range(30):
        agent.infer(request(digits_bundles, 1, i))
    agent.tick()
    assert agent.store.state("digits").record(1).status == "good"


def test_bad_golden_samples_roll_back_by_themselves(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    agent = make_agent(
        tmp_path,
        digits_bundles,
        install=("1", "2"),
        model_defaults=ModelPolicy(probation_requests=1),
    )
    agent.infer(request(digits_bundles))
    agent.tick()  # v2 passes probation -> good
    agent.install(digits_bundles.path(4, "badgolden"))
    state = agent.store.state("digits")
    assert state.active == 2
    assert state.record(4).status == "failed"
    assert "golden" in state.record(4).reason
    assert agent.infer(request(digits_bundles)).parameters["model_version"] == "2"
    assert agent.registry.rollbacks == 1


def test_probation_fails_on_real_traffic_and_rolls_back(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    agent = make_agent(
        tmp_path,
        digits_bundles,
        install=("3",),
        model_defaults=ModelPolicy(probation_requests=25, max_reject_rate=0.2),
    )
    for i in range(25):
        agent.infer(request(digits_bundles, 1, i))
    agent.tick()
    agent.install(digits_bundles.path(5, "narrow"))  # golden samples pass, real data does not
    assert agent.registry.get("digits").pipeline.version == 5  # type: ignore[union-attr]
    rejected = 0
    for i in range(40):
        try:
            agent.infer(request(digits_bundles, 1, 100 + i))
        except InputValidationError:
            rejected += 1
    assert rejected > 20
    agent.tick()
    state = agent.store.state("digits")
    assert state.active == 3
    assert state.record(5).status == "failed"
    assert "reject rate" in state.record(5).reason


def test_memory_budget_refuses_the_load(tmp_path: Path, digits_bundles: DigitsBundles) -> None:
    agent = make_agent(tmp_path, digits_bundles, budget=1)  # 1 MiB < 8 MiB fixed estimate
    assert agent.registry.get("digits") is None
    assert not agent.ready()
    assert any(e["event"] == "admission_refused" for e in agent.registry.events)


def test_ab_split_is_sticky_per_routing_key(tmp_path: Path, digits_bundles: DigitsBundles) -> None:
    policy = ModelPolicy(ab_candidate="digits@1", ab_fraction=0.5, probation_requests=1)
    agent = make_agent(tmp_path, digits_bundles, install=("1",), model_defaults=policy)
    agent.infer(request(digits_bundles))
    agent.tick()
    agent.install(digits_bundles.path(2))
    agent.start()
    arms = {}
    for key in (f"user-{i}" for i in range(200)):
        first = agent.infer(request(digits_bundles, routing_key=key))
        again = agent.infer(request(digits_bundles, routing_key=key))
        assert first.parameters["ab_arm"] == again.parameters["ab_arm"]
        assert first.parameters["model_version"] == again.parameters["model_version"]
        arms[key] = first.parameters["ab_arm"]
    share = sum(a == "candidate" for a in arms.values()) / len(arms)
    assert 0.35 < share < 0.65
    versions = {
        agent.infer(request(digits_bundles, routing_key=k)).parameters["model_version"]
        for k, a in arms.items()
        if a == "candidate"
    }
    assert versions == {"1"}


def test_shadow_candidate_reports_agreement(tmp_path: Path, digits_bundles: DigitsBundles) -> None:
    policy = ModelPolicy(shadow_candidate="digits@1", shadow_fraction=1.0, probation_requests=1)
    agent = make_agent(tmp_path, digits_bundles, install=("1",), model_defaults=policy)
    agent.infer(request(digits_bundles))
    agent.tick()
    agent.install(digits_bundles.path(2))
    for i in range(50):
        agent.infer(request(digits_bundles, 1, i))
    shadow = agent.candidates.shadow("digits")
    assert shadow is not None
    assert shadow.flush(10.0)
    stats = shadow.stats()
    assert stats["compared"] >= 40
    assert stats["agreement"] == 1.0  # same weights, different version


@pytest.mark.parametrize(
    ("mode", "fail", "expect_source"),
    [
        ("cloud_only", False, "cloud"),
        ("prefer_cloud", False, "cloud"),
        ("device_only", False, "device"),
    ],
)
def test_fallback_modes(
    tmp_path: Path, digits_bundles: DigitsBundles, mode: str, fail: bool, expect_source: str
) -> None:
    cloud = FakeCloud(fail)
    agent = make_agent(
        tmp_path, digits_bundles, transport=cloud, fallback=FallbackConfig(mode=mode)
    )
    res = agent.infer(request(digits_bundles))
    assert res.source == expect_source


def test_prefer_device_sends_invalid_input_and_hard_examples_to_cloud(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    cloud = FakeCloud()
    agent = make_agent(
        tmp_path,
        digits_bundles,
        transport=cloud,
        fallback=FallbackConfig(mode="prefer_device", min_confidence=0.999999),
    )
    bad = digits_bundles.x_eval[:1].copy()
    bad[0, 0] = np.nan
    res = agent.infer(InferenceRequest("digits", {"input": bad}))
    assert (res.source, res.parameters["fallback_reason"]) == ("cloud", "invalid_input")
    res = agent.infer(request(digits_bundles))  # almost nothing is 99.9999% confident
    assert res.source == "cloud"
    assert res.parameters["fallback_reason"] == "low_confidence"
    assert cloud.calls == ["invalid_input", "low_confidence"]


def test_cloud_failure_keeps_the_device_answer(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    agent = make_agent(
        tmp_path,
        digits_bundles,
        transport=FakeCloud(fail=True),
        fallback=FallbackConfig(mode="prefer_device", min_confidence=0.999999),
    )
    res = agent.infer(request(digits_bundles))
    assert res.source == "device"
    assert "fallback_failed" in res.parameters


def test_capture_ring_exports_sampled_requests(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    agent = make_agent(tmp_path, digits_bundles)
    agent.capture = CaptureRing(
        tmp_path / "cap", CaptureConfig(enabled=True, sample_rate=1.0, max_bytes=256 * 1024)
    )
    for i in range(900):
        agent.infer(request(digits_bundles, 1, i % 400))
        if i % 200 == 0:
            time.sleep(0.05)  # let the writer keep up: a full queue would drop, by design
    agent.capture.close()
    records = list(CaptureRing.export(tmp_path / "cap"))
    total = sum(p.stat().st_size for p in CaptureRing.segments(tmp_path / "cap"))
    assert total <= 256 * 1024
    assert 0 < len(records) < 900 - agent.capture.dropped  # the oldest segments were deleted
    assert records[-1]["model"] == "digits"
    assert records[-1]["inputs"]["input"]["shape"] == [1, 64]


def test_drift_windows_close_and_score(tmp_path: Path, digits_bundles: DigitsBundles) -> None:
    agent = make_agent(tmp_path, digits_bundles)
    for start in range(0, 448, 64):
        agent.infer(request(digits_bundles, 64, start))
    shifted = np.clip(digits_bundles.x_eval[:64] + 6.0, 0, 16)
    for _ in range(20):
        agent.infer(InferenceRequest("digits", {"input": shifted}))
    agent.tick()
    windows = [w for _, _, w in agent.drift_windows if w.tensor == "input"]
    assert windows
    assert windows[-1].verdict.to_dict()  # scored
    drifted = [w for w in windows if w.verdict.to_dict().get("alert")]
    assert drifted, "a +6 grey-level shift must raise a drift alert"
    status = agent.status()
    assert status["models"]["digits"]["requests"] == 27


def test_agent_metrics_are_collected_at_scrape(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from edge_agent.serving.metrics import AgentCollector

    agent = make_agent(tmp_path, digits_bundles)
    for i in range(20):  # 1,280 rows: five 256-row sketch blocks, one closed 1,000-row window
        agent.infer(request(digits_bundles, 64, (i % 7) * 64))
    bad = digits_bundles.x_eval[:1].copy()
    bad[0, 0] = -5.0
    with pytest.raises(InputValidationError):
        agent.infer(InferenceRequest("digits", {"input": bad}))
    agent.tick()
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent))
    text = generate_latest(registry).decode()
    assert 'edgefleet_agent_model_version{model="digits"} 1.0' in text
    assert (
        'edgefleet_agent_validation_rejects_total{model="digits",reason="out_of_range"} 1.0' in text
    )
    assert 'edgefleet_agent_requests_total{model="digits",outcome="ok"} 20.0' in text
    assert "edgefleet_agent_drift_psi{" in text
    assert "edgefleet_agent_rollbacks_total 0.0" in text


def test_out_of_distribution_input_goes_to_cloud(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    cloud = FakeCloud()
    agent = make_agent(
        tmp_path,
        digits_bundles,
        transport=cloud,
        fallback=FallbackConfig(mode="prefer_device", ood_feature_fraction=0.2),
    )
    assert agent.infer(request(digits_bundles)).source == "device"
    # within the signed contract (0..16) but nothing like a digit: every pixel lit
    odd = np.full((1, 64), 16.0, np.float32)
    res = agent.infer(InferenceRequest("digits", {"input": odd}))
    assert (res.source, res.parameters["fallback_reason"]) == ("cloud", "out_of_distribution")


def test_drift_alert_is_flagged_in_response_parameters(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    agent = make_agent(tmp_path, digits_bundles)
    assert "drift_alert" not in agent.infer(request(digits_bundles)).parameters
    shifted = np.clip(digits_bundles.x_eval[:64] + 6.0, 0, 16)
    for _ in range(20):
        res = agent.infer(InferenceRequest("digits", {"input": shifted}))
    assert res.parameters.get("drift_alert") is True


def test_litert_bundle_serves_through_the_agent(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    """A .tflite bundle (AI Edge Quantizer, dynamic int8) installs and serves like ONNX."""
    from datetime import UTC, datetime

    from sklearn.datasets import load_digits

    from edge_agent.contract import (
        DimSpec,
        FeatureRanges,
        InputContract,
        OutputContract,
        Preprocessing,
        TensorSpec,
    )
    from model_builder.build import build_bundle
    from model_builder.config import BuildConfig
    from model_builder.data import Dataset

    pytest.importorskip("ai_edge_quantizer")
    model = (Path(__file__).parents[1] / "fixtures" / "tflite" / "digits_mlp.tflite").read_bytes()
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    name, out = "serving_default_pixels:0", "PartitionedCall:0"
    contract = (
        InputContract(
            (
                TensorSpec(
                    name,
                    "float32",
                    (DimSpec(min=1, max=64), DimSpec(size=64)),
                    FeatureRanges((0.0,), (16.0,)),
                    "reject",
                    Preprocessing("affine", (1 / 16,), (0.0,)),
                ),
            )
        ),
        OutputContract("classification", (out,), tuple(str(i) for i in range(10)), out),
    )
    now = datetime.now(UTC)
    res = build_bundle(
        model,
        "tflite",
        Dataset({name: x[:300]}, None),
        Dataset({name: x[-400:]}, y[-400:]),
        contract,
        BuildConfig(name="digits-tfl", version=1, mode="dynamic", measure_latency=False),
        digits_bundles.keys,
        now=now,
    )
    path = tmp_path / "digits-tfl-1.efb"
    path.write_bytes(res.bundle)
    from edge_agent.runtime.device import detect_device_profile

    agent = make_agent(tmp_path, digits_bundles, install=(), device=detect_device_profile())
    agent.install(path)
    reply = agent.infer(InferenceRequest("digits-tfl", {name: x[-64:]}))
    assert reply.parameters["model_version"] == "1"
    assert (np.argmax(reply.outputs[out], axis=1) == y[-64:]).mean() > 0.9
    assert agent.model_metadata("digits-tfl")["platform"] == "tflite"


def spy_fast_path(agent: Agent) -> list[str]:
    """Record the requests (by model) that ``infer`` answered on its fast path."""
    taken: list[str] = []
    local = agent._local

    def spy(req: InferenceRequest, entry: Any) -> Any:
        taken.append(req.model)
        return local(req, entry)

    agent._local = spy  # type: ignore[method-assign]
    return taken


class RoutedRouter(Router):
    """A router the fast path never trusts: every request asks it (the slow path)."""

    @property
    def local_only(self) -> bool:
        return False


def test_fast_path_answers_and_accounts_as_the_router_does(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    """Same answer, parameters, ground-truth memory and counts through the fast path as
    through the router, for a good and a refused request."""
    seen = []
    for slow in (False, True):
        agent = make_agent(tmp_path / str(slow), digits_bundles)
        if slow:
            agent.router = RoutedRouter(agent.router.mode, cloud=agent.router.cloud)
        taken = spy_fast_path(agent)
        answers = [agent.infer(request(digits_bundles, 2, i)) for i in range(3)]
        bad = digits_bundles.x_eval[:1].copy()
        bad[0, 0] = np.nan
        with pytest.raises(InputValidationError):
            agent.infer(InferenceRequest("digits", {"input": bad}))
        assert taken == ([] if slow else ["digits"] * 4)
        pipeline = agent.registry.get("digits").pipeline  # type: ignore[union-attr]
        seen.append(
            (
                [(a.source, a.model_version, dict(a.parameters), a.batched) for a in answers],
                [a.outputs["probabilities"].tolist() for a in answers],
                [a.request_id is not None for a in answers],
                dict(agent.counts),
                dict(agent.snapshot().sources),
                (pipeline.requests, pipeline.rows, pipeline.rejects),
                len(agent.ground_truth),
            )
        )
        agent.close()
    assert seen[0] == seen[1]


def test_fast_path_is_taken_only_where_routing_cannot_differ(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    plain = make_agent(tmp_path / "plain", digits_bundles, install=("1", "2"))
    taken = spy_fast_path(plain)
    plain.infer(request(digits_bundles))
    assert taken == ["digits"]
    plain.infer(request(digits_bundles, version="2"))  # a pinned version: the router decides
    assert taken == ["digits"]
    plain.unload_model("digits")
    with pytest.raises(ModelStoreError, match="unloaded"):
        plain.infer(request(digits_bundles))
    assert taken == ["digits"]
    plain.close()

    # A cloud that prefer_device may reach: every request goes through the router.
    cloud = FakeCloud()
    routed = make_agent(
        tmp_path / "cloud",
        digits_bundles,
        transport=cloud,
        fallback=FallbackConfig(mode="prefer_device", min_confidence=0.999999),
    )
    taken = spy_fast_path(routed)
    assert routed.infer(request(digits_bundles)).source == "cloud"
    assert taken == []
    routed.close()
    # The same cloud under device_only can never be reached: the fast path answers.
    local = make_agent(
        tmp_path / "device_only",
        digits_bundles,
        transport=FakeCloud(),
        fallback=FallbackConfig(mode="device_only"),
    )
    taken = spy_fast_path(local)
    assert local.infer(request(digits_bundles)).source == "device"
    assert taken == ["digits"]
    local.close()

    # An A/B split: the router draws the arm.
    policy = ModelPolicy(ab_candidate="digits@1", ab_fraction=0.5, probation_requests=1)
    ab = make_agent(tmp_path / "ab", digits_bundles, install=("1",), model_defaults=policy)
    ab.infer(request(digits_bundles))
    ab.tick()
    ab.install(digits_bundles.path(2))
    ab.start()
    taken = spy_fast_path(ab)
    arms = {
        ab.infer(request(digits_bundles, routing_key=f"user-{i}")).parameters["ab_arm"]
        for i in range(40)
    }
    assert arms == {"live", "candidate"}
    assert taken == []
    ab.close()


def test_fast_path_still_feeds_the_shadow(tmp_path: Path, digits_bundles: DigitsBundles) -> None:
    policy = ModelPolicy(shadow_candidate="digits@1", shadow_fraction=1.0, probation_requests=1)
    agent = make_agent(tmp_path, digits_bundles, install=("1",), model_defaults=policy)
    agent.infer(request(digits_bundles))
    agent.tick()
    agent.install(digits_bundles.path(2))
    taken = spy_fast_path(agent)
    for i in range(20):
        agent.infer(request(digits_bundles, 1, i))
    assert taken == ["digits"] * 20
    shadow = agent.candidates.shadow("digits")
    assert shadow is not None
    assert shadow.flush(10.0)
    assert shadow.stats()["compared"] >= 15
    agent.close()
