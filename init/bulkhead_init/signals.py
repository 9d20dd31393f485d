"""Signals, tini-style: block the ones init acts on and collect them synchronously.

Blocked signals stay pending even for PID 1 (which the kernel otherwise shields from
signals it has no handler for), and ``sigtimedwait`` hands them over one at a time in the
single main loop: no handlers, no threads, no races with the rest of init.

``_signal`` instead of ``signal``: the public wrapper only adds enums, and ``enum`` costs
~6 ms to import natively (many times that under TCG).
"""

from __future__ import annotations

import _signal
import os

SIGCHLD = _signal.SIGCHLD
SIGHUP = _signal.SIGHUP
SIGINT = _signal.SIGINT
SIGKILL = _signal.SIGKILL
SIGTERM = _signal.SIGTERM
SIGUSR2 = _signal.SIGUSR2

HANDLED = frozenset((SIGCHLD, SIGTERM, SIGINT, SIGUSR2, SIGHUP))
_UNCATCHABLE = frozenset((SIGKILL, _signal.SIGSTOP))

_NAMES = {
    getattr(_signal, n): n
    for n in dir(_signal)
    if n.startswith("SIG") and not n.startswith("SIG_") and n not in ("SIGIOT", "SIGPOLL")
}


def block() -> None:
    _signal.pthread_sigmask(_signal.SIG_BLOCK, HANDLED)


def wait(timeout: float | None) -> int | None:
    """The next pending handled signal, or None after ``timeout`` seconds (None: forever)."""
    if timeout is None:
        return _signal.sigwaitinfo(HANDLED).si_signo
    info = _signal.sigtimedwait(HANDLED, max(timeout, 0.0))
    return None if info is None else info.si_signo


def reset_for_exec() -> None:
    """In a forked child: every disposition to default and nothing blocked.

    An ignored signal stays ignored across exec, and Python ignores SIGPIPE and SIGXFSZ
    itself (a test namespace may add SIGINT and SIGQUIT from a shell's background job).
    """
    for signo in _signal.valid_signals() - _UNCATCHABLE:
        try:
            _signal.signal(signo, _signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())


def name(signo: int) -> str:
    return _NAMES.get(signo, f"signal {signo}")


def describe(status: int) -> str:
    """A wait status in words: ``exit code 3`` or ``killed by SIGKILL``."""
    if os.WIFEXITED(status):
        return f"exit code {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        text = f"killed by {name(os.WTERMSIG(status))}"
        return text + " (core dumped)" if os.WCOREDUMP(status) else text
    return f"wait status {status:#x}"
