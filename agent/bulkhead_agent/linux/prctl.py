"""``prctl(2)`` operations the container setup and the spawner need."""

from __future__ import annotations

from .libc import check, libc

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_SET_DUMPABLE = 4
PR_GET_KEEPCAPS = 7
PR_SET_KEEPCAPS = 8
PR_SET_NAME = 15
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_LOWER = 3
PR_CAP_AMBIENT_CLEAR_ALL = 4


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    result = libc().prctl(option, arg2, arg3, arg4, arg5)
    return check(result, f"prctl({option}, {arg2}, {arg3}, {arg4}, {arg5})")


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def get_no_new_privs() -> bool:
    return bool(prctl(PR_GET_NO_NEW_PRIVS))


def set_child_subreaper(on: bool = True) -> None:
    """Orphaned descendants are re-parented to us (and reaped by us) instead of to PID 1."""
    prctl(PR_SET_CHILD_SUBREAPER, int(on))


def set_pdeathsig(signo: int) -> None:
    """Deliver ``signo`` to this process when the thread that forked it dies (0: never)."""
    prctl(PR_SET_PDEATHSIG, signo)


def set_keepcaps(on: bool) -> None:
    """Keep the permitted capabilities across a setuid() away from uid 0."""
    prctl(PR_SET_KEEPCAPS, int(on))


def capbset_read(cap: int) -> bool:
    return bool(prctl(PR_CAPBSET_READ, cap))


def capbset_drop(cap: int) -> None:
    prctl(PR_CAPBSET_DROP, cap)


def cap_ambient_raise(cap: int) -> None:
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)


def cap_ambient_clear_all() -> None:
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def cap_ambient_is_set(cap: int) -> bool:
    return bool(prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, cap))
