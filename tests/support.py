"""Helpers shared by tests: small real manifests and signed bundles, the CLI arguments of a
build, and ``wait_until``, the one way a test waits for something another thread or process does.

Fakes of production interfaces live in ``fakes.py``, the fake clock in ``clock.py``.
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from edge_agent.contract import (
    BundleManifest,
    Compatibility,
    DeviceProfile,
    DimSpec,
    FeatureRanges,
    InputContract,
    OutputContract,
    Provenance,
    TensorSpec,
)
from edge_agent.drift import build_baseline
from model_builder.keystore import KeyStore
from model_builder.package import artifact_ref, package_bundle

NOW = datetime(2026, 6, 1, tzinfo=UTC)
T = TypeVar("T")

#: How often ``wait_until`` asks again (seconds): short, so a test waits little past the event.
POLL_INTERVAL = 0.02
DEVICE = DeviceProfile(arch="x86_64", runtimes={"onnxruntime": "1.20.0"})


def make_manifest(
    artifact: bytes,
    *,
    name: str = "digits",
    version: int = 1,
    channel: str = "stable",
    arch: tuple[str, ...] = ("any",),
    min_runtime_version: str = "1.16",
) -> BundleManifest:
    rng = np.random.default_rng(version)
    x = rng.normal(size=(200, 4))
    probs = rng.dirichlet(np.ones(3), size=200)
    return BundleManifest(
        name=name,
        version=version,
        channel=channel,
        artifact=artifact_ref(artifact, "onnx"),
        inputs=InputContract(
            tensors=(
                TensorSpec(
                    name="input",
                    dtype="float32",
                    shape=(DimSpec(min=1, max=64, name="batch"), DimSpec(size=4)),
                    ranges=FeatureRanges(low=(-10.0,), high=(10.0,)),
                ),
            )
        ),
        outputs=OutputContract(
            task="classification",
            outputs=("probabilities",),
            labels=("a", "b", "c"),
            score_output="probabilities",
        ),
        baseline=build_baseline({"input": x}, {"probabilities": probs}, n_bins=8),
        compatibility=Compatibility(
            runtime="onnxruntime", min_runtime_version=min_runtime_version, arch=arch
        ),
        provenance=Provenance(
            source_sha256="0" * 64,
            source_format="onnx",
            recipe={"mode": "static"},
            tool_versions={"edgefleet": "test"},
            built_at="2026-06-01T00:00:00Z",
        ),
    )


def make_bundle(
    store: KeyStore,
    artifact: bytes = b"model-bytes-v1" * 10,
    *,
    now: datetime = NOW,
    key_labels: list[str] | None = None,
    expires_days: int = 365,
    **manifest_kwargs: object,
) -> bytes:
    manifest = make_manifest(artifact, **manifest_kwargs)  # type: ignore[arg-type]
    return package_bundle(
        manifest, artifact, store, now=now, expires_days=expires_days, key_labels=key_labels
    )


def members(bundle: bytes) -> dict[str, bytes]:
    """The bundle's members in order, as a dict."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:") as tar:
        for m in tar.getmembers():
            fh = tar.extractfile(m)
            assert fh is not None
            out[m.name] = fh.read()
    return out


def repack(parts: dict[str, bytes]) -> bytes:
    """A tar of ``parts`` in the given order, bypassing every check (an attacker's tool)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in parts.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write(tmp_path: Path, data: bytes, name: str = "b.efb") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def build_argv(
    example: Path, *, keys: Path, out: Path, version: int, contract: Path | None = None
) -> list[str]:
    """``model-builder build`` arguments for an example directory as ``save_example`` writes it
    (``model.onnx``, ``calib.npz``, ``eval.npz``, ``contract.json``); extra options go after."""
    return [
        "build",
        str(example / "model.onnx"),
        "--calib",
        str(example / "calib.npz"),
        "--eval",
        str(example / "eval.npz"),
        "--contract",
        str(contract or example / "contract.json"),
        "--name",
        "digits",
        "--version",
        str(version),
        "--keystore",
        str(keys),
        "--out",
        str(out),
    ]


def wait_until(
    predicate: Callable[[], T], timeout: float = 20.0, what: str | Callable[[], str] = ""
) -> T:
    """Ask ``predicate`` until it returns something truthy and return that; fail the test
    (naming ``what``) if it has not after ``timeout`` seconds.

    The way a test waits for another thread, process or broker: on a condition with a deadline,
    never a fixed sleep. Code on a fake clock (``clock.FakeClock``) needs no waiting at all.
    ``what`` may be a function, called only on failure (e.g. to show a process's log). A
    predicate that sees the wait can never succeed (the process died) fails or raises itself.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            said = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout} s waiting for {said or predicate}")
        time.sleep(POLL_INTERVAL)
