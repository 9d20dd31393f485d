"""Console logging shared by init and agent: ``[  2.345] INFO init: message``.

Deliberately not the ``logging`` module: PID 1 must start fast and must never
raise, so a write that fails is dropped rather than propagated.
"""

from __future__ import annotations

import os
import sys
import time

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Logger:
    def __init__(self, component: str, level: str = "info", fd: int | None = None) -> None:
        self.component = component
        self.threshold = LEVELS.get(level, 20)
        self.fd = sys.stderr.fileno() if fd is None else fd

    def set_level(self, level: str) -> None:
        self.threshold = LEVELS.get(level, self.threshold)

    def _emit(self, level: str, msg: str) -> None:
        if LEVELS[level] < self.threshold:
            return
        # CLOCK_BOOTTIME is the kernel's own clock, so lines line up with dmesg.
        stamp = time.clock_gettime(time.CLOCK_BOOTTIME)
        line = f"[{stamp:9.3f}] {level.upper():7} {self.component}: {msg}\n"
        try:
            os.write(self.fd, line.encode("utf-8", "replace"))
        except OSError:
            pass

    def debug(self, msg: str) -> None:
        self._emit("debug", msg)

    def info(self, msg: str) -> None:
        self._emit("info", msg)

    def warning(self, msg: str) -> None:
        self._emit("warning", msg)

    def error(self, msg: str) -> None:
        self._emit("error", msg)


def boottime_ms() -> float:
    """Milliseconds since the kernel started (includes time suspended)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) * 1000.0
