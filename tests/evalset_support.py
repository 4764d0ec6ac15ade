"""Evaluation set files and a confidently wrong digits candidate for the offline comparison tests.

``eval_set_bytes`` writes an ``.npz`` the way an operator would (``x`` float32 raw pixels,
``y`` class indices). ``wrong_candidate`` builds and signs, with the digits key store, a digits
bundle retrained with most 3s labelled 8 (``model_builder.examples.digits_mislabelled_mlp``):
same inputs and preprocessing, confidence no lower, about 9 points less accurate.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bundles import DigitsBundles
from model_builder.build import build_bundle
from model_builder.config import BuildConfig
from model_builder.data import Dataset


def eval_set_bytes(x: np.ndarray, y: np.ndarray, *, compressed: bool = True) -> bytes:
    out = io.BytesIO()
    save = np.savez_compressed if compressed else np.savez
    save(out, x=np.asarray(x, dtype=np.float32), y=np.asarray(y, dtype=np.int64))
    return out.getvalue()


def digits_eval_set(bundles: DigitsBundles, path: Path) -> Path:
    """The digits held-out split (raw pixels 0..16) as an evaluation set file."""
    path.write_bytes(eval_set_bytes(bundles.x_eval, bundles.y_eval))
    return path


def wrong_candidate(bundles: DigitsBundles, version: int, out: Path) -> Path:
    """A signed, confidently wrong digits bundle of ``version`` (see the module docstring)."""
    from model_builder.examples import digits_mislabelled_mlp

    now = datetime.now(UTC)
    ex = digits_mislabelled_mlp()
    result = build_bundle(
        ex.model_bytes,
        "onnx",
        Dataset({ex.input_name: ex.x_calib}, None),
        Dataset({ex.input_name: ex.x_eval}, ex.y_eval),
        (ex.input_contract(max_batch=64), ex.output_contract()),
        BuildConfig(name="digits", version=version, measure_latency=False, arch=("any",)),
        bundles.keys,
        now=now,
    )
    path = out / f"digits-{version}-wrong.efb"
    path.write_bytes(result.bundle)
    return path
