"""The process's C library, loaded once and lazily, and the errno check every wrapper uses.

``ctypes`` is only imported on first use: the guest's PID 1 and the agent's fast paths must
not pay for it (DESIGN decision 9). The spawner calls :func:`libc` once before it forks so
its children never load anything.
"""

from __future__ import annotations

import errno
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes

_libc: ctypes.CDLL | None = None

# System call numbers for the calls glibc 2.36 does not wrap.
_SYSCALLS = {
    "x86_64": {"pivot_root": 155, "bpf": 321},
    "aarch64": {"pivot_root": 41, "bpf": 280},
}


def libc() -> ctypes.CDLL:
    """The C library with argument types declared, loaded on first call."""
    global _libc
    if _libc is None:
        import ctypes

        lib = ctypes.CDLL(None, use_errno=True)
        char_p, c_int, c_ulong = ctypes.c_char_p, ctypes.c_int, ctypes.c_ulong
        lib.unshare.argtypes = [c_int]
        lib.setns.argtypes = [c_int, c_int]
        lib.mount.argtypes = [char_p, char_p, char_p, c_ulong, char_p]
        lib.umount2.argtypes = [char_p, c_int]
        lib.sethostname.argtypes = [char_p, ctypes.c_size_t]
        lib.setdomainname.argtypes = [char_p, ctypes.c_size_t]
        lib.prctl.argtypes = [c_int, c_ulong, c_ulong, c_ulong, c_ulong]
        lib.setgroups.argtypes = [ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint32)]
        lib.capget.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        # syscall() is variadic: declare the arguments per call site (see syscall_number).
        lib.syscall.restype = ctypes.c_long
        _libc = lib
    return _libc


def syscall_number(name: str) -> int:
    """The number of a system call glibc has no wrapper for, on this machine."""
    machine = os.uname().machine
    try:
        return _SYSCALLS[machine][name]
    except KeyError:
        raise OSError(errno.ENOSYS, f"{name}: no system call number known for {machine}") from None


def check(result: int, call: str) -> int:
    """Raise ``OSError(errno, "<call>: <strerror>")`` if a libc call returned -1."""
    if result < 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{call}: {os.strerror(err)}")
    return result
