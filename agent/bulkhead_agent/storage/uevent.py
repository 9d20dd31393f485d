"""Kernel uevents: the netlink socket the kernel announces device changes on, and their parsing.

The guest has no udev: the agent listens on ``NETLINK_KOBJECT_UEVENT`` itself (group 1, the
kernel's own messages). A message is ``ACTION@DEVPATH`` followed by ``KEY=VALUE`` lines, all
NUL-separated. Messages that udevd re-broadcasts (group 2, starting with ``libudev``) are
never asked for and ignored if seen.

:class:`UeventMonitor` owns one socket for the whole agent and hands every event to the
listeners subscribed at that moment; a waiter subscribes *before* it looks at sysfs, so an
event between the look and the wait cannot be missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable, Iterator
from typing import NamedTuple

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1
# Hot-plugging a disk makes a burst of events (pci, virtio, bdi, block, queue...): room for
# many bursts, so that a slow loop does not lose any. SO_RCVBUFFORCE (root) ignores rmem_max.
RECEIVE_BUFFER = 4 * 1024 * 1024
SO_RCVBUFFORCE = 33


class Uevent(NamedTuple):
    action: str  # add, remove, change, move, bind, unbind, online, offline
    devpath: str  # below /sys, e.g. /devices/pci0000:00/0000:00:10.0/0000:01:00.0/...
    env: dict[str, str]

    @property
    def subsystem(self) -> str:
        return self.env.get("SUBSYSTEM", "")

    @property
    def devname(self) -> str:
        """The node's name under /dev (``vdb``), or ``""``."""
        return self.env.get("DEVNAME", "")

    def __str__(self) -> str:
        extra = f" {self.devname}" if self.devname else ""
        return f"{self.action} {self.subsystem or '?'} {self.devpath}{extra}"


def parse(data: bytes) -> Uevent | None:
    """A kernel uevent from one netlink datagram; ``None`` for anything else (udev's, junk)."""
    if data.startswith(b"libudev"):
        return None
    parts = data.split(b"\0")
    header = parts[0].decode(errors="replace")
    action, sep, devpath = header.partition("@")
    if not sep or not action or not devpath.startswith("/"):
        return None
    env: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, value = part.decode(errors="replace").partition("=")
        if sep and key:
            env[key] = value
    # The kernel repeats both in the environment; those win when present.
    return Uevent(env.get("ACTION", action), env.get("DEVPATH", devpath), env)


def open_socket() -> socket.socket:
    """A non-blocking socket bound to the kernel's uevent multicast group."""
    sock = socket.socket(
        socket.AF_NETLINK,
        socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
        NETLINK_KOBJECT_UEVENT,
    )
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.bind((0, KERNEL_GROUP))
    except BaseException:
        sock.close()
        raise
    return sock


Listener = Callable[[Uevent | None], None]


class UeventMonitor:
    """One uevent socket read on the event loop, fanned out to subscribed listeners.

    A listener gets each :class:`Uevent`, or ``None`` when events may have been lost (the
    socket overflowed): it must then look at sysfs again rather than trust what it heard.
    Opened on first use: a guest that never waits for a device never opens it.
    """

    def __init__(self, opener: Callable[[], socket.socket] = open_socket) -> None:
        self._opener = opener
        self._sock: socket.socket | None = None
        self._listeners: list[Listener] = []

    @contextlib.contextmanager
    def subscribe(self, listener: Listener) -> Iterator[None]:
        self._start()
        self._listeners.append(listener)
        try:
            yield
        finally:
            self._listeners.remove(listener)

    def _start(self) -> None:
        if self._sock is not None:
            return
        self._sock = self._opener()
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._read)

    def _read(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._dispatch(None)  # the kernel dropped some: everyone rescans
                continue
            event = parse(data)
            if event is not None:
                self._dispatch(event)

    def _dispatch(self, event: Uevent | None) -> None:
        for listener in list(self._listeners):
            listener(event)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None


def wake_on_events(loop_event: asyncio.Event) -> Listener:
    """A listener that sets ``loop_event`` for every event (the waiter then rescans)."""

    def listener(_event: Uevent | None) -> None:
        loop_event.set()

    return listener
