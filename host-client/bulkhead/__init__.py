"""Bulkhead host client: boot sandbox VMs under QEMU and drive their guest agent.

    from bulkhead import Sandbox

    with Sandbox.up("demo", memory_mib=512) as sb:
        proc = sb.run(["sh", "-c", "echo hello from $(hostname)"])
        out, err = proc.communicate()
        print(out.decode(), proc.returncode)

``Sandbox`` owns the VM (through a per-sandbox monitor process); ``AgentClient``
talks to an agent through any unix socket or gRPC target; the transports reach
the agent's bridge over AF_VSOCK, hybrid vsock or the virtio-serial mux.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AgentError,
    AlreadyExists,
    BootError,
    BulkheadError,
    DeadlineExceeded,
    FailedPrecondition,
    ImageNotFound,
    InvalidArgument,
    NotFound,
    ProcessTimeout,
    QemuError,
    SandboxError,
    SandboxExists,
    SandboxNotFound,
    SpecError,
    StdioError,
    TransportError,
    Unavailable,
)

# The rest is imported on first use: the monitor process (one per sandbox)
# starts from this package and must not pay for grpc it never uses.
_LAZY = {
    "AgentClient": "client",
    "Attachment": "process",
    "BootTimeline": "details",
    "Container": "containers",
    "ContainerInfo": "details",
    "ContainerStats": "details",
    "GuestDetails": "details",
    "Output": "process",
    "Process": "process",
    "ProcessExit": "details",
    "ProcessInfo": "details",
    "ProcessMemory": "details",
    "StartFailure": "details",
    "make_spec": "spec",
    "UnixRelay": "relay",
    "Sandbox": "sandbox",
    "SandboxDetails": "sandbox",
    "SandboxInfo": "state",
    "StorageClient": "storage",
    "StorageInfo": "storage",
    "VolumeStats": "storage",
    "HybridVsockTransport": "transport",
    "SerialMuxTransport": "transport",
    "Transport": "transport",
    "VsockTransport": "transport",
}

if TYPE_CHECKING:
    from .client import AgentClient
    from .containers import Container
    from .details import (
        BootTimeline,
        ContainerInfo,
        ContainerStats,
        GuestDetails,
        ProcessExit,
        ProcessInfo,
        ProcessMemory,
        StartFailure,
    )
    from .process import Attachment, Output, Process
    from .relay import UnixRelay
    from .sandbox import Sandbox, SandboxDetails
    from .spec import make_spec
    from .state import SandboxInfo
    from .storage import StorageClient, StorageInfo, VolumeStats
    from .transport import HybridVsockTransport, SerialMuxTransport, Transport, VsockTransport


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AgentClient",
    "AgentError",
    "AlreadyExists",
    "Attachment",
    "BootError",
    "BootTimeline",
    "BulkheadError",
    "Container",
    "ContainerInfo",
    "ContainerStats",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GuestDetails",
    "HybridVsockTransport",
    "ImageNotFound",
    "InvalidArgument",
    "NotFound",
    "Output",
    "Process",
    "ProcessExit",
    "ProcessInfo",
    "ProcessMemory",
    "ProcessTimeout",
    "QemuError",
    "Sandbox",
    "SandboxDetails",
    "SandboxError",
    "SandboxExists",
    "SandboxInfo",
    "SandboxNotFound",
    "SerialMuxTransport",
    "SpecError",
    "StartFailure",
    "StdioError",
    "StorageClient",
    "StorageInfo",
    "Transport",
    "TransportError",
    "Unavailable",
    "UnixRelay",
    "VolumeStats",
    "VsockTransport",
    "make_spec",
]
