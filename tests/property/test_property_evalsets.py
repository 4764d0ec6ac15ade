"""Property: the evaluation-set parser (operator uploads, ``fleet_server.evalsets.data``) answers
every file with an ``EvalSetData`` or a typed ``EvalSetRejectedError``, never another exception,
and what it accepts survives the canonical re-encoding unchanged."""

from __future__ import annotations

import io
import zipfile

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fleet_server.errors import EvalSetRejectedError
from fleet_server.evalsets.data import EvalSetData, canonical_bytes, parse_eval_set

MAX = 1 << 16


def _valid(n: int, features: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = rng.integers(0, 10, n)
    return canonical_bytes(EvalSetData(x, y.astype(np.int64)))


def _parse(data: bytes) -> EvalSetData | None:
    try:
        return parse_eval_set(data, max_bytes=MAX)
    except EvalSetRejectedError as exc:
        reason = exc.reason
    assert reason  # every refusal says which rule
    return None


@given(st.integers(1, 40), st.integers(1, 8), st.integers(0, 2**16), st.data())
def test_flipped_or_cut_bytes_are_typed(
    n: int, features: int, seed: int, data: st.DataObject
) -> None:
    raw = bytearray(_valid(n, features, seed))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    _parse(bytes(raw[:cut]))
    _parse(bytes(raw))


ARRAYS = st.tuples(
    st.sampled_from(["f4", "f8", "i1", "i8", "u2", "b1", "c8", "f2", "U3", "V4"]),
    st.lists(st.integers(0, 5), max_size=4),
)


@given(st.dictionaries(st.sampled_from(["x.npy", "y.npy", "z.npy", "../x.npy", "x"]), ARRAYS,
                       max_size=3), st.booleans())  # fmt: skip
def test_any_npz_of_any_arrays_is_typed(
    members: dict[str, tuple[str, list[int]]], deflate: bool
) -> None:
    out = io.BytesIO()
    mode = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(out, "w", compression=mode) as archive:
        for name, (dtype, shape) in members.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.zeros(shape, dtype=dtype), allow_pickle=False)
            archive.writestr(name, buf.getvalue())
    parsed = _parse(out.getvalue())
    if parsed is not None:
        assert parsed.x.dtype == np.float32
        assert parsed.y.dtype == np.int64
        assert parsed.x.shape[0] == parsed.y.shape[0] >= 1


@given(st.integers(1, 60), st.integers(1, 6), st.integers(0, 2**16))
def test_accepted_sets_survive_the_canonical_form(n: int, features: int, seed: int) -> None:
    data = _valid(n, features, seed)
    parsed = parse_eval_set(data, max_bytes=MAX)
    again = parse_eval_set(canonical_bytes(parsed), max_bytes=MAX)
    assert np.array_equal(again.x, parsed.x)
    assert np.array_equal(again.y, parsed.y)
    assert canonical_bytes(again) == data
