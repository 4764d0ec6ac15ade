"""``RegistryCloudModels``: the cloud model of a *published version* (its bundle, or a model the
operator registered for that version or the whole name), and which version a device runs by the
registry. A real SQLite registry, real bundles and onnxruntime; no broker."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bundles import DigitsBundles
from edge_agent.bundle import read_bundle
from edge_agent.wire.reported import ModelReport, ReportedState
from fleet_server.errors import FallbackServingError
from fleet_server.fallback.cloud_models import RegistryCloudModels
from fleet_server.registry.store import Registry


@pytest.fixture
def registry(tmp_path: Path, digits_bundles: DigitsBundles) -> Iterator[Registry]:
    reg = Registry.open(f"sqlite:///{tmp_path / 'registry.db'}")
    reg.upgrade()
    (tmp_path / "bundles").mkdir()
    for v in (1, 2):
        data = digits_bundles.path(v).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        shutil.copy(digits_bundles.path(v), tmp_path / "bundles" / f"{sha}.bundle")
        reg.publish_bundle("digits", v, channel="stable", sha256=sha, length=len(data),
                           targets_sha256=sha)  # fmt: skip
    yield reg
    reg.close()


def source(
    registry: Registry, tmp_path: Path, keys: DigitsBundles, models_dir: Path | None = None
) -> RegistryCloudModels:
    root = keys.keys.trusted_root()
    return RegistryCloudModels(
        registry,
        tmp_path / "bundles",
        lambda: root,
        clock=lambda: datetime.now(UTC),
        models_dir=models_dir,
    )


def version(s: RegistryCloudModels, v: int) -> str:
    m = s.load("digits", v)
    assert m is not None
    return m.version


def onnx(digits_bundles: DigitsBundles) -> bytes:
    b = read_bundle(
        digits_bundles.path(1),
        digits_bundles.keys.trusted_root(),
        now=datetime.now(UTC),
        installed_version=None,
        device=None,
    )
    return b.artifact


def test_published_versions_answer_with_their_own_bundle_others_are_refused(
    registry: Registry, tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    s = source(registry, tmp_path, digits_bundles)
    m1, m2 = s.load("digits", 1), s.load("digits", 2)
    assert (m1 and m1.version, m2 and m2.version) == ("1", "2")
    assert s.load("digits", 3) is None  # not published: never another version instead
    assert s.load("other", 1) is None
    assert s.describe().startswith("the published bundle of the version each device runs")


def test_models_registered_per_version_and_per_name(
    registry: Registry, tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    d = tmp_path / "cloud"
    d.mkdir()
    (d / "digits@2.onnx").write_bytes(onnx(digits_bundles))  # e.g. v2's float model
    s = source(registry, tmp_path, digits_bundles, d)
    assert version(s, 1) == "1"  # no file for v1: its bundle
    assert version(s, 2).startswith("2+sha256:")
    assert s.load("digits", 5) is None  # a file does not publish a version
    (d / "digits.onnx").write_bytes(onnx(digits_bundles))  # one model for every version
    s = source(registry, tmp_path, digits_bundles, d)
    assert version(s, 1).startswith("sha256:")
    assert version(s, 2).startswith("2+sha256:")  # per version wins
    assert "digits@2" in s.describe()


@pytest.mark.parametrize("name", ["digits@x.onnx", "digits@0.onnx", "@2.onnx"])
def test_a_bad_version_mark_is_refused_typed(
    registry: Registry, tmp_path: Path, digits_bundles: DigitsBundles, name: str
) -> None:
    d = tmp_path / "cloud"
    d.mkdir()
    (d / name).write_bytes(onnx(digits_bundles))
    with pytest.raises(FallbackServingError, match="<name>@<version>"):
        source(registry, tmp_path, digits_bundles, d)


def test_a_bundle_that_is_not_the_version_it_is_published_as_is_refused(
    registry: Registry, tmp_path: Path, digits_bundles: DigitsBundles
) -> None:
    data = digits_bundles.path(3).read_bytes()  # a v3 bundle recorded as v4
    sha = hashlib.sha256(data).hexdigest()
    shutil.copy(digits_bundles.path(3), tmp_path / "bundles" / f"{sha}.bundle")
    registry.publish_bundle("digits", 4, channel="stable", sha256=sha, length=len(data),
                            targets_sha256=sha)  # fmt: skip
    with pytest.raises(FallbackServingError, match="is not digits v4"):
        source(registry, tmp_path, digits_bundles).load("digits", 4)


@pytest.mark.parametrize(
    ("report", "want"),
    [
        (ModelReport(active=2, assigned=3), 2),  # what it runs, not what it is getting
        (ModelReport(active=None, assigned=1), 1),  # nothing installed yet: its assignment
        (ModelReport(active=None), None),
        (None, None),  # no report for the model
    ],
)
def test_version_of_reads_what_the_device_reports(
    registry: Registry,
    tmp_path: Path,
    digits_bundles: DigitsBundles,
    report: ModelReport | None,
    want: int | None,
) -> None:
    registry.enroll("cam-1")
    models = {} if report is None else {"digits": report}
    registry.record_reported("cam-1", ReportedState("cam-1", 0.0, models=models).to_dict())
    s = source(registry, tmp_path, digits_bundles)
    assert s.version_of("digits", "cam-1") == want
    assert s.version_of("digits", "cam-unknown") is None
