"""A capture dataset exported as Parquet holds exactly what the ``.npz`` export holds.

The file is read back with pyarrow: every column, its values, dtype and (for tensors) the row
shape kept in the field's metadata, against the npz export of the same dataset.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edge_agent.common.capture_chunk import CaptureRecord, pack_chunk
from fleet_server.capture.parquet import FORMAT, to_parquet
from fleet_server.capture.store import DatasetStore
from fleet_server.errors import DatasetUnusableError
from fleet_server.registry.ops.datasets import CapturePolicy
from fleet_server.registry.store import Registry


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DatasetStore]:
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    yield DatasetStore(
        tmp_path / "datasets", registry, clock=lambda: datetime(2026, 1, 1, tzinfo=UTC)
    )
    registry.close()


def _policy() -> CapturePolicy:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return CapturePolicy("digits", True, {"devices": ["cam-7"]}, 10**6, 1 << 24, 65536, (), now)


def _record(i: int, rows: int) -> CaptureRecord:
    rng = np.random.default_rng(i)
    return CaptureRecord(
        "digits",
        1 + i % 2,
        1_700_000_000.25 + i,
        f"req-{i}",
        {
            "image": rng.normal(size=(rows, 2, 3)).astype(np.float32),
            "ids": rng.integers(-5, 5, size=(rows, 4)).astype(np.int64),
        },
        {"p": rng.random(size=(rows, 3)).astype(np.float32)},
        np.array([(i + r) % 3 - 1 for r in range(rows)], np.int32),
    )


def _column(table: pa.Table, name: str) -> np.ndarray[Any, Any]:
    col = table.column(name).combine_chunks()
    field = table.schema.field(name)
    if pa.types.is_fixed_size_list(field.type):
        shape = [int(d) for d in json.loads(field.metadata[b"row_shape"])]
        return np.asarray(col.values.to_numpy(zero_copy_only=False)).reshape(len(col), *shape)
    return np.asarray(col.to_numpy(zero_copy_only=False))


def test_parquet_export_reads_back_equal_to_the_npz_export(store: DatasetStore) -> None:
    data, _ = pack_chunk("cam-7", "digits", [_record(i, rows=1 + i % 3) for i in range(6)])
    dataset = store.ingest("cam-7", _policy(), data, {}).dataset
    assert dataset is not None
    flat = np.load(io.BytesIO(store.export(dataset.sha256)), allow_pickle=False)
    table = pq.read_table(io.BytesIO(store.export(dataset.sha256, "parquet")))
    assert table.schema.metadata[b"edgefleet.format"] == FORMAT.encode()
    assert sorted(table.column_names) == sorted(flat.files)
    assert table.num_rows == len(flat["label"]) == 12
    for name in flat.files:
        want, got = flat[name], _column(table, name)
        assert got.shape == want.shape, name
        if want.dtype.kind == "U":
            assert got.tolist() == want.tolist(), name
        else:
            assert got.dtype == want.dtype, name
            np.testing.assert_array_equal(got, want, err_msg=name)
    assert _column(table, "input/image").shape[1:] == (2, 3)
    assert set(_column(table, "request_id").tolist()) >= {"req-0", "req-5"}


def test_an_unknown_format_is_refused(store: DatasetStore) -> None:
    data, _ = pack_chunk("cam-7", "digits", [_record(0, rows=1)])
    dataset = store.ingest("cam-7", _policy(), data, {}).dataset
    assert dataset is not None
    with pytest.raises(DatasetUnusableError, match="npz, parquet"):
        store.export(dataset.sha256, "csv")


def test_columns_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="different lengths"):
        to_parquet({"a": np.zeros(2), "b": np.zeros(3)})
