"""Container cgroups from asyncio: waiting on cgroup.events, freezing, killing, removing.

The layout of the agent's subtree is in ``agent_cgroup``.
"""

from __future__ import annotations

import asyncio
import os
import select

from ..oci.cgroups import Cgroup
from .procfs import read_file

# A missed notification must not hang anyone: events are re-read at least this often.
RECHECK_S = 1.0


class CgroupTree:
    """Where the agent's groups are (see ``agent_cgroup.setup``, which makes them)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.agent = os.path.join(directory, "agent")
        self.containers = os.path.join(directory, "containers")

    def cgroup(self, container_id: str) -> Cgroup:
        return Cgroup(container_id, root=self.containers)


async def wait_event(cgroup: Cgroup, key: str, value: int, timeout: float) -> None:
    """Wait until ``cgroup.events`` shows ``key value`` (frozen, populated), or TimeoutError.

    kernfs signals a change of the file with POLLPRI. asyncio's selector only asks for
    POLLIN, which such files always report, so the file goes into an epoll set of its own
    asking for EPOLLPRI alone, and that epoll fd, readable when the set has an event, is what
    the loop watches.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    fd = os.open(cgroup.file("cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)
    poller = select.epoll()
    changed = asyncio.Event()

    def on_event() -> None:
        poller.poll(0)  # edge-triggered: consuming the event re-arms it
        changed.set()

    try:
        poller.register(fd, select.EPOLLPRI | select.EPOLLET)
        loop.add_reader(poller.fileno(), on_event)
        try:
            while True:
                changed.clear()
                # Reading the file is also what acknowledges the notification.
                events = _parse_events(os.pread(fd, 4096, 0))
                if events.get(key) == value:
                    return
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(f"{cgroup.path}: {key} is not {value} after {timeout} s")
                try:
                    await asyncio.wait_for(changed.wait(), min(remaining, RECHECK_S))
                except TimeoutError:
                    pass
        finally:
            loop.remove_reader(poller.fileno())
    finally:
        poller.close()
        os.close(fd)


def _parse_events(raw: bytes) -> dict[str, int]:
    result = {}
    for line in raw.decode().splitlines():
        key, _, number = line.partition(" ")
        if number.isdigit():
            result[key] = int(number)
    return result


async def freeze(cgroup: Cgroup, frozen: bool, timeout: float) -> None:
    """Write cgroup.freeze and wait until the kernel reports the group (un)frozen."""
    cgroup.write_files({"cgroup.freeze": "1" if frozen else "0"})
    await wait_event(cgroup, "frozen", 1 if frozen else 0, timeout)


async def kill_all(cgroup: Cgroup, timeout: float) -> None:
    """SIGKILL everything in the group (cgroup.kill: no fork can race it) and wait until empty."""
    if os.path.exists(cgroup.file("cgroup.kill")):
        cgroup.write_files({"cgroup.kill": "1"})
    else:  # before Linux 5.14: one by one, again until nothing is left
        import signal

        for pid in procs(cgroup):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    await wait_event(cgroup, "populated", 0, timeout)


def procs(cgroup: Cgroup) -> list[int]:
    """Every process in the group and in the groups the container made below it."""
    pids: list[int] = []
    for dirpath, _dirs, _files in os.walk(cgroup.path):
        raw = read_file(os.path.join(dirpath, "cgroup.procs")) or b""
        pids.extend(int(p) for p in raw.split())
    return sorted(set(pids))


async def remove(cgroup: Cgroup, timeout: float) -> None:
    """Remove the group (and groups below it) once empty, killing what is still in it."""
    if not os.path.isdir(cgroup.path):
        return
    if cgroup.populated:
        await kill_all(cgroup, timeout)
    for dirpath, _dirs, _files in os.walk(cgroup.path, topdown=False):
        try:
            os.rmdir(dirpath)
        except FileNotFoundError:
            pass
