"""Loopback up and the hostname: all the networking init does (the agent does the rest).

A SIOCSIFFLAGS ioctl on any socket is enough for ``lo``; pyroute2 would cost tens of MB.
"""

from __future__ import annotations

import _socket  # the C module: ``socket`` would pull in enum and selectors
import fcntl
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .log import Logger

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
# struct ifreq: 16-byte name, then a union whose first member here is short ifr_flags;
# 40 bytes in all on x86_64.
_IFREQ = struct.Struct("16sh22x")
HOSTNAME_FILE = "/proc/sys/kernel/hostname"


def link_up(name: str = "lo") -> bool:
    """Set IFF_UP on ``name``; return False if it was up already."""
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM, 0)
    try:
        req = _IFREQ.pack(name.encode(), 0)
        _, flags = _IFREQ.unpack(fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, req))
        if flags & IFF_UP:
            return False
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, _IFREQ.pack(name.encode(), flags | IFF_UP))
        return True
    finally:
        sock.close()


def set_hostname(name: str, path: str = HOSTNAME_FILE) -> None:
    with open(path, "w") as f:
        f.write(name)


def setup(log: Logger, hostname: str) -> None:
    try:
        changed = link_up("lo")
        log.debug("lo up" if changed else "lo was up already")
    except OSError as exc:
        log.error(f"cannot bring lo up: {exc}")
    try:
        set_hostname(hostname)
        log.info(f"hostname {hostname}")
    except OSError as exc:
        log.error(f"cannot set hostname {hostname!r}: {exc}")
