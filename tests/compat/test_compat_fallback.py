"""Every committed cloud-fallback message still parses, with the meaning it had when released.

Fixtures live in ``fallback-*/`` (see its README) and are never regenerated: an agent released
before ``model_version`` existed keeps being answered, and an agent that names its version
keeps being understood.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.wire.fallback import FallbackRequest, FallbackResponse

HERE = Path(__file__).parent / "fallback-v1-2026-12"
X = np.arange(8, dtype=np.float32).reshape(2, 4) / 8


def test_a_request_from_before_model_version_still_parses_without_one() -> None:
    r = FallbackRequest.from_bytes((HERE / "request-before-version.bin").read_bytes())
    assert (r.model, r.reason, r.deadline_ms, r.model_version) == (
        "digits",
        "hard_example",
        500.0,
        None,
    )
    np.testing.assert_array_equal(r.inputs["x"], X)
    assert r.device_outputs["probs"].shape == (2, 2)
    # Re-encoding an old request gives the very bytes it came as (no field added on the way).
    assert r.to_bytes() == (HERE / "request-before-version.bin").read_bytes()


def test_a_request_naming_its_version_parses() -> None:
    data = (HERE / "request-with-version.bin").read_bytes()
    r = FallbackRequest.from_bytes(data)
    assert (r.model, r.model_version) == ("digits", 2)
    np.testing.assert_array_equal(r.inputs["x"], X)
    assert r.to_bytes() == data


def test_released_responses_parse() -> None:
    ok = FallbackResponse.from_bytes((HERE / "response-ok.bin").read_bytes())
    assert (ok.ok, ok.model_version, ok.outputs["probs"].shape) == (True, "1", (2, 2))
    for name, code in (
        ("response-unknown-model.bin", "unknown_model"),
        ("response-unknown-version.bin", "unknown_version"),
    ):
        r = FallbackResponse.from_bytes((HERE / name).read_bytes())
        assert (r.ok, r.error_code, r.outputs) == (False, code, {})
