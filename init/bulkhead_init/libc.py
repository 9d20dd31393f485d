"""The few system calls Python 3.11's stdlib lacks: mount, umount2, reboot, finit_module.

ctypes costs ~5 ms to import natively, so callers import this module when they first need
it rather than at start-up. Every wrapper raises ``OSError`` with the C errno on failure.
"""

from __future__ import annotations

import ctypes
import os

# x86_64 system call number (the guest kernel is x86_64 only); glibc 2.36 has no wrapper.
SYS_FINIT_MODULE = 313

# reboot(2) commands, <linux/reboot.h>.
RB_AUTOBOOT = 0x01234567
RB_POWER_OFF = 0x4321FEDC

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.reboot.argtypes = [ctypes.c_int]
# syscall() is variadic; declaring the three arguments as longs passes them in full
# 64-bit registers, which is what the kernel reads.
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_char_p, ctypes.c_long]
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    result = _libc.mount(
        source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None
    )
    _check(result, f"mount {fstype} on {target}")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def reboot(cmd: int) -> None:
    """Power off or restart now. Only returns on failure (it raises then)."""
    _check(_libc.reboot(cmd), f"reboot({cmd:#x})")


def finit_module(fd: int, params: bytes = b"", flags: int = 0) -> None:
    _check(_libc.syscall(SYS_FINIT_MODULE, fd, params, flags), "finit_module")
