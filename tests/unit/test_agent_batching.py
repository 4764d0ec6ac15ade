"""Adaptive batching inside a real agent (``[models.<name>] batching``): concurrent requests
through ``Agent.infer`` share a session run, and everything per request stays per request —
answers, validation, counts, drift rows, metrics."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from test_agent import make_agent, request
from test_batching import Held

from bundles import DigitsBundles
from edge_agent.config import ModelPolicy
from edge_agent.errors import InputValidationError
from edge_agent.runtime.batching import BatchingRuntime
from edge_agent.serving.metrics import AgentCollector
from support import wait_until


def test_concurrent_requests_share_a_batch_and_are_each_answered_and_counted(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    plain = make_agent(tmp_path / "plain", digits_bundles)
    agent = make_agent(
        tmp_path / "batched",
        digits_bundles,
        models={"digits": ModelPolicy(batching="on", batch_max_rows=256)},
    )
    try:
        pipeline = agent.registry.get("digits").pipeline  # type: ignore[union-attr]
        batcher = pipeline.runtime
        assert isinstance(batcher, BatchingRuntime)
        held = Held(batcher.inner)  # type: ignore[arg-type]
        batcher.inner = held  # type: ignore[assignment]
        answers: dict[int, object] = {}

        def ask(i: int) -> None:
            try:
                answers[i] = agent.infer(request(digits_bundles, 1 + i % 3, start=5 * i))
            except Exception as exc:
                answers[i] = exc

        threads = [threading.Thread(target=ask, args=(0,))]
        threads[0].start()
        assert held.entered.wait(30)
        for i in range(1, 25):
            t = threading.Thread(target=ask, args=(i,))
            t.start()
            threads.append(t)

        def queued() -> int:
            with batcher._cond:
                return len(batcher._queue)

        wait_until(lambda: queued() == 24, timeout=30, what="24 requests queued")
        # a request that does not fit the contract is refused before it reaches the batch
        bad = request(digits_bundles, 1)
        bad.inputs["input"] = bad.inputs["input"][:, :10]
        try:
            agent.infer(bad)
        except InputValidationError:
            pass
        else:
            raise AssertionError("a malformed request was not refused")
        held.release.set()
        for t in threads:
            t.join(30)
        assert held.calls[1] == sum(1 + i % 3 for i in range(1, 25))  # one run for all 24
        for i in range(25):
            got = answers[i]
            want = plain.infer(request(digits_bundles, 1 + i % 3, start=5 * i))
            assert not isinstance(got, Exception), got
            assert got.model_version == want.model_version  # type: ignore[attr-defined]
            assert got.batched  # type: ignore[attr-defined]  # so the API runs it in its pool
            assert not want.batched
            for name, value in want.outputs.items():
                np.testing.assert_allclose(
                    got.outputs[name],  # type: ignore[attr-defined]
                    value,
                    rtol=1e-5,
                    atol=1e-6,
                )
        assert pipeline.requests == 25
        assert pipeline.rows == sum(1 + i % 3 for i in range(25))
        assert pipeline.client_errors == 1
        registry = CollectorRegistry()
        registry.register(AgentCollector(agent))
        text = generate_latest(registry).decode()
        assert 'edgefleet_agent_batches_total{model="digits",what="batches"} 2.0' in text
        assert 'edgefleet_agent_batches_total{model="digits",what="requests"} 25.0' in text
        # the lone first request (one row), then 48 rows at once
        assert 'edgefleet_agent_batch_rows_le_total{le="32",model="digits"} 1.0' in text
        assert 'edgefleet_agent_batch_rows_le_total{le="64",model="digits"} 2.0' in text
    finally:
        agent.close()
        plain.close()


def test_batching_is_off_by_default_and_auto_leaves_the_tiny_digits_model_alone(
    tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    """The digits MLP runs a row in microseconds: batching could not save the 50 us a row it
    must to pay, whatever this machine's speed."""
    agent = make_agent(tmp_path / "default", digits_bundles)
    auto = make_agent(
        tmp_path / "auto", digits_bundles, models={"digits": ModelPolicy(batching="auto")}
    )
    try:
        for a in (agent, auto):
            runtime = a.registry.get("digits").pipeline.runtime  # type: ignore[union-attr]
            assert not isinstance(runtime, BatchingRuntime)
    finally:
        agent.close()
        auto.close()
