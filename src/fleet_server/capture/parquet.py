"""The Parquet form of a flat training export: the one module of the server that imports pyarrow.

Owns ``to_parquet``: the columns ``DatasetStore.export`` builds (one row per request row) as a
Parquet file. A column whose rows are scalars is a plain column (numbers keep their dtype,
text is UTF-8 ``string``); a tensor column (``input/<name>``, ``output/<name>``) holds each
row flattened as a ``fixed_size_list`` of its dtype, and the row's shape is kept in the
field's metadata (``row_shape``, a JSON list) so a reader gets the tensors back exactly:
``np.asarray(column.values).reshape(n, *row_shape)``. The file's metadata names its format
(``edgefleet.format``). pyarrow is a dependency of the server extra only and is imported
here, when an export asks for Parquet.

Does not own which columns an export has (``fleet_server.capture.store``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = ["FORMAT", "to_parquet"]

#: The file metadata's ``edgefleet.format`` value.
FORMAT: Final = "edgefleet-dataset-export/1"


def to_parquet(columns: Mapping[str, npt.NDArray[Any]]) -> bytes:
    """The columns (all with the same first dimension, the rows) as Parquet bytes.

    Raises:
        ValueError: the columns disagree on the number of rows, or a dtype Parquet cannot hold.
    """
    import pyarrow as pa  # the server extra's; imported only for a Parquet export
    import pyarrow.parquet as pq

    sizes = {len(a) for a in columns.values()}
    if len(sizes) > 1:
        raise ValueError(f"columns of different lengths: {sorted(sizes)}")
    fields, arrays = [], []
    for name, a in columns.items():
        shape = [int(d) for d in a.shape[1:]]
        if a.dtype.kind == "U":
            arr = pa.array(a.astype(object), type=pa.string())
        elif shape:
            width = int(np.prod(shape))
            flat = pa.array(np.ascontiguousarray(a).reshape(-1))
            arr = pa.FixedSizeListArray.from_arrays(flat, width)
        else:
            arr = pa.array(a)
        meta = {b"row_shape": json.dumps(shape).encode()} if shape else None
        fields.append(pa.field(name, arr.type, nullable=False, metadata=meta))
        arrays.append(arr)
    schema = pa.schema(fields, metadata={b"edgefleet.format": FORMAT.encode()})
    table = pa.Table.from_arrays(arrays, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()
