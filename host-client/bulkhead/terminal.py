"""The local terminal, for ``bulkhead run -it``: raw mode, window size, resize signals."""

from __future__ import annotations

import contextlib
import os
import signal
import termios
import tty
from collections.abc import Callable, Iterator
from types import FrameType


def is_terminal(fd: int) -> bool:
    return os.isatty(fd)


def window_size(fd: int) -> tuple[int, int] | None:
    """``(rows, cols)`` of the terminal on ``fd``; ``None`` if it is not one."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return size.lines, size.columns


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Put the terminal on ``fd`` in raw mode (no echo, no line editing, no signal keys).

    Keys such as Ctrl-C then arrive as bytes (``\\x03``) to send on to the container's
    terminal, whose own line discipline turns them into signals. The previous mode is
    restored however the block ends.
    """
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        # TCSADRAIN: let our last output through before the mode changes back.
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def on_resize(callback: Callable[[], None]) -> Iterator[None]:
    """Call ``callback`` (in the main thread) whenever the window changes size (SIGWINCH)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        callback()

    previous = signal.signal(signal.SIGWINCH, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)
