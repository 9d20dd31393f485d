"""IPv6 autoconfiguration off on the interfaces the host configures.

A spec's addresses and routes are the complete set, so the kernel must not add its own from
router advertisements (QEMU's user-mode network sends them, restricted or not): ``accept_ra``
and ``autoconf`` go to 0 on every interface a request names, before its addresses are set.
The files are per network namespace, as seen by the calling thread.
"""

from __future__ import annotations

import os

KEYS = ("accept_ra", "autoconf")
OFF = {key: "0" for key in KEYS}


def _path(ifname: str, key: str) -> str:
    return f"/proc/sys/net/ipv6/conf/{ifname}/{key}"


def read(ifname: str) -> dict[str, str] | None:
    """The current values; None when the interface has no IPv6 (disabled, or no such files)."""
    values = {}
    for key in KEYS:
        try:
            with open(_path(ifname, key)) as f:
                values[key] = f.read().strip()
        except FileNotFoundError:
            return None
    return values


def write(ifname: str, values: dict[str, str]) -> None:
    for key, value in values.items():
        fd = os.open(_path(ifname, key), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
