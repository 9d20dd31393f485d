"""The OCI runtime spec (``config.json``): loaded, validated and turned into typed records.

Only the Linux parts are read. Every problem is a :class:`SpecError` whose text starts with
the JSON path of the offending field (``linux.namespaces[2].type: unknown namespace 'foo'``),
so a host-side user can find it in the bundle they sent. Unknown keys are ignored, as the
spec asks of runtimes, so that newer specs still load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from ..linux.capabilities import CAPABILITIES
from ..linux.mounts import PROPAGATION_OPTIONS, MountOptions, parse_mount_options

UINT32_MAX = 2**32 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT64_MAX = 2**64 - 1

NAMESPACE_TYPES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time")
# Known to the spec but not created by this runtime (yet).
UNSUPPORTED_NAMESPACES = ("time",)

RLIMIT_TYPES = (
    "RLIMIT_AS",
    "RLIMIT_CORE",
    "RLIMIT_CPU",
    "RLIMIT_DATA",
    "RLIMIT_FSIZE",
    "RLIMIT_LOCKS",
    "RLIMIT_MEMLOCK",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_NOFILE",
    "RLIMIT_NPROC",
    "RLIMIT_RSS",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
    "RLIMIT_SIGPENDING",
    "RLIMIT_STACK",
)

SECCOMP_ACTIONS = (
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_LOG",
    "SCMP_ACT_NOTIFY",
)
SECCOMP_OPERATORS = (
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
)
SECCOMP_FLAGS = (
    "SECCOMP_FILTER_FLAG_TSYNC",
    "SECCOMP_FILTER_FLAG_LOG",
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
)
HOOK_KINDS = (
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
)
DEVICE_TYPES = ("c", "b", "u", "p")


class SpecError(ValueError):
    """A spec field is missing or wrong; ``str()`` is ``"<json path>: <message>"``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


# --- the typed spec ------------------------------------------------------------------------
# NamedTuples rather than dataclasses: immutable and typed all the same, but several times
# cheaper to define, and this module is imported at every agent and spawner start, which
# under TCG costs ~25x what it does natively (DESIGN decision 9).

_EMPTY: Mapping[str, str] = MappingProxyType({})


class User(NamedTuple):
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    umask: int | None = None


class Capabilities(NamedTuple):
    """The five sets, as capability names; a set the spec leaves out is empty."""

    bounding: tuple[str, ...] = ()
    effective: tuple[str, ...] = ()
    inheritable: tuple[str, ...] = ()
    permitted: tuple[str, ...] = ()
    ambient: tuple[str, ...] = ()


class Rlimit(NamedTuple):
    type: str  # "RLIMIT_NOFILE"
    soft: int
    hard: int


class Process(NamedTuple):
    args: tuple[str, ...]
    cwd: str
    user: User = User(0, 0)
    env: tuple[str, ...] = ()
    terminal: bool = False
    console_size: tuple[int, int] | None = None  # (height, width)
    # None: the spec says nothing, so the capabilities are left as they are.
    capabilities: Capabilities | None = None
    rlimits: tuple[Rlimit, ...] = ()
    no_new_privileges: bool = False
    oom_score_adj: int | None = None
    apparmor_profile: str = ""
    selinux_label: str = ""

    def env_dict(self) -> dict[str, str]:
        """The environment as a mapping; a later duplicate wins, as with execve and sh."""
        result: dict[str, str] = {}
        for item in self.env:
            key, _, value = item.partition("=")
            result[key] = value
        return result


class Root(NamedTuple):
    path: str
    readonly: bool = False


class Mount(NamedTuple):
    destination: str
    type: str = ""
    source: str = ""
    options: tuple[str, ...] = ()

    @property
    def parsed_options(self) -> MountOptions:
        return parse_mount_options(self.options)

    @property
    def is_bind(self) -> bool:
        return self.type == "bind" or "bind" in self.options or "rbind" in self.options


class Namespace(NamedTuple):
    type: str
    path: str = ""  # "": create a new one


class IDMapping(NamedTuple):
    container_id: int
    host_id: int
    size: int


class DeviceRule(NamedTuple):
    allow: bool
    type: str = "a"
    major: int | None = None  # None: any (-1 in the spec)
    minor: int | None = None
    access: str = "rwm"


class Memory(NamedTuple):
    limit: int | None = None
    reservation: int | None = None
    swap: int | None = None
    kernel: int | None = None
    kernel_tcp: int | None = None
    swappiness: int | None = None
    disable_oom_killer: bool | None = None
    use_hierarchy: bool | None = None
    check_before_update: bool | None = None


class CPU(NamedTuple):
    shares: int | None = None
    quota: int | None = None
    burst: int | None = None
    period: int | None = None
    realtime_runtime: int | None = None
    realtime_period: int | None = None
    cpus: str = ""
    mems: str = ""
    idle: int | None = None


class WeightDevice(NamedTuple):
    major: int
    minor: int
    weight: int | None = None
    leaf_weight: int | None = None


class ThrottleDevice(NamedTuple):
    major: int
    minor: int
    rate: int


class BlockIO(NamedTuple):
    weight: int | None = None
    leaf_weight: int | None = None
    weight_device: tuple[WeightDevice, ...] = ()
    throttle_read_bps_device: tuple[ThrottleDevice, ...] = ()
    throttle_write_bps_device: tuple[ThrottleDevice, ...] = ()
    throttle_read_iops_device: tuple[ThrottleDevice, ...] = ()
    throttle_write_iops_device: tuple[ThrottleDevice, ...] = ()


class HugepageLimit(NamedTuple):
    page_size: str  # "2MB"
    limit: int


class Resources(NamedTuple):
    devices: tuple[DeviceRule, ...] = ()
    memory: Memory | None = None
    cpu: CPU | None = None
    pids_limit: int | None = None
    block_io: BlockIO | None = None
    hugepage_limits: tuple[HugepageLimit, ...] = ()
    unified: Mapping[str, str] = _EMPTY


class SeccompArg(NamedTuple):
    index: int
    value: int
    op: str
    value_two: int = 0


class SeccompSyscall(NamedTuple):
    names: tuple[str, ...]
    action: str
    errno_ret: int | None = None
    args: tuple[SeccompArg, ...] = ()


class Seccomp(NamedTuple):
    default_action: str
    default_errno_ret: int | None = None
    architectures: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    listener_path: str = ""
    syscalls: tuple[SeccompSyscall, ...] = ()


class Device(NamedTuple):
    type: str  # c, b, u or p
    path: str
    major: int = 0
    minor: int = 0
    file_mode: int | None = None
    uid: int | None = None
    gid: int | None = None


class Linux(NamedTuple):
    namespaces: tuple[Namespace, ...] = ()
    uid_mappings: tuple[IDMapping, ...] = ()
    gid_mappings: tuple[IDMapping, ...] = ()
    resources: Resources | None = None
    cgroups_path: str = ""
    sysctl: Mapping[str, str] = _EMPTY
    masked_paths: tuple[str, ...] = ()
    readonly_paths: tuple[str, ...] = ()
    rootfs_propagation: str = ""
    seccomp: Seccomp | None = None
    devices: tuple[Device, ...] = ()
    mount_label: str = ""

    def namespace(self, type_: str) -> Namespace | None:
        for ns in self.namespaces:
            if ns.type == type_:
                return ns
        return None


class Hook(NamedTuple):
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None


class Hooks(NamedTuple):
    prestart: tuple[Hook, ...] = ()
    create_runtime: tuple[Hook, ...] = ()
    create_container: tuple[Hook, ...] = ()
    start_container: tuple[Hook, ...] = ()
    poststart: tuple[Hook, ...] = ()
    poststop: tuple[Hook, ...] = ()


class Spec(NamedTuple):
    oci_version: str
    process: Process
    root: Root
    hostname: str = ""
    domainname: str = ""
    mounts: tuple[Mount, ...] = ()
    linux: Linux = Linux()
    hooks: Hooks = Hooks()
    annotations: Mapping[str, str] = _EMPTY


# --- field readers -----------------------------------------------------------------------

_MISSING = object()


class _Object:
    """A JSON object at a known path, with typed accessors that raise SpecError."""

    __slots__ = ("path", "value")

    def __init__(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise SpecError(path or "(spec)", "must be an object")
        self.value = value
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return self.value.get(key) is not None

    def _get(self, key: str, required: bool) -> Any:
        value = self.value.get(key, _MISSING)
        if value is None:  # JSON null means "not set", as Go's omitempty readers see it
            value = _MISSING
        if value is _MISSING and required:
            raise SpecError(self.at(key), "is required")
        return value

    def string(self, key: str, *, required: bool = False, default: str = "") -> str:
        value = self._get(key, required)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            raise SpecError(self.at(key), "must be a string")
        return value

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self._get(key, False)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise SpecError(self.at(key), "must be true or false")
        return value

    def optional_boolean(self, key: str) -> bool | None:
        return self.boolean(key) if self.has(key) else None

    def integer(
        self,
        key: str,
        *,
        required: bool = False,
        low: int = INT64_MIN,
        high: int = INT64_MAX,
    ) -> int | None:
        value = self._get(key, required)
        if value is _MISSING:
            return None
        return _integer(value, self.at(key), low, high)

    def strings(
        self, key: str, *, required: bool = False, non_empty: bool = False
    ) -> tuple[str, ...]:
        value = self._get(key, required)
        if value is _MISSING:
            if non_empty:
                raise SpecError(self.at(key), "must be a non-empty list of strings")
            return ()
        if (
            not isinstance(value, list)
            or not all(isinstance(v, str) for v in value)
            or (non_empty and not value)
        ):
            what = "a non-empty list of strings" if non_empty else "a list of strings"
            raise SpecError(self.at(key), f"must be {what}")
        return tuple(value)

    def string_map(self, key: str) -> dict[str, str]:
        value = self._get(key, False)
        if value is _MISSING:
            return {}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise SpecError(self.at(key), "must be an object of strings")
        return dict(value)

    def object(self, key: str, *, required: bool = False) -> _Object | None:
        value = self._get(key, required)
        if value is _MISSING:
            return None
        return _Object(value, self.at(key))

    def objects(self, key: str) -> list[_Object]:
        value = self._get(key, False)
        if value is _MISSING:
            return []
        if not isinstance(value, list):
            raise SpecError(self.at(key), "must be a list")
        return [_Object(item, f"{self.at(key)}[{i}]") for i, item in enumerate(value)]


def _integer(value: Any, path: str, low: int, high: int) -> int:
    # bool is an int in Python but not in JSON.
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(path, "must be an integer")
    if not low <= value <= high:
        raise SpecError(path, f"must be between {low} and {high}")
    return value


def _absolute(path: str, where: str) -> str:
    if not path.startswith("/"):
        raise SpecError(where, f"must be an absolute path, not {path!r}")
    if ".." in path.split("/"):
        raise SpecError(where, f"must not contain '..': {path!r}")
    return path


# --- sections ----------------------------------------------------------------------------


def _user(obj: _Object | None) -> User:
    if obj is None:
        return User(0, 0)
    gids = obj.value.get("additionalGids") or []
    where = obj.at("additionalGids")
    if not isinstance(gids, list):
        raise SpecError(where, "must be a list of integers")
    return User(
        uid=obj.integer("uid", required=True, low=0, high=UINT32_MAX),
        gid=obj.integer("gid", required=True, low=0, high=UINT32_MAX),
        additional_gids=tuple(
            _integer(g, f"{where}[{i}]", 0, UINT32_MAX) for i, g in enumerate(gids)
        ),
        umask=obj.integer("umask", low=0, high=0o777),
    )


def _capabilities(obj: _Object | None) -> Capabilities | None:
    if obj is None:
        return None
    sets: dict[str, tuple[str, ...]] = {}
    for name in ("bounding", "effective", "inheritable", "permitted", "ambient"):
        caps = obj.strings(name)
        for i, cap in enumerate(caps):
            if cap not in CAPABILITIES:
                raise SpecError(f"{obj.at(name)}[{i}]", f"unknown capability {cap!r}")
        sets[name] = caps
    return Capabilities(**sets)


def _rlimits(objs: list[_Object]) -> tuple[Rlimit, ...]:
    seen: set[str] = set()
    result = []
    for obj in objs:
        type_ = obj.string("type", required=True)
        if type_ not in RLIMIT_TYPES:
            raise SpecError(obj.at("type"), f"unknown rlimit {type_!r}")
        if type_ in seen:
            raise SpecError(obj.at("type"), f"{type_} is given twice")
        seen.add(type_)
        soft = obj.integer("soft", required=True, low=0, high=UINT64_MAX)
        hard = obj.integer("hard", required=True, low=0, high=UINT64_MAX)
        if soft > hard:
            raise SpecError(obj.at("soft"), f"must not exceed hard ({soft} > {hard})")
        result.append(Rlimit(type_, soft, hard))
    return tuple(result)


def parse_process(value: Any, path: str = "process") -> Process:
    """Validate a ``process`` object: the container's, or an exec request's."""
    obj = _Object(value, path)
    env = obj.strings("env")
    for i, item in enumerate(env):
        if "=" not in item or item.startswith("="):
            raise SpecError(f"{obj.at('env')}[{i}]", f"must be KEY=VALUE, not {item!r}")
    cwd = obj.string("cwd", required=True)
    if not cwd.startswith("/"):
        raise SpecError(obj.at("cwd"), f"must be an absolute path, not {cwd!r}")
    size = obj.object("consoleSize")
    console_size = None
    if size is not None:
        console_size = (
            size.integer("height", required=True, low=0, high=UINT32_MAX),
            size.integer("width", required=True, low=0, high=UINT32_MAX),
        )
    return Process(
        args=obj.strings("args", required=True, non_empty=True),
        cwd=cwd,
        user=_user(obj.object("user")),
        env=env,
        terminal=obj.boolean("terminal"),
        console_size=console_size,
        capabilities=_capabilities(obj.object("capabilities")),
        rlimits=_rlimits(obj.objects("rlimits")),
        no_new_privileges=obj.boolean("noNewPrivileges"),
        oom_score_adj=obj.integer("oomScoreAdj", low=-1000, high=1000),
        apparmor_profile=obj.string("apparmorProfile"),
        selinux_label=obj.string("selinuxLabel"),
    )


def _mounts(objs: list[_Object]) -> tuple[Mount, ...]:
    result = []
    for obj in objs:
        destination = _absolute(obj.string("destination", required=True), obj.at("destination"))
        if obj.has("uidMappings") or obj.has("gidMappings"):
            raise SpecError(obj.at("uidMappings"), "id-mapped mounts are not supported")
        result.append(
            Mount(
                destination=destination,
                type=obj.string("type"),
                source=obj.string("source"),
                options=obj.strings("options"),
            )
        )
    return tuple(result)


def _namespaces(objs: list[_Object]) -> tuple[Namespace, ...]:
    seen: set[str] = set()
    result = []
    for obj in objs:
        type_ = obj.string("type", required=True)
        if type_ not in NAMESPACE_TYPES:
            raise SpecError(obj.at("type"), f"unknown namespace {type_!r}")
        if type_ in UNSUPPORTED_NAMESPACES:
            raise SpecError(obj.at("type"), f"namespace {type_!r} is not supported")
        if type_ in seen:
            raise SpecError(obj.at("type"), f"namespace {type_!r} is given twice")
        seen.add(type_)
        path = obj.string("path")
        if path and not path.startswith("/"):
            raise SpecError(obj.at("path"), f"must be an absolute path, not {path!r}")
        result.append(Namespace(type_, path))
    return tuple(result)


def _id_mappings(objs: list[_Object]) -> tuple[IDMapping, ...]:
    return tuple(
        IDMapping(
            container_id=obj.integer("containerID", required=True, low=0, high=UINT32_MAX),
            host_id=obj.integer("hostID", required=True, low=0, high=UINT32_MAX),
            size=obj.integer("size", required=True, low=1, high=UINT32_MAX),
        )
        for obj in objs
    )


def _device_rules(objs: list[_Object]) -> tuple[DeviceRule, ...]:
    result = []
    for obj in objs:
        type_ = obj.string("type", default="a")
        if type_ not in ("a", "c", "b"):
            raise SpecError(obj.at("type"), f"must be 'a', 'c' or 'b', not {type_!r}")
        access = obj.string("access", default="rwm")
        if not access or set(access) - set("rwm"):
            raise SpecError(obj.at("access"), f"must be letters of 'rwm', not {access!r}")
        if not obj.has("allow"):
            raise SpecError(obj.at("allow"), "is required")
        major = obj.integer("major", low=-1)
        minor = obj.integer("minor", low=-1)
        result.append(
            DeviceRule(
                allow=obj.boolean("allow"),
                type=type_,
                major=None if major is None or major < 0 else major,
                minor=None if minor is None or minor < 0 else minor,
                access=access,
            )
        )
    return tuple(result)


def _memory(obj: _Object | None) -> Memory | None:
    if obj is None:
        return None
    return Memory(
        limit=obj.integer("limit"),
        reservation=obj.integer("reservation"),
        swap=obj.integer("swap"),
        kernel=obj.integer("kernel"),
        kernel_tcp=obj.integer("kernelTCP"),
        swappiness=obj.integer("swappiness", low=0, high=100),
        disable_oom_killer=obj.optional_boolean("disableOOMKiller"),
        use_hierarchy=obj.optional_boolean("useHierarchy"),
        check_before_update=obj.optional_boolean("checkBeforeUpdate"),
    )


def _cpu(obj: _Object | None) -> CPU | None:
    if obj is None:
        return None
    return CPU(
        shares=obj.integer("shares", low=0, high=UINT64_MAX),
        quota=obj.integer("quota"),
        burst=obj.integer("burst", low=0, high=UINT64_MAX),
        period=obj.integer("period", low=0, high=UINT64_MAX),
        realtime_runtime=obj.integer("realtimeRuntime"),
        realtime_period=obj.integer("realtimePeriod", low=0, high=UINT64_MAX),
        cpus=obj.string("cpus"),
        mems=obj.string("mems"),
        idle=obj.integer("idle", low=0, high=1),
    )


def _throttle(objs: list[_Object]) -> tuple[ThrottleDevice, ...]:
    return tuple(
        ThrottleDevice(
            major=obj.integer("major", required=True, low=0),
            minor=obj.integer("minor", required=True, low=0),
            rate=obj.integer("rate", required=True, low=0, high=UINT64_MAX),
        )
        for obj in objs
    )


def _block_io(obj: _Object | None) -> BlockIO | None:
    if obj is None:
        return None
    return BlockIO(
        weight=obj.integer("weight", low=10, high=1000),
        leaf_weight=obj.integer("leafWeight", low=10, high=1000),
        weight_device=tuple(
            WeightDevice(
                major=dev.integer("major", required=True, low=0),
                minor=dev.integer("minor", required=True, low=0),
                weight=dev.integer("weight", low=10, high=1000),
                leaf_weight=dev.integer("leafWeight", low=10, high=1000),
            )
            for dev in obj.objects("weightDevice")
        ),
        throttle_read_bps_device=_throttle(obj.objects("throttleReadBpsDevice")),
        throttle_write_bps_device=_throttle(obj.objects("throttleWriteBpsDevice")),
        throttle_read_iops_device=_throttle(obj.objects("throttleReadIOPSDevice")),
        throttle_write_iops_device=_throttle(obj.objects("throttleWriteIOPSDevice")),
    )


def _resources(obj: _Object | None) -> Resources | None:
    if obj is None:
        return None
    pids = obj.object("pids")
    hugepages = []
    for item in obj.objects("hugepageLimits"):
        page_size = item.string("pageSize", required=True)
        if not page_size or "/" in page_size or "." in page_size:
            raise SpecError(item.at("pageSize"), f"bad page size {page_size!r}")
        hugepages.append(HugepageLimit(page_size, item.integer("limit", required=True, low=0)))
    unified = obj.string_map("unified")
    for key in unified:
        if "/" in key or key.startswith(".") or "." not in key:
            raise SpecError(f"{obj.at('unified')}.{key}", "is not a cgroup interface file name")
    return Resources(
        devices=_device_rules(obj.objects("devices")),
        memory=_memory(obj.object("memory")),
        cpu=_cpu(obj.object("cpu")),
        pids_limit=pids.integer("limit", required=True) if pids is not None else None,
        block_io=_block_io(obj.object("blockIO")),
        hugepage_limits=tuple(hugepages),
        unified=unified,
    )


def parse_resources(value: Any, path: str = "linux.resources") -> Resources:
    """Validate a ``linux.resources`` object on its own (UpdateContainer sends one)."""
    resources = _resources(_Object(value, path))
    assert resources is not None  # _Object refused anything but an object
    return resources


def _seccomp(obj: _Object | None) -> Seccomp | None:
    if obj is None:
        return None

    def action(o: _Object, key: str, required: bool) -> str:
        value = o.string(key, required=required)
        if value and value not in SECCOMP_ACTIONS:
            raise SpecError(o.at(key), f"unknown seccomp action {value!r}")
        return value

    architectures = obj.strings("architectures")
    for i, arch in enumerate(architectures):
        if not arch.startswith("SCMP_ARCH_"):
            raise SpecError(f"{obj.at('architectures')}[{i}]", f"unknown architecture {arch!r}")
    flags = obj.strings("flags")
    for i, flag in enumerate(flags):
        if flag not in SECCOMP_FLAGS:
            raise SpecError(f"{obj.at('flags')}[{i}]", f"unknown seccomp flag {flag!r}")
    syscalls = []
    for entry in obj.objects("syscalls"):
        args = []
        for arg in entry.objects("args"):
            op = arg.string("op", required=True)
            if op not in SECCOMP_OPERATORS:
                raise SpecError(arg.at("op"), f"unknown operator {op!r}")
            args.append(
                SeccompArg(
                    index=arg.integer("index", required=True, low=0, high=5),
                    value=arg.integer("value", required=True, low=0, high=UINT64_MAX),
                    value_two=arg.integer("valueTwo", low=0, high=UINT64_MAX) or 0,
                    op=op,
                )
            )
        syscalls.append(
            SeccompSyscall(
                names=entry.strings("names", required=True, non_empty=True),
                action=action(entry, "action", True),
                errno_ret=entry.integer("errnoRet", low=0, high=UINT32_MAX),
                args=tuple(args),
            )
        )
    return Seccomp(
        default_action=action(obj, "defaultAction", True),
        default_errno_ret=obj.integer("defaultErrnoRet", low=0, high=UINT32_MAX),
        architectures=architectures,
        flags=flags,
        listener_path=obj.string("listenerPath"),
        syscalls=tuple(syscalls),
    )


def _devices(objs: list[_Object]) -> tuple[Device, ...]:
    result = []
    for obj in objs:
        type_ = obj.string("type", required=True)
        if type_ not in DEVICE_TYPES:
            raise SpecError(obj.at("type"), f"unknown device type {type_!r}")
        needs_numbers = type_ != "p"
        result.append(
            Device(
                type=type_,
                path=_absolute(obj.string("path", required=True), obj.at("path")),
                major=obj.integer("major", required=needs_numbers, low=0) or 0,
                minor=obj.integer("minor", required=needs_numbers, low=0) or 0,
                file_mode=obj.integer("fileMode", low=0, high=0o7777),
                uid=obj.integer("uid", low=0, high=UINT32_MAX),
                gid=obj.integer("gid", low=0, high=UINT32_MAX),
            )
        )
    return tuple(result)


def _paths(obj: _Object, key: str) -> tuple[str, ...]:
    paths = obj.strings(key)
    for i, path in enumerate(paths):
        _absolute(path, f"{obj.at(key)}[{i}]")
    return paths


def _linux(obj: _Object | None) -> Linux:
    if obj is None:
        return Linux()
    propagation = obj.string("rootfsPropagation")
    if propagation and propagation not in PROPAGATION_OPTIONS:
        raise SpecError(obj.at("rootfsPropagation"), f"unknown propagation {propagation!r}")
    return Linux(
        namespaces=_namespaces(obj.objects("namespaces")),
        uid_mappings=_id_mappings(obj.objects("uidMappings")),
        gid_mappings=_id_mappings(obj.objects("gidMappings")),
        resources=_resources(obj.object("resources")),
        cgroups_path=obj.string("cgroupsPath"),
        sysctl=obj.string_map("sysctl"),
        masked_paths=_paths(obj, "maskedPaths"),
        readonly_paths=_paths(obj, "readonlyPaths"),
        rootfs_propagation=propagation,
        seccomp=_seccomp(obj.object("seccomp")),
        devices=_devices(obj.objects("devices")),
        mount_label=obj.string("mountLabel"),
    )


def _hooks(obj: _Object | None) -> Hooks:
    if obj is None:
        return Hooks()
    kinds = {}
    for kind in HOOK_KINDS:
        hooks = []
        for hook in obj.objects(kind):
            hooks.append(
                Hook(
                    path=_absolute(hook.string("path", required=True), hook.at("path")),
                    args=hook.strings("args"),
                    env=hook.strings("env"),
                    timeout=hook.integer("timeout", low=1),
                )
            )
        snake = "".join("_" + c.lower() if c.isupper() else c for c in kind)
        kinds[snake] = tuple(hooks)
    return Hooks(**kinds)


# --- cross-field rules -------------------------------------------------------------------


def _check_consistency(spec: Spec) -> None:
    linux = spec.linux
    types = {ns.type for ns in linux.namespaces}
    if (spec.hostname or spec.domainname) and "uts" not in types:
        key = "hostname" if spec.hostname else "domainname"
        raise SpecError(key, "needs a uts namespace in linux.namespaces")
    user = linux.namespace("user")
    creates_user_ns = user is not None and not user.path
    if (linux.uid_mappings or linux.gid_mappings) and not creates_user_ns:
        raise SpecError("linux.uidMappings", "needs a new user namespace in linux.namespaces")
    if creates_user_ns and not (linux.uid_mappings and linux.gid_mappings):
        raise SpecError("linux.uidMappings", "a new user namespace needs uid and gid mappings")
    if "mount" not in types:
        # Without a mount namespace every mount would land on the guest itself.
        for key, present in (
            ("mounts", spec.mounts),
            ("linux.maskedPaths", linux.masked_paths),
            ("linux.readonlyPaths", linux.readonly_paths),
            ("linux.devices", linux.devices),
            ("root.readonly", spec.root.readonly),
            ("linux.rootfsPropagation", linux.rootfs_propagation),
        ):
            if present:
                raise SpecError(key, "needs a mount namespace in linux.namespaces")
    for key in linux.sysctl:
        if not key or "/" in key or ".." in key:
            raise SpecError(f"linux.sysctl.{key}", "is not a sysctl name")


# --- entry points ------------------------------------------------------------------------


def parse(value: Any) -> Spec:
    """Validate a decoded ``config.json`` and return it typed; raises :class:`SpecError`."""
    obj = _Object(value, "")
    version = obj.string("ociVersion", required=True)
    if not version.startswith("1."):
        raise SpecError("ociVersion", f"unsupported version {version!r} (need 1.x)")
    root = obj.object("root", required=True)
    process = obj.object("process", required=True)
    spec = Spec(
        oci_version=version,
        process=parse_process(process.value, "process"),
        root=Root(root.string("path", required=True), root.boolean("readonly")),
        hostname=obj.string("hostname"),
        domainname=obj.string("domainname"),
        mounts=_mounts(obj.objects("mounts")),
        linux=_linux(obj.object("linux")),
        hooks=_hooks(obj.object("hooks")),
        annotations=obj.string_map("annotations"),
    )
    if not spec.root.path:
        raise SpecError("root.path", "must not be empty")
    _check_consistency(spec)
    return spec


def loads(text: str | bytes) -> Spec:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SpecError("(spec)", f"not valid JSON: {exc}") from None
    return parse(value)


def load(path: str) -> Spec:
    """Read and validate a bundle's ``config.json``."""
    with open(path, "rb") as f:
        return loads(f.read())
