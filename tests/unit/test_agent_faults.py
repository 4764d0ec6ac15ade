"""Faults found in review: each test reproduces one and holds the fix in place."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np
import pytest
from test_agent import FakeCloud, make_agent, request

from bundles import DigitsBundles
from edge_agent.config import CaptureConfig, FallbackConfig, ModelPolicy
from edge_agent.errors import InputValidationError
from edge_agent.serving.capture import CaptureRing
from edge_agent.serving.service import InferenceRequest


def test_bad_update_while_first_version_on_probation_keeps_serving(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    agent = make_agent(tmp_path, digits_bundles, install=("1",))  # v1 still on probation
    agent.install(digits_bundles.path(4, "badgolden"))
    assert agent.infer(request(digits_bundles)).parameters["model_version"] == "1"
    state = agent.store.state("digits")
    assert state.active == 1
    assert state.record(4).status == "failed"
    assert agent.ready()


def test_probation_failure_without_good_version_keeps_serving_and_does_not_raise(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    agent = make_agent(
        tmp_path,
        digits_bundles,
        install=("5-narrow",),
        model_defaults=ModelPolicy(probation_requests=25, max_reject_rate=0.2),
    )
    for i in range(40):
        with contextlib.suppress(InputValidationError):
            agent.infer(request(digits_bundles, 1, 100 + i))
    agent.tick()  # must not raise
    agent.tick()
    assert agent.registry.get("digits").pipeline.version == 5  # type: ignore[union-attr]
    assert any(e["event"] == "probation_failed" for e in agent.registry.events)


def test_probation_verdict_never_lands_on_a_version_switched_to_meanwhile(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    agent = make_agent(
        tmp_path,
        digits_bundles,
        install=("1", "2"),
        model_defaults=ModelPolicy(probation_requests=1, max_reject_rate=0.2),
    )
    agent.infer(request(digits_bundles))
    agent.tick()
    agent.install(digits_bundles.path(5, "narrow"))
    for i in range(30):
        with contextlib.suppress(InputValidationError):
            agent.infer(request(digits_bundles, 1, 100 + i))
    # the operator rolls back through another process before the daemon's tick
    agent.store.rollback("digits", "operator", failed=False)
    agent.tick()
    state = agent.store.state("digits")
    assert state.record(2).status == "good"  # not blamed for v5's rejects


def test_requests_in_flight_survive_swaps(tmp_path: Path, digits_bundles: DigitsBundles) -> None:
    agent = make_agent(
        tmp_path,
        digits_bundles,
        install=("1", "2"),
        model_defaults=ModelPolicy(probation_requests=1),
    )
    agent.infer(request(digits_bundles))
    agent.tick()
    errors: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                agent.infer(request(digits_bundles, 8))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(6):  # swap the serving pipeline back and forth under load
        agent.install(digits_bundles.path(3))
        agent.rollback("digits", "swap test")
    stop.set()
    for t in threads:
        t.join()
    assert errors == []


def test_prefer_cloud_answers_on_device_when_the_cloud_fails(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    agent = make_agent(
        tmp_path,
        digits_bundles,
        transport=FakeCloud(fail=True),
        fallback=FallbackConfig(mode="prefer_cloud"),
    )
    res = agent.infer(request(digits_bundles))
    assert res.source == "device"
    assert "fallback_failed" in res.parameters


def test_invalid_input_with_cloud_down_still_explains_the_validation_error(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    agent = make_agent(
        tmp_path,
        digits_bundles,
        transport=FakeCloud(fail=True),
        fallback=FallbackConfig(mode="prefer_device"),
    )
    bad = digits_bundles.x_eval[:1].copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputValidationError) as info:
        agent.infer(InferenceRequest("digits", {"input": bad}))
    assert info.value.reason == "nan"


def test_client_structural_errors_do_not_fail_probation(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    agent = make_agent(
        tmp_path,
        digits_bundles,
        install=("1",),
        model_defaults=ModelPolicy(probation_requests=30, max_reject_rate=0.2),
    )
    for i in range(30):
        agent.infer(request(digits_bundles, 1, i))
    for _ in range(25):
        with pytest.raises(InputValidationError):
            agent.infer(InferenceRequest("digits", {"inputs": digits_bundles.x_eval[:1]}))
    agent.tick()
    assert agent.store.state("digits").record(1).status == "good"
    assert agent.registry.get("digits").pipeline.client_errors == 25  # type: ignore[union-attr]


def test_dropped_rows_are_identified_in_the_response(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    agent = make_agent(tmp_path, digits_bundles, model_defaults=ModelPolicy(validation="drop"))
    x = digits_bundles.x_eval[:5].copy()
    x[1, 0] = np.nan
    x[3, 0] = 99.0
    res = agent.infer(InferenceRequest("digits", {"input": x}))
    assert res.parameters["kept_rows"] == [0, 2, 4]
    assert res.outputs["probabilities"].shape == (3, 10)


def test_stray_files_in_the_capture_directory_are_ignored(tmp_path: Path) -> None:
    cap = tmp_path / "cap"
    cap.mkdir()
    (cap / "seg-3.old.jsonl").write_text("junk")
    (cap / "seg-2.jsonl").write_text('{"model": "m"}\n{torn')
    ring = CaptureRing(cap, CaptureConfig(enabled=True, sample_rate=1.0))
    ring.close()
    assert [r["model"] for r in CaptureRing.export(cap)] == ["m"]
