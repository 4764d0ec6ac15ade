"""One training file of a model's captured rows over a time range: ``DatasetStore.export_model``
stacks every dataset of the model in the range (rows outside it left out), refuses datasets
whose columns differ, an empty range, a range over the bounds and an unknown format; the admin
route parses its times and refuses hostile ones."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_capture_parquet import _policy, _record

from edge_agent.common.capture_chunk import pack_chunk
from fleet_server.capture import store as store_module
from fleet_server.capture.store import DatasetStore
from fleet_server.errors import DatasetUnusableError
from fleet_server.registry.ops.datasets import DatasetRecord
from fleet_server.registry.store import Registry

T0 = 1_700_000_000.25  # the first record's time in _record


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DatasetStore]:
    registry = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.upgrade()
    yield DatasetStore(
        tmp_path / "datasets", registry, clock=lambda: datetime(2026, 1, 1, tzinfo=UTC)
    )
    registry.close()


def _ingest(store: DatasetStore, device: str, first: int, count: int) -> DatasetRecord:
    policy = replace(_policy(), selector={"devices": [device]})
    records = [_record(i, rows=1 + i % 3) for i in range(first, first + count)]
    data, _ = pack_chunk(device, "digits", records)
    dataset = store.ingest(device, policy, data, {}).dataset
    assert dataset is not None
    return dataset


def _npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_the_datasets_in_the_range_stack_in_time_order(store: DatasetStore) -> None:
    late = _ingest(store, "cam-long-name-2", 10, 4)  # stored first, captured later
    early = _ingest(store, "cam-7", 0, 4)
    merged = _npz(store.export_model("digits", T0, T0 + 100))
    parts = [_npz(store.export(d.sha256)) for d in (early, late)]
    assert set(merged) == set(parts[0])
    for name in merged:
        want = np.concatenate([p[name] for p in parts])
        if want.dtype.kind == "U":
            assert merged[name].tolist() == want.tolist(), name
        else:
            np.testing.assert_array_equal(merged[name], want, err_msg=name)
    assert merged["device"].tolist()[-1] == "cam-long-name-2"  # text columns of any width
    table = pq.read_table(io.BytesIO(store.export_model("digits", T0, T0 + 100, "parquet")))
    assert table.num_rows == len(merged["label"])


def test_rows_outside_the_range_are_left_out(store: DatasetStore) -> None:
    _ingest(store, "cam-7", 0, 6)  # records at T0 + 0 .. T0 + 5
    _ingest(store, "cam-8", 20, 2)  # at T0 + 20, T0 + 21: a dataset wholly outside
    merged = _npz(store.export_model("digits", T0 + 2, T0 + 4))
    assert sorted(set(merged["time"].tolist())) == [T0 + 2, T0 + 3, T0 + 4]
    assert set(merged["device"].tolist()) == {"cam-7"}


def test_an_empty_range_and_a_bad_format_are_refused(store: DatasetStore) -> None:
    _ingest(store, "cam-7", 0, 2)
    with pytest.raises(DatasetUnusableError, match="no captured row"):
        store.export_model("digits", T0 + 50, T0 + 60)
    with pytest.raises(DatasetUnusableError, match="no captured row"):
        store.export_model("other", T0, T0 + 60)
    with pytest.raises(DatasetUnusableError, match="npz, parquet"):
        store.export_model("digits", T0, T0 + 60, "csv")


def test_datasets_with_other_columns_are_refused_not_mixed(store: DatasetStore) -> None:
    _ingest(store, "cam-7", 0, 2)
    policy = replace(_policy(), selector={"devices": ["cam-9"]})
    other = _record(5, rows=1)
    other = replace(other, inputs={"image": other.inputs["image"][:, :1]})  # another shape
    data, _ = pack_chunk("cam-9", "digits", [other])
    assert store.ingest("cam-9", policy, data, {}).dataset is not None
    with pytest.raises(DatasetUnusableError, match="one by one"):
        store.export_model("digits", T0, T0 + 60)


def test_a_range_over_the_bounds_is_refused(
    store: DatasetStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(3):
        _ingest(store, f"cam-{i}", 2 * i, 2)
    monkeypatch.setattr(store_module, "MAX_MERGED_DATASETS", 2)
    with pytest.raises(DatasetUnusableError, match="more than 2 datasets"):
        store.export_model("digits", T0, T0 + 60)
    monkeypatch.setattr(store_module, "MAX_MERGED_DATASETS", 10)
    monkeypatch.setattr(store_module, "MAX_MERGED_BYTES", 100)
    with pytest.raises(DatasetUnusableError, match="over 100 bytes"):
        store.export_model("digits", T0, T0 + 60)


def test_overlapping_datasets_come_out_in_time_order(store: DatasetStore) -> None:
    _ingest(store, "cam-7", 0, 8)  # T0 + 0 .. 7
    _ingest(store, "cam-8", 3, 2)  # T0 + 3, 4: inside cam-7's span
    merged = _npz(store.export_model("digits", T0, T0 + 100))
    times = merged["time"].tolist()
    assert times == sorted(times)
    assert set(merged["device"][merged["time"] == T0 + 3].tolist()) == {"cam-7", "cam-8"}


def test_columns_over_the_memory_bound_are_refused_before_they_are_built(
    store: DatasetStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Per-record values repeat on every row: a small stored chunk can export large.
    dataset = _ingest(store, "cam-7", 0, 6)
    whole = len(store.export(dataset.sha256))
    monkeypatch.setattr(store_module, "MAX_EXPORT_BYTES", 200)
    with pytest.raises(DatasetUnusableError, match="narrow the range"):
        store.export(dataset.sha256)
    with pytest.raises(DatasetUnusableError, match="narrow the range"):
        store.export_model("digits", T0, T0 + 100)
    monkeypatch.setattr(store_module, "MAX_EXPORT_BYTES", 10 * whole)
    assert len(store.export(dataset.sha256)) == whole
