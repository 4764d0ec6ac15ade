"""What bounding a request's decode costs, next to the decode itself (local v2 API).

Times, per body: ``json.loads`` + tensor conversion (``decode_request``), the byte-count bound
``decode_cost`` the API computes before parsing a body above 64 KiB, and, for comparison, a
shape-checked alternative (a Python walk of the parsed data). Also the batch-1 JSON request of
``bench_agent.py`` decoded with and without the text guard of numeric tensors. Median of
``--rounds`` rounds.

    .venv/bin/python bench/bench_decode.py --markdown
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from typing import Any

import numpy as np

import edge_agent.api.decode as decode
from edge_agent.api.budget import decode_cost


def _median_us(func: Callable[[], Any], rounds: int, number: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(number):
            func()
        times.append((time.perf_counter() - start) / number)
    return statistics.median(times) * 1e6


def _walk(value: Any) -> int:
    """The shape-checked alternative: count elements by walking the parsed lists."""
    if isinstance(value, list):
        return sum(_walk(v) for v in value) + 1
    return 1


def _body(data: Any, shape: list[int]) -> bytes:
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": data}]}
    return json.dumps(doc).encode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    bodies = {
        f"{n:,} floats": _body(rng.random(n).round(6).tolist(), [n]) for n in (800_000, 100_000)
    }
    rows = []
    for name, body in bodies.items():
        full = _median_us(lambda b=body: decode.decode_request(b), args.rounds, 1)
        bound = _median_us(lambda b=body: decode_cost(b), args.rounds, 3)
        walk = _median_us(lambda b=body: _walk(json.loads(b)), args.rounds, 1)
        rows.append((name, len(body), full, bound, walk))

    x1 = rng.random((1, 64)).astype(np.float32)
    batch1 = _body(x1.ravel().tolist(), [1, 64])
    guard = decode._refuse_text
    with_guard: list[float] = []
    without_guard: list[float] = []
    for _ in range(args.rounds):  # alternating rounds: a loaded machine drifts
        with_guard.append(_median_us(lambda: decode.decode_request(batch1), 1, 20000))
        decode._refuse_text = lambda *a: None  # type: ignore[assignment]
        try:
            without_guard.append(_median_us(lambda: decode.decode_request(batch1), 1, 20000))
        finally:
            decode._refuse_text = guard  # type: ignore[assignment]

    print(f"Run {date.today()}: python {platform.python_version()}, numpy {np.__version__}")
    if args.markdown:
        print("\n| body | bytes | decode | bound from bytes | walk of parsed data |")
        print("|---|---:|---:|---:|---:|")
        for name, size, full, bound, walk in rows:
            print(
                f"| {name} | {size:,} | {full / 1000:.1f} ms | {bound / 1000:.2f} ms "
                f"({bound / full:.1%}) | {walk / 1000:.1f} ms ({walk / full:.0%}) |"
            )
        print("\n| batch-1 JSON request (64 FP32) | us |")
        print("|---|---:|")
        print(f"| decode, without the text guard | {statistics.median(without_guard):.2f} |")
        print(f"| decode, with the text guard | {statistics.median(with_guard):.2f} |")
    else:
        guards = [statistics.median(without_guard), statistics.median(with_guard)]
        print(json.dumps({"rows": rows, "batch1": guards}))


if __name__ == "__main__":
    main()
