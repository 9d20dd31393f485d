"""Start a child with a clean slate: fork, set up, exec, and report exec errors.

Why not os.posix_spawn: glibc's posix_spawn leaves its two internal signals (32, 33)
ignored in the child, and an ignored signal survives exec, into the agent and every
container it starts. A plain fork from single-threaded PID 1 is cheap and lets the child
also claim a controlling terminal, which the debug shell needs.
"""

from __future__ import annotations

import fcntl
import os

from . import signals

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

TIOCSCTTY = 0x540E  # x86_64, <asm-generic/ioctls.h>


def spawn(
    argv: list[str],
    env: Mapping[str, str],
    *,
    output_fd: int | None = None,
    tty: str | None = None,
) -> int:
    """Start ``argv`` (searched in ``env``'s PATH) in a new session; return its pid.

    With ``tty``: stdin/stdout/stderr are that terminal, and it becomes the controlling
    terminal. Otherwise stdin is /dev/null and stdout/stderr are ``output_fd``.
    Raises OSError if the program cannot be executed.
    """
    env = dict(env)
    report_r, report_w = os.pipe()  # both close-on-exec: EOF means exec succeeded
    try:
        pid = os.fork()
    except OSError:
        os.close(report_r)
        os.close(report_w)
        raise
    if pid == 0:
        try:
            os.close(report_r)
            _child_setup(output_fd, tty)
            os.execvpe(argv[0], argv, env)
        except BaseException as exc:
            err = getattr(exc, "errno", None) or 0
            try:
                os.write(report_w, f"{err}:{exc}".encode(errors="replace"))
            finally:
                os._exit(127)
        os._exit(127)  # not reached: exec only comes back by raising
    os.close(report_w)
    try:
        report = b""
        while chunk := os.read(report_r, 4096):
            report += chunk
    finally:
        os.close(report_r)
    if report:
        os.waitpid(pid, 0)  # it has exited (127) already; don't leave it to the reaper
        err, _, text = report.decode(errors="replace").partition(":")
        raise OSError(int(err) if err.isdigit() else 0, text)
    return pid


def _child_setup(output_fd: int | None, tty: str | None) -> None:
    os.setsid()
    if tty is not None:
        fd = os.open(tty, os.O_RDWR)
        # Opening /dev/console never makes it the controlling terminal (the kernel treats
        # it as O_NOCTTY), so claim it explicitly; 1: take it even from another session.
        fcntl.ioctl(fd, TIOCSCTTY, 1)
        stdin = stdout = fd
    else:
        try:
            stdin = os.open("/dev/null", os.O_RDONLY)
        except OSError:
            stdin = 0  # no /dev/null yet: keep what init has
        stdout = 2 if output_fd is None else output_fd
    os.dup2(stdin, 0)
    os.dup2(stdout, 1)
    os.dup2(stdout, 2)
    signals.reset_for_exec()
