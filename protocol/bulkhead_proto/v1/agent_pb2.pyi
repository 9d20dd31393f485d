from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetGuestDetailsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BootTimeline(_message.Message):
    __slots__ = ("init_started_ms", "agent_started_ms", "agent_ready_ms")
    INIT_STARTED_MS_FIELD_NUMBER: _ClassVar[int]
    AGENT_STARTED_MS_FIELD_NUMBER: _ClassVar[int]
    AGENT_READY_MS_FIELD_NUMBER: _ClassVar[int]
    init_started_ms: float
    agent_started_ms: float
    agent_ready_ms: float
    def __init__(self, init_started_ms: _Optional[float] = ..., agent_started_ms: _Optional[float] = ..., agent_ready_ms: _Optional[float] = ...) -> None: ...

class GuestDetails(_message.Message):
    __slots__ = ("agent_version", "protocol_version", "kernel_release", "cpus", "memory_total_bytes", "cgroup_version", "features", "boot", "agent_restarts", "hostname", "uptime_seconds", "kernel_modules", "init_version", "agent_pid", "processes")
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    KERNEL_RELEASE_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CGROUP_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    BOOT_FIELD_NUMBER: _ClassVar[int]
    AGENT_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_MODULES_FIELD_NUMBER: _ClassVar[int]
    INIT_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_PID_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    protocol_version: int
    kernel_release: str
    cpus: int
    memory_total_bytes: int
    cgroup_version: int
    features: _containers.RepeatedScalarFieldContainer[str]
    boot: BootTimeline
    agent_restarts: int
    hostname: str
    uptime_seconds: float
    kernel_modules: _containers.RepeatedScalarFieldContainer[str]
    init_version: str
    agent_pid: int
    processes: _containers.RepeatedCompositeFieldContainer[ProcessMemory]
    def __init__(self, agent_version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., kernel_release: _Optional[str] = ..., cpus: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., cgroup_version: _Optional[int] = ..., features: _Optional[_Iterable[str]] = ..., boot: _Optional[_Union[BootTimeline, _Mapping]] = ..., agent_restarts: _Optional[int] = ..., hostname: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., kernel_modules: _Optional[_Iterable[str]] = ..., init_version: _Optional[str] = ..., agent_pid: _Optional[int] = ..., processes: _Optional[_Iterable[_Union[ProcessMemory, _Mapping]]] = ...) -> None: ...

class ProcessMemory(_message.Message):
    __slots__ = ("pid", "name", "rss_bytes", "uss_bytes", "pss_bytes", "threads")
    PID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    USS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    name: str
    rss_bytes: int
    uss_bytes: int
    pss_bytes: int
    threads: int
    def __init__(self, pid: _Optional[int] = ..., name: _Optional[str] = ..., rss_bytes: _Optional[int] = ..., uss_bytes: _Optional[int] = ..., pss_bytes: _Optional[int] = ..., threads: _Optional[int] = ...) -> None: ...

class SetGuestTimeRequest(_message.Message):
    __slots__ = ("unix_nanos",)
    UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    unix_nanos: int
    def __init__(self, unix_nanos: _Optional[int] = ...) -> None: ...

class SetGuestTimeResponse(_message.Message):
    __slots__ = ("previous_unix_nanos",)
    PREVIOUS_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    previous_unix_nanos: int
    def __init__(self, previous_unix_nanos: _Optional[int] = ...) -> None: ...

class AddEntropyRequest(_message.Message):
    __slots__ = ("data", "credit")
    DATA_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    credit: bool
    def __init__(self, data: _Optional[bytes] = ..., credit: _Optional[bool] = ...) -> None: ...

class AddEntropyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ("reboot",)
    REBOOT_FIELD_NUMBER: _ClassVar[int]
    reboot: bool
    def __init__(self, reboot: _Optional[bool] = ...) -> None: ...

class ShutdownResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
