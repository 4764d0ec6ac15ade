"""Tier B: Apache DataSketches KLL quantile sketches, one per feature. Optional.

Owns: the only import of ``datasketches`` in edgefleet (lazy, inside functions, so tier A never
pays for it), ``KllFeatureSketches`` and its wrapped binary form. Does not own: tier A, edges
or scores. Each feature keeps a ``kll_doubles_sketch``; a batch is fed one column at a time
through the binding's array overload ``update(ndarray[float64])``, so the Python loop runs over
features, never rows. Like tier A, NaN is ignored (KLL drops it); infinities are kept.

Bytes: little-endian header ``magic "EFKL", format version u16, reserved u16, n_features u32,
k u32``, then per feature a u32 length and that feature's ``kll_doubles_sketch.serialize()``.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.drift._wire import MAX_FEATURES
from edge_agent.errors import ContractError, DriftError

FORMAT_VERSION = 1
DEFAULT_K = 200
#: DataSketches' own bounds on k.
MIN_K, MAX_K = 8, 65535
_MAGIC = b"EFKL"
_HEADER = struct.Struct("<4sHHII")
_LEN = struct.Struct("<I")


def _kll_class() -> Any:
    try:
        from datasketches import kll_doubles_sketch
    except ImportError as exc:  # pragma: no cover - a dependency of the base install
        raise DriftError("tier-B drift needs the 'datasketches' package") from exc
    return kll_doubles_sketch


def read_header(data: bytes) -> tuple[int, int]:
    """``(n_features, k)`` from KLL bytes, checking only the header (no datasketches import).

    Raises:
        ContractError: not KLL bytes of a supported version, or an out-of-range header.
    """
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) < _HEADER.size:
        raise ContractError("KLL sketch bytes are truncated (no header)")
    magic, version, _reserved, f, k = _HEADER.unpack_from(bytes(data[: _HEADER.size]))
    if magic != _MAGIC:
        raise ContractError("KLL sketch bytes do not start with the KLL magic")
    if version != FORMAT_VERSION:
        raise ContractError(f"KLL sketch bytes version {version} is not supported")
    if not 1 <= f <= MAX_FEATURES or not MIN_K <= k <= MAX_K:
        raise ContractError(f"KLL sketch bytes declare {f} features, k={k}")
    return f, k


class KllFeatureSketches:
    """One KLL quantile sketch per feature of a tensor (mutable; not thread-safe)."""

    __slots__ = ("_k", "_sketches")

    def __init__(self, n_features: int, k: int = DEFAULT_K) -> None:
        """Empty sketches.

        Args:
            n_features: Features per sample (``flatten_features`` output width).
            k: KLL accuracy parameter; rank error is about ``1.65 / k`` (see
                ``normalized_rank_error``).

        Raises:
            ValueError: ``n_features`` or ``k`` is out of range.
        """
        if not 1 <= n_features <= MAX_FEATURES:
            raise ValueError(f"n_features must be in [1, {MAX_FEATURES}]")
        if not MIN_K <= k <= MAX_K:
            raise ValueError(f"k must be in [{MIN_K}, {MAX_K}]")
        cls = _kll_class()
        self._k = k
        self._sketches: list[Any] = [cls(k) for _ in range(n_features)]

    @property
    def n_features(self) -> int:
        """Number of features."""
        return len(self._sketches)

    @property
    def k(self) -> int:
        """The KLL accuracy parameter."""
        return self._k

    def n(self) -> npt.NDArray[np.int64]:
        """Values each feature's sketch has seen (NaN excluded)."""
        return np.asarray([s.n for s in self._sketches], dtype=np.int64)

    def normalized_rank_error(self) -> float:
        """Single-sided normalised rank error (99th percentile) of ``quantiles``."""
        return float(_kll_class().get_normalized_rank_error(self._k, False))

    def update(self, batch2d: npt.ArrayLike) -> None:
        """Add a batch of feature rows.

        Raises:
            DriftError: the batch is not ``(n, n_features)`` or not real-valued.
        """
        x = np.asarray(batch2d)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise DriftError(f"expected a batch of shape (n, {self.n_features}), got {x.shape}")
        if x.dtype.kind not in "biuf":
            raise DriftError(f"drift needs real numeric values, got dtype {x.dtype}")
        if x.shape[0] == 0:
            return
        # Column-major so each feature's column is one contiguous float64 array.
        cols = np.asfortranarray(x, dtype=np.float64)
        for j, sketch in enumerate(self._sketches):
            sketch.update(cols[:, j])

    def merge(self, other: KllFeatureSketches) -> None:
        """Merge ``other`` into this one, feature by feature.

        Raises:
            DriftError: the feature counts or ``k`` differ (a smaller ``k`` would silently
                weaken this sketch's error bound).
        """
        if other.n_features != self.n_features or other.k != self.k:
            raise DriftError(
                f"KLL sketches differ: {self.n_features} features k={self.k} vs "
                f"{other.n_features} features k={other.k}"
            )
        for mine, theirs in zip(self._sketches, other._sketches, strict=True):
            mine.merge(theirs)

    def quantiles(self, ranks: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Approximate quantiles at normalised ``ranks`` in ``[0, 1]``.

        Returns:
            Shape ``(n_features, len(ranks))``; rows of empty features are NaN.

        Raises:
            ValueError: a rank is outside ``[0, 1]`` or ``ranks`` is not 1-D.
        """
        r = np.asarray(ranks, dtype=np.float64)
        if r.ndim != 1 or not np.all((r >= 0.0) & (r <= 1.0)):
            raise ValueError("ranks must be a 1-D sequence of values in [0, 1]")
        out = np.full((self.n_features, r.size), np.nan, dtype=np.float64)
        rank_list = r.tolist()
        for j, sketch in enumerate(self._sketches):
            if not sketch.is_empty():
                out[j] = sketch.get_quantiles(rank_list)
        return out

    def min_max(self) -> npt.NDArray[np.float64]:
        """Exact ``(n_features, 2)`` minimum and maximum per feature; NaN for empty features.

        Unlike ``quantiles([0, 1])``, which returns retained items once the sketch compacts.
        """
        out = np.full((self.n_features, 2), np.nan, dtype=np.float64)
        for j, sketch in enumerate(self._sketches):
            if not sketch.is_empty():
                out[j] = (sketch.get_min_value(), sketch.get_max_value())
        return out

    def to_bytes(self) -> bytes:
        """Header plus each feature's DataSketches serialisation (see the module docstring)."""
        parts = [_HEADER.pack(_MAGIC, FORMAT_VERSION, 0, self.n_features, self._k)]
        for sketch in self._sketches:
            blob = sketch.serialize()
            parts.append(_LEN.pack(len(blob)))
            parts.append(blob)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> KllFeatureSketches:
        """Parse ``to_bytes`` output.

        Raises:
            ContractError: bad header, truncated or trailing bytes, or a sketch DataSketches
                refuses to deserialise.
        """
        f, k = read_header(data)
        buf = bytes(data)
        kll = _kll_class()
        sketches: list[Any] = []
        pos = _HEADER.size
        for j in range(f):
            if len(buf) < pos + _LEN.size:
                raise ContractError(f"KLL sketch bytes are truncated at feature {j}")
            (length,) = _LEN.unpack_from(buf, pos)
            pos += _LEN.size
            if len(buf) < pos + length:
                raise ContractError(f"KLL sketch bytes are truncated at feature {j}")
            try:
                sketch = kll.deserialize(buf[pos : pos + length])
            except (ValueError, IndexError, RuntimeError, MemoryError) as exc:
                raise ContractError(f"KLL sketch of feature {j} is corrupt: {exc}") from exc
            if sketch.k != k:
                raise ContractError(f"KLL sketch of feature {j} has k={sketch.k}, header k={k}")
            sketches.append(sketch)
            pos += length
        if pos != len(buf):
            raise ContractError("KLL sketch bytes have trailing data")
        out = cls.__new__(cls)
        out._k = k
        out._sketches = sketches
        return out
