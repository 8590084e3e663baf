"""Regenerate the Python code for the berth/v1 contract.

Run ``python -m berth.proto.generate`` (or ``make proto``). The generated modules
must import each other as ``berth.proto.berth.v1.*``; protoc derives Python import
paths from include paths, so we compile through a scratch include root where
``berth/proto`` points at this folder. No post-processing, so a test can check the
committed files are exactly what protoc produces.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
SOURCES = ("types.proto", "cluster.proto", "agent.proto")


def generate(out_root: Path | None = None) -> Path:
    """Compile the contract; return the folder holding the generated files."""
    from grpc_tools import protoc  # dev dependency, imported lazily

    with tempfile.TemporaryDirectory() as scratch:
        include = Path(scratch) / "inc"
        (include / "berth").mkdir(parents=True)
        (include / "berth" / "proto").symlink_to(PROTO_DIR)
        out = Path(out_root) if out_root else include
        if out_root:
            (out / "berth" / "proto" / "berth" / "v1").mkdir(parents=True, exist_ok=True)
        wkt = Path(protoc.__file__).parent / "_proto"
        files = [f"berth/proto/berth/v1/{name}" for name in SOURCES]
        bindir = Path(sys.executable).parent
        args = [
            "protoc",
            f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
            f"-I{include}",
            f"-I{wkt}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *files,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        return out / "berth" / "proto" / "berth" / "v1"


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(generate(Path(sys.argv[1])))
    else:
        print(generate())
