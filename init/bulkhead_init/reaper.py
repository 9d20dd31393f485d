"""Reap every child that has exited: ours and orphans the kernel reparented to PID 1."""

from __future__ import annotations

import os

# __WALL: also children created by clone() with an exit signal other than SIGCHLD.
_WALL = 0x40000000


def reap() -> tuple[list[tuple[int, int]], bool]:
    """Collect all exited children without blocking.

    Returns the (pid, wait status) pairs and whether any child is still alive. Several
    SIGCHLDs may merge into one, hence the loop until nothing is left.
    """
    exited: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG | _WALL)
        except ChildProcessError:
            return exited, False
        if pid == 0:
            return exited, True
        exited.append((pid, status))
