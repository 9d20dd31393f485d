"""The committed protocol code must match the .proto files (CI fails when stale)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "protocol" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_generated_code_imports_without_grpc_tools() -> None:
    # The guest has no grpc_tools: the generated modules must stand alone.
    code = (
        "import sys; sys.modules['grpc_tools'] = None\n"
        "from bulkhead_proto.v1 import agent_pb2, agent_pb2_grpc\n"
        "assert agent_pb2.DESCRIPTOR.package == 'bulkhead.v1'\n"
        "assert hasattr(agent_pb2_grpc, 'AgentStub')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
