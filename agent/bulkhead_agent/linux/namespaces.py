"""Namespaces: clone flags, ``unshare(2)`` and ``setns(2)``, and the OCI names for them."""

from __future__ import annotations

from .libc import check, libc

# <linux/sched.h>
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_FS = 0x00000200
CLONE_FILES = 0x00000400
CLONE_SYSVSEM = 0x00040000

# OCI namespace type -> (clone flag, name under /proc/<pid>/ns/).
OCI_NAMESPACES: dict[str, tuple[int, str]] = {
    "user": (CLONE_NEWUSER, "user"),
    "mount": (CLONE_NEWNS, "mnt"),
    "uts": (CLONE_NEWUTS, "uts"),
    "ipc": (CLONE_NEWIPC, "ipc"),
    "network": (CLONE_NEWNET, "net"),
    "cgroup": (CLONE_NEWCGROUP, "cgroup"),
    "pid": (CLONE_NEWPID, "pid"),
    "time": (CLONE_NEWTIME, "time"),
}

_FLAG_NAMES = {
    CLONE_NEWTIME: "CLONE_NEWTIME",
    CLONE_NEWNS: "CLONE_NEWNS",
    CLONE_NEWCGROUP: "CLONE_NEWCGROUP",
    CLONE_NEWUTS: "CLONE_NEWUTS",
    CLONE_NEWIPC: "CLONE_NEWIPC",
    CLONE_NEWUSER: "CLONE_NEWUSER",
    CLONE_NEWPID: "CLONE_NEWPID",
    CLONE_NEWNET: "CLONE_NEWNET",
    CLONE_FS: "CLONE_FS",
    CLONE_FILES: "CLONE_FILES",
    CLONE_SYSVSEM: "CLONE_SYSVSEM",
}


def flag_names(flags: int) -> str:
    """``CLONE_NEWNS|CLONE_NEWUTS`` for error messages; unknown bits in hex."""
    names = [name for bit, name in _FLAG_NAMES.items() if flags & bit]
    rest = flags & ~sum(bit for bit in _FLAG_NAMES if flags & bit)
    if rest or not names:
        names.append(hex(rest))
    return "|".join(names)


def unshare(flags: int) -> None:
    check(libc().unshare(flags), f"unshare({flag_names(flags)})")


def setns(fd: int, nstype: int = 0) -> None:
    """Join the namespace open at ``fd``; ``nstype`` 0 accepts any type."""
    check(libc().setns(fd, nstype), f"setns({fd}, {flag_names(nstype) if nstype else 0})")
