"""Conformance with KServe's Python client (``kserve`` 0.21): ``InferenceRESTClient`` (v2) and
``InferenceGRPCClient`` drive a real daemon through every method they have.

kserve cannot share the project's environment (it needs protobuf < 7 and starlette >= 1.3), so
``scripts/setup.sh test`` builds ``.venv-kserve`` pinned by ``constraints-kserve.txt``, and
``kserve_v2_client.py`` runs there as a subprocess and prints what each call answered; the
assertions are here, against the daemon's own REST answers. tritonclient's conformance (metadata,
repository, Unix socket, the whole error table) is in ``test_grpc_daemon.py`` and
``test_repository_daemon.py``; the KServe clients have no metadata or repository methods.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_grpc_daemon import GRPC_CODE, HTTP_STATUS, Daemon, daemon  # noqa: F401

from bundles import DigitsBundles
from edge_agent.errors import InputValidationError, ModelNotFoundError

ROOT = Path(__file__).resolve().parents[2]
KSERVE_PYTHON = ROOT / ".venv-kserve" / "bin" / "python"
CLIENT = Path(__file__).with_name("kserve_v2_client.py")
BATCHES = (1, 7, 64)


@pytest.fixture(scope="module")
def seen(daemon: Daemon, digits_bundles: DigitsBundles) -> dict[str, Any]:  # noqa: F811
    """What every KServe client call answered (one run of ``kserve_v2_client.py``)."""
    if not KSERVE_PYTHON.exists():
        pytest.fail(f"{KSERVE_PYTHON} is missing: run 'bash scripts/setup.sh test'")
    given = {
        "model": "digits",
        "batches": {str(b): digits_bundles.x_eval[:b].astype(np.float32).tolist() for b in BATCHES},
    }
    done = subprocess.run(  # -I: no module of this directory can shadow kserve's imports
        [str(KSERVE_PYTHON), "-I", str(CLIENT), daemon.http, daemon.url],
        input=json.dumps(given),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=CLIENT.parent,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_probes(seen: dict[str, Any], protocol: str) -> None:
    calls = seen[protocol]
    assert calls["live"] is True
    assert calls["ready"] is True
    assert calls["model_ready"] is True
    if protocol == "rest":  # the client reads any non-2xx as "not ready"
        assert calls["unknown_model_ready"] is False
    else:  # the gRPC client raises the status: the error table's code for an unknown model
        assert calls["unknown_model_ready"] == {"raised": GRPC_CODE[ModelNotFoundError]}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(
    ("protocol", "form"),
    [("rest", "json"), ("rest", "binary"), ("grpc", "typed"), ("grpc", "raw")],
)
def test_infer_matches_rest(
    seen: dict[str, Any],
    daemon: Daemon,  # noqa: F811
    digits_bundles: DigitsBundles,
    protocol: str,
    form: str,
    batch: int,
) -> None:
    x = digits_bundles.x_eval[:batch].astype(np.float32)
    rid = f"{protocol}-{batch}-{form}"
    got = seen[protocol][rid]
    assert got["id"] == rid
    assert got["datatype"] == "FP32"
    assert got["shape"] == [batch, 10]
    if protocol == "grpc":  # kserve's REST response reader drops model_version (its from_bytes)
        assert got["model_version"] == "1"
    rest = daemon.rest.infer("digits", {"input": x})
    assert got["output"] == rest["outputs"][0]["name"]
    scores = np.asarray(got["data"]).reshape(batch, 10)
    np.testing.assert_allclose(
        scores, np.asarray(rest["outputs"][0]["data"]).reshape(batch, 10), rtol=1e-6
    )
    assert (scores.argmax(axis=1) == digits_bundles.y_eval[:batch]).mean() >= 0.75


def test_rest_errors_are_the_error_table(seen: dict[str, Any]) -> None:
    calls = seen["rest"]
    unknown, rank = calls["rest-unknown_model"], calls["rest-wrong_rank"]
    assert unknown["raised"] == "HTTPStatusError"
    assert unknown["status"] == HTTP_STATUS[ModelNotFoundError]
    assert rank["status"] == HTTP_STATUS[InputValidationError]
    assert "reason: rank" in rank["message"] or "reason: shape" in rank["message"]


def test_grpc_errors_are_the_error_table(seen: dict[str, Any]) -> None:
    calls = seen["grpc"]
    assert calls["grpc-unknown_model"]["raised"] == GRPC_CODE[ModelNotFoundError]
    rank = calls["grpc-wrong_rank"]
    assert rank["raised"] == GRPC_CODE[InputValidationError]
    assert "reason: rank" in rank["message"] or "reason: shape" in rank["message"]
    output = calls["grpc-unknown_output"]
    assert output["raised"] == GRPC_CODE[InputValidationError]
    assert "reason: output" in output["message"]
