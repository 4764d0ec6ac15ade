"""Signed bundles of a real digits model (the ``digits_bundles`` fixture builds them once)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from edge_agent.contract import BundleManifest, FeatureRanges
from model_builder.build import build_bundle
from model_builder.config import BuildConfig
from model_builder.data import Dataset
from model_builder.examples import digits_mlp
from model_builder.keystore import KeyStore
from model_builder.package import package_bundle


@dataclass(frozen=True)
class DigitsBundles:
    """Bundle files of one model name under one key store, and the data they came from."""

    keys: KeyStore
    dir: Path
    x_eval: np.ndarray
    y_eval: np.ndarray

    def path(self, version: int, flavour: str = "good") -> Path:
        return self.dir / f"digits-{version}-{flavour}.efb"


def _variant(
    manifest: BundleManifest,
    artifact: bytes,
    keys: KeyStore,
    version: int,
    now: datetime,
    **changes: object,
) -> bytes:
    m = dataclasses.replace(manifest, version=version, **changes)  # type: ignore[arg-type]
    return package_bundle(m, artifact, keys, now=now)


def build_digits_bundles(out: Path) -> DigitsBundles:
    """v1-v3 good; v4 whose golden samples lie (fails the health check); v5 whose input
    contract is far too narrow (passes golden samples, then fails probation on real traffic)."""
    now = datetime.now(UTC)
    keys = KeyStore.init(out / "keys", now=now)
    ex = digits_mlp()
    calib = Dataset({ex.input_name: ex.x_calib}, None)
    evaluation = Dataset({ex.input_name: ex.x_eval}, ex.y_eval)
    contract = (ex.input_contract(max_batch=64), ex.output_contract())
    result = build_bundle(
        ex.model_bytes,
        "onnx",
        calib,
        evaluation,
        contract,
        BuildConfig(name="digits", version=1, measure_latency=False, arch=("any",)),
        keys,
        now=now,
    )
    manifest = result.manifest
    from edge_agent.bundle import read_bundle

    (out / "tmp.efb").write_bytes(result.bundle)
    artifact = read_bundle(
        out / "tmp.efb", keys.trusted_root(), now=now, installed_version=None, device=None
    ).artifact
    for v in (1, 2, 3):
        (out / f"digits-{v}-good.efb").write_bytes(_variant(manifest, artifact, keys, v, now))
    lying = tuple(
        dataclasses.replace(
            g,
            label=(g.label or 0) + 1 if g.label is not None else 1,
            expected={k: (np.asarray(e) * 0 + 0.5).tolist() for k, e in g.expected.items()},
        )
        for g in manifest.golden
    )
    (out / "digits-4-badgolden.efb").write_bytes(
        _variant(manifest, artifact, keys, 4, now, golden=lying)
    )
    # Per-feature ranges that just cover the golden samples: real digits fall outside.
    spec = manifest.inputs.tensors[0]
    golden_x = np.concatenate(
        [np.asarray(g.inputs[spec.name]).reshape(1, -1) for g in manifest.golden]
    )
    narrow = dataclasses.replace(
        spec,
        ranges=FeatureRanges(
            tuple(golden_x.min(axis=0).tolist()), tuple(golden_x.max(axis=0).tolist())
        ),
    )
    inputs = dataclasses.replace(manifest.inputs, tensors=(narrow,))
    (out / "digits-5-narrow.efb").write_bytes(
        _variant(manifest, artifact, keys, 5, now, inputs=inputs)
    )
    return DigitsBundles(keys, out, ex.x_eval, ex.y_eval)


def misnormalised_bundle(bundles: DigitsBundles, version: int, out: Path) -> Path:
    """A degraded digits bundle that installs cleanly but answers badly in the field.

    Its declared preprocessing scales the inputs wrongly (x0.25 on top of the standardisation),
    as a build with a normalisation mistake would; its golden samples were computed through that
    same preprocessing, so the device's health check passes. Its output baseline is the good
    model's: in the field its predictions drift and its confidence drops.
    """
    from edge_agent.bundle import read_bundle
    from edge_agent.contract import Preprocessing
    from edge_agent.runtime.loader import load_runtime

    now = datetime.now(UTC)
    good = read_bundle(
        bundles.path(1), bundles.keys.trusted_root(), now=now, installed_version=None, device=None
    )
    m = good.manifest
    spec = m.inputs.tensors[0]
    pre = spec.preprocessing
    wrong = Preprocessing(
        "affine", tuple(s * 0.25 for s in pre.scale), tuple(o * 0.25 for o in pre.offset)
    )
    wrong_spec = dataclasses.replace(spec, preprocessing=wrong)
    runtime = load_runtime(good.artifact, m.artifact.format)
    try:
        dtypes = {i.name: i.dtype for i in runtime.inputs}
        golden = []
        for g in m.golden:
            raw = np.asarray(g.inputs[spec.name], dtype=np.float64)
            got = runtime.run({spec.name: wrong.apply(raw, dtypes.get(spec.name, spec.dtype))})
            expected = {k: np.asarray(v).tolist() for k, v in got.items() if k in g.expected}
            golden.append(dataclasses.replace(g, expected=expected, label=None))
    finally:
        runtime.close()
    inputs = dataclasses.replace(m.inputs, tensors=(wrong_spec,))
    path = out / f"digits-{version}-misnormalised.efb"
    path.write_bytes(
        _variant(m, good.artifact, bundles.keys, version, now, inputs=inputs, golden=tuple(golden))
    )
    return path


def mislabelled_bundle(bundles: DigitsBundles, version: int, out: Path) -> Path:
    """A confidently wrong digits bundle (``examples.digits_mislabelled_mlp``: most 3s trained as
    8s), built and signed like the good ones with the same key store: it installs cleanly,
    passes its own golden samples and is about 9 points less accurate, with confidence no lower.
    """
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
    path = out / f"digits-{version}-mislabelled.efb"
    path.write_bytes(result.bundle)
    return path
