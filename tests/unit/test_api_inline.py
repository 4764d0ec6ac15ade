"""Where the v2 API runs a model's inference: on the event loop, or in its worker threads.

A model whose smoothed service time is below ``INLINE_SERVICE_S`` runs inline on the event loop
(cheaper than a thread hop); others run in the ``edgefleet-api`` pool so the loop never waits on
them. The service time of a device answer is the CPU time of the thread that computed it: time
the thread spent off the CPU (waiting for the GIL, or for a core other processes hold) is not the
model's cost. Counting it made one preempted call push a fast model into the pool, where worker
threads contending with the loop for the GIL kept every call slow and the model stayed there:
the periodic tail stall of issue 13 under 64 connections. A cloud answer or a failure may have
waited on the network, so its wall time counts. ``time.sleep`` stands for being off the CPU.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from edge_agent.api.app import create_app
from edge_agent.api.endpoints import INLINE_SERVICE_S
from edge_agent.config import ApiConfig
from edge_agent.errors import FallbackError
from edge_agent.serving.service import (
    SOURCE_CLOUD,
    SOURCE_DEVICE,
    InferenceRequest,
    InferenceResult,
)

POOL = "edgefleet-api"
REQUESTS = 8
# Five times the threshold: a wall-clock estimate can never fall below it.
SLOW_S = 5 * INLINE_SERVICE_S


def off_cpu() -> None:
    time.sleep(SLOW_S)


def on_cpu() -> None:
    start = time.thread_time()
    while time.thread_time() - start < SLOW_S:
        pass


def instant() -> None:
    return None


class WorkService:
    """An InferenceService whose ``infer`` runs ``work``, then answers from ``source`` (or
    raises ``FallbackError`` when ``source`` is None), recording the thread it ran in."""

    def __init__(self, work: Callable[[], None], source: str | None, batched: bool = False) -> None:
        self.work = work
        self.source = source
        self.batched = batched
        self.threads: list[str] = []

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def not_ready(self) -> dict[str, str]:
        return {}

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "edgefleet", "version": "0", "extensions": []}

    def model_names(self) -> list[str]:
        return ["m"]

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        return {"name": name, "versions": ["1"], "platform": "onnxruntime_onnx"}

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return True

    def infer(self, request: InferenceRequest) -> InferenceResult:
        self.threads.append(threading.current_thread().name)
        self.work()
        if self.source is None:
            raise FallbackError("the cloud did not answer in time")
        return InferenceResult(
            model=request.model,
            model_version="1",
            outputs={"y": np.asarray(request.inputs["x"]) * 2},
            source=self.source,
            parameters={},
            batched=self.batched,
        )


BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}

CASES = {
    # (work, source, batched, later calls inline?)
    "device answer, fast": (instant, SOURCE_DEVICE, False, True),
    # A batching model needs calls in flight together: never one at a time on the loop.
    "device answer, fast, the model batches": (instant, SOURCE_DEVICE, True, False),
    "device answer, slow in wall time only (thread off the CPU)": (
        off_cpu,
        SOURCE_DEVICE,
        False,
        True,
    ),
    "device answer, slow in CPU time": (on_cpu, SOURCE_DEVICE, False, False),
    "cloud answer, slow in wall time": (off_cpu, SOURCE_CLOUD, False, False),
    "failure, slow in wall time": (off_cpu, None, False, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_where_inference_runs(case: str) -> None:
    work, source, batched, inline = CASES[case]
    service = WorkService(work, source, batched)
    config = ApiConfig(rate_limit_per_second=1e6, rate_limit_burst=1_000_000)
    with TestClient(create_app(service, config), raise_server_exceptions=False) as client:
        statuses = [
            client.post("/v2/models/m/infer", json=BODY).status_code for _ in range(REQUESTS)
        ]
    assert statuses == [200 if source is not None else 503] * REQUESTS
    assert len(service.threads) == REQUESTS
    # The first call has no estimate yet: it runs in the pool.
    assert service.threads[0].startswith(POOL)
    later = [name.startswith(POOL) for name in service.threads[1:]]
    assert later == [not inline] * (REQUESTS - 1), service.threads


def test_a_fast_model_that_turns_slow_moves_to_the_pool() -> None:
    """Below half the threshold the CPU clock is not read (a device answer counts its wall
    time, capped at the threshold); a call that took longer has the next ones measured, so a
    model that turns slow in CPU time still leaves the loop within a few calls."""
    calls = [0]

    def fast_then_slow() -> None:
        calls[0] += 1
        if calls[0] > 4:
            on_cpu()

    service = WorkService(fast_then_slow, SOURCE_DEVICE)
    config = ApiConfig(rate_limit_per_second=1e6, rate_limit_burst=1_000_000)
    with TestClient(create_app(service, config), raise_server_exceptions=False) as client:
        for _ in range(10):
            assert client.post("/v2/models/m/infer", json=BODY).status_code == 200
    pooled = [name.startswith(POOL) for name in service.threads]
    assert pooled[1:5] == [False] * 4, service.threads  # fast: inline after the first call
    assert pooled[-1], service.threads  # slow in CPU time: back in the pool
