"""The admin API reads a model version from the path as ASCII digits only.

``'²'.isdigit()`` is True (``int`` then raised a bare ValueError: a 500) and ``int('\u0661')`` is 1
(an Arabic-Indic digit named version 1). Both are refused with the typed 400 now.
"""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient
from test_rollout_runner import World, api, world  # noqa: F401  (fixtures)


@pytest.mark.parametrize("version", ["\u00b2", "1\u00b2", "\u0661", "\uff11", "1%0A", "%201"])
def test_a_model_version_is_ascii_digits(
    world: World,  # noqa: F811
    api: TestClient,  # noqa: F811
    version: str,
) -> None:
    assert api.get("/v1/models/digits/1").status_code == 200  # the route itself answers
    got = api.get(f"/v1/models/digits/{version}")
    assert got.status_code == 400, got.text
    assert got.json()["code"] == "rollout_policy_invalid"
