"""The decode cost bound and the memory budget of the v2 API (pure parts, and through the app).

``decode_cost`` must be an upper bound of what decoding really allocates: checked against
``tracemalloc``'s peak (numpy reports its buffers to it) for hostile bodies, ordinary ones and
generated ones. The daemon-level bound (VmHWM of a real process) is in
``tests/integration/test_api_memory.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from edge_agent.api.app import create_app
from edge_agent.api.budget import MAX_COST_RATIO, MemoryBudget, decode_cost
from edge_agent.api.decode import FAST_JSON_BYTES, decode_request
from edge_agent.api.metrics import ApiMetrics
from edge_agent.config import ApiConfig
from edge_agent.errors import ConfigError, InputValidationError
from edge_agent.serving.service import InferenceRequest, InferenceResult

N = 50_000


def _body(data: Any, datatype: str = "FP32", shape: list[int] | None = None) -> bytes:
    doc = {"inputs": [{"name": "x", "datatype": datatype, "shape": shape or [1], "data": data}]}
    return json.dumps(doc).encode()


def _raw(items: bytes) -> bytes:
    return b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[' + items + b"]}]}"


def _binary(datatype: str, tail: bytes, count: int) -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": datatype,
                    "shape": [count],
                    "parameters": {"binary_data_size": len(tail)},
                }
            ]
        }
    ).encode()
    return header + tail, len(header)


BODIES: dict[str, tuple[bytes, int | None]] = {
    "empty lists": (_raw(b",".join([b"[]"] * N)), None),
    "nested empty lists": (_raw(b",".join([b"[[[]]]"] * N)), None),
    "empty objects": (_raw(b",".join([b"{}"] * N)), None),
    "small objects": (_raw(b",".join([b'{"a":1,"b":[2]}'] * N)), None),
    "short strings": (_raw(b",".join([b'"ab"'] * N)), None),
    "astral strings": (_body(["\U0001f600"] * N, "BYTES", [N]), None),
    "non-ascii raw": (_raw(",".join(['"é\U0001f600"'] * N).encode()), None),
    "short floats": (_body([0.5] * N, shape=[N]), None),
    "long floats": (_body([0.123456789] * N, shape=[N]), None),
    "ints": (_body([1] * N, "INT64", [N]), None),
    "column": (_body([[0.5]] * N, shape=[N, 1]), None),
    "bools": (_body([True] * N, "BOOL", [N]), None),
    "text": (_body(["ab"] * N, "BYTES", [N]), None),
    # One long string among numbers: numpy would make every element as wide as the string.
    "long string among numbers": (_body(["a" * 10_000] + [0] * 10_000, shape=[10_001]), None),
    "short string among floats": (_body(["a"] + [0.5] * N, shape=[N + 1]), None),
    "binary fp32": _binary("FP32", np.zeros(N, "<f4").tobytes(), N),
    "binary BYTES 1": _binary("BYTES", b"\x01\x00\x00\x00a" * N, N),
    "binary BYTES 0": _binary("BYTES", b"\x00\x00\x00\x00" * N, N),
    "binary escaped BYTES": (
        _binary("BYTES", b"\x02\x00\x00\x00ab" * N, N)[0].replace(b'"BYTES"', b'"\\u0042YTES"'),
        _binary("BYTES", b"", N)[1] + 5,
    ),
}


def _peak(body: bytes, end: int | None) -> int:
    with contextlib.suppress(InputValidationError):  # one-time caches are not the body's cost
        decode_request(body[:200], None)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with contextlib.suppress(InputValidationError):
            decode_request(body, None if end is None else str(end))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("case", list(BODIES))
def test_decode_cost_bounds_the_measured_peak(case: str) -> None:
    body, end = BODIES[case]
    assert _peak(body, end) + len(body) <= decode_cost(body, end)  # + the body itself


# Bodies short enough for orjson (``decode.FAST_JSON_BYTES``), whose parse document counts too.
SHORT: dict[str, bytes] = {
    "empty lists": _raw(b",".join([b"[]"] * 2000)),
    "small objects": _raw(b",".join([b'{"a":1,"b":[2]}'] * 1000)),
    "short strings": _raw(b",".join([b'"ab"'] * 2000)),
    "short floats": _body([0.5] * 2000, shape=[2000]),
    "long floats": _body([-2.1718501174563347e126] * 2000, shape=[2000]),
    "one long string": _raw(b'"' + b"x" * 60_000 + b'"'),
}


@pytest.mark.parametrize("case", list(SHORT))
def test_decode_cost_bounds_the_peak_of_short_bodies(case: str) -> None:
    body = SHORT[case]
    assert len(body) <= FAST_JSON_BYTES
    assert _peak(body, None) + len(body) <= decode_cost(body)


ORDINARY = ("short floats", "long floats", "ints", "column", "bools", "text", "binary fp32")


@pytest.mark.parametrize("case", ORDINARY)
def test_ordinary_bodies_stay_under_the_ratio_cap(case: str) -> None:
    body, end = BODIES[case]
    assert decode_cost(body, end) <= MAX_COST_RATIO * len(body)


@pytest.mark.parametrize("case", ["empty objects", "small objects", "nested empty lists"])
def test_hostile_structure_exceeds_the_ratio_cap(case: str) -> None:
    body, end = BODIES[case]
    assert decode_cost(body, end) > MAX_COST_RATIO * len(body)


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=6),
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=30,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(item=_JSON, repeat=st.integers(200, 2000), datatype=st.sampled_from(["FP32", "BYTES"]))
def test_decode_cost_bounds_generated_bodies(item: Any, repeat: int, datatype: str) -> None:
    body = _body([item] * repeat, datatype, [repeat])
    assert _peak(body, None) + len(body) <= decode_cost(body)


def test_out_of_range_header_end_is_bounded_as_whole_json() -> None:
    body = _raw(b",".join([b"[]"] * 100))
    assert decode_cost(body, len(body) + 5) == decode_cost(body) == decode_cost(body, -1)


# --- the budget ---------------------------------------------------------------------------


def test_budget_waits_in_order_and_shrink_releases() -> None:
    async def scenario() -> list[str]:
        budget = MemoryBudget(100)
        order: list[str] = []
        first_in = asyncio.Event()
        release_first = asyncio.Event()

        async def user(name: str, amount: int, gate: asyncio.Event | None = None) -> None:
            async with budget.hold(amount) as held:
                order.append(name)
                if gate is not None:
                    first_in.set()
                    await gate.wait()
                    held.shrink(10)
                    await asyncio.sleep(0)
                    order.append(f"{name} shrunk")
                    await asyncio.sleep(0)

        a = asyncio.create_task(user("a", 500, release_first))  # capped at the total
        await first_in.wait()
        b = asyncio.create_task(user("b", 90))
        c = asyncio.create_task(user("c", 5))  # fits now, but waits behind b (FIFO)
        await asyncio.sleep(0)
        assert budget.waiting == 2
        assert order == ["a"]
        release_first.set()
        await asyncio.gather(a, b, c)
        assert budget.free == budget.total
        return order

    order = asyncio.run(scenario())
    assert order[:2] == ["a", "b"]
    assert set(order) == {"a", "b", "c", "a shrunk"}


def test_cancelled_waiter_leaves_nothing_held() -> None:
    async def scenario() -> MemoryBudget:
        budget = MemoryBudget(10)
        async with budget.hold(10):
            waiter = asyncio.create_task(_hold(budget, 10))
            await asyncio.sleep(0)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        async with budget.hold(10):
            pass
        return budget

    async def _hold(budget: MemoryBudget, amount: int) -> None:
        async with budget.hold(amount):
            pass

    assert asyncio.run(scenario()).free == 10


# --- through the app ------------------------------------------------------------------------


class _Echo:
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def not_ready(self) -> dict[str, str]:
        return {}

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "fake", "version": "0", "extensions": []}

    def model_names(self) -> list[str]:
        return ["m"]

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        return {"name": name, "versions": ["1"], "platform": "x", "inputs": [], "outputs": []}

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return True

    def infer(self, request: InferenceRequest) -> InferenceResult:
        x = next(iter(request.inputs.values()))
        return InferenceResult(request.model, "1", {"y": np.asarray(x.shape)})


def test_app_refuses_a_body_whose_decoding_exceeds_the_budget() -> None:
    config = ApiConfig(max_request_bytes=1 << 20, max_decode_memory_bytes=8 << 20)
    app = create_app(_Echo(), config)
    hostile = _raw(b",".join([b"[]"] * 200_000))  # 600 KB, ~19 MB to decode
    ok = _body([0.5] * 100_000, shape=[100_000])  # 500 KB, under the budget
    with TestClient(app) as client:
        refused = client.post("/v2/models/m/infer", content=hostile)
        assert refused.status_code == 413
        assert "decoding this body" in refused.json()["error"]
        assert client.post("/v2/models/m/infer", content=ok).status_code == 200
        metrics = client.get("/metrics").text
    assert 'reason="decode_memory"' in metrics
    assert app.state.metrics is not None


def test_decode_budget_must_hold_a_maximum_body() -> None:
    with pytest.raises(ConfigError, match="max_decode_memory_bytes"):
        ApiConfig(max_request_bytes=1 << 20, max_decode_memory_bytes=1 << 20).validate()


def _chunks(body: bytes, size: int = 16 * 1024) -> Any:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_chunked_bodies_are_bounded_too() -> None:
    config = ApiConfig(max_request_bytes=1 << 20, max_decode_memory_bytes=8 << 20)
    app = create_app(_Echo(), config)
    small = _body([0.5] * 1000, shape=[1000])  # < 64 KiB: read whole, decoded inline
    hostile = _raw(b",".join([b"[]"] * 200_000))
    large = _body([0.5] * 100_000, shape=[100_000])
    with TestClient(app) as client:
        assert client.post("/v2/models/m/infer", content=_chunks(small)).status_code == 200
        refused = client.post("/v2/models/m/infer", content=_chunks(hostile))
        assert refused.status_code == 413
        assert "decoding this body" in refused.json()["error"]
        assert client.post("/v2/models/m/infer", content=_chunks(large)).status_code == 200
        too_big = _body([0.5] * 300_000, shape=[300_000])  # over max_request_bytes
        assert client.post("/v2/models/m/infer", content=_chunks(too_big)).status_code == 413


KINDS = [
    ([1, 2.5, True], "f"),
    ([[1], [2]], "f"),
    ([None, 1], "O"),
    ([[1], ["a"]], "U"),
    (["a" * 1000, 0], "U"),
    ([], "f"),
    ([[]], "f"),
    ([1, {"a": 1}], "O"),
]


@pytest.mark.parametrize(("data", "kind"), KINDS)
def test_element_kind_without_allocating(data: list[Any], kind: str) -> None:
    from edge_agent.api.decode import _element_kind, _scan_kind

    # numpy's discovery and the fallback scan agree on what matters: text/objects or numbers
    assert (_element_kind(data) in "USO") == (kind in "USO")
    assert (_scan_kind(data) in "USO") == (kind in "USO")


def test_a_numpy_whose_private_discovery_changed_falls_back_to_the_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from numpy._core import _multiarray_umath

    from edge_agent.api.decode import _numpy_discovery

    assert _numpy_discovery() is not None  # this numpy: its discovery answers as expected
    monkeypatch.setattr(_multiarray_umath, "_discover_array_parameters", lambda data, x: None)
    assert _numpy_discovery() is None  # another signature: not used (no request fails)
    monkeypatch.setattr(_multiarray_umath, "_discover_array_parameters", lambda data: (None, ()))
    assert _numpy_discovery() is None  # other answers: not used either


@pytest.mark.parametrize("datatype", ["BOOL", "UINT8", "INT32", "INT64", "FP16", "FP32", "FP64"])
def test_text_among_numbers_is_refused_before_numpy_allocates(datatype: str) -> None:
    body = _body(["a" * 2_000] + [1] * 20_000, datatype, [20_001])
    tracemalloc.start()
    try:
        with pytest.raises(InputValidationError, match="holds strings"):
            decode_request(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * len(body)  # numpy would have allocated 20,001 x 8,000 bytes


def test_decode_budget_is_exported_in_metrics() -> None:
    config = ApiConfig(max_request_bytes=1 << 20, max_decode_memory_bytes=8 << 20)
    metrics = ApiMetrics()
    create_app(_Echo(), config, metrics)
    app = create_app(_Echo(), config, metrics)  # the same metrics twice: no duplicate series
    with TestClient(app) as client:
        text = client.get("/metrics").text
    assert 'edgefleet_api_decode_memory_bytes{kind="limit"} 8.388608e+06' in text
    assert 'edgefleet_api_decode_memory_bytes{kind="held"} 0.0' in text
    assert "edgefleet_api_decode_waiting_requests 0.0" in text


def test_a_stalled_upload_holds_the_budget_only_until_its_deadline() -> None:
    # A client declares a large body, sends one chunk and stops: it holds the whole decode budget
    # (declared * MAX_COST_RATIO, capped), so without a deadline every other large request waits.
    config = ApiConfig(
        max_request_bytes=1 << 20, max_decode_memory_bytes=8 << 20, body_read_seconds=0.2
    )
    app = create_app(_Echo(), config)
    ok = _body([0.5] * 100_000, shape=[100_000])  # 500 KB: needs a share of the budget

    def scope(length: int) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v2/models/m/infer",
            "raw_path": b"/v2/models/m/infer",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-length", str(length).encode())],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 8080),
        }

    async def request(length: int, chunks: list[bytes], stall: asyncio.Event | None) -> int:
        queue = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
        queue[-1]["more_body"] = stall is not None

        async def receive() -> dict[str, Any]:
            if queue:
                return queue.pop(0)
            assert stall is not None
            await stall.wait()  # never set: the client stopped sending
            return {"type": "http.disconnect"}

        status = 0

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await app(scope(length), receive, send)
        return status

    async def scenario() -> tuple[int, int]:
        stall = asyncio.Event()
        stalled = asyncio.create_task(request(1 << 20, [b"[" * 70_000], stall))
        await asyncio.sleep(0)  # let it take its reservation first
        served = await asyncio.wait_for(request(len(ok), [ok], None), timeout=30)
        return await asyncio.wait_for(stalled, timeout=30), served

    stalled_status, served_status = asyncio.run(scenario())
    assert stalled_status == 408
    assert served_status == 200
