"""The committed gRPC descriptor is the .proto's: regenerate with
``.venv/bin/python tests/unit/test_grpc_descriptor.py`` (needs grpcio-tools, a dev dependency)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PROTO = "edge_agent/api/grpc_v2/grpc_predict_v2.proto"
TARGET = SRC / "edge_agent/api/grpc_v2/_descriptor.py"


def compile_proto() -> bytes:
    """The .proto's ``FileDescriptorProto``, serialized deterministically."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        args = ["protoc", f"-I{SRC}", f"--descriptor_set_out={out}", PROTO]
        assert protoc.main(args) == 0
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return files.file[0].SerializeToString(deterministic=True)


def render(data: bytes) -> str:
    """``_descriptor.py`` holding ``data``, in literals of at most ~90 characters."""
    lines: list[str] = []
    start = 0
    while start < len(data):
        end = start + 1
        while end < len(data) and len(repr(data[start : end + 1])) <= 90:
            end += 1
        lines.append(f"    {data[start:end]!r}")
        start = end
    body = "\n".join(lines)
    return (
        '"""GENERATED from grpc_predict_v2.proto: do not edit (see tests/unit/'
        "test_grpc_descriptor.py).\n\n"
        "The serialized ``FileDescriptorProto`` of the protocol's gRPC service, so the device\n"
        'needs neither protoc nor grpcio-tools.\n"""\n\n'
        f"FILE_DESCRIPTOR = (\n{body}\n)\n"
    )


def test_committed_descriptor_matches_the_proto() -> None:
    pytest.importorskip("grpc_tools")
    from edge_agent.api.grpc_v2._descriptor import FILE_DESCRIPTOR

    assert compile_proto() == FILE_DESCRIPTOR, "run this file to regenerate _descriptor.py"


if __name__ == "__main__":
    TARGET.write_text(render(compile_proto()))
    sys.exit(0)
