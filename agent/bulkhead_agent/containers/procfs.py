"""What /proc says about processes: their details for ListProcesses, the members of a PID
namespace (signal-all and listing when there is no cgroup v2), and usage figures for stats
without cgroup files."""

from __future__ import annotations

import os
from typing import NamedTuple


class ProcInfo(NamedTuple):
    pid: int
    ppid: int
    uid: int
    args: tuple[str, ...]
    state: str  # one letter, as ps shows it: R, S, D, Z, T, ...


class Usage(NamedTuple):
    cpu_user_usec: int = 0
    cpu_system_usec: int = 0
    rss_bytes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    pids: int = 0


def read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone meanwhile (ENOENT, ESRCH) or not ours to read
        return None


def _stat_fields(pid: int) -> tuple[str, list[str]] | None:
    """(comm, the fields after it) of /proc/PID/stat; comm may hold spaces and parens."""
    raw = read_file(f"/proc/{pid}/stat")
    if raw is None:
        return None
    text = raw.decode(errors="replace")
    start, end = text.find("("), text.rfind(")")
    if start < 0 or end < 0:
        return None
    return text[start + 1 : end], text[end + 2 :].split()


def process_info(pid: int) -> ProcInfo | None:
    stat = _stat_fields(pid)
    if stat is None:
        return None
    comm, fields = stat
    uid = 0
    status = read_file(f"/proc/{pid}/status") or b""
    for line in status.splitlines():
        if line.startswith(b"Uid:"):
            uid = int(line.split()[1])  # the real uid
            break
    cmdline = read_file(f"/proc/{pid}/cmdline") or b""
    args = tuple(a.decode(errors="replace") for a in cmdline.split(b"\0")[:-1])
    return ProcInfo(pid, int(fields[1]), uid, args or (f"[{comm}]",), fields[0])


def _namespace_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pid_namespace_of(pid: int) -> tuple[int, int] | None:
    return _namespace_id(f"/proc/{pid}/ns/pid")


def own_pid_namespace() -> tuple[int, int] | None:
    return _namespace_id("/proc/self/ns/pid")


def pid_namespace_members(namespace: tuple[int, int]) -> list[int]:
    """Every process (as the agent numbers them) whose PID namespace is ``namespace``.

    Processes in namespaces nested below it are not included; a container that makes its own
    PID namespaces has them killed with its PID 1 anyway.
    """
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _namespace_id(f"/proc/{name}/ns/pid") == namespace:
            members.append(int(name))
    return sorted(members)


def usage(pids: list[int]) -> Usage:
    """Summed figures of ``pids`` from /proc (what stats can say without a cgroup)."""
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    user = system = rss = read = write = count = 0
    for pid in pids:
        stat = _stat_fields(pid)
        if stat is None:
            continue
        fields = stat[1]
        count += 1
        # utime, stime are fields 14 and 15 of stat(5); fields[] starts at field 3.
        user += int(fields[11]) * 1_000_000 // ticks
        system += int(fields[12]) * 1_000_000 // ticks
        statm = (read_file(f"/proc/{pid}/statm") or b"0 0").split()
        rss += int(statm[1]) * page
        for line in (read_file(f"/proc/{pid}/io") or b"").splitlines():
            key, _, value = line.partition(b": ")
            if key == b"read_bytes":
                read += int(value)
            elif key == b"write_bytes":
                write += int(value)
    return Usage(user, system, rss, read, write, count)
