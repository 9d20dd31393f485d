"""Reading the guest's and its processes' figures from /proc: plain parsing, no metrics types.

Every function takes the /proc directory (tests give a fake tree) and reads each file once.
A file that is missing (PSI turned off, an old kernel) gives an empty answer, not an error.
"""

from __future__ import annotations

import os
from typing import NamedTuple

PROC = "/proc"
SECTOR = 512  # /proc/diskstats counts 512-byte sectors whatever the device's block size
CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
PSI_RESOURCES = ("cpu", "memory", "io")
# Virtual block devices that only add noise (and there are 16 ram disks by default).
IGNORED_DISKS = ("ram", "loop", "zram")


def _text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return ""


def clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


class Stat(NamedTuple):
    cpu_seconds: dict[str, float]  # mode -> seconds, all CPUs together
    cpus: int
    context_switches: int
    forks: int
    procs_running: int
    procs_blocked: int
    boot_time: float  # unix seconds


def stat(proc: str = PROC, ticks: int | None = None) -> Stat:
    ticks = ticks or clock_ticks()
    cpu: dict[str, float] = {}
    cpus = 0
    other: dict[str, int] = {}
    for line in _text(f"{proc}/stat").splitlines():
        name, _, rest = line.partition(" ")
        if name == "cpu":
            values = rest.split()
            cpu = {mode: int(v) / ticks for mode, v in zip(CPU_MODES, values, strict=False)}
        elif name.startswith("cpu"):
            cpus += 1
        elif name in ("ctxt", "processes", "procs_running", "procs_blocked", "btime"):
            other[name] = int(rest)
    return Stat(
        cpu,
        cpus,
        other.get("ctxt", 0),
        other.get("processes", 0),
        other.get("procs_running", 0),
        other.get("procs_blocked", 0),
        float(other.get("btime", 0)),
    )


def meminfo(proc: str = PROC) -> dict[str, int]:
    """Every ``/proc/meminfo`` line, in bytes where the kernel says kB."""
    out = {}
    for line in _text(f"{proc}/meminfo").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def loadavg(proc: str = PROC) -> tuple[float, float, float] | None:
    parts = _text(f"{proc}/loadavg").split()
    if len(parts) < 3:
        return None
    return float(parts[0]), float(parts[1]), float(parts[2])


def uptime(proc: str = PROC) -> float | None:
    parts = _text(f"{proc}/uptime").split()
    return float(parts[0]) if parts else None


def pressure(proc: str = PROC) -> dict[tuple[str, str], float]:
    """(resource, "some"/"full") -> seconds stalled in total, from /proc/pressure/*."""
    out = {}
    for resource in PSI_RESOURCES:
        for line in _text(f"{proc}/pressure/{resource}").splitlines():
            kind, *fields = line.split()
            for field in fields:
                key, _, value = field.partition("=")
                if key == "total":
                    out[(resource, kind)] = int(value) / 1e6  # microseconds
    return out


class Disk(NamedTuple):
    name: str
    major: int
    minor: int
    reads: int
    read_bytes: int
    read_seconds: float
    writes: int
    written_bytes: int
    write_seconds: float
    io_seconds: float


def diskstats(proc: str = PROC) -> list[Disk]:
    disks = []
    for line in _text(f"{proc}/diskstats").splitlines():
        f = line.split()
        if len(f) < 14 or f[2].startswith(IGNORED_DISKS):
            continue
        n = [int(x) for x in f[3:14]]
        disks.append(
            Disk(
                name=f[2],
                major=int(f[0]),
                minor=int(f[1]),
                reads=n[0],
                read_bytes=n[2] * SECTOR,
                read_seconds=n[3] / 1000,
                writes=n[4],
                written_bytes=n[6] * SECTOR,
                write_seconds=n[7] / 1000,
                io_seconds=n[9] / 1000,
            )
        )
    return disks


class NetDevice(NamedTuple):
    name: str
    receive_bytes: int
    receive_packets: int
    receive_errors: int
    receive_drops: int
    transmit_bytes: int
    transmit_packets: int
    transmit_errors: int
    transmit_drops: int


def netdev(proc: str = PROC) -> list[NetDevice]:
    devices = []
    for line in _text(f"{proc}/net/dev").splitlines()[2:]:  # two header lines
        name, _, rest = line.partition(":")
        f = rest.split()
        if len(f) < 12:
            continue
        devices.append(
            NetDevice(
                name.strip(),
                int(f[0]),
                int(f[1]),
                int(f[2]),
                int(f[3]),
                int(f[8]),
                int(f[9]),
                int(f[10]),
                int(f[11]),
            )
        )
    return devices


class Process(NamedTuple):
    rss_bytes: int
    user_seconds: float
    system_seconds: float
    threads: int
    open_fds: int
    start_seconds: float  # since boot


def process(
    pid: int, proc: str = PROC, ticks: int | None = None, page: int | None = None
) -> Process | None:
    """One process's figures from ``/proc/PID/stat`` and its fd directory; None if it is gone."""
    raw = _text(f"{proc}/{pid}/stat")
    if not raw:
        return None
    # The command name is in parentheses and may hold spaces or ")": split after the last one.
    fields = raw[raw.rfind(")") + 2 :].split()
    ticks = ticks or clock_ticks()
    try:
        fds = len(os.listdir(f"{proc}/{pid}/fd"))
    except OSError:
        fds = 0
    # fields[0] is field 3 (state) of proc(5)
    return Process(
        rss_bytes=int(fields[21]) * (page or page_size()),
        user_seconds=int(fields[11]) / ticks,
        system_seconds=int(fields[12]) / ticks,
        threads=int(fields[17]),
        open_fds=fds,
        start_seconds=int(fields[19]) / ticks,
    )


def children(pid: int, proc: str = PROC) -> list[int]:
    """The children of ``pid``'s main thread (the agent's: the spawner)."""
    return [int(p) for p in _text(f"{proc}/{pid}/task/{pid}/children").split()]
