"""Capabilities: the name table, ``capget(2)``/``capset(2)`` and the bounding and ambient sets.

Sets are handled as 64-bit masks (bit N = capability N), the way /proc/<pid>/status shows them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from .libc import check, libc
from .prctl import cap_ambient_clear_all, cap_ambient_raise, capbset_drop, capbset_read

# <linux/capability.h>, in number order.
CAPABILITIES: dict[str, int] = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_BROADCAST": 11,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14,
    "CAP_IPC_OWNER": 15,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_PACCT": 20,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_BOOT": 22,
    "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24,
    "CAP_SYS_TIME": 25,
    "CAP_SYS_TTY_CONFIG": 26,
    "CAP_MKNOD": 27,
    "CAP_LEASE": 28,
    "CAP_AUDIT_WRITE": 29,
    "CAP_AUDIT_CONTROL": 30,
    "CAP_SETFCAP": 31,
    "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34,
    "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_READ": 37,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
    "CAP_CHECKPOINT_RESTORE": 40,
}
CAP_NAMES: dict[int, str] = {number: name for name, number in CAPABILITIES.items()}
CAP_LAST_KNOWN = max(CAPABILITIES.values())

_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class CapSets(NamedTuple):
    effective: int
    permitted: int
    inheritable: int


def mask_of(names: list[str] | tuple[str, ...]) -> int:
    """The bit mask of capability names; a KeyError names an unknown one."""
    mask = 0
    for name in names:
        mask |= 1 << CAPABILITIES[name]
    return mask


def names_of(mask: int) -> list[str]:
    return [name for number, name in CAP_NAMES.items() if mask >> number & 1]


def last_cap() -> int:
    """The highest capability number the running kernel knows."""
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
            return int(f.read())
    except OSError:
        return CAP_LAST_KNOWN


@functools.cache
def _structs():  # ctypes classes are built on first use: ctypes is imported lazily
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        ]

    return ctypes, Header, Data * 2


def capget(pid: int = 0) -> CapSets:
    ctypes, header_t, data_t = _structs()
    header = header_t(_LINUX_CAPABILITY_VERSION_3, pid)
    data = data_t()
    check(libc().capget(ctypes.byref(header), ctypes.byref(data)), f"capget(pid={pid})")
    return CapSets(
        data[0].effective | data[1].effective << 32,
        data[0].permitted | data[1].permitted << 32,
        data[0].inheritable | data[1].inheritable << 32,
    )


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set this thread's effective, permitted and inheritable sets."""
    ctypes, header_t, data_t = _structs()
    header = header_t(_LINUX_CAPABILITY_VERSION_3, 0)
    data = data_t()
    for i in (0, 1):
        shift = 32 * i
        data[i].effective = effective >> shift & 0xFFFFFFFF
        data[i].permitted = permitted >> shift & 0xFFFFFFFF
        data[i].inheritable = inheritable >> shift & 0xFFFFFFFF
    call = f"capset(effective={effective:#x}, permitted={permitted:#x}, "
    call += f"inheritable={inheritable:#x})"
    check(libc().capset(ctypes.byref(header), ctypes.byref(data)), call)


def limit_bounding_set(keep: int) -> None:
    """Drop every capability not in ``keep`` from the bounding set (needs CAP_SETPCAP)."""
    for cap in range(last_cap() + 1):
        if not keep >> cap & 1 and capbset_read(cap):
            capbset_drop(cap)


def set_ambient(mask: int) -> None:
    """Make the ambient set exactly ``mask``; each cap must be permitted and inheritable."""
    cap_ambient_clear_all()
    for cap in range(last_cap() + 1):
        if mask >> cap & 1:
            cap_ambient_raise(cap)
