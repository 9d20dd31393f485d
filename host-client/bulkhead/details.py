"""Plain-Python views of agent replies, easy to print and to dump as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from google.protobuf.message import Message

from bulkhead_proto.v1 import agent_pb2


def message_to_dict(message: Message) -> dict[str, Any]:
    """Every field of ``message`` (set or not) as JSON-ready Python values.

    Unlike protobuf's JSON mapping, 64-bit integers stay numbers: they are byte
    counts and nanoseconds, not identifiers that overflow JavaScript.
    """
    out: dict[str, Any] = {}
    for fd in message.DESCRIPTOR.fields:
        value = getattr(message, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            out[fd.name] = {k: _value(value_fd, v) for k, v in value.items()}
        elif _is_repeated(fd):
            out[fd.name] = [_value(fd, v) for v in value]
        else:
            out[fd.name] = _value(fd, value)
    return out


def _is_repeated(fd: Any) -> bool:
    # protobuf 5+ has is_repeated; older releases only the label.
    is_repeated = getattr(fd, "is_repeated", None)
    if is_repeated is not None:
        return bool(is_repeated)
    return fd.label == fd.LABEL_REPEATED


def _value(fd: Any, value: Any) -> Any:
    if fd.message_type is not None:
        return message_to_dict(value)
    if fd.enum_type is not None:
        known = fd.enum_type.values_by_number
        return known[value].name if value in known else value
    if isinstance(value, bytes):
        return value.hex()
    return value


class _FromProto:
    """Dataclass fields filled from the message fields of the same name."""

    raw: Message

    def __getattr__(self, name: str) -> Any:
        # Fields added to the protocol after this class was written are still
        # reachable, straight from the message.
        if name == "raw" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.raw, name)

    def to_dict(self) -> dict[str, Any]:
        return message_to_dict(self.raw)


@dataclass(frozen=True, repr=False)
class BootTimeline(_FromProto):
    """Milliseconds since the guest kernel started, measured in the guest."""

    init_started_ms: float
    agent_started_ms: float
    agent_ready_ms: float
    raw: agent_pb2.BootTimeline = field(compare=False)

    @classmethod
    def from_proto(cls, msg: agent_pb2.BootTimeline) -> BootTimeline:
        return cls(msg.init_started_ms, msg.agent_started_ms, msg.agent_ready_ms, msg)

    def phases(self) -> dict[str, float]:
        """Duration of each boot phase in milliseconds, in order."""
        return {
            "kernel → init": self.init_started_ms,
            "init → agent start": self.agent_started_ms - self.init_started_ms,
            "agent start → agent ready": self.agent_ready_ms - self.agent_started_ms,
        }

    def __repr__(self) -> str:
        return (
            f"BootTimeline(init_started_ms={self.init_started_ms:.1f}, "
            f"agent_started_ms={self.agent_started_ms:.1f}, "
            f"agent_ready_ms={self.agent_ready_ms:.1f})"
        )


@dataclass(frozen=True)
class ProcessMemory(_FromProto):
    pid: int
    name: str
    rss_bytes: int
    uss_bytes: int
    pss_bytes: int
    threads: int
    raw: agent_pb2.ProcessMemory = field(compare=False, repr=False)

    @classmethod
    def from_proto(cls, msg: agent_pb2.ProcessMemory) -> ProcessMemory:
        return cls(msg.pid, msg.name, msg.rss_bytes, msg.uss_bytes, msg.pss_bytes, msg.threads, msg)


@dataclass(frozen=True)
class GuestDetails(_FromProto):
    """Facts about the guest and its agent (``GetGuestDetails``)."""

    agent_version: str
    protocol_version: int
    init_version: str
    kernel_release: str
    hostname: str
    cpus: int
    memory_total_bytes: int
    cgroup_version: int
    uptime_seconds: float
    agent_pid: int
    agent_restarts: int
    features: tuple[str, ...]
    kernel_modules: tuple[str, ...]
    boot: BootTimeline
    processes: tuple[ProcessMemory, ...]
    raw: agent_pb2.GuestDetails = field(compare=False, repr=False)

    @classmethod
    def from_proto(cls, msg: agent_pb2.GuestDetails) -> GuestDetails:
        special = {
            "features": tuple(msg.features),
            "kernel_modules": tuple(msg.kernel_modules),
            "boot": BootTimeline.from_proto(msg.boot),
            "processes": tuple(ProcessMemory.from_proto(p) for p in msg.processes),
            "raw": msg,
        }
        values = {
            f.name: special[f.name] if f.name in special else getattr(msg, f.name)
            for f in fields(cls)
        }
        return cls(**values)
