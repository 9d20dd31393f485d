"""Matching what an agent that died left behind: its records (``records``) against the
processes its spawner reports (``spawner.client.Adopted``). ``Manager.adopt`` does the rest.

The spawner is the truth about processes (alive, held, exited and how); the record is the
truth about what they are to the host (ids, spec, root, cgroup). A process in one and not in
the other was being made when the agent died: the host never heard it succeed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from ..spawner.client import Adopted
from .process import START_FAILED, ExitInfo

# What the spawner said of a process, beyond running and exited.
CREATED, FAILED, STARTING = "created", "failed", "starting"


def by_container(adopted: Iterable[Adopted]) -> dict[str, list[Adopted]]:
    found: dict[str, list[Adopted]] = {}
    for child in adopted:
        found.setdefault(child.container_id, []).append(child)
    return found


def take(children: list[Adopted], exec_id: str, pid: int) -> Adopted | None:
    """The spawner's record of one process of the container (removed from ``children``).

    A container id or exec id may have been used by an earlier process that failed to be
    made; the pid tells them apart when the agent got to know it, else the latest wins.
    """
    kind = "exec" if exec_id else "container"
    candidates = [c for c in children if c.kind == kind and c.exec_id == exec_id]
    if pid:
        candidates = [c for c in candidates if c.pid == pid] or candidates[-1:]
    if not candidates:
        return None
    child = candidates[-1]
    children.remove(child)
    return child


def failed_exit(child: Adopted) -> ExitInfo:
    """Setup or exec failed while the agent was away (a start it asked for, say)."""
    error = child.error
    if error is None:
        return ExitInfo(START_FAILED, child.pid, step="setup", message="failed to start")
    return ExitInfo(
        START_FAILED, child.pid, step=error.step, errno=error.errno, message=error.message
    )


def unknown_exit(pid: int) -> ExitInfo:
    """The record names a process the spawner never made (an exec under way at the agent's
    death): it never ran."""
    return ExitInfo(
        START_FAILED,
        pid,
        step="adopt",
        message="the agent restarted before the process was started",
    )


def restored_exit(saved: object) -> ExitInfo | None:
    """A start failure as the record kept it (``ExitInfo._asdict()``)."""
    if not isinstance(saved, dict):
        return None
    fields = {k: v for k, v in saved.items() if k in ExitInfo._fields}
    return ExitInfo(**fields)


def close_fds(children: Iterable[Adopted]) -> None:
    for child in children:
        for fd in child.fds.values():
            os.close(fd)
