"""Power off or reboot: end every process, flush, unmount, and tell the kernel.

Contract (internals.md): SIGTERM everything, wait up to 3 s, SIGKILL the rest, sync,
unmount, reboot(2). The wait is a deadline loop on SIGCHLD, so a guest whose processes
exit at once powers off at once.
"""

from __future__ import annotations

import os
import time

from . import mounts, reaper, signals

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from .log import Logger

TERM_GRACE_S = 3.0
KILL_GRACE_S = 2.0  # after SIGKILL only a task stuck in the kernel survives; don't wait long

POWER_OFF = "power-off"
REBOOT = "reboot"


def _kill_all(signo: int) -> None:
    try:
        # From PID 1, -1 means every process in our PID namespace but ourselves.
        os.kill(-1, signo)
    except ProcessLookupError:
        pass  # nobody left


def drain(log: Logger, deadline: float, on_exit: Callable[[int, int], None]) -> bool:
    """Reap until no child is left (True) or ``deadline`` (monotonic) passes (False)."""
    while True:
        exited, alive = reaper.reap()
        for pid, status in exited:
            on_exit(pid, status)
        if not alive:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        signo = signals.wait(left)
        if signo not in (None, signals.SIGCHLD):
            log.info(f"ignoring {signals.name(signo)}: shutting down already")


def run(
    kind: str,
    log: Logger,
    on_exit: Callable[[int, int], None],
    unmount: bool = True,
) -> None:
    """The whole sequence. Returns only if reboot(2) failed (the caller keeps reaping)."""
    start = time.monotonic()
    log.info(f"{kind}: sending SIGTERM to all processes")
    _kill_all(signals.SIGTERM)
    if drain(log, start + TERM_GRACE_S, on_exit):
        log.info(f"{kind}: all processes exited after {(time.monotonic() - start) * 1000:.0f} ms")
    else:
        log.warning(f"{kind}: processes still running after {TERM_GRACE_S:.0f} s; sending SIGKILL")
        _kill_all(signals.SIGKILL)
        if not drain(log, time.monotonic() + KILL_GRACE_S, on_exit):
            log.error(f"{kind}: processes survived SIGKILL (stuck in the kernel?); going on")
    log.info(f"{kind}: syncing filesystems")
    os.sync()
    if unmount:
        count = mounts.unmount_all(log)
        log.info(f"{kind}: unmounted {count} filesystems")
    finish(kind, log)


def finish(kind: str, log: Logger) -> None:
    """The reboot(2) call itself; logs and returns if the kernel refuses."""
    from . import libc

    if os.getpid() != 1:  # belt and braces: main() refuses to run as anything but PID 1
        log.error(f"{kind}: not PID 1, not calling reboot(2)")
        return
    cmd = libc.RB_POWER_OFF if kind == POWER_OFF else libc.RB_AUTOBOOT
    log.info("powering off" if kind == POWER_OFF else "rebooting")
    try:
        libc.reboot(cmd)
    except OSError as exc:
        log.error(f"{kind} failed: {exc}")
