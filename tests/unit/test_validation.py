"""Input validation: structural problems raise naming the field; row problems are counted."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edge_agent.contract import DimSpec, FeatureRanges, InputContract, TensorSpec
from edge_agent.contract.validation import Validator
from edge_agent.errors import InputValidationError


def contract(
    nan_policy: str = "reject", ranges: FeatureRanges | None = None, max_payload: int = 1 << 20
) -> InputContract:
    img = TensorSpec(
        "img",
        "float32",
        (DimSpec(min=1, max=8), DimSpec(size=2), DimSpec(size=3)),
        ranges=ranges or FeatureRanges((0.0,), (1.0,)),
        nan_policy=nan_policy,
    )
    seq = TensorSpec("seq", "int64", (DimSpec(min=1, max=8), DimSpec(min=1, max=4, name="len")))
    return InputContract((img, seq), max_payload_bytes=max_payload)


def feeds(n: int = 2, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "img": np.full((n, 2, 3), 0.5, np.float32),
        "seq": np.ones((n, 3), np.int64),
    }
    base.update(over)
    return base


STRUCTURAL = [
    ("missing", {"seq": np.ones((2, 3), np.int64)}, "missing_input", "img"),
    ("unknown", {**feeds(), "extra": np.zeros(1)}, "unknown_input", "extra"),
    ("dtype str", feeds(img=np.array([["a"]])), "dtype", "img"),
    ("dtype float to int", feeds(seq=np.ones((2, 3), np.float32)), "dtype", "seq"),
    ("ragged", feeds(img=[[1.0], [1.0, 2.0]]), "dtype", "img"),
    ("rank", feeds(img=np.zeros((2, 6), np.float32)), "rank", "img"),
    ("fixed dim", feeds(img=np.zeros((2, 3, 3), np.float32)), "shape", "img"),
    ("dynamic dim too long", feeds(seq=np.ones((2, 5), np.int64)), "shape", "seq"),
    ("dynamic dim empty", feeds(seq=np.ones((2, 0), np.int64)), "shape", "seq"),
    ("batch too large", feeds(9), "batch_too_large", "img"),
    ("empty batch", feeds(0), "empty_batch", "img"),
    ("batch mismatch", feeds(seq=np.ones((3, 3), np.int64)), "batch_mismatch", "seq"),
]


@pytest.mark.parametrize(
    ("case", "request_feeds", "reason", "field"), STRUCTURAL, ids=[c[0] for c in STRUCTURAL]
)
def test_structural_problems_raise_with_field_and_reason(
    case: str, request_feeds: dict[str, Any], reason: str, field: str
) -> None:
    with pytest.raises(InputValidationError) as info:
        Validator(contract()).validate(request_feeds)
    assert info.value.reason == reason
    assert info.value.field == field


def test_payload_limit() -> None:
    v = Validator(contract(max_payload=100))
    with pytest.raises(InputValidationError) as info:
        v.validate(feeds(4))  # 4*6*4 + 4*3*8 = 192 bytes
    assert info.value.reason == "payload_too_large"
    with pytest.raises(InputValidationError):
        Validator(contract()).validate(feeds(), payload_bytes=(1 << 20) + 1)


def test_valid_request_passes_and_converts_untyped_values() -> None:
    img = [[[0.25] * 3] * 2] * 2
    r = Validator(contract()).validate(feeds(img=img, seq=[[1, 2], [3, 4]]))
    assert r.rows_kept == r.rows_in == 2
    assert r.feeds["img"].dtype == np.float32
    assert r.feeds["seq"].dtype == np.int64
    assert not r.rejected


CONTRACT_DTYPES = ["float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64"]
CONTRACT_DTYPES += ["bool"]
SENT_DTYPES = [*CONTRACT_DTYPES, "uint16", "uint32", "uint64"]


@pytest.mark.parametrize("sent", SENT_DTYPES)
@pytest.mark.parametrize("declared", CONTRACT_DTYPES)
def test_a_typed_tensor_is_never_cast(declared: str, sent: str) -> None:
    spec = TensorSpec("x", declared, (DimSpec(min=1, max=4), DimSpec(size=2)))
    x = np.ones((2, 2), sent)
    if sent == declared:
        assert Validator(InputContract((spec,))).validate({"x": x}).feeds["x"].dtype == x.dtype
        return
    with pytest.raises(InputValidationError) as info:
        Validator(InputContract((spec,))).validate({"x": x})
    assert info.value.reason == "dtype"
    assert info.value.field == "x"
    wire = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "bool": "BOOL"}
    assert wire.get(declared, declared.upper()) in str(info.value)


def _bad_rows() -> dict[str, Any]:
    img = np.full((5, 2, 3), 0.5, np.float32)
    img[0, 0, 0] = np.nan
    img[1, 1, 2] = np.inf
    img[2, 0, 1] = 1.5  # out of range
    img[3, 0, 0] = np.nan
    img[3, 0, 1] = -2.0  # NaN and out of range in the same row
    return feeds(5, img=img)


def test_reject_policy_counts_rows_by_reason() -> None:
    with pytest.raises(InputValidationError) as info:
        Validator(contract()).validate(_bad_rows())
    assert info.value.counts == {"nan": 2, "inf": 1, "out_of_range": 2}
    assert info.value.field == "img"
    assert info.value.reason == "nan"


def test_drop_policy_keeps_good_rows() -> None:
    r = Validator(contract(), policy="drop").validate(_bad_rows())
    assert (r.rows_in, r.rows_kept, r.dropped) == (5, 1, 4)
    assert r.kept is not None
    assert r.kept.tolist() == [False, False, False, False, True]
    assert r.feeds["seq"].shape == (1, 3)
    assert dict(r.rejected) == {"nan": 2, "inf": 1, "out_of_range": 2}


def test_drop_policy_with_every_row_bad_raises() -> None:
    img = np.full((2, 2, 3), np.nan, np.float32)
    with pytest.raises(InputValidationError):
        Validator(contract(), policy="drop").validate(feeds(img=img))


def test_nan_allowed_policy_ignores_non_finite_but_checks_range() -> None:
    img = np.full((3, 2, 3), 0.5, np.float32)
    img[0, 0, 0] = np.nan
    img[1, 0, 0] = np.inf
    v = Validator(contract(nan_policy="allow"), policy="drop")
    assert v.validate(feeds(3, img=img)).rows_kept == 3
    img[2, 0, 0] = 7.0
    r = v.validate(feeds(3, img=img))
    assert (r.rows_kept, dict(r.rejected)) == (2, {"out_of_range": 1})


def test_per_feature_ranges() -> None:
    lo = tuple(float(i) for i in range(6))
    hi = tuple(float(i) + 0.5 for i in range(6))
    v = Validator(contract(ranges=FeatureRanges(lo, hi)), policy="drop")
    ok = np.array(lo, np.float32).reshape(1, 2, 3).repeat(2, axis=0)
    assert v.validate(feeds(img=ok)).rows_kept == 2
    bad = ok.copy()
    bad[1, 1, 2] = 5.75  # feature 5 allows [5, 5.5]
    r = v.validate(feeds(img=bad))
    assert r.kept is not None
    assert r.kept.tolist() == [True, False]
