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


# -- containers and processes --

_ENOENT = 2


@dataclass(frozen=True)
class StartFailure(_FromProto):
    """Why a process never ran its command: the setup step that failed, and its errno."""

    step: str
    errno: int
    message: str
    raw: agent_pb2.StartFailure = field(compare=False, repr=False)

    @classmethod
    def from_proto(cls, msg: agent_pb2.StartFailure) -> StartFailure:
        return cls(msg.step, msg.errno, msg.message, msg)

    def __str__(self) -> str:
        return f"{self.step}: {self.message}" if self.message else self.step


_KINDS = {
    agent_pb2.ProcessExit.EXITED: "exited",
    agent_pb2.ProcessExit.SIGNALED: "signaled",
    agent_pb2.ProcessExit.START_FAILED: "start_failed",
}


@dataclass(frozen=True)
class ProcessExit(_FromProto):
    """How a process ended (``WaitProcess``, or the last message of ``Attach``).

    ``kind`` is ``"exited"`` (``exit_code`` applies), ``"signaled"`` (``signal``
    applies; ``oom_killed`` says whether the kernel's OOM killer sent it) or
    ``"start_failed"`` (``start_failure`` applies: the command never ran).
    """

    kind: str
    exit_code: int
    signal: int
    oom_killed: bool
    start_failure: StartFailure | None
    pid: int
    raw: agent_pb2.ProcessExit = field(compare=False, repr=False)

    @classmethod
    def from_proto(cls, msg: agent_pb2.ProcessExit) -> ProcessExit:
        kind = _KINDS.get(msg.kind, "unknown")
        failure = StartFailure.from_proto(msg.start_failure) if kind == "start_failed" else None
        return cls(kind, msg.exit_code, msg.signal, msg.oom_killed, failure, msg.pid, msg)

    @property
    def returncode(self) -> int:
        """The status a shell (and docker) would report.

        The exit code; 128 + the signal number when a signal killed it; for a
        process that never started, 127 when the command (or a file it needed)
        does not exist and 126 for any other failure, as a shell says "not
        found" and "cannot execute". An exit the agent did not classify is 125,
        the status docker gives to its own failures.
        """
        if self.kind == "exited":
            return self.exit_code
        if self.kind == "signaled":
            return 128 + self.signal
        if self.kind == "start_failed":
            errno = self.start_failure.errno if self.start_failure else 0
            return 127 if errno == _ENOENT else 126
        return 125

    @property
    def ok(self) -> bool:
        """Whether the process ran and exited with status 0."""
        return self.kind == "exited" and self.exit_code == 0

    def __str__(self) -> str:
        if self.kind == "exited":
            return f"exited with code {self.exit_code}"
        if self.kind == "signaled":
            oom = " (out of memory)" if self.oom_killed else ""
            return f"killed by {_signal_name(self.signal)}{oom}"
        if self.kind == "start_failed":
            return f"failed to start: {self.start_failure}"
        return "ended in an unknown way"

    def to_dict(self) -> dict[str, Any]:
        out = message_to_dict(self.raw)
        out["kind"] = self.kind  # the short name, not the proto enum's
        out["returncode"] = self.returncode
        return out


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass(frozen=True)
class ContainerStats(_FromProto):
    """Resource use of one container, read from its cgroup (``GetContainerStats``).

    ``memory_max_bytes`` and ``pids_max`` are 0 when there is no limit.
    """

    cpu_usage_usec: int
    cpu_user_usec: int
    cpu_system_usec: int
    cpu_nr_throttled: int
    cpu_throttled_usec: int
    memory_current_bytes: int
    memory_peak_bytes: int
    memory_max_bytes: int
    memory_oom_kills: int
    pids_current: int
    pids_max: int
    io_read_bytes: int
    io_write_bytes: int
    raw: agent_pb2.ContainerStats = field(compare=False, repr=False)

    @classmethod
    def from_proto(cls, msg: agent_pb2.ContainerStats) -> ContainerStats:
        return cls(**_plain_fields(cls, msg))


@dataclass(frozen=True)
class ContainerInfo(_FromProto):
    """One container as ``ListContainers`` reports it.

    ``status`` is ``"created"``, ``"running"``, ``"paused"`` or ``"stopped"``.
    """

    container_id: str
    status: str
    pid: int
    created_unix: float
    args: tuple[str, ...]
    rootfs: str
    exec_ids: tuple[str, ...]
    raw: agent_pb2.ContainerInfo = field(compare=False, repr=False)

    @classmethod
    def from_proto(cls, msg: agent_pb2.ContainerInfo) -> ContainerInfo:
        return cls(**_plain_fields(cls, msg))


@dataclass(frozen=True)
class ProcessInfo(_FromProto):
    """One process of a container (``ListProcesses``), with guest pids."""

    pid: int
    ppid: int
    uid: int
    args: tuple[str, ...]
    state: str
    raw: agent_pb2.ProcessInfo = field(compare=False, repr=False)

    @classmethod
    def from_proto(cls, msg: agent_pb2.ProcessInfo) -> ProcessInfo:
        return cls(**_plain_fields(cls, msg))


def _plain_fields(cls: type, msg: Message) -> dict[str, Any]:
    """Constructor arguments for a dataclass whose fields are scalars or repeated scalars."""
    values: dict[str, Any] = {"raw": msg}
    for f in fields(cls):
        if f.name != "raw":
            value = getattr(msg, f.name)
            # Repeated fields are protobuf containers: freeze them into tuples.
            values[f.name] = value if isinstance(value, str | bytes | int | float) else tuple(value)
    return values
