"""An evaluation set file: strict reading, and the canonical bytes its digest is taken of.

The file is an ``.npz`` (numpy's zip of ``.npy`` arrays) with exactly two arrays: ``x``, float32
inputs in the model's raw input layout ``(n, ...)`` (what a device's client sends, before the
bundle's declared preprocessing), and ``y``, integer class indices ``(n,)``. It is read from
bytes, never unpickled, with every size checked before anything is allocated: the compressed
size (``max_bytes``), each member's declared size, the array headers' shapes against them, the
sample count. ``canonical_bytes`` writes the arrays back as an uncompressed ``.npz`` with fixed
member order and timestamps, so the same data always has the same sha256 however it was saved.

Owns: ``EvalSetData`` and ``parse_eval_set``/``canonical_bytes``. Raises
``EvalSetRejectedError`` with a stable ``reason`` for every malformed file. Does not own where
files are stored or registered (``fleet_server.evalsets.store``).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fleet_server.errors import EvalSetRejectedError

__all__ = [
    "DEFAULT_MAX_EVALSET_BYTES",
    "MAX_SAMPLES",
    "EvalSetData",
    "canonical_bytes",
    "digest",
    "parse_eval_set",
]

#: The largest evaluation set file accepted (compressed), and the largest it may expand to.
DEFAULT_MAX_EVALSET_BYTES: Final = 64 * 1024 * 1024
_EXPANSION: Final = 8
#: Samples per set: enough to judge a per-class recall tightly, small enough to run in seconds.
MAX_SAMPLES: Final = 1_000_000
_MAX_RANK: Final = 8
_MEMBERS: Final = ("x.npy", "y.npy")


# What zipfile and numpy raise on a damaged archive: bad offsets (ValueError: negative seek),
# truncation, a corrupt deflate stream (zlib.error), an encrypted member (RuntimeError), an
# unsupported compression method (NotImplementedError).
_ZIP_ERRORS: Final = (
    ValueError,
    OSError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    RuntimeError,
    NotImplementedError,
)


def _reject(message: str, reason: str) -> EvalSetRejectedError:
    return EvalSetRejectedError(f"evaluation set refused: {message}", reason=reason)


@dataclass(frozen=True, eq=False)
class EvalSetData:
    """The arrays of one evaluation set: ``x`` float32 ``(n, ...)``, ``y`` int64 ``(n,)``."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]

    @property
    def samples(self) -> int:
        return int(self.y.shape[0])

    @property
    def classes(self) -> int:
        """Classes the labels name: the largest index plus one."""
        return int(self.y.max()) + 1

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])


def _header(member: Any, size: int, name: str) -> tuple[np.dtype[Any], tuple[int, ...], bool]:
    """Read an ``.npy`` header and check the data it declares fits in ``size`` bytes."""
    try:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise _reject(f"{name} is not a numpy array ({exc})", "bad_array") from exc
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise _reject(f"{name} must be a plain numeric array, not {dtype}", "dtype")
    if len(shape) > _MAX_RANK or any(d < 0 for d in shape):
        raise _reject(f"{name} has an unusable shape {shape}", "shape")
    if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > size:
        raise _reject(f"{name} declares more data than the file holds", "bad_array")
    return dtype, tuple(int(d) for d in shape), bool(fortran)


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> npt.NDArray[Any]:
    name = info.filename[:-4]
    try:
        with archive.open(info) as member:
            dtype, shape, _ = _header(member, info.file_size, name)
        with archive.open(info) as member:
            array = np.lib.format.read_array(member, allow_pickle=False)
    except EvalSetRejectedError:
        raise
    except _ZIP_ERRORS as exc:  # a mangled archive fails in zipfile, not only in numpy
        raise _reject(f"{name} cannot be read ({exc})", "bad_array") from exc
    if array.dtype != dtype or array.shape != shape:  # pragma: no cover - numpy's own check
        raise _reject(f"{name} does not match its header", "bad_array")
    return array


def parse_eval_set(data: bytes, *, max_bytes: int = DEFAULT_MAX_EVALSET_BYTES) -> EvalSetData:
    """Read an evaluation set file (see the module docstring) from its bytes.

    Raises:
        EvalSetRejectedError: too large, not an ``.npz``, other members than ``x`` and ``y``,
            a malformed or pickled array, ``x`` not float32 of rank >= 2, ``y`` not integer of
            rank 1, different lengths, no or too many samples, negative labels, non-finite
            inputs. ``reason`` says which.
    """
    if len(data) > max_bytes:
        raise _reject(f"the file is {len(data)} bytes, the limit is {max_bytes}", "too_large")
    if not data:
        raise _reject("the file is empty", "not_npz")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except _ZIP_ERRORS as exc:
        raise _reject("not an .npz file (numpy.savez)", "not_npz") from exc
    with archive:
        infos = archive.infolist()
        names = sorted(i.filename for i in infos)
        if names != sorted(_MEMBERS):
            shown = ", ".join(repr(n[:64]) for n in names[:8])
            raise _reject(f"the file must hold exactly x and y, it holds {shown}", "members")
        if sum(i.file_size for i in infos) > max_bytes * _EXPANSION:
            raise _reject("the arrays expand beyond the size limit", "too_large")
        arrays = {i.filename[:-4]: _read(archive, i) for i in infos}
    x, y = arrays["x"], arrays["y"]
    if x.dtype != np.float32:
        raise _reject(f"x must be float32, it is {x.dtype}", "dtype")
    if y.dtype.kind not in "iu":
        raise _reject(f"y must hold integer class indices, it is {y.dtype}", "dtype")
    if x.ndim < 2 or y.ndim != 1:
        raise _reject(f"x must be (n, ...) and y (n,); got {x.shape} and {y.shape}", "shape")
    if x.shape[0] != y.shape[0]:
        raise _reject(f"x has {x.shape[0]} samples, y {y.shape[0]}", "length")
    if y.shape[0] == 0 or y.shape[0] > MAX_SAMPLES:
        raise _reject(f"a set holds 1..{MAX_SAMPLES} samples, not {y.shape[0]}", "empty")
    if int(y.min()) < 0 or int(y.max()) >= 1024:
        raise _reject("class indices must lie in 0..1023", "labels")
    if not np.isfinite(x).all():
        raise _reject("x holds NaN or infinite values", "non_finite")
    return EvalSetData(np.ascontiguousarray(x), y.astype(np.int64))


def canonical_bytes(data: EvalSetData) -> bytes:
    """The set as an uncompressed ``.npz`` with fixed member order and timestamps."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in (("x", data.x), ("y", data.y)):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


def digest(canonical: bytes) -> str:
    """The sha256 (hex) a set is addressed by: of its canonical bytes."""
    return hashlib.sha256(canonical).hexdigest()
