"""Notice OOM kills as they happen: every container's ``memory.events`` in one epoll set.

The kernel counts each OOM kill in the group's ``memory.events`` (``oom_kill N``, this group
and those below it) and signals a change of the file to pollers with POLLPRI, as it does for
``cgroup.events`` (see ``containers.cgroup_tree.wait_event``). asyncio's selector asks for
POLLIN only, so the files go into an epoll set of their own asking for EPOLLPRI, and the
loop watches that set's fd: one fd per container plus one, no thread, no timer.

The watcher only says "this container's file changed"; comparing counts (so that each kill
is reported exactly once, whether noticed here or at the process's exit) is the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
from collections.abc import Callable

MEMORY_EVENTS = "memory.events"


def oom_kills(path: str) -> int | None:
    """The ``oom_kill`` count of a ``memory.events`` file; None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:  # no memory controller, or the group is gone
        return None
    for line in raw.splitlines():
        if line.startswith(b"oom_kill "):
            return int(line.split()[1])
    return 0


class OomWatcher:
    def __init__(self, on_change: Callable[[str], None]) -> None:
        self._on_change = on_change
        self._poller: select.epoll | None = None
        self._fds: dict[str, int] = {}  # key (container id) -> fd
        self._keys: dict[int, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, key: str, path: str) -> bool:
        """Watch ``path`` for ``key``; False when it cannot be opened (no memory controller)."""
        self.unwatch(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        if self._poller is None:
            self._poller = select.epoll()
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._poller.fileno(), self._on_ready)
        try:
            # Edge-triggered: each change is one event; no need to read the file to re-arm.
            self._poller.register(fd, select.EPOLLPRI | select.EPOLLET)
        except OSError:  # EPERM: not a kernfs file (a test's plain file); checks still happen
            os.close(fd)
            return False
        self._fds[key] = fd
        self._keys[fd] = key
        return True

    def unwatch(self, key: str) -> None:
        fd = self._fds.pop(key, None)
        if fd is None:
            return
        del self._keys[fd]
        if self._poller is not None:
            with contextlib.suppress(OSError):
                self._poller.unregister(fd)
        os.close(fd)

    @property
    def watched(self) -> int:
        return len(self._fds)

    def _on_ready(self) -> None:
        assert self._poller is not None
        for fd, _mask in self._poller.poll(0):
            key = self._keys.get(fd)
            if key is not None:
                self._on_change(key)

    def close(self) -> None:
        for key in list(self._fds):
            self.unwatch(key)
        if self._poller is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._poller.fileno())
            self._poller.close()
            self._poller = None
