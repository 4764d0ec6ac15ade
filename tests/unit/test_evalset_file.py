"""Evaluation set files: the hostile-file table, the canonical digest, hostile provenance text.

Every malformed file is refused with ``EvalSetRejectedError`` and a stable reason, before any
large allocation (a header declaring 10**12 samples in a small file is refused on its header);
a pickled array is refused, never loaded. The same data saved compressed or not, in either
member order, has one digest. Provenance text with control, escape or bidi characters is refused.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from evalset_support import eval_set_bytes
from fleet_server.errors import EvalSetRejectedError
from fleet_server.evalsets.data import canonical_bytes, digest, parse_eval_set
from fleet_server.evalsets.store import EvalSetStore, check_text

RNG = np.random.default_rng(0)
X = RNG.uniform(0, 16, size=(60, 64)).astype(np.float32)
Y = (np.arange(60) % 10).astype(np.int64)


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


def _npy(array: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array(out, array, allow_pickle=allow_pickle)
    return out.getvalue()


def _huge_header() -> bytes:
    """An .npy whose header declares 10**12 float32 samples, followed by 16 bytes of data."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 64)}
    )
    return out.getvalue() + b"\0" * 16


def _pickled() -> bytes:
    arr = np.empty(2, dtype=object)
    arr[:] = [{"a": 1}, [2]]
    return _npy(arr, allow_pickle=True)


HOSTILE: list[tuple[str, Callable[[], bytes], str]] = [
    ("empty file", lambda: b"", "not_npz"),
    ("not a zip", lambda: b"PK\x03\x04 this is not a zip at all", "not_npz"),
    ("a bundle-sized blob of text", lambda: b"x" * 1000, "not_npz"),
    ("no members", lambda: _zip({}), "members"),
    ("only x", lambda: _zip({"x.npy": _npy(X)}), "members"),
    (
        "an extra member",
        lambda: _zip({"x.npy": _npy(X), "y.npy": _npy(Y), "z.npy": _npy(Y)}),
        "members",
    ),
    (
        "a path-traversing member",
        lambda: _zip({"x.npy": _npy(X), "../y.npy": _npy(Y)}),
        "members",
    ),
    ("x not an array", lambda: _zip({"x.npy": b"hello", "y.npy": _npy(Y)}), "bad_array"),
    ("a pickled object array", lambda: _zip({"x.npy": _pickled(), "y.npy": _npy(Y)}), "dtype"),
    (
        "a structured dtype",
        lambda: _zip(
            {"x.npy": _npy(np.zeros(60, dtype=[("a", "<f4"), ("b", "<i4")])), "y.npy": _npy(Y)}
        ),
        "dtype",
    ),
    (
        "a header declaring 10**12 samples",
        lambda: _zip({"x.npy": _huge_header(), "y.npy": _npy(Y)}),
        "bad_array",
    ),
    (
        "truncated data",
        lambda: _zip({"x.npy": _npy(X)[:-100], "y.npy": _npy(Y)}),
        "bad_array",
    ),
    ("x float64", lambda: _zip({"x.npy": _npy(X.astype(np.float64)), "y.npy": _npy(Y)}), "dtype"),
    ("y float", lambda: _zip({"x.npy": _npy(X), "y.npy": _npy(Y.astype(np.float32))}), "dtype"),
    ("x of rank 1", lambda: _zip({"x.npy": _npy(X[:, 0]), "y.npy": _npy(Y)}), "shape"),
    ("y of rank 2", lambda: _zip({"x.npy": _npy(X), "y.npy": _npy(Y.reshape(-1, 1))}), "shape"),
    ("different lengths", lambda: eval_set_bytes(X, Y[:-1]), "length"),
    ("no samples", lambda: eval_set_bytes(X[:0], Y[:0]), "empty"),
    ("negative labels", lambda: eval_set_bytes(X, Y - 1), "labels"),
    ("labels past 1023", lambda: eval_set_bytes(X, Y + 1020), "labels"),
    ("NaN inputs", lambda: eval_set_bytes(np.where(X > 15.9, np.nan, X), Y), "non_finite"),
    ("infinite inputs", lambda: eval_set_bytes(np.where(X > 15.9, np.inf, X), Y), "non_finite"),
]


@pytest.mark.parametrize(("what", "make", "reason"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_files_are_refused_with_their_reason(
    what: str, make: Callable[[], bytes], reason: str
) -> None:
    with pytest.raises(EvalSetRejectedError) as err:
        parse_eval_set(make())
    assert err.value.reason == reason, (what, str(err.value))


def test_a_file_over_the_cap_is_refused_before_it_is_read() -> None:
    data = eval_set_bytes(X, Y)
    with pytest.raises(EvalSetRejectedError) as err:
        parse_eval_set(data, max_bytes=len(data) - 1)
    assert err.value.reason == "too_large"


def test_a_zip_bomb_is_refused_on_its_declared_sizes() -> None:
    big = np.zeros((4096, 1024), dtype=np.float32)  # 16 MiB of zeros compresses to ~16 KiB
    data = eval_set_bytes(big, np.zeros(4096, dtype=np.int64))
    assert len(data) < 200_000
    with pytest.raises(EvalSetRejectedError) as err:
        parse_eval_set(data, max_bytes=200_000)
    assert err.value.reason == "too_large"


def test_a_good_file_reads_back_and_has_one_digest_however_saved() -> None:
    a = parse_eval_set(eval_set_bytes(X, Y))
    assert a.samples == 60
    assert a.classes == 10
    assert a.sample_shape == (64,)
    assert a.x.dtype == np.float32
    assert a.y.dtype == np.int64
    np.testing.assert_array_equal(a.x, X)
    plain = io.BytesIO()
    np.savez(plain, y=Y.astype(np.int32), x=X)  # other order, int32 labels, uncompressed
    b = parse_eval_set(plain.getvalue())
    canonical = canonical_bytes(a)
    assert digest(canonical) == digest(canonical_bytes(b))
    assert canonical_bytes(parse_eval_set(canonical)) == canonical
    # Other data, other digest.
    assert digest(canonical_bytes(parse_eval_set(eval_set_bytes(X, Y[::-1])))) != digest(canonical)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "line\nbreak",
        "escape \x1b[31mred",
        "bell\x07",
        "bidi \u202eevil",
        "isolate \u2066x\u2069",
        "x" * 513,
    ],
)
def test_hostile_provenance_text_is_refused(text: str) -> None:
    with pytest.raises(EvalSetRejectedError) as err:
        check_text(text, "the source", 512, required=True)
    assert err.value.reason == "bad_text"


def test_provenance_text_is_kept_stripped() -> None:
    assert check_text("  labelled by QA, batch 7  ", "the source", 512) == (
        "labelled by QA, batch 7"
    )


def test_the_store_refuses_hostile_text_and_files_and_writes_nothing(tmp_path: Path) -> None:
    from fleet_server.registry.store import Registry

    reg = Registry.open(f"sqlite:///{tmp_path / 'r.db'}")
    reg.upgrade()
    store = EvalSetStore(tmp_path / "evalsets", reg)
    with pytest.raises(EvalSetRejectedError):
        store.add("digits", eval_set_bytes(X, Y), source="qa\x1b]0;pwned\x07")
    with pytest.raises(EvalSetRejectedError):
        store.add("digits", b"not a set", source="qa")
    with pytest.raises(EvalSetRejectedError):
        store.add("digits\n", eval_set_bytes(X, Y), source="qa")
    assert store.listing() == []
    assert not (tmp_path / "evalsets").exists() or not any((tmp_path / "evalsets").iterdir())
    reg.close()
