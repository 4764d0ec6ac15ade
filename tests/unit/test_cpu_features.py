"""CPU feature requirements: signed by the builder, checked by the device at install time.

An ``x86-vnni`` bundle (full 8-bit weights) computes wrong answers where VNNI is missing, so it
must name VNNI in its signed compatibility block and a device without it must refuse it with a
typed error; ``x86`` bundles stay portable. Bundles from before the field keep installing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from edge_agent.contract import BundleManifest, Compatibility, DeviceProfile
from edge_agent.contract.cpu import (
    VNNI,
    cpu_features_from_cpuinfo,
    unmet_requirements,
    validate_requirements,
)
from edge_agent.errors import ContractError, IncompatibleTargetError
from edge_agent.runtime.device import detect_device_profile
from edge_agent.store.store import ModelStore
from model_builder.build_parts import compatibility
from model_builder.config import BuildConfig
from model_builder.examples import digits_mlp
from model_builder.keystore import KeyStore
from model_builder.package import package_bundle
from model_builder.quantize.for_onnx import default_target, detect_target
from support import NOW, make_manifest, write

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 avx512f avx512_vnni
bugs\t\t: spectre_v1

processor\t: 1
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 avx512f avx512_vnni amx_int8
"""
HYBRID_CPUINFO = """processor\t: 0
flags\t\t: sse4_2 avx2 avx_vnni
processor\t: 1
flags\t\t: sse4_2 avx2
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize(
    ("text", "has", "lacks"),
    [
        (X86_CPUINFO, {"avx2", "avx512_vnni"}, {"amx_int8"}),  # only what every CPU offers
        (HYBRID_CPUINFO, {"avx2"}, {"avx_vnni"}),
        (ARM_CPUINFO, {"asimd", "asimddp"}, {"avx2", "50.00"}),
        ("", set(), {"avx2"}),
        ("model name\t: flags avx2 in a name\n", set(), {"avx2"}),
    ],
)
def test_cpu_features_from_cpuinfo(text: str, has: set[str], lacks: set[str]) -> None:
    features = cpu_features_from_cpuinfo(text)
    assert has <= features
    assert not lacks & features


@pytest.mark.parametrize(
    ("required", "offered", "unmet"),
    [
        ((), set(), []),
        ((VNNI,), {"avx2", "avx512_vnni"}, []),
        ((VNNI,), {"avx2", "avx_vnni"}, []),
        ((VNNI,), {"avx2", "avx512f"}, [VNNI]),
        (("avx2", VNNI), {"AVX2"}, [VNNI]),
    ],
)
def test_unmet_requirements(required: tuple[str, ...], offered: set[str], unmet: list[str]) -> None:
    assert unmet_requirements(required, offered) == unmet


@pytest.mark.parametrize("bad", ["", "AVX2", "avx2|", "a b", "x" * 40, 7])
def test_requirement_spelling_is_strict(bad: object) -> None:
    with pytest.raises(ContractError):
        validate_requirements([bad])  # type: ignore[list-item]


def _compat(*features: str) -> Compatibility:
    return Compatibility("onnxruntime", "1.16", ("x86_64",), cpu_features=features)


@pytest.mark.parametrize(
    ("features", "device_features", "ok"),
    [
        ((), frozenset(), True),
        ((VNNI,), frozenset({"avx2", "avx512_vnni"}), True),
        ((VNNI,), frozenset({"avx2"}), False),
        ((VNNI,), frozenset(), False),
        ((VNNI,), None, True),  # a hand-made profile that does not know its CPU: unchecked
    ],
)
def test_compatibility_checks_cpu_features(
    features: tuple[str, ...], device_features: frozenset[str] | None, ok: bool
) -> None:
    device = DeviceProfile("x86_64", {"onnxruntime": "1.20"}, cpu_features=device_features)
    if ok:
        _compat(*features).check(device)
    else:
        with pytest.raises(IncompatibleTargetError, match="avx512_vnni"):
            _compat(*features).check(device)


def test_json_round_trip_and_absent_when_empty() -> None:
    assert "cpu_features" not in _compat().to_dict()
    c = _compat(VNNI)
    assert c.to_dict()["cpu_features"] == [VNNI]
    assert Compatibility.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ContractError):
        Compatibility.from_dict({**c.to_dict(), "cpu_features": "avx2"})


def test_vnni_and_portable_targets_sign_different_compatibility() -> None:
    model = digits_mlp().model_bytes
    signed = {
        target: compatibility("onnx", model, {"mode": "static"}, target, BuildConfig("d", 1))
        for target in ("x86", "x86-vnni", "arm64")
    }
    assert signed["x86-vnni"].cpu_features == (VNNI,)
    assert signed["x86"].cpu_features == ()
    assert signed["arm64"].cpu_features == ()
    assert signed["x86"] != signed["x86-vnni"]
    fp16 = compatibility("onnx", model, {"mode": "fp16"}, "x86-vnni", BuildConfig("d", 1))
    assert fp16.cpu_features == ()  # float kernels need nothing beyond the architecture


def test_default_target_is_portable() -> None:
    assert default_target() in ("x86", "arm64")
    assert detect_target() in ("x86", "x86-vnni", "arm64")


def test_this_device_reports_its_cpu_flags(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(HYBRID_CPUINFO)
    profile = detect_device_profile(tmp_path / "cpuinfo")
    assert profile.cpu_features == frozenset({"sse4_2", "avx2"})
    assert detect_device_profile(tmp_path / "missing").cpu_features is None


def _store(tmp_path: Path, keys: KeyStore, features: frozenset[str]) -> ModelStore:
    device = DeviceProfile("x86_64", {"onnxruntime": "1.20.0"}, cpu_features=features)
    return ModelStore(tmp_path / "state", keys.trusted_root(), device, clock=lambda: NOW)


def test_install_refuses_a_vnni_bundle_on_a_cpu_without_vnni(tmp_path: Path) -> None:
    keys = KeyStore.init(tmp_path / "keys", now=NOW)
    artifact = b"model" * 20
    manifest: BundleManifest = make_manifest(artifact, arch=("x86_64",))
    vnni = dataclasses.replace(
        manifest,
        compatibility=dataclasses.replace(manifest.compatibility, cpu_features=(VNNI,)),
    )
    bundle = write(tmp_path, package_bundle(vnni, artifact, keys, now=NOW), "vnni.efb")
    store = _store(tmp_path, keys, frozenset({"sse4_2", "avx2"}))
    with pytest.raises(IncompatibleTargetError, match="CPU features"):
        store.install(bundle)
    assert store.state("digits").versions == ()
    ok = _store(tmp_path / "vnni-host", keys, frozenset({"avx2", "avx512_vnni"}))
    assert ok.install(bundle).version == 1


def test_published_schema_accepts_the_requirement() -> None:
    from importlib import resources

    import jsonschema

    schema = json.loads(
        resources.files("edge_agent").joinpath("schemas/manifest.schema.json").read_text()
    )
    artifact = b"model" * 20
    manifest = make_manifest(artifact)
    doc = manifest.to_dict()
    doc["compatibility"]["cpu_features"] = [VNNI, "avx2"]
    jsonschema.validate(doc, schema)
    doc["compatibility"]["cpu_features"] = ["AVX2"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)
