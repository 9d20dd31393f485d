"""cgroup v2 for containers: OCI ``linux.resources`` mapped onto interface files, and a
:class:`Cgroup` that creates, fills, freezes, measures, kills and removes one container's group.

The guest mounts only the unified hierarchy (DESIGN decision 6), so there is no v1 code here.
``linux.resources.devices`` has no file in v2: it becomes an eBPF program attached to the
group (``device_filter``), by :meth:`Cgroup.create` and :meth:`Cgroup.update`.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

from .spec import DeviceRule, Resources, SpecError

DEFAULT_ROOT = "/sys/fs/cgroup/bulkhead"
# Controllers handed down to the containers' groups when the kernel offers them.
CONTROLLERS = ("cpu", "cpuset", "io", "memory", "pids", "hugetlb", "misc", "rdma")
DEFAULT_CPU_PERIOD = 100_000  # microseconds, the kernel's default


# --- resources -> files (pure) -----------------------------------------------------------


def cpu_weight_from_shares(shares: int) -> int:
    """v1 cpu.shares [2, 262144] onto v2 cpu.weight [1, 10000], the conversion runtimes share."""
    return 1 + ((shares - 2) * 9999) // 262142


def io_weight_from_blkio(weight: int) -> int:
    """v1 blkio.weight [10, 1000] onto v2 io.weight [1, 10000]."""
    return 1 + ((weight - 10) * 9999) // 990


def _limit(value: int) -> str:
    """OCI uses -1 (any negative, in practice) for "no limit"; v2 writes "max"."""
    return "max" if value < 0 else str(value)


def resources_to_v2(resources: Resources) -> dict[str, str]:
    """The cgroup v2 interface files, and their contents, that express ``resources``.

    Files that take one entry per write (io.max, io.weight) hold several lines; write them one
    line at a time. ``linux.resources.unified`` is applied last and wins. Settings v2 cannot
    express raise :class:`SpecError`; deprecated ones (kernel memory, swappiness, ...) are
    ignored, as other runtimes do.
    """
    files: dict[str, str] = {}
    where = "linux.resources"

    cpu = resources.cpu
    if cpu is not None:
        if cpu.shares:
            files["cpu.weight"] = str(cpu_weight_from_shares(cpu.shares))
        if cpu.quota or cpu.period:
            quota = str(cpu.quota) if cpu.quota and cpu.quota > 0 else "max"
            files["cpu.max"] = f"{quota} {cpu.period or DEFAULT_CPU_PERIOD}"
        if cpu.burst is not None:
            files["cpu.max.burst"] = str(cpu.burst)
        if cpu.idle is not None:
            files["cpu.idle"] = str(cpu.idle)
        if cpu.realtime_runtime or cpu.realtime_period:
            raise SpecError(f"{where}.cpu.realtimeRuntime", "real-time limits need cgroup v1")
        if cpu.cpus:
            files["cpuset.cpus"] = cpu.cpus
        if cpu.mems:
            files["cpuset.mems"] = cpu.mems

    memory = resources.memory
    if memory is not None:
        if memory.limit is not None and memory.limit != 0:
            files["memory.max"] = _limit(memory.limit)
        if memory.reservation is not None and memory.reservation != 0:
            files["memory.low"] = _limit(memory.reservation)
        if memory.swap is not None and memory.swap != 0:
            files["memory.swap.max"] = _swap_max(memory.limit, memory.swap, f"{where}.memory")

    if resources.pids_limit:  # 0: not set, as runc reads it
        files["pids.max"] = _limit(resources.pids_limit)

    block_io = resources.block_io
    if block_io is not None:
        weights = []
        if block_io.weight:
            weights.append(f"default {io_weight_from_blkio(block_io.weight)}")
        for dev in block_io.weight_device:
            if dev.weight:
                weights.append(f"{dev.major}:{dev.minor} {io_weight_from_blkio(dev.weight)}")
        if weights:
            files["io.weight"] = "\n".join(weights)
        limits: dict[str, list[str]] = {}
        for key, devices in (
            ("rbps", block_io.throttle_read_bps_device),
            ("wbps", block_io.throttle_write_bps_device),
            ("riops", block_io.throttle_read_iops_device),
            ("wiops", block_io.throttle_write_iops_device),
        ):
            for dev in devices:
                rate = str(dev.rate) if dev.rate else "max"  # 0 removes the limit
                limits.setdefault(f"{dev.major}:{dev.minor}", []).append(f"{key}={rate}")
        if limits:
            files["io.max"] = "\n".join(f"{dev} {' '.join(kv)}" for dev, kv in limits.items())

    for hugepage in resources.hugepage_limits:
        files[f"hugetlb.{hugepage.page_size}.max"] = str(hugepage.limit)

    files.update(resources.unified)
    return files


def _swap_max(limit: int | None, swap: int, where: str) -> str:
    # OCI's swap is memory+swap (v1 memsw); v2's memory.swap.max is swap alone.
    if swap < 0:
        return "max"
    if limit is None or limit <= 0:
        raise SpecError(f"{where}.swap", "needs memory.limit (OCI swap counts memory+swap)")
    if swap < limit:
        raise SpecError(f"{where}.swap", f"must be at least memory.limit ({swap} < {limit})")
    return str(swap - limit)


# --- reading files -------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _keyed(text: str | None) -> dict[str, int]:
    """``key value`` lines (cpu.stat, memory.events, cgroup.events) as a dict."""
    result: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        try:
            result[key] = int(value)
        except ValueError:
            continue
    return result


def _single(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    return None if text == "max" else int(text)


def _io_stat(text: str | None) -> dict[str, dict[str, int]]:
    """``8:0 rbytes=1 wbytes=2 ...`` lines keyed by device."""
    result: dict[str, dict[str, int]] = {}
    for line in (text or "").splitlines():
        device, *pairs = line.split()
        result[device] = {k: int(v) for k, _, v in (p.partition("=") for p in pairs)}
    return result


_NONE: Mapping[str, int] = MappingProxyType({})
_NO_IO: Mapping[str, dict[str, int]] = MappingProxyType({})


class CgroupStats(NamedTuple):
    """What the group's files say; a file the kernel does not offer leaves its field empty."""

    cpu: Mapping[str, int] = _NONE  # cpu.stat: usage_usec, user_usec, system_usec, ...
    memory_current: int | None = None
    memory_peak: int | None = None
    memory_events: Mapping[str, int] = _NONE  # low, high, max, oom, oom_kill
    pids_current: int | None = None
    io: Mapping[str, dict[str, int]] = _NO_IO  # io.stat by "major:minor"

    @property
    def oom_kills(self) -> int:
        return self.memory_events.get("oom_kill", 0)


# --- one container's group -----------------------------------------------------------------


class Cgroup:
    """The cgroup ``<root>/<name>`` on a cgroup2 hierarchy."""

    def __init__(self, name: str, root: str = DEFAULT_ROOT) -> None:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"bad cgroup name {name!r}")
        self.root = root
        self.path = os.path.join(root, name)

    def __repr__(self) -> str:
        return f"Cgroup({self.path!r})"

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # creation and settings

    def create(self, resources: Resources | None = None) -> None:
        """Create the group (and ``root``), hand it the controllers, apply ``resources``.

        Device rules included: the group is made before the container's process joins it,
        so the process never runs unfiltered.
        """
        files = resources_to_v2(resources) if resources is not None else {}
        self._prepare_parent()
        os.mkdir(self.path, 0o755)
        try:
            self.write_files(files)
            if resources is not None:
                self.set_devices(resources.devices)
        except BaseException:
            self.remove()
            raise

    def update(self, resources: Resources) -> None:
        self.write_files(resources_to_v2(resources))
        self.set_devices(resources.devices)

    def set_devices(self, rules: tuple[DeviceRule, ...]) -> None:
        """Make ``rules`` the group's device rules (a new program replaces the old one).

        No rules leaves the group as it is: an update that does not mention devices keeps
        them. bpf(2) and ctypes are only loaded when a spec has rules.
        """
        if rules:
            from . import device_filter

            device_filter.apply(self.path, rules)

    def write_files(self, files: dict[str, str]) -> None:
        for name, value in files.items():
            for line in value.split("\n"):
                self._write(name, line)

    def _write(self, name: str, value: str) -> None:
        path = self.file(name)
        try:
            # No O_CREAT: a file the kernel does not offer (its controller is not enabled
            # here) is then ENOENT rather than a confusing EACCES.
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise OSError(exc.errno, f"write {value!r} to {path}: {exc.strerror}") from None

    def _prepare_parent(self) -> None:
        """Create ``root`` if needed and have it hand its controllers down to us.

        v2 only offers a controller to a group whose parent lists it in
        cgroup.subtree_control. ``root``'s own parent must offer them already (the guest's
        init enables them at the top of the hierarchy).
        """
        if not os.path.exists(os.path.join(self.root, "cgroup.controllers")):
            parent = os.path.dirname(self.root)
            if not os.path.exists(os.path.join(parent, "cgroup.controllers")):
                raise OSError(errno.ENOENT, f"{parent} is not a cgroup2 directory")
            try:
                os.mkdir(self.root, 0o755)
            except FileExistsError:
                pass  # another container's creation got there first
        _enable_controllers(self.root)

    # membership

    def add(self, pid: int) -> None:
        self._write("cgroup.procs", str(pid))

    def procs(self) -> list[int]:
        text = _read(self.file("cgroup.procs")) or ""
        return [int(line) for line in text.split()]

    def events(self) -> dict[str, int]:
        return _keyed(_read(self.file("cgroup.events")))

    @property
    def populated(self) -> bool:
        return self.events().get("populated", 0) == 1

    @property
    def frozen(self) -> bool:
        return self.events().get("frozen", 0) == 1

    # freezer

    def freeze(self, timeout: float = 5.0) -> None:
        """Freeze every process and wait (up to ``timeout`` s) until the kernel says frozen."""
        self._write("cgroup.freeze", "1")
        self.wait_event("frozen", 1, timeout)

    def thaw(self, timeout: float = 5.0) -> None:
        self._write("cgroup.freeze", "0")
        self.wait_event("frozen", 0, timeout)

    def wait_event(self, key: str, value: int, timeout: float) -> None:
        """Wait until cgroup.events shows ``key value``; kernfs wakes poll() on each change."""
        path = self.file("cgroup.events")
        deadline = time.monotonic() + timeout
        with open(path, "rb", buffering=0) as f:
            poller = select.poll()
            poller.register(f, select.POLLPRI)
            while True:
                f.seek(0)
                if _keyed(f.read().decode()).get(key) == value:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{path}: {key} not {value} after {timeout} s")
                if not poller.poll(remaining * 1000):
                    continue  # timed out: the loop reports it after one last read
                # Reading resets the notification; re-read at the top of the loop.

    # statistics

    def stats(self) -> CgroupStats:
        return CgroupStats(
            cpu=_keyed(_read(self.file("cpu.stat"))),
            memory_current=_single(_read(self.file("memory.current"))),
            memory_peak=_single(_read(self.file("memory.peak"))),
            memory_events=_keyed(_read(self.file("memory.events"))),
            pids_current=_single(_read(self.file("pids.current"))),
            io=_io_stat(_read(self.file("io.stat"))),
        )

    # ending

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the group (and below) and wait until it is empty."""
        if os.path.exists(self.file("cgroup.kill")):
            self._write("cgroup.kill", "1")  # atomic, races no fork (Linux 5.14)
        else:
            self._kill_one_by_one(timeout)
        self.wait_event("populated", 0, timeout)

    def _kill_one_by_one(self, timeout: float) -> None:
        # Frozen, nothing can fork between reading cgroup.procs and the kill; SIGKILL still
        # reaches frozen tasks.
        deadline = time.monotonic() + timeout
        self.freeze(timeout)
        try:
            while pids := self.procs():
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.path}: processes left after SIGKILL: {pids}")
                self.wait_event("populated", 0, max(0.0, deadline - time.monotonic()))
        finally:
            self._write("cgroup.freeze", "0")

    def remove(self, timeout: float = 5.0) -> None:
        """Remove the group and any groups the container made below it, once they are empty."""
        if not os.path.exists(self.path):
            return
        if self.populated:
            self.wait_event("populated", 0, timeout)
        for dirpath, _dirnames, _files in os.walk(self.path, topdown=False):
            try:
                os.rmdir(dirpath)
            except FileNotFoundError:
                pass


def _enable_controllers(path: str) -> None:
    available = set((_read(os.path.join(path, "cgroup.controllers")) or "").split())
    enabled = set((_read(os.path.join(path, "cgroup.subtree_control")) or "").split())
    for controller in CONTROLLERS:
        if controller in available and controller not in enabled:
            # One at a time: a controller the kernel refuses (e.g. cpu with real-time
            # threads about) must not keep the others from being handed down. A missing
            # controller shows later as a missing file when its limits are written.
            try:
                with open(os.path.join(path, "cgroup.subtree_control"), "w") as f:
                    f.write(f"+{controller}")
            except OSError:
                pass
