"""The committed generated code is exactly what protoc produces from the .proto files."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from berth.proto import generate

GENERATED = [
    "types_pb2.py",
    "types_pb2.pyi",
    "cluster_pb2.py",
    "cluster_pb2.pyi",
    "cluster_pb2_grpc.py",
    "agent_pb2.py",
    "agent_pb2.pyi",
    "agent_pb2_grpc.py",
    "cluster_pb2_grpc.pyi",
    "agent_pb2_grpc.pyi",
]


@pytest.mark.parametrize("name", GENERATED)
def test_generated_code_matches_proto(tmp_path: Path, name: str) -> None:
    out = generate.generate(tmp_path)
    committed = generate.PROTO_DIR / "berth" / "v1" / name
    fresh = out / name
    assert fresh.exists(), f"protoc did not produce {name}"
    assert filecmp.cmp(committed, fresh, shallow=False), (
        f"proto/berth/v1/{name} differs from protoc's output: run `make proto` and commit, never hand-edit"
    )
