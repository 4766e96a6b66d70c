"""Stubs for ``grpchantesting`` generated at bench time, never committed.

Every transport exchanges the same google-protobuf (upb) ``Message``, so
that message encoding costs the same everywhere and the comparison is about
the transports.  grpcio additionally needs its ``*_pb2_grpc`` module.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
PROTO = "grpchantesting/test.proto"


def generate(out: Path) -> None:
    """Run ``grpc_tools.protoc`` on proto/grpchantesting/test.proto into *out*."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            PROTO,
        ],
        check=True,
    )


def load(out: Path, *, grpc: bool = False) -> tuple[ModuleType, ModuleType | None]:
    """Import the generated ``test_pb2`` (and ``test_pb2_grpc``) from *out*."""
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    pb2 = importlib.import_module("grpchantesting.test_pb2")
    pb2_grpc = importlib.import_module("grpchantesting.test_pb2_grpc") if grpc else None
    return pb2, pb2_grpc
