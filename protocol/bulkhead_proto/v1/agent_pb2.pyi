from bulkhead_proto.v1 import storage_pb2 as _storage_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
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

class CreateContainerRequest(_message.Message):
    __slots__ = ("container_id", "oci_spec", "bundle_dir", "rootfs_storage", "storages")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    OCI_SPEC_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_DIR_FIELD_NUMBER: _ClassVar[int]
    ROOTFS_STORAGE_FIELD_NUMBER: _ClassVar[int]
    STORAGES_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    oci_spec: bytes
    bundle_dir: str
    rootfs_storage: str
    storages: _containers.RepeatedCompositeFieldContainer[_storage_pb2.StorageSpec]
    def __init__(self, container_id: _Optional[str] = ..., oci_spec: _Optional[bytes] = ..., bundle_dir: _Optional[str] = ..., rootfs_storage: _Optional[str] = ..., storages: _Optional[_Iterable[_Union[_storage_pb2.StorageSpec, _Mapping]]] = ...) -> None: ...

class CreateContainerResponse(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class StartContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class StartContainerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExecProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "process")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    process: bytes
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., process: _Optional[bytes] = ...) -> None: ...

class ExecProcessResponse(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class SignalProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "signal", "all")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    signal: int
    all: bool
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., signal: _Optional[int] = ..., all: _Optional[bool] = ...) -> None: ...

class SignalProcessResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WaitProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ...) -> None: ...

class ProcessExit(_message.Message):
    __slots__ = ("kind", "exit_code", "signal", "oom_killed", "start_failure", "pid")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[ProcessExit.Kind]
        EXITED: _ClassVar[ProcessExit.Kind]
        SIGNALED: _ClassVar[ProcessExit.Kind]
        START_FAILED: _ClassVar[ProcessExit.Kind]
    KIND_UNSPECIFIED: ProcessExit.Kind
    EXITED: ProcessExit.Kind
    SIGNALED: ProcessExit.Kind
    START_FAILED: ProcessExit.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLED_FIELD_NUMBER: _ClassVar[int]
    START_FAILURE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    kind: ProcessExit.Kind
    exit_code: int
    signal: int
    oom_killed: bool
    start_failure: StartFailure
    pid: int
    def __init__(self, kind: _Optional[_Union[ProcessExit.Kind, str]] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., oom_killed: _Optional[bool] = ..., start_failure: _Optional[_Union[StartFailure, _Mapping]] = ..., pid: _Optional[int] = ...) -> None: ...

class StartFailure(_message.Message):
    __slots__ = ("step", "errno", "message")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ERRNO_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    step: str
    errno: int
    message: str
    def __init__(self, step: _Optional[str] = ..., errno: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class RemoveContainerRequest(_message.Message):
    __slots__ = ("container_id", "timeout_ms")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    timeout_ms: int
    def __init__(self, container_id: _Optional[str] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class RemoveContainerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PauseContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class PauseContainerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class ResumeContainerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpdateContainerRequest(_message.Message):
    __slots__ = ("container_id", "resources")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    resources: bytes
    def __init__(self, container_id: _Optional[str] = ..., resources: _Optional[bytes] = ...) -> None: ...

class UpdateContainerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ContainerStatsRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class ContainerStats(_message.Message):
    __slots__ = ("cpu_usage_usec", "cpu_user_usec", "cpu_system_usec", "cpu_nr_throttled", "cpu_throttled_usec", "memory_current_bytes", "memory_peak_bytes", "memory_max_bytes", "memory_oom_kills", "pids_current", "pids_max", "io_read_bytes", "io_write_bytes")
    CPU_USAGE_USEC_FIELD_NUMBER: _ClassVar[int]
    CPU_USER_USEC_FIELD_NUMBER: _ClassVar[int]
    CPU_SYSTEM_USEC_FIELD_NUMBER: _ClassVar[int]
    CPU_NR_THROTTLED_FIELD_NUMBER: _ClassVar[int]
    CPU_THROTTLED_USEC_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CURRENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_OOM_KILLS_FIELD_NUMBER: _ClassVar[int]
    PIDS_CURRENT_FIELD_NUMBER: _ClassVar[int]
    PIDS_MAX_FIELD_NUMBER: _ClassVar[int]
    IO_READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    IO_WRITE_BYTES_FIELD_NUMBER: _ClassVar[int]
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
    def __init__(self, cpu_usage_usec: _Optional[int] = ..., cpu_user_usec: _Optional[int] = ..., cpu_system_usec: _Optional[int] = ..., cpu_nr_throttled: _Optional[int] = ..., cpu_throttled_usec: _Optional[int] = ..., memory_current_bytes: _Optional[int] = ..., memory_peak_bytes: _Optional[int] = ..., memory_max_bytes: _Optional[int] = ..., memory_oom_kills: _Optional[int] = ..., pids_current: _Optional[int] = ..., pids_max: _Optional[int] = ..., io_read_bytes: _Optional[int] = ..., io_write_bytes: _Optional[int] = ...) -> None: ...

class ListContainersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ContainerInfo(_message.Message):
    __slots__ = ("container_id", "status", "pid", "created_unix", "args", "rootfs", "exec_ids")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ROOTFS_FIELD_NUMBER: _ClassVar[int]
    EXEC_IDS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    status: str
    pid: int
    created_unix: float
    args: _containers.RepeatedScalarFieldContainer[str]
    rootfs: str
    exec_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, container_id: _Optional[str] = ..., status: _Optional[str] = ..., pid: _Optional[int] = ..., created_unix: _Optional[float] = ..., args: _Optional[_Iterable[str]] = ..., rootfs: _Optional[str] = ..., exec_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ListContainersResponse(_message.Message):
    __slots__ = ("containers",)
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    containers: _containers.RepeatedCompositeFieldContainer[ContainerInfo]
    def __init__(self, containers: _Optional[_Iterable[_Union[ContainerInfo, _Mapping]]] = ...) -> None: ...

class ListProcessesRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class ProcessInfo(_message.Message):
    __slots__ = ("pid", "ppid", "uid", "args", "state")
    PID_FIELD_NUMBER: _ClassVar[int]
    PPID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    pid: int
    ppid: int
    uid: int
    args: _containers.RepeatedScalarFieldContainer[str]
    state: str
    def __init__(self, pid: _Optional[int] = ..., ppid: _Optional[int] = ..., uid: _Optional[int] = ..., args: _Optional[_Iterable[str]] = ..., state: _Optional[str] = ...) -> None: ...

class ListProcessesResponse(_message.Message):
    __slots__ = ("processes",)
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    processes: _containers.RepeatedCompositeFieldContainer[ProcessInfo]
    def __init__(self, processes: _Optional[_Iterable[_Union[ProcessInfo, _Mapping]]] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "stdout_offset", "stderr_offset", "stdin", "stdin_eof", "ack_stdout", "ack_stderr")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    STDOUT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    STDERR_OFFSET_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    STDIN_EOF_FIELD_NUMBER: _ClassVar[int]
    ACK_STDOUT_FIELD_NUMBER: _ClassVar[int]
    ACK_STDERR_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    stdout_offset: int
    stderr_offset: int
    stdin: bytes
    stdin_eof: bool
    ack_stdout: int
    ack_stderr: int
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., stdout_offset: _Optional[int] = ..., stderr_offset: _Optional[int] = ..., stdin: _Optional[bytes] = ..., stdin_eof: _Optional[bool] = ..., ack_stdout: _Optional[int] = ..., ack_stderr: _Optional[int] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("stdout", "stderr", "exit", "gap")
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    stdout: Output
    stderr: Output
    exit: ProcessExit
    gap: OutputGap
    def __init__(self, stdout: _Optional[_Union[Output, _Mapping]] = ..., stderr: _Optional[_Union[Output, _Mapping]] = ..., exit: _Optional[_Union[ProcessExit, _Mapping]] = ..., gap: _Optional[_Union[OutputGap, _Mapping]] = ...) -> None: ...

class OutputGap(_message.Message):
    __slots__ = ("stream", "from_offset", "to_offset")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    FROM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TO_OFFSET_FIELD_NUMBER: _ClassVar[int]
    stream: str
    from_offset: int
    to_offset: int
    def __init__(self, stream: _Optional[str] = ..., from_offset: _Optional[int] = ..., to_offset: _Optional[int] = ...) -> None: ...

class Output(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ResizeTerminalRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "rows", "cols")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    rows: int
    cols: int
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ...) -> None: ...

class ResizeTerminalResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetMetricsRequest(_message.Message):
    __slots__ = ("sandbox",)
    SANDBOX_FIELD_NUMBER: _ClassVar[int]
    sandbox: str
    def __init__(self, sandbox: _Optional[str] = ...) -> None: ...

class GetMetricsResponse(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class StreamEventsRequest(_message.Message):
    __slots__ = ("since", "accept_gap")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_GAP_FIELD_NUMBER: _ClassVar[int]
    since: int
    accept_gap: bool
    def __init__(self, since: _Optional[int] = ..., accept_gap: _Optional[bool] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("seq", "time_unix", "kind", "container_id", "exec_id", "pid", "exit", "oom_kills", "device", "mount_point", "agent_restarts", "lost_from", "lost_to", "details")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Event.Kind]
        CONTAINER_STARTED: _ClassVar[Event.Kind]
        CONTAINER_EXITED: _ClassVar[Event.Kind]
        PROCESS_EXITED: _ClassVar[Event.Kind]
        OOM_KILL: _ClassVar[Event.Kind]
        DEVICE_ADDED: _ClassVar[Event.Kind]
        DEVICE_REMOVED: _ClassVar[Event.Kind]
        STORAGE_MOUNTED: _ClassVar[Event.Kind]
        AGENT_RESTARTED: _ClassVar[Event.Kind]
        EVENTS_LOST: _ClassVar[Event.Kind]
    KIND_UNSPECIFIED: Event.Kind
    CONTAINER_STARTED: Event.Kind
    CONTAINER_EXITED: Event.Kind
    PROCESS_EXITED: Event.Kind
    OOM_KILL: Event.Kind
    DEVICE_ADDED: Event.Kind
    DEVICE_REMOVED: Event.Kind
    STORAGE_MOUNTED: Event.Kind
    AGENT_RESTARTED: Event.Kind
    EVENTS_LOST: Event.Kind
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MOUNT_POINT_FIELD_NUMBER: _ClassVar[int]
    AGENT_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    LOST_FROM_FIELD_NUMBER: _ClassVar[int]
    LOST_TO_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time_unix: float
    kind: Event.Kind
    container_id: str
    exec_id: str
    pid: int
    exit: ProcessExit
    oom_kills: int
    device: str
    mount_point: str
    agent_restarts: int
    lost_from: int
    lost_to: int
    details: _containers.ScalarMap[str, str]
    def __init__(self, seq: _Optional[int] = ..., time_unix: _Optional[float] = ..., kind: _Optional[_Union[Event.Kind, str]] = ..., container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., pid: _Optional[int] = ..., exit: _Optional[_Union[ProcessExit, _Mapping]] = ..., oom_kills: _Optional[int] = ..., device: _Optional[str] = ..., mount_point: _Optional[str] = ..., agent_restarts: _Optional[int] = ..., lost_from: _Optional[int] = ..., lost_to: _Optional[int] = ..., details: _Optional[_Mapping[str, str]] = ...) -> None: ...
