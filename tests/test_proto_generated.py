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


def test_shim_api_is_generated_without_grpc_stubs() -> None:
    # The shim speaks ttrpc: its containerd types are messages only, checked by the same
    # --check run above, and importable without grpc_tools (or grpc) like the agent's.
    api = ROOT / "shim" / "bulkhead_shim" / "api"
    protos = sorted(p.stem for p in api.glob("*.proto"))
    assert protos, "no shim protos"
    assert sorted(p.name.removesuffix("_pb2.py") for p in api.glob("*_pb2.py")) == protos
    assert not list(api.glob("*_pb2_grpc.py"))
    code = (
        "import sys; sys.modules['grpc_tools'] = None; sys.modules['grpc'] = None\n"
        "from bulkhead_shim.api import shim_pb2, events_pb2, ttrpc_request_pb2\n"
        "assert shim_pb2.DESCRIPTOR.package == 'containerd.task.v2'\n"
        "assert 'Task' in shim_pb2.DESCRIPTOR.services_by_name\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
